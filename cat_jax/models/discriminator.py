"""PatchGAN discriminator (the taming-transformers / VQGAN ``NLayerDiscriminator``).

The network scores overlapping patches of an image as real or fake: ``num_layers``
4x4 stride-2 convolutions, one 4x4 stride-1 convolution, then a 4x4 stride-1
convolution to one logit per patch. A 256x256 image with ``num_layers=3`` gives a
30x30 grid of logits, each with a 70x70-pixel receptive field.

Normalisation (``norm``):

* ``'none'``: plain convolutions with bias.
* ``'group'`` (default): GroupNorm after every hidden convolution except the first,
  where taming uses BatchNorm. GroupNorm is per-image, so the discriminator does not
  mix images of a batch (R1 penalties stay per-image) and needs no extra state.
* ``'spectral'``: every convolution wrapped in ``flax.linen.SpectralNorm``. Its
  power-iteration vectors live in the **'batch_stats'** collection, which ``init``
  creates. Train with ``update_stats=True`` and ``mutable=['batch_stats']`` and keep
  the returned stats; evaluate with ``update_stats=False``::

    variables = disc.init(rng, images)
    logits, updates = disc.apply(variables, images, update_stats=True,
                                 mutable=['batch_stats'])
    variables = {'params': new_params, 'batch_stats': updates['batch_stats']}
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

NORMS = ("none", "group", "spectral")
_KERNEL = (4, 4)
_PADDING = ((1, 1), (1, 1))
_MAX_CHANNEL_MULT = 8


def patch_logits_hw(image_hw: tuple[int, int], num_layers: int = 3) -> tuple[int, int]:
  """(height, width) of the logit grid ``PatchDiscriminator`` returns for ``image_hw``."""

  def side(n: int) -> int:
    for _ in range(num_layers):
      n //= 2  # 4x4 kernel, stride 2, padding 1
    return n - 2  # two 4x4 stride-1 convolutions with padding 1 each remove one pixel

  return side(image_hw[0]), side(image_hw[1])


class PatchDiscriminator(nn.Module):
  """Patch discriminator: NHWC images in [-1, 1] -> (B, h, w, 1) real/fake logits.

  Attributes:
    base_channels: channels of the first convolution; layer ``n`` has
      ``base_channels * min(2**n, 8)``.
    num_layers: number of stride-2 convolutions (taming's ``n_layers``).
    norm: 'none' | 'group' | 'spectral' (see the module docstring).
    num_groups: GroupNorm groups (reduced to a divisor of the channel count).
    dtype: computation dtype.
    param_dtype: parameter dtype.
  """

  base_channels: int = 64
  num_layers: int = 3
  norm: str = "group"
  num_groups: int = 32
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def _conv(self, x: jax.Array, features: int, stride: int, use_bias: bool, name: str,
            update_stats: bool) -> jax.Array:
    conv = nn.Conv(
        features, _KERNEL, strides=(stride, stride), padding=_PADDING, use_bias=use_bias,
        kernel_init=nn.initializers.normal(0.02),  # taming's weights_init
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    if self.norm == "spectral":
      return nn.SpectralNorm(conv, dtype=self.dtype, param_dtype=self.param_dtype,
                             name=f"{name}_spectral")(x, update_stats=update_stats)
    return conv(x)

  def _hidden(self, x: jax.Array, features: int, stride: int, index: int,
              update_stats: bool) -> jax.Array:
    group = self.norm == "group"
    x = self._conv(x, features, stride, use_bias=not group, name=f"conv_{index}",
                   update_stats=update_stats)
    if group:
      x = nn.GroupNorm(num_groups=math.gcd(self.num_groups, features), dtype=self.dtype,
                       param_dtype=self.param_dtype, name=f"norm_{index}")(x)
    return nn.leaky_relu(x, negative_slope=0.2)

  @nn.compact
  def __call__(self, images: jax.Array, *, update_stats: bool = False) -> jax.Array:
    """Returns patch logits (B, h, w, 1); ``update_stats`` only matters for 'spectral'."""
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    if self.num_layers < 1:
      raise ValueError(f"num_layers must be >= 1, got {self.num_layers}")
    if images.ndim != 4:
      raise ValueError(f"images must be NHWC (rank 4), got shape {images.shape}")
    out_hw = patch_logits_hw(images.shape[1:3], self.num_layers)
    if min(out_hw) < 1:
      raise ValueError(
          f"images of {images.shape[1]}x{images.shape[2]} are too small for num_layers="
          f"{self.num_layers}: need sides of at least {3 * 2**self.num_layers}")

    x = jnp.asarray(images, self.dtype)
    # The first layer is never normalised (taming), but is spectral-normalised under 'spectral'.
    x = self._conv(x, self.base_channels, 2, use_bias=True, name="conv_0",
                   update_stats=update_stats)
    x = nn.leaky_relu(x, negative_slope=0.2)
    mult = 1
    for n in range(1, self.num_layers):
      mult = min(2**n, _MAX_CHANNEL_MULT)
      x = self._hidden(x, self.base_channels * mult, 2, n, update_stats)
    mult = min(2**self.num_layers, _MAX_CHANNEL_MULT)
    x = self._hidden(x, self.base_channels * mult, 1, self.num_layers, update_stats)
    return self._conv(x, 1, 1, use_bias=True, name="logits", update_stats=update_stats)
