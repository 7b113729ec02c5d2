"""Pixel reconstruction losses (computed in at least float32).

``l1`` and ``l2`` are means over every element. ``log_mse`` is the mean over images of ``log(MSE_i + floor)``: up
to a constant factor, minus the mean per-image PSNR that evaluation reports, with ``floor`` at its 50 dB cap. Each
image's error counts relative to its own size, so an image a linear code reproduces almost exactly (a flat colour)
is pushed to stay so, where L2 would trade its few grey levels for a little on a busy image.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from cat_jax.losses.perceptual import perceptual_loss

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


def weighted_reconstruction_loss(images: jax.Array, recon: jax.Array, *, kind: str = "l1", weight: float = 1.0,
                                 lpips_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
                                 lpips_weight: float = 0.0,
                                 log_mse_weight: float = 0.0) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
  """The generator's reconstruction objective (taming's ``nll``, no KL): ``weight * reconstruction_loss(kind)
  + lpips_weight * LPIPS (+ log_mse_weight * log_mse_loss)``. Returns ``(total, (pixel loss, LPIPS))``; LPIPS is 0
  without ``lpips_weight``. ``lpips_fn``: a frozen distance ``(x, y) -> (B,)`` (``perceptual_loss``)."""
  pixel = reconstruction_loss(images, recon, kind)
  lpips = jnp.zeros(())
  if lpips_weight > 0:
    lpips = perceptual_loss(lpips_fn, recon, images)
  total = weight * pixel + lpips_weight * lpips
  if log_mse_weight > 0:
    total += log_mse_weight * log_mse_loss(images, recon)
  return total, (pixel, lpips)
