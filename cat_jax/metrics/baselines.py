"""No-learning baselines a tokenizer must beat.

``area_bicubic``: average-pool the image to a level's latent grid (H/f, W/f) and resize it back with bicubic
interpolation. It keeps 3 numbers per latent position (the tokenizer keeps ``z_channels``), so any learned tokenizer
worth its compute reconstructs better at every level.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from cat_jax import levels as L


def area_bicubic(images: jax.Array, level: int) -> jax.Array:
  """Images (B, H, W, C) in [-1, 1] pooled to the level's grid and upsampled bicubically, clipped to [-1, 1]."""
  f = L.factor_for_level(level)
  b, h, w, c = images.shape
  if h % f or w % f:
    raise ValueError(f"image sides must be multiples of {f} for level {level} ({L.level_name(level)}), got {h}x{w}")
  small = jnp.asarray(images, jnp.float32).reshape(b, h // f, f, w // f, f, c).mean(axis=(2, 4))
  return jnp.clip(jax.image.resize(small, (b, h, w, c), method="bicubic"), -1.0, 1.0)
