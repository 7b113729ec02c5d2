"""Converts pytorch-fid's ``pt_inception-2015-12-05`` weights into ``cat_jax.models.inception``.

``python -m cat_jax.convert inception --out PATH [--torch-weights FILE]``. The torch file is the one
pytorch-fid downloads into the torch hub cache; this machine cannot download it, so it must already be
there (or be passed explicitly). torch is imported only inside the functions that read torch files.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, Mapping

import numpy as np

from cat_jax import weights

TORCH_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
TORCH_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                     + TORCH_WEIGHTS_NAME)
DEFAULT_OUT_NAME = "inception_fid.msgpack"

_BN_RENAMES = {"weight": ("params", "scale"), "bias": ("params", "bias"),
               "running_mean": ("batch_stats", "mean"), "running_var": ("batch_stats", "var")}


def convert_state_dict(state_dict: Mapping[str, Any]) -> dict:
  """torch FID Inception state dict (numpy or torch tensors) -> ``{'params', 'batch_stats'}``.

  Keys are those of ``pytorch_fid.inception.fid_inception_v3()`` (``Mixed_5b.branch1x1.conv.weight``);
  the ``blocks.i.j.`` keys of pytorch-fid's ``InceptionV3`` wrapper are not accepted. The classifier
  (``fc.*``) and ``num_batches_tracked`` are dropped: FID uses the 2048-d pool features.
  """
  variables: dict = {"params": {}, "batch_stats": {}}
  for key, value in state_dict.items():
    *path, layer, leaf = key.split(".")
    if not path or key.startswith(("fc.", "AuxLogits.")) or leaf == "num_batches_tracked":
      continue
    array = np.asarray(value.detach().cpu().numpy() if hasattr(value, "detach") else value,
                       dtype=np.float32)
    if layer == "conv" and leaf == "weight":
      collection, name = "params", "kernel"
      array = np.transpose(array, (2, 3, 1, 0))  # OIHW -> HWIO
    elif layer == "bn" and leaf in _BN_RENAMES:
      collection, name = _BN_RENAMES[leaf]
    else:
      raise ValueError(f"unexpected key in the Inception state dict: {key}")
    node = variables[collection]
    for part in (*path, layer):
      node = node.setdefault(part, {})
    node[name] = array
  _check_against_model(variables)
  return variables


def _check_against_model(variables: dict) -> None:
  """Raises ValueError unless ``variables`` has exactly the names and shapes of ``InceptionV3``."""
  import jax
  import jax.numpy as jnp
  from flax import traverse_util

  from cat_jax.models.inception import InceptionV3
  expected = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                            jnp.zeros((1, 299, 299, 3), jnp.float32))
  want = {k: tuple(v.shape) for k, v in traverse_util.flatten_dict(expected, sep="/").items()}
  got = {k: v.shape for k, v in traverse_util.flatten_dict(variables, sep="/").items()}
  missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  wrong = sorted(k for k in set(want) & set(got) if want[k] != got[k])
  if missing or unexpected or wrong:
    raise ValueError(
        "not the FID Inception (pt_inception-2015-12-05) state dict: "
        f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected "
        f"(e.g. {unexpected[:3]}), {len(wrong)} with other shapes (e.g. {wrong[:3]})")


def load_torch_state_dict(path: str | os.PathLike) -> dict:
  """Reads a torch checkpoint on the CPU."""
  import torch  # Only the converter needs torch.
  state_dict = torch.load(str(path), map_location="cpu", weights_only=True)
  return {k: v.numpy() for k, v in state_dict.items()}


def default_torch_weights_path() -> pathlib.Path:
  return weights.torch_hub_checkpoints_dir() / TORCH_WEIGHTS_NAME


def convert_cli(torch_weights: str | None, out: str) -> None:
  """Entry point of ``python -m cat_jax.convert inception``."""
  path = pathlib.Path(torch_weights) if torch_weights else default_torch_weights_path()
  weights.require_file(path, "pytorch-fid Inception weights", TORCH_WEIGHTS_URL)
  weights.save_params(out, convert_state_dict(load_torch_state_dict(path)))
