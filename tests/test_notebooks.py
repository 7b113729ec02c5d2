"""The Colab demo notebook runs top to bottom on CPU (the shipped pretrained tokenizer, its knob-free levels="auto",
the encode and decode command lines), and the outputs stored in it are the shipped tokenizer's."""

import json
import os
import pathlib
import re

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
  images = [o for cell in nb.cells for o in cell.get("outputs", [])
            if {"image/png", "image/jpeg"} & set(o.get("data", {}))]
  assert images, "the side-by-side reconstructions were not displayed"
  assert "python -m cat_jax.decode" in outputs and "(exit status 0)" in outputs and "original" in outputs


def test_stored_outputs_are_the_shipped_tokenizers_without_local_paths():
  """Rerun the notebook (nbclient) whenever the shipped tokenizer changes: its outputs must name the shipped step."""
  shipped = json.loads((ROOT / "cat_jax" / "pretrained" / "demo" / "config.json").read_text())["step"]
  nb = nbformat.read(ROOT / "notebooks" / "cat_demo.ipynb", as_version=4)
  code = [cell for cell in nb.cells if cell.cell_type == "code"]
  assert all(cell.get("execution_count") for cell in code), "store the outputs of a full run"
  outputs = [o for cell in code for o in cell.get("outputs", [])]
  assert not [o for o in outputs if o.get("output_type") == "error"]
  text = "".join(o.get("text", "") or "".join(o.get("data", {}).get("text/plain", "")) for o in outputs)
  steps = {int(s.replace(",", "")) for s in re.findall(r"step ([0-9][0-9,]*)", text)}
  assert steps == {shipped}, (steps, shipped)
  assert not re.search(r"(/tmp/|/home/|/root/|/work/|/content/|[A-Z]:\\\\)", text), "a local path in the outputs"
  source = "".join(cell.source for cell in code)
  assert 'Tokenizer.from_pretrained(' in source and 'levels="auto"' in source
  assert not re.search(r"from cat_jax\.[a-z_]+ import|import cat_jax\.", source), "only the public API"
