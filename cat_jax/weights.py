"""Weight folders: what ``Tokenizer.save_pretrained`` writes and ``from_pretrained`` / ``--config.init_from`` read.

A folder holds ``config.json`` (the run's config; ``model`` rebuilds the network) and ``model.safetensors``, the EMA
generator. A release for fine-tuning adds, optimiser-free, ``generator.safetensors`` (the raw generator the
optimiser was stepping) and ``discriminator.safetensors`` (its parameters under ``params/`` and, with spectral
normalisation, its power-iteration vectors under ``batch_stats/``). Tensors are float32 arrays named by their path
in the Flax tree, ``/``-joined (``enc_stages_0_0/conv1/kernel``; a '/' inside a name is written %2F), in Flax's
layouts (HWIO kernels).

Folders written before safetensors (``params.msgpack`` instead of ``model.safetensors``) still load.

Frozen converted networks (LPIPS, the FID Inception: ``python -m cat_jax.convert lpips|inception``) are single msgpack
files: ``save_params`` / ``load_params``, found under ``weights_dir()``.
"""

from __future__ import annotations

import json
import os
import pathlib
from typing import Any, Mapping

import numpy as np

CONFIG = "config.json"
MODEL = "model.safetensors"  # the EMA generator: what inference loads
GENERATOR = "generator.safetensors"  # the raw generator (optional)
DISCRIMINATOR = "discriminator.safetensors"  # the discriminator's params/ and batch_stats/ (optional)
LEGACY_MODEL = "params.msgpack"
FORMAT = {"format": "flax", "library": "cat_jax"}


def _escape(key: str) -> str:  # flax's SpectralNorm names its vectors 'conv_0/kernel/u': keep '/' for nesting
  return str(key).replace("%", "%25").replace("/", "%2F")


def _unescape(key: str) -> str:
  return key.replace("%2F", "/").replace("%25", "%")


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """``{"a": {"b": x}}`` -> ``{"a/b": x}`` (numpy leaves; a '/' inside a name is written %2F)."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      out.update(flatten(value, f"{prefix}{_escape(key)}/"))
    else:
      out[f"{prefix}{_escape(key)}"] = np.asarray(value)
  return out


def path_key(path) -> str:
  """The ``flatten`` name of a ``jax.tree_util`` key path (of dict keys)."""
  return "/".join(_escape(getattr(k, "key", k)) for k in path)


def unflatten(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
  """Inverse of ``flatten``."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = (_unescape(p) for p in name.split("/"))
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def save_tree(path: str | os.PathLike, tree: Mapping[str, Any], metadata: Mapping[str, str] | None = None) -> None:
  """Writes a pytree of arrays as one safetensors file (atomically: a crash never leaves a half-written file)."""
  from safetensors.numpy import save_file

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  flat = {k: np.array(v, order="C") for k, v in flatten(tree).items()}  # not ascontiguousarray: it makes 0-d 1-d
  tmp = path.with_name(path.name + ".tmp")
  save_file(flat, str(tmp), metadata={**FORMAT, **(metadata or {})})
  os.chmod(tmp, 0o644)  # safetensors creates it owner-only; weights are meant to be shared
  os.replace(tmp, path)


def load_tree(path: str | os.PathLike) -> dict[str, Any]:
  """Reads a pytree written by ``save_tree``."""
  from safetensors import safe_open

  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"no weights file at {path}")
  with safe_open(str(path), framework="numpy") as f:
    fmt = (f.metadata() or {}).get("format")
    if fmt not in (None, "flax"):
      raise ValueError(f"{path} holds {fmt!r} weights, not a cat_jax (Flax) folder's: a folder written by "
                       "`python -m cat_jax.convert to_torch` is for PyTorch (its modeling_cat.py loads it)")
    return unflatten({k: f.get_tensor(k) for k in f.keys()})


def model_file(folder: str | os.PathLike) -> pathlib.Path | None:
  """The generator weights of a folder: ``model.safetensors``, else a legacy ``params.msgpack``, else None."""
  folder = pathlib.Path(folder)
  for name in (MODEL, LEGACY_MODEL):
    if (folder / name).is_file():
      return folder / name
  return None


