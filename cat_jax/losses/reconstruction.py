"""Pixel reconstruction losses (computed in at least float32).

``l1`` and ``l2`` are means over every element. ``log_mse`` is the mean over images of ``log(MSE_i + floor)``: up
to a constant factor, minus the mean per-image PSNR that evaluation reports, with ``floor`` at its 50 dB cap. Each
image's error counts relative to its own size, so an image a linear code reproduces almost exactly (a flat colour)
is pushed to stay so, where L2 would trade its few grey levels for a little on a busy image.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("l1", "l2", "log_mse")
# MSE on [-1, 1] of an image at the reported 50 dB cap (image_quality.PSNR_MAX_DB): 4 * 10^-5.
LOG_MSE_FLOOR = 4.0 * 10.0 ** (-50.0 / 10.0)


def _difference(x: jax.Array, y: jax.Array) -> jax.Array:
  x, y = jnp.asarray(x), jnp.asarray(y)
  if x.shape != y.shape:
    raise ValueError(f"x and y must have the same shape, got {x.shape} and {y.shape}")
  # bf16 means over a whole batch of images lose digits; accumulate in float32 (or wider).
  dtype = jnp.promote_types(jnp.result_type(x, y), jnp.float32)
  return x.astype(dtype) - y.astype(dtype)


def l1_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean absolute error over all elements."""
  return jnp.mean(jnp.abs(_difference(x, y)))


def l2_loss(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error over all elements."""
  return jnp.mean(jnp.square(_difference(x, y)))


def log_mse_loss(x: jax.Array, y: jax.Array, floor: float = LOG_MSE_FLOOR) -> jax.Array:
  """Mean over images (axis 0) of ``log(mean squared error of the image + floor)``."""
  d = _difference(x, y)
  per_image = jnp.mean(jnp.square(d).reshape(d.shape[0], -1), axis=1)
  return jnp.mean(jnp.log(per_image + floor))


def reconstruction_loss(x: jax.Array, y: jax.Array, kind: str = "l1") -> jax.Array:
  """``l1_loss``, ``l2_loss`` or ``log_mse_loss`` of ``x`` against ``y``, chosen by ``kind``."""
  if kind == "l1":
    return l1_loss(x, y)
  if kind == "l2":
    return l2_loss(x, y)
  if kind == "log_mse":
    return log_mse_loss(x, y)
  raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
