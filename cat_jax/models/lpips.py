"""LPIPS (VGG16, v0.1) in Flax linen: a frozen perceptual distance.

INPUT RANGE: images are NHWC float in **[-1, 1]**, like everywhere in cat_jax and like the
``lpips`` package's default (``normalize=False``). Feeding [0, 1] images is the most common
LPIPS bug: it runs, returns plausible-looking numbers and silently measures the wrong thing.
Convert with ``x * 2 - 1`` first; ``check_range`` catches the mistake on concrete arrays, and
``LPIPSDistance(..., check_inputs=True)`` runs it on every eager call.

The network matches ``lpips.LPIPS(net='vgg', version='0.1')``: the ScalingLayer, torchvision's
VGG16 ``features`` tapped at relu1_2, relu2_2, relu3_3, relu4_3 and relu5_3, per-position unit
normalisation over channels, squared difference, a bias-free 1x1 linear head per tap, spatial
mean, and the sum over taps. Weights come from ``python -m cat_jax.convert lpips``.
"""

from __future__ import annotations

import os
import pathlib
import warnings
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import weights

Dtype = Any

# ScalingLayer constants of the `lpips` package: (x - shift) / scale maps [-1, 1] images to
# (approximately) the ImageNet-normalised input torchvision's VGG16 was trained on.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10  # lpips.normalize_tensor's eps

# (block, convs per block, channels) of VGG16; block k ends in the tap relu{k}_{convs}.
VGG16_BLOCKS = ((1, 2, 64), (2, 2, 128), (3, 3, 256), (4, 3, 512), (5, 3, 512))
TAP_CHANNELS = tuple(c for _, _, c in VGG16_BLOCKS)
MIN_SIDE = 16  # four 2x2 max-pools before relu5_3: smaller images leave an empty tap

DEFAULT_FILENAME = "lpips_vgg16_v0.1.msgpack"


def default_lpips_path() -> pathlib.Path:
  """Default converted-weights file: ``weights_dir() / 'lpips_vgg16_v0.1.msgpack'``."""
  return weights.weights_dir() / DEFAULT_FILENAME


def scale_inputs(x: jax.Array) -> jax.Array:
  """The LPIPS ScalingLayer: [-1, 1] image -> VGG input, per channel (NHWC)."""
  shift = jnp.asarray(SHIFT, x.dtype)
  scale = jnp.asarray(SCALE, x.dtype)
  return (x - shift) / scale


def normalize_channels(features: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """Divides each position's channel vector by its L2 norm (+ eps), as ``lpips.normalize_tensor``.

  Forward values are the reference's exactly. The gradient differs only at positions whose
  features are all zero (dead ReLUs): torch gives NaN there (d sqrt(0)), this gives 0.
  """
  sq = jnp.sum(jnp.square(features), axis=-1, keepdims=True)
  positive = sq > 0
  norm = jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)
  return features / (norm + eps)


def check_inputs(x: jax.Array, y: jax.Array) -> None:
  """Raises ValueError unless x and y are matching NHWC RGB batches of at least 16x16."""
  for name, a in (("x", x), ("y", y)):
    if a.ndim != 4:
      raise ValueError(f"LPIPS expects NHWC images (rank 4), got {name} with shape {a.shape}.")
    if a.shape[-1] != 3:
      raise ValueError(
          f"LPIPS expects 3 RGB channels last (NHWC), got {name} with shape {a.shape}; "
          "NCHW torch-style arrays must be transposed with x.transpose(0, 2, 3, 1).")
    if min(a.shape[1:3]) < MIN_SIDE:
      raise ValueError(
          f"LPIPS needs images of at least {MIN_SIDE}x{MIN_SIDE} (VGG16 pools 4 times before "
          f"relu5_3), got {name} with shape {a.shape}.")
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}.")


def check_range(x: Any, name: str = "x", tol: float = 1e-3) -> None:
  """Debug helper for concrete arrays: are these [-1, 1] images?

  Raises ValueError when values leave [-1 - tol, 1 + tol] (e.g. [0, 255] images) and warns
  when no value is negative, the signature of [0, 1] images passed by mistake. Does nothing
  for traced values (inside jit/grad), where the values are unknown.
  """
  if isinstance(x, jax.core.Tracer):
    return
  x = np.asarray(x)
  lo, hi = float(x.min()), float(x.max())
  if lo < -1 - tol or hi > 1 + tol:
    raise ValueError(
        f"LPIPS expects {name} in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]. "
        "For uint8 images use x / 127.5 - 1; for [0, 1] images use x * 2 - 1.")
  if lo >= 0 and hi > 0:
    warnings.warn(
        f"LPIPS input {name} has no negative values (range [{lo:.4g}, {hi:.4g}]): it looks like "
        "a [0, 1] image, but LPIPS expects [-1, 1]. Convert with x * 2 - 1.", stacklevel=2)


