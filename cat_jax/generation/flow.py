"""Rectified flow (flow matching with the linear path, as in SiT) and its deterministic ODE sampler.

Convention: t = 0 is noise, t = 1 is data. ``x_t = t * x + (1 - t) * noise``; the network predicts the velocity
``v = x - noise`` (constant along the straight path) with a mean-squared error. Sampling integrates
``dx/dt = v(x_t, t)`` from noise at t = 0 to t = 1 with Euler or Heun steps: deterministic given the initial noise.

Classifier-free guidance: during training a label is replaced by the null class with probability
``class_dropout``; at sampling ``v = v_null + scale * (v_class - v_null)`` (scale 1: the conditional model).
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

TIME_SAMPLING = ("uniform", "logit_normal")
SOLVERS = ("euler", "heun")

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]  # (x, t (B,)) -> v


def sample_times(rng: jax.Array, n: int, how: str = "uniform") -> jax.Array:
  """Training times in (0, 1): uniform, or logit-normal (SD3's, more weight on the middle of the path)."""
  if how == "uniform":
    return jax.random.uniform(rng, (n,))
  if how == "logit_normal":
    return jax.nn.sigmoid(jax.random.normal(rng, (n,)))
  raise ValueError(f"time sampling must be one of {TIME_SAMPLING}, got {how!r}")


def drop_labels(rng: jax.Array, labels: jax.Array, null_class: int, class_dropout: float) -> jax.Array:
  """Each label becomes ``null_class`` with probability ``class_dropout`` (classifier-free guidance training)."""
  drop = jax.random.uniform(rng, labels.shape) < class_dropout
  return jnp.where(drop, null_class, labels)


def flow_matching_loss(apply_fn: Callable, params, x: jax.Array, labels: jax.Array, level, rng: jax.Array, *,
                       null_class: int, class_dropout: float = 0.1, time_sampling: str = "uniform"
                       ) -> jax.Array:
  """Mean squared error of the predicted velocity on the straight path from noise to ``x``.

  ``apply_fn(params, x_t, t, labels, level) -> v``; ``x`` (B, h, w, C) normalised latents of one level.
  """
  t_rng, noise_rng, drop_rng = jax.random.split(rng, 3)
  t = sample_times(t_rng, x.shape[0], time_sampling)
  noise = jax.random.normal(noise_rng, x.shape, x.dtype)
  x_t = t[:, None, None, None] * x + (1.0 - t[:, None, None, None]) * noise
  labels = drop_labels(drop_rng, labels, null_class, class_dropout)
  v = apply_fn(params, x_t, t, labels, level)
  return jnp.mean(jnp.square(v - (x - noise)))


def guided_velocity(apply_fn: Callable, params, labels: jax.Array, level, cfg_scale, *,
                    null_class: int) -> VelocityFn:
  """``(x, t) -> v`` with classifier-free guidance: one batched call on ``[x, x]`` with ``[labels, null]``."""

  def velocity(x, t):
    both = apply_fn(params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
                    jnp.concatenate([labels, jnp.full_like(labels, null_class)]), level)
    v_class, v_null = jnp.split(both, 2)
    return v_null + cfg_scale * (v_class - v_null)

  return velocity


def integrate(velocity: VelocityFn, noise: jax.Array, *, num_steps: int, solver: str = "euler") -> jax.Array:
  """Solves dx/dt = velocity(x, t) from ``noise`` at t = 0 to t = 1 in ``num_steps`` uniform steps."""
  if solver not in SOLVERS:
    raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  dt = 1.0 / num_steps
  batch = noise.shape[0]

  def step(i, x):
    t = jnp.full((batch,), i * dt, jnp.float32)
    v = velocity(x, t)
    if solver == "euler":
      return x + dt * v
    x_euler = x + dt * v  # Heun: average the slopes at both ends of the step
    return x + 0.5 * dt * (v + velocity(x_euler, t + dt))

  return jax.lax.fori_loop(0, num_steps, step, noise)


def sample(apply_fn: Callable, params, rng: jax.Array, labels: jax.Array, level, *, grid: tuple[int, int],
           channels: int, null_class: int, cfg_scale: float = 1.0, num_steps: int = 50, solver: str = "euler"
           ) -> jax.Array:
  """Normalised latents (B, h, w, C) of classes ``labels`` at ``level``; the same ``rng`` gives the same samples."""
  noise = jax.random.normal(rng, (labels.shape[0], *grid, channels), jnp.float32)
  velocity = guided_velocity(apply_fn, params, labels, level, cfg_scale, null_class=null_class)
  return integrate(velocity, noise, num_steps=num_steps, solver=solver)
