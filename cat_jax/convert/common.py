"""Saving and loading converted (frozen) parameter trees, and locating public torch weights."""

from __future__ import annotations

import os
import pathlib

import flax.serialization
import jax
import numpy as np


def weights_dir() -> pathlib.Path:
  """Where converted weights live by default: $CAT_JAX_WEIGHTS or ~/.cache/cat_jax."""
  return pathlib.Path(os.environ.get("CAT_JAX_WEIGHTS", "~/.cache/cat_jax")).expanduser()


def torch_hub_checkpoints_dir() -> pathlib.Path:
  """torch.hub's checkpoint cache ($TORCH_HOME/hub/checkpoints, default ~/.cache/torch/...)."""
  torch_home = os.environ.get("TORCH_HOME", "~/.cache/torch")
  return pathlib.Path(torch_home).expanduser() / "hub" / "checkpoints"


def save_params(path: str | os.PathLike, params) -> None:
  """Writes a parameter pytree (numpy leaves) as a msgpack file."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  params = jax.tree.map(np.asarray, params)
  tmp = path.with_suffix(path.suffix + ".tmp")
  tmp.write_bytes(flax.serialization.msgpack_serialize(params))
  os.replace(tmp, path)  # never leave a half-written file under the final name


def load_params(path: str | os.PathLike):
  """Reads a parameter pytree written by ``save_params``."""
  path = pathlib.Path(path)
  if not path.exists():
    raise FileNotFoundError(
        f"No converted weights at {path}. Create them with `python -m cat_jax.convert ...` "
        "(see README, 'Pretrained weights').")
  return flax.serialization.msgpack_restore(path.read_bytes())


def require_file(path: pathlib.Path, what: str, url: str) -> pathlib.Path:
  """Returns ``path`` if it exists, else raises with download instructions."""
  if not path.exists():
    raise FileNotFoundError(
        f"{what} not found at {path}.\nThis machine cannot download it for you. Download\n  {url}\n"
        f"and place it at {path} (or pass its path explicitly).")
  return path
