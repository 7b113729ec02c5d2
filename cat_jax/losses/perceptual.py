"""Perceptual (LPIPS) reconstruction loss."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def perceptual_loss(lpips_fn: Callable[[jax.Array, jax.Array], jax.Array], x: jax.Array,
                    y: jax.Array) -> jax.Array:
  """Mean LPIPS distance over the batch (a scalar).

  Args:
    lpips_fn: a frozen distance ``(x, y) -> (B,)``, e.g. ``cat_jax.models.lpips.load_lpips()``.
    x: reconstructions, NHWC in [-1, 1] (NOT [0, 1]).
    y: targets, same shape and range.
  """
  return jnp.mean(lpips_fn(x, y))
