"""Pixel reconstruction losses (means over every element, computed in at least float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("l1", "l2")


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


def reconstruction_loss(x: jax.Array, y: jax.Array, kind: str = "l1") -> jax.Array:
  """``l1_loss`` or ``l2_loss`` of ``x`` against ``y``, chosen by ``kind``."""
  if kind == "l1":
    return l1_loss(x, y)
  if kind == "l2":
    return l2_loss(x, y)
  raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
