"""InceptionV3 as the FID reference uses it (pytorch-fid's FID variant), in Flax linen.

This is the network of ``pytorch_fid.inception.InceptionV3([3])`` with ``use_fid_inception=True``:
torchvision's Inception3 trunk with the FID-specific Mixed_5b-d (A), Mixed_6b-e (C) and Mixed_7b/c (E)
blocks, whose 3x3 average pools exclude padding (TensorFlow semantics) and whose last block max-pools.
Inputs are resized to 299x299 exactly as pytorch-fid does (bilinear, ``align_corners=False``, no
antialiasing, also when downsampling) and the output is the 2048-d global average pool.

Parameter names follow the torch state dict (``Mixed_5b/branch1x1/conv/kernel``...) so conversion is a
rename and a transpose; see ``cat_jax.convert.inception``.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
PrecisionLike = Any

FID_INPUT_SIZE = 299
FEATURE_DIM = 2048
# The batch-norm epsilon of torchvision's BasicConv2d (TF-slim's value).
_BN_EPSILON = 1e-3


def _source_indices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Two taps and the weight of the second, as torch's bilinear kernel with align_corners=False."""
  scale = np.float64(np.float32(in_size / out_size))
  # torch evaluates scale * (i + 0.5) - 0.5 as one fused multiply-add on a float32 scale: compute it
  # exactly (float64) and round once, or taps near the right edge move by a float32 ulp.
  src = ((np.arange(out_size) + 0.5) * scale - 0.5).astype(np.float32)
  src = np.maximum(src, np.float32(0.0))
  i0 = np.floor(src).astype(np.int32)
  i0 = np.minimum(i0, in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  lam = (src - i0).astype(np.float32)
  return i0, i1, lam


def resize_bilinear(images: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Bilinear resize of NHWC ``images`` to ``size``, identical to torch's
  ``F.interpolate(mode='bilinear', align_corners=False)`` (no antialiasing when downsampling,
  unlike ``jax.image.resize``)."""
  _, h, w, _ = images.shape
  out_h, out_w = size
  if (h, w) == (out_h, out_w):
    return images
  x = images
  # Width first, then height: the order of torch's CPU kernel.
  i0, i1, lam = _source_indices(w, out_w)
  lam = jnp.asarray(lam, x.dtype)[None, None, :, None]
  x = jnp.take(x, i0, axis=2) * (1 - lam) + jnp.take(x, i1, axis=2) * lam
  i0, i1, lam = _source_indices(h, out_h)
  lam = jnp.asarray(lam, x.dtype)[None, :, None, None]
  x = jnp.take(x, i0, axis=1) * (1 - lam) + jnp.take(x, i1, axis=1) * lam
  return x


def preprocess_for_fid(images: jax.Array, *, resize: bool = True) -> jax.Array:
  """[-1, 1] NHWC images -> the network's input, the way pytorch-fid prepares [0, 1] images.

  pytorch-fid resizes the [0, 1] image and then maps it to [-1, 1]; we do the same steps in the same
  order so the rounding matches.
  """
  x = (images.astype(jnp.float32) + 1.0) * 0.5
  if resize:
    x = resize_bilinear(x, (FID_INPUT_SIZE, FID_INPUT_SIZE))
  return 2.0 * x - 1.0


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nn.Module):
  """Conv (no bias) -> BatchNorm (running statistics, eps 1e-3) -> ReLU."""
  features: int
  kernel_size: int | Sequence[int]
  strides: int | Sequence[int] = 1
  padding: int | Sequence[int] = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    ph, pw = _pair(self.padding)
    x = nn.Conv(self.features, _pair(self.kernel_size), strides=_pair(self.strides),
                padding=((ph, ph), (pw, pw)), use_bias=False, dtype=self.dtype,
                param_dtype=self.param_dtype, precision=self.precision, name="conv")(x)
    x = nn.BatchNorm(use_running_average=True, epsilon=_BN_EPSILON, dtype=self.dtype,
                     param_dtype=self.param_dtype, name="bn")(x)
    return nn.relu(x)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  # TensorFlow's average pool: padded zeros are not counted (pytorch-fid's "Patch").
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)), count_include_pad=False)


def _max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class _Block(nn.Module):
  """Shared fields of the Mixed blocks."""
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = None

  def conv(self, features, kernel_size, name, strides=1, padding=0) -> BasicConv2d:
    return BasicConv2d(features, kernel_size, strides=strides, padding=padding, dtype=self.dtype,
                       param_dtype=self.param_dtype, precision=self.precision, name=name)


class FIDInceptionA(_Block):
  """Mixed_5b/c/d."""
  pool_features: int = 32

  @nn.compact
  def __call__(self, x):
    b1 = self.conv(64, 1, "branch1x1")(x)
    b5 = self.conv(48, 1, "branch5x5_1")(x)
    b5 = self.conv(64, 5, "branch5x5_2", padding=2)(b5)
    b3 = self.conv(64, 1, "branch3x3dbl_1")(x)
    b3 = self.conv(96, 3, "branch3x3dbl_2", padding=1)(b3)
    b3 = self.conv(96, 3, "branch3x3dbl_3", padding=1)(b3)
    bp = self.conv(self.pool_features, 1, "branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(_Block):
  """Mixed_6a (torchvision's, unchanged in the FID variant)."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv(384, 3, "branch3x3", strides=2)(x)
    bd = self.conv(64, 1, "branch3x3dbl_1")(x)
    bd = self.conv(96, 3, "branch3x3dbl_2", padding=1)(bd)
    bd = self.conv(96, 3, "branch3x3dbl_3", strides=2)(bd)
    return jnp.concatenate([b3, bd, _max_pool_3x3_stride2(x)], axis=-1)


class FIDInceptionC(_Block):
  """Mixed_6b/c/d/e."""
  channels_7x7: int = 128

  @nn.compact
  def __call__(self, x):
    c7 = self.channels_7x7
    b1 = self.conv(192, 1, "branch1x1")(x)
    b7 = self.conv(c7, 1, "branch7x7_1")(x)
    b7 = self.conv(c7, (1, 7), "branch7x7_2", padding=(0, 3))(b7)
    b7 = self.conv(192, (7, 1), "branch7x7_3", padding=(3, 0))(b7)
    bd = self.conv(c7, 1, "branch7x7dbl_1")(x)
    bd = self.conv(c7, (7, 1), "branch7x7dbl_2", padding=(3, 0))(bd)
    bd = self.conv(c7, (1, 7), "branch7x7dbl_3", padding=(0, 3))(bd)
    bd = self.conv(c7, (7, 1), "branch7x7dbl_4", padding=(3, 0))(bd)
    bd = self.conv(192, (1, 7), "branch7x7dbl_5", padding=(0, 3))(bd)
    bp = self.conv(192, 1, "branch_pool")(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1)


class InceptionD(_Block):
  """Mixed_7a (torchvision's, unchanged in the FID variant)."""

  @nn.compact
  def __call__(self, x):
    b3 = self.conv(192, 1, "branch3x3_1")(x)
    b3 = self.conv(320, 3, "branch3x3_2", strides=2)(b3)
    b7 = self.conv(192, 1, "branch7x7x3_1")(x)
    b7 = self.conv(192, (1, 7), "branch7x7x3_2", padding=(0, 3))(b7)
    b7 = self.conv(192, (7, 1), "branch7x7x3_3", padding=(3, 0))(b7)
    b7 = self.conv(192, 3, "branch7x7x3_4", strides=2)(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3_stride2(x)], axis=-1)


class FIDInceptionE(_Block):
  """Mixed_7b (``max_pool=False``: average pool without padding) and Mixed_7c (``max_pool=True``)."""
  max_pool: bool = False

  @nn.compact
  def __call__(self, x):
    b1 = self.conv(320, 1, "branch1x1")(x)
    b3 = self.conv(384, 1, "branch3x3_1")(x)
    b3 = jnp.concatenate([self.conv(384, (1, 3), "branch3x3_2a", padding=(0, 1))(b3),
                          self.conv(384, (3, 1), "branch3x3_2b", padding=(1, 0))(b3)], axis=-1)
    bd = self.conv(448, 1, "branch3x3dbl_1")(x)
    bd = self.conv(384, 3, "branch3x3dbl_2", padding=1)(bd)
    bd = jnp.concatenate([self.conv(384, (1, 3), "branch3x3dbl_3a", padding=(0, 1))(bd),
                          self.conv(384, (3, 1), "branch3x3dbl_3b", padding=(1, 0))(bd)], axis=-1)
    if self.max_pool:
      # The FID network max-pools here (a quirk of the TF graph; pytorch-fid keeps it).
      pooled = nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))
    else:
      pooled = _avg_pool_3x3_same(x)
    bp = self.conv(192, 1, "branch_pool")(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


class InceptionV3(nn.Module):
  """FID InceptionV3: NHWC images in [-1, 1] (any size) -> (B, 2048) pool features.

  Attributes:
    resize_input: resize to 299x299 the pytorch-fid way first (keep True for comparable FIDs).
    precision: conv precision; HIGHEST by default so GPU convs do not silently run in TF32.
  """
  resize_input: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: PrecisionLike = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    conv = functools.partial(BasicConv2d, **kw)
    x = preprocess_for_fid(images, resize=self.resize_input).astype(self.dtype)
    x = conv(32, 3, strides=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, 3, name="Conv2d_2a_3x3")(x)
    x = conv(64, 3, padding=1, name="Conv2d_2b_3x3")(x)
    x = _max_pool_3x3_stride2(x)
    x = conv(80, 1, name="Conv2d_3b_1x1")(x)
    x = conv(192, 3, name="Conv2d_4a_3x3")(x)
    x = _max_pool_3x3_stride2(x)
    x = FIDInceptionA(pool_features=32, name="Mixed_5b", **kw)(x)
    x = FIDInceptionA(pool_features=64, name="Mixed_5c", **kw)(x)
    x = FIDInceptionA(pool_features=64, name="Mixed_5d", **kw)(x)
    x = InceptionB(name="Mixed_6a", **kw)(x)
    x = FIDInceptionC(channels_7x7=128, name="Mixed_6b", **kw)(x)
    x = FIDInceptionC(channels_7x7=160, name="Mixed_6c", **kw)(x)
    x = FIDInceptionC(channels_7x7=160, name="Mixed_6d", **kw)(x)
    x = FIDInceptionC(channels_7x7=192, name="Mixed_6e", **kw)(x)
    x = InceptionD(name="Mixed_7a", **kw)(x)
    x = FIDInceptionE(max_pool=False, name="Mixed_7b", **kw)(x)
    x = FIDInceptionE(max_pool=True, name="Mixed_7c", **kw)(x)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))


def inception_apply_fn(variables, **module_kwargs) -> Callable[[jax.Array], jax.Array]:
  """A jitted ``images in [-1, 1] NHWC -> (B, 2048) float32`` function over fixed ``variables``."""
  model = InceptionV3(**module_kwargs)

  @jax.jit
  def features(images: jax.Array) -> jax.Array:
    return model.apply(variables, images)

  return features


def load_inception(path: str | os.PathLike | None = None, **module_kwargs
                   ) -> Callable[[jax.Array], jax.Array]:
  """Loads converted FID Inception weights and returns ``images in [-1, 1] NHWC -> (B, 2048)``.

  ``path`` defaults to ``weights_dir()/inception_fid.msgpack``, the converter's default output
  (``python -m cat_jax.convert inception --out PATH``). ``module_kwargs`` go to ``InceptionV3``.
  """
  from cat_jax import weights
  if path is None:
    path = weights.weights_dir() / "inception_fid.msgpack"
  variables = weights.load_params(path)
  variables = jax.tree.map(jnp.asarray, variables)
  return inception_apply_fn(variables, **module_kwargs)