def is_folder(path: str | os.PathLike) -> bool:
  """Whether ``path`` is a weight folder (config.json + generator weights)."""
  path = pathlib.Path(path).expanduser()
  return (path / CONFIG).is_file() and model_file(path) is not None


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
  folder = pathlib.Path(folder).expanduser()
  if not is_folder(folder):
    found = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else "not a directory"
    raise FileNotFoundError(f"{folder} is not a tokenizer folder: it needs {CONFIG} and {MODEL} (found: {found}); "
                            "write one with Tokenizer.save_pretrained(DIR) or `python -m cat_jax.convert release`")
  return json.loads((folder / CONFIG).read_text())


def read_params(folder: str | os.PathLike, which: str = MODEL) -> dict[str, Any]:
  """The parameter tree ``which`` (``MODEL``, ``GENERATOR`` or ``DISCRIMINATOR``) of a folder."""
  folder = pathlib.Path(folder).expanduser()
  if which == MODEL:
    path = model_file(folder)
    if path is None:
      raise FileNotFoundError(f"{folder} has neither {MODEL} nor {LEGACY_MODEL}")
    if path.name == LEGACY_MODEL:
      return load_params(path)
    return load_tree(path)
  return load_tree(folder / which)


def write_folder(folder: str | os.PathLike, config: Mapping[str, Any], params: Mapping[str, Any], *,
                 generator: Mapping[str, Any] | None = None, discriminator: Mapping[str, Any] | None = None) -> None:
  """Writes ``config.json`` and ``model.safetensors`` (``params``), and the optional training-state files.

  ``discriminator``: ``{"params": ..., "batch_stats": ...}`` (``batch_stats`` may be empty).
  """
  folder = pathlib.Path(folder).expanduser()
  folder.mkdir(parents=True, exist_ok=True)
  save_tree(folder / MODEL, params)
  if generator is not None:
    save_tree(folder / GENERATOR, generator)
  if discriminator is not None:
    save_tree(folder / DISCRIMINATOR, {k: v for k, v in discriminator.items() if v})
  tmp = folder / (CONFIG + ".tmp")
  tmp.write_text(json.dumps(dict(config), indent=2, sort_keys=True, default=list))
  os.replace(tmp, folder / CONFIG)
  legacy = folder / LEGACY_MODEL
  if legacy.exists():  # one set of generator weights per folder
    legacy.unlink()


# -- converted frozen networks (LPIPS, Inception) ----------------------------------------------------------------
def weights_dir() -> pathlib.Path:
  """Where converted weights live by default: $CAT_JAX_WEIGHTS or ~/.cache/cat_jax."""
  return pathlib.Path(os.environ.get("CAT_JAX_WEIGHTS", "~/.cache/cat_jax")).expanduser()


def torch_hub_checkpoints_dir() -> pathlib.Path:
  """torch.hub's checkpoint cache ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/...)."""
  torch_home = os.environ.get("TORCH_HOME", "~/.cache/torch")
  return pathlib.Path(torch_home).expanduser() / "hub" / "checkpoints"


def save_params(path: str | os.PathLike, params) -> None:
  """Writes a parameter pytree (numpy leaves) as a msgpack file."""
  import flax.serialization
  import jax

  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  params = jax.tree.map(np.asarray, params)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_bytes(flax.serialization.msgpack_serialize(params))
  os.replace(tmp, path)  # never leave a half-written file under the final name


def load_params(path: str | os.PathLike):
  """Reads a parameter pytree written by ``save_params``."""
  import flax.serialization

  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"No converted weights at {path}. Create them with `python -m cat_jax.convert ...` "
        "(see docs/guide.md, 'Pretrained weights').")
  return flax.serialization.msgpack_restore(path.read_bytes())


def require_file(path: pathlib.Path, what: str, url: str) -> pathlib.Path:
  """Returns ``path`` if it exists, else raises with download instructions."""
  if not path.exists():
    raise FileNotFoundError(
        f"{what} not found at {path}.\nThis machine cannot download it for you. Download\n  {url}\n"
        f"and place it at {path} (or pass its path explicitly).")
  return path