class VGG16Features(nn.Module):
  """torchvision VGG16 ``features`` (3x3 convs, ReLU, 2x2 max-pool) returning the 5 LPIPS taps."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: jax.lax.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    taps = []
    for block, num_convs, channels in VGG16_BLOCKS:
      if block > 1:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")  # floors odd sizes, as torch
      for i in range(1, num_convs + 1):
        x = nn.Conv(channels, (3, 3), padding=((1, 1), (1, 1)), dtype=self.dtype,
                    param_dtype=self.param_dtype, precision=self.precision,
                    name=f"conv{block}_{i}")(x)
        x = nn.relu(x)
      taps.append(x)
    return tuple(taps)


class LPIPS(nn.Module):
  """LPIPS-VGG distance between two NHWC batches in [-1, 1]; returns shape (B,).

  Parameters: ``vgg`` (VGG16Features) and ``lin0`` .. ``lin4`` (bias-free 1x1 heads, kernel
  (C, 1)). Use ``LPIPS.load(path)`` for a frozen callable with converted weights bound.
  """
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: jax.lax.PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    check_inputs(x, y)
    batch = x.shape[0]
    # Scaling, norms, heads and the sum run in at least float32 even for a bfloat16 trunk.
    wide = jnp.promote_types(self.dtype, jnp.float32)
    # One trunk pass over both batches: same weights, twice the batch, better device use.
    both = scale_inputs(jnp.concatenate([x, y], axis=0).astype(wide))
    taps = VGG16Features(self.dtype, self.param_dtype, self.precision, name="vgg")(
        both.astype(self.dtype))
    distance = jnp.zeros((batch,), wide)
    for k, tap in enumerate(taps):
      tap = normalize_channels(tap.astype(wide))
      diff = jnp.square(tap[:batch] - tap[batch:])
      head = nn.Dense(1, use_bias=False, dtype=wide, param_dtype=self.param_dtype,
                      precision=self.precision, name=f"lin{k}")
      distance = distance + jnp.mean(head(diff), axis=(1, 2, 3))
    return distance

  @classmethod
  def load(cls, path: str | os.PathLike | None = None, **kwargs) -> LPIPSDistance:
    """Same as ``load_lpips``."""
    return load_lpips(path, **kwargs)


def _check_tree(params, module: LPIPS) -> None:
  """Raises ValueError when ``params`` do not have LPIPS-VGG's structure and shapes."""
  dummy = jax.ShapeDtypeStruct((1, MIN_SIDE, MIN_SIDE, 3), jnp.float32)
  expected = jax.eval_shape(module.init, jax.random.key(0), dummy, dummy)["params"]
  expected_shapes = jax.tree.map(lambda a: tuple(a.shape), expected)
  try:
    got_shapes = jax.tree.map(lambda a: tuple(np.shape(a)), params)
  except Exception as e:  # noqa: BLE001 - any malformed tree gets the same explanation
    raise ValueError(f"LPIPS params are not a parameter tree: {e}") from e
  if got_shapes != expected_shapes:
    raise ValueError(
        "LPIPS params do not match LPIPS-VGG16: expected shapes\n"
        f"{expected_shapes}\ngot\n{got_shapes}\n"
        "Re-create them with `python -m cat_jax.convert lpips --out PATH`.")


class LPIPSDistance:
  """Frozen LPIPS: ``lpips_distance(x, y) -> (B,)`` with converted params bound.

  The params live in ``self.params``, a tree of their own: keep them out of any optimiser
  state. They enter the computation through ``jax.lax.stop_gradient``, so gradients flow to
  the images only. Inputs: NHWC in [-1, 1] (see the module docstring).
  """

  def __init__(self, params, *, dtype: Dtype = jnp.float32,
               precision: jax.lax.PrecisionLike = None, check_inputs: bool = False,
               validate: bool = True):
    """Args:
      params: the ``params`` collection of ``LPIPS`` (as written by the converter).
      dtype: compute dtype of the VGG trunk (normalisation and heads: at least float32).
      precision: matmul/conv precision, e.g. ``'highest'`` for parity checks.
      check_inputs: run ``check_range`` on both inputs at every eager (non-traced) call.
      validate: check the tree's structure and shapes against the model now.
    """
    self.module = LPIPS(dtype=dtype, precision=precision)
    if validate:
      _check_tree(params, self.module)
    self.params = jax.tree.map(jnp.asarray, params)
    self.check_inputs = check_inputs

  def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
    if self.check_inputs:
      check_range(x, "x")
      check_range(y, "y")
    return _frozen_apply(self.module, self.params, x, y)


@jax.jit(static_argnums=0)
def _frozen_apply(module: LPIPS, params, x: jax.Array, y: jax.Array) -> jax.Array:
  return module.apply({"params": jax.lax.stop_gradient(params)}, x, y)


def load_lpips(path: str | os.PathLike | None = None, **kwargs) -> LPIPSDistance:
  """Loads converted LPIPS-VGG weights (default ``default_lpips_path()``) as a frozen callable.

  Keyword arguments go to ``LPIPSDistance`` (dtype, precision, check_inputs).
  """
  path = default_lpips_path() if path is None else pathlib.Path(path)
  return LPIPSDistance(weights.load_params(path), **kwargs)

