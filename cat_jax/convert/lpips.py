"""torchvision VGG16 + `lpips` v0.1 linear heads -> Flax params of ``cat_jax.models.lpips.LPIPS``.

Two public files make LPIPS-VGG:
  * torchvision's ImageNet VGG16 (``vgg16-397923af.pth``, in the torch hub cache once torchvision
    has downloaded it, or anywhere via ``--torch-weights``);
  * the ``lpips`` package's linear heads ``lpips/weights/v0.1/vgg.pth`` (shipped inside the
    installed package).

``python -m cat_jax.convert lpips --out ~/.cache/cat_jax/lpips_vgg16_v0.1.msgpack``
"""

from __future__ import annotations

import pathlib
import re
from typing import Any, Mapping

import numpy as np

from cat_jax import weights

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_FILENAME = "vgg16-397923af.pth"

# Index in torchvision's vgg16().features of each conv, in order conv1_1 .. conv5_3.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CONV_NAMES = ("conv1_1", "conv1_2", "conv2_1", "conv2_2", "conv3_1", "conv3_2", "conv3_3",
                    "conv4_1", "conv4_2", "conv4_3", "conv5_1", "conv5_2", "conv5_3")
NUM_HEADS = 5

# Accepted spellings of a VGG16 feature layer: torchvision (features.i), the lpips module
# (net.sliceN.i) and a bare features Sequential (i).
_VGG_KEY = re.compile(r"^(?:features\.|net\.slice\d\.)?(\d+)\.(weight|bias)$")
_LIN_KEY = re.compile(r"^lins?\.?(\d)\.model\.1\.weight$")


def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor; avoids importing torch here
    value = value.detach().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def convert_torch_lpips(vgg_state_dict: Mapping[str, Any],
                        lin_state_dict: Mapping[str, Any]) -> dict:
  """Maps torch state dicts to the ``params`` collection of ``LPIPS``.

  Args:
    vgg_state_dict: torchvision ``vgg16().state_dict()`` (``features.i.*``; classifier keys are
      ignored), an ``lpips.LPIPS`` state dict (``net.sliceN.i.*``), or a bare features dict.
    lin_state_dict: the ``lpips`` heads (``lin{k}.model.1.weight`` or ``lins.{k}...``), e.g.
      ``lpips/weights/v0.1/vgg.pth`` or a whole ``lpips.LPIPS`` state dict.

  Returns:
    ``{'vgg': {'conv1_1': {'kernel', 'bias'}, ...}, 'lin0': {'kernel'}, ...}`` of float32 numpy
    arrays (conv kernels HWIO, head kernels (C, 1)).
  """
  by_index: dict[int, dict[str, np.ndarray]] = {}
  for key, value in vgg_state_dict.items():
    match = _VGG_KEY.match(key)
    if match:
      by_index.setdefault(int(match.group(1)), {})[match.group(2)] = _to_numpy(value)
  vgg = {}
  for index, name in zip(VGG16_CONV_INDICES, VGG16_CONV_NAMES):
    layer = by_index.get(index, {})
    if set(layer) != {"weight", "bias"}:
      raise KeyError(
          f"VGG16 state dict lacks features.{index}.weight/bias ({name}); expected torchvision "
          f"vgg16 keys 'features.<i>.*' or lpips keys 'net.slice<n>.<i>.*', got e.g. "
          f"{sorted(vgg_state_dict)[:5]}")
    # torch OIHW cross-correlation -> flax HWIO (flax convs are cross-correlations too).
    vgg[name] = {"kernel": layer["weight"].transpose(2, 3, 1, 0), "bias": layer["bias"]}

  heads = {}
  for key, value in lin_state_dict.items():
    match = _LIN_KEY.match(key)
    if match:
      heads.setdefault(int(match.group(1)), _to_numpy(value))  # lin{k} and lins.{k} are equal
  params: dict = {"vgg": vgg}
  missing = [f"lin{k}.model.1.weight" for k in range(NUM_HEADS) if k not in heads]
  if missing:
    raise KeyError(f"lpips state dict lacks {missing}; got keys {sorted(lin_state_dict)[:10]}")
  for k in range(NUM_HEADS):
    weight = heads[k]  # (1, C, 1, 1)
    params[f"lin{k}"] = {"kernel": weight[:, :, 0, 0].T.copy()}
  return params


def lpips_linear_weights_path() -> pathlib.Path:
  """The v0.1 VGG heads shipped inside the installed ``lpips`` package."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.find_spec("lpips")
  if spec is None or spec.origin is None:
    raise FileNotFoundError(
        "The `lpips` package is not installed; it ships the LPIPS linear weights "
        "(lpips/weights/v0.1/vgg.pth). Install it with `pip install lpips`.")
  return pathlib.Path(spec.origin).parent / "weights" / "v0.1" / "vgg.pth"


def convert_cli(torch_weights: str | None, out: str) -> None:
  """Converts torchvision VGG16 (``torch_weights`` or the hub cache) + lpips v0.1 heads to ``out``."""
  import torch  # pylint: disable=g-import-not-at-top  # a conversion-time dependency only

  if torch_weights is None:
    vgg_path = weights.torch_hub_checkpoints_dir() / VGG16_FILENAME
  else:
    vgg_path = pathlib.Path(torch_weights).expanduser()
  weights.require_file(vgg_path, "torchvision VGG16 ImageNet weights", VGG16_URL)
  lin_path = weights.require_file(
      lpips_linear_weights_path(), "lpips v0.1 VGG linear weights",
      "https://github.com/richzhang/PerceptualSimilarity/raw/master/lpips/weights/v0.1/vgg.pth")
  vgg_state = torch.load(vgg_path, map_location="cpu", weights_only=True)
  lin_state = torch.load(lin_path, map_location="cpu", weights_only=True)
  weights.save_params(out, convert_torch_lpips(vgg_state, lin_state))
