"""The Colab demo notebook runs top to bottom on CPU (the shipped pretrained tokenizer, JPEG complexity)."""

import os
import pathlib

import nbclient
import nbformat

from conftest import xla_flags

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_demo_notebook_executes(tmp_path):
  nb = nbformat.read(ROOT / "notebooks" / "cat_demo.ipynb", as_version=4)
  env = {"CAT_TOKENIZER": "demo", "JAX_PLATFORMS": "cpu", "XLA_FLAGS": xla_flags(1),
         "PYTHONPATH": str(ROOT)}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)  # the kernel inherits this process's environment
  try:
    client = nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                                     resources={"metadata": {"path": str(ROOT)}})
    client.execute()
  finally:
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
  outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
  assert "auto level" in outputs and "tokens/image" in outputs and "area+bicubic" in outputs
  assert "tokenizer 'demo'" in outputs  # the shipped pretrained tokenizer, loaded without a download
  images = [o for cell in nb.cells for o in cell.get("outputs", []) if "image/png" in o.get("data", {})]
  assert images, "the side-by-side reconstructions were not displayed"
