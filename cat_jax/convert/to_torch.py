"""A cat_jax tokenizer as a self-contained PyTorch folder (``python -m cat_jax.convert to_torch --src T --out DIR``).

DIR gets ``modeling_cat.py`` (this package's ``cat_jax/convert/modeling_cat.py``, torch only), ``model.safetensors``
(the generator in PyTorch names and layouts, float32) and ``config.json`` (``model``: the constructor's arguments;
``latent_scaling`` of a converted SD VAE; where the weights came from). docs/pytorch.md shows the three lines that
use it. Writing needs no torch: the weights are rearranged in numpy.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
from typing import Any, Mapping

import numpy as np

MODULE_FILE = pathlib.Path(__file__).with_name("modeling_cat.py")
# The NestedVAE fields the PyTorch module implements, and the values it implements for each (None: any value).
EXPORTABLE = {"ch": None, "ch_mult": None, "num_res_blocks": None, "z_channels": None, "in_channels": None,
              "head_attention": None, "logvar_range": None, "norm": ("group", "rms", "none"), "norm_groups": None,
              "shortcuts": None, "residual_gate": None}
TRAINING_ONLY = ("logvar_init", "dtype", "param_dtype")  # no effect on a float32 forward pass


def check_exportable(model_config: Mapping[str, Any]) -> dict[str, Any]:
  """The constructor arguments of ``modeling_cat.CATTokenizer`` for a ``config.model``; raises ValueError naming
  every option the PyTorch module does not implement."""
  problems = []
  for key, value in model_config.items():
    if key in TRAINING_ONLY:
      continue
    if key not in EXPORTABLE:
      problems.append(f"model.{key}={value!r} (the PyTorch module has no such option)")
    elif EXPORTABLE[key] is not None and value not in EXPORTABLE[key]:
      problems.append(f"model.{key}={value!r} (it implements {', '.join(map(repr, EXPORTABLE[key]))})")
  if problems:
    raise ValueError("cannot export to PyTorch: " + "; ".join(problems))
  out = {k: v for k, v in model_config.items() if k in EXPORTABLE}
  return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def torch_key(path: tuple[str, ...]) -> str:
  """A Flax parameter path as the PyTorch module's state-dict name (``enc_stages_0_1/conv1/kernel`` ->
  ``enc_stages.0.1.conv1.weight``)."""
  parts: list[str] = []
  for p in path:
    if p in ("GroupNorm_0", "RMSNorm_0"):
      continue
    if m := re.fullmatch(r"(enc_stages|dec_stages)_(\d+)_(\d+)", p):
      parts += m.groups()
    elif m := re.fullmatch(r"(enc_exit|dec_entry|enc_down|dec_up)_(\d+)", p):
      parts += m.groups()
    elif p == "Conv_0":
      parts.append("conv")
    elif p in ("kernel", "scale"):
      parts.append("weight")
    else:
      parts.append(p)
  return ".".join(parts)


def torch_value(path: tuple[str, ...], value) -> np.ndarray:
  """A Flax array in PyTorch's layout: HWIO -> OIHW convolution kernels, (in, out) -> (out, in) dense ones."""
  a = np.asarray(value, np.float32)
  if path[-1] == "kernel":
    a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T
  return np.array(a, np.float32, order="C")  # a writable copy (torch.from_numpy wants one)


def torch_state_dict(params: Mapping, *, prefix: str = "") -> dict[str, np.ndarray]:
  """A Flax parameter tree (NestedVAE or PatchDiscriminator) as a PyTorch state dict of numpy arrays."""
  return {prefix + torch_key(path): torch_value(path, v) for path, v in _flatten(params).items()}


def export(tokenizer, out: str | os.PathLike, *, source: str | None = None) -> pathlib.Path:
  """Writes ``tokenizer`` (a ``cat_jax.Tokenizer``) as a PyTorch folder; returns its path."""
  import jax
  from safetensors.numpy import save_file

  config = tokenizer.export_config()
  model = check_exportable(config["model"])
  out = pathlib.Path(out).expanduser()
  out.mkdir(parents=True, exist_ok=True)
  state = torch_state_dict(jax.device_get(tokenizer.params))
  tmp = out / "model.safetensors.tmp"
  save_file(state, str(tmp), metadata={"format": "pt", "library": "cat_jax"})
  os.chmod(tmp, 0o644)
  os.replace(tmp, out / "model.safetensors")
  shutil.copyfile(MODULE_FILE, out / MODULE_FILE.name)
  torch_config = {"model": model, "levels": {"0": "8x", "1": "16x", "2": "32x"}, "step": config.get("step"),
                  "latent_scaling": config.get("latent_scaling"), "source": source,
                  "image_size": (config.get("data") or {}).get("image_size")}
  (out / "config.json").write_text(json.dumps(torch_config, indent=2, sort_keys=True))
  return out


def convert_cli(src: str | None, out: str, *, step: int | None = None) -> None:
  """``python -m cat_jax.convert to_torch --src TOKENIZER --out DIR``."""
  import jax

  from cat_jax.tokenizer import load_tokenizer

  if src is None:
    raise FileNotFoundError("to_torch needs --src TOKENIZER: a shipped name (demo), a tokenizer folder or a "
                            "training workdir")
  tok = load_tokenizer(src, step=step, batch_size=1)
  folder = export(tok, out, source=str(src))
  n = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(tok.params))
  print(f"PyTorch tokenizer ({n:,} parameters, step {tok.step}) in {folder}: modeling_cat.py, model.safetensors, "
        "config.json (docs/pytorch.md)")

