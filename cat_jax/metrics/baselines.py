"""No-learning baselines a tokenizer must beat.

``area_bicubic``: average-pool the image to a level's latent grid (H/f, W/f) and resize it back with bicubic
interpolation. It keeps 3 numbers per latent position (the tokenizer keeps ``z_channels``), so any learned tokenizer
worth its compute reconstructs better at every level.

``dct_code``: keep the lowest-frequency DCT coefficients of each f x f patch in YCbCr (JPEG's zig-zag order,
``cat_jax.models.patch_code``), as many numbers per latent position as the tokenizer has latent channels, and invert.
The stronger baseline: same numbers per position as the model, still no learning. A nested VAE with
``shortcuts=True`` starts exactly here (its residual branches are zero at init), so this row is also "what training
added".
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cat_jax import levels as L
from cat_jax.models import patch_code


def area_bicubic(images: jax.Array, level: int) -> jax.Array:
  """Images (B, H, W, C) in [-1, 1] pooled to the level's grid and upsampled bicubically, clipped to [-1, 1]."""
  f = L.factor_for_level(level)
  b, h, w, c = images.shape
  if h % f or w % f:
    raise ValueError(f"image sides must be multiples of {f} for level {level} ({L.level_name(level)}), got {h}x{w}")
  small = jnp.asarray(images, jnp.float32).reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))
  return jnp.clip(jax.image.resize(small, (b, h, w, c), method="bicubic"), -1.0, 1.0)


def dct_code(images: jax.Array, level: int, channels: int) -> jax.Array:
  """Images (B, H, W, 3) in [-1, 1] through the fixed DCT patch code with ``channels`` numbers per latent position."""
  f = L.factor_for_level(level)
  _, h, w, _ = images.shape
  if h % f or w % f:
    raise ValueError(f"image sides must be multiples of {f} for level {level} ({L.level_name(level)}), got {h}x{w}")
  code = patch_code.encode_patches(images, f, channels)
  return jnp.clip(patch_code.decode_patches(code, f), -1.0, 1.0)
