"""Adversarial losses and regularisers as pure functions (MAGVIT / taming-transformers style).

Logits are raw discriminator outputs of any shape (patch grids included); every loss
is a mean over all of them, computed in at least float32. Typical generator step::

  g_loss = generator_loss(fake_logit=d(fake))
  d_weight = adaptive_generator_weight(nll_grad=grad_nll_wrt_last_kernel,
                                       gan_grad=grad_g_loss_wrt_last_kernel)
  loss = nll + disc_weight * d_weight * g_loss     # from the discriminator's start step on (train.gan_in_step)
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

LOSS_TYPES = ("hinge", "non_saturating")


def _f32(x: jax.Array) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_loss_type(loss_type: str) -> None:
  if loss_type not in LOSS_TYPES:
    raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")


def discriminator_loss(*, real_logit: jax.Array, fake_logit: jax.Array,
                       loss_type: str = "hinge") -> jax.Array:
  """Discriminator loss, the average of its real and fake halves.

  hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))).
  non_saturating: 0.5 * (mean(softplus(-real)) + mean(softplus(fake))), i.e. binary
  cross-entropy with labels 1 for real and 0 for fake.
  """
  _check_loss_type(loss_type)
  real, fake = _f32(real_logit), _f32(fake_logit)
  if loss_type == "hinge":
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))
  return 0.5 * (jnp.mean(jax.nn.softplus(-real)) + jnp.mean(jax.nn.softplus(fake)))


def generator_loss(*, fake_logit: jax.Array, loss_type: str = "hinge") -> jax.Array:
  """Generator loss: hinge -mean(fake); non_saturating mean(softplus(-fake))."""
  _check_loss_type(loss_type)
  fake = _f32(fake_logit)
  if loss_type == "hinge":
    return -jnp.mean(fake)
  return jnp.mean(jax.nn.softplus(-fake))


def lecam_regularizer(*, real_logit: jax.Array, fake_logit: jax.Array, ema_real: jax.Array,
                      ema_fake: jax.Array) -> jax.Array:
  """LeCam regulariser (Tseng et al. 2021) for the discriminator loss.

  mean(relu(real - ema_fake)^2) + mean(relu(ema_real - fake)^2), where the EMAs are
  running means of the real and fake logits (see ``lecam_ema_update``). Add it to the
  discriminator loss with a small weight (MAGVIT uses 0.001).
  """
  real, fake = _f32(real_logit), _f32(fake_logit)
  ema_real, ema_fake = jax.lax.stop_gradient(_f32(ema_real)), jax.lax.stop_gradient(_f32(ema_fake))
  return (jnp.mean(jnp.square(jax.nn.relu(real - ema_fake)))
          + jnp.mean(jnp.square(jax.nn.relu(ema_real - fake))))


def lecam_ema_update(*, ema_real: jax.Array, ema_fake: jax.Array, real_logit: jax.Array,
                     fake_logit: jax.Array, decay: float = 0.999) -> tuple[jax.Array, jax.Array]:
  """New (ema_real, ema_fake): ``ema <- decay * ema + (1 - decay) * mean(logit)``.

  Start both EMAs at 0.0 (MAGVIT). The means are taken without gradient.
  """
  real_mean = jax.lax.stop_gradient(jnp.mean(_f32(real_logit)))
  fake_mean = jax.lax.stop_gradient(jnp.mean(_f32(fake_logit)))
  return (decay * _f32(ema_real) + (1.0 - decay) * real_mean,
          decay * _f32(ema_fake) + (1.0 - decay) * fake_mean)


def r1_penalty(discriminator_apply: Callable[[jax.Array], jax.Array],
               images: jax.Array) -> jax.Array:
  """R1 penalty (Mescheder et al. 2018): batch mean of ||grad_x D(x)||^2 on real images.

  ``discriminator_apply`` maps images (B, H, W, C) to logits (B, ...) and nothing else
  (close over params; with spectral norm use ``update_stats=False`` here). An image's
  score D(x) is the mean of its patch logits, so the penalty does not grow with the
  logit grid size; for a one-logit discriminator this is StyleGAN's R1. Images must not
  interact inside the discriminator (GroupNorm and spectral norm are per-image; batch
  norm is not). Unweighted: the loss term is ``gamma / 2 * r1_penalty(...)``. It is
  differentiable w.r.t. the discriminator's parameters (double backprop).
  """
  images = jnp.asarray(images)

  def summed_image_scores(x: jax.Array) -> jax.Array:
    logits = _f32(discriminator_apply(x))
    return jnp.sum(jnp.mean(logits.reshape(logits.shape[0], -1), axis=1))

  grads = _f32(jax.grad(summed_image_scores)(images))
  return jnp.mean(jnp.sum(jnp.square(grads).reshape(grads.shape[0], -1), axis=1))


def _global_norm(tree: Any) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(_f32(leaf))) for leaf in leaves))


def adaptive_generator_weight(*, nll_grad: Any, gan_grad: Any, eps: float = 1e-4,
                              max_weight: float = 1e4) -> jax.Array:
  """taming's adaptive GAN weight: ||nll_grad|| / (||gan_grad|| + eps), clipped to [0, max_weight].

  Both gradients are taken w.r.t. the decoder's last layer (its kernel, or any pytree of
  parameters: the norm is the global norm over leaves); ``nll_grad`` is the gradient of the
  reconstruction (+ perceptual) loss, ``gan_grad`` that of ``generator_loss``. The result
  is a stop-gradient scalar; multiply it by the configured discriminator weight.
  """
  weight = _global_norm(nll_grad) / (_global_norm(gan_grad) + eps)
  return jax.lax.stop_gradient(jnp.clip(weight, 0.0, max_weight))


def surrogate_generator_loss(recon: jax.Array, *, nll_grad: jax.Array, gan_grad: jax.Array,
                             gan_coef: jax.Array) -> jax.Array:
  """``<nll_grad + gan_coef * gan_grad, recon>`` without gradient through the first factor: a loss whose gradient
  w.r.t. whatever produced ``recon`` is that of ``nll + gan_coef * g_loss``, given their gradients w.r.t. ``recon``
  (taken once, and reused for ``adaptive_generator_weight``). Its value is not the loss's."""
  return jnp.sum(jax.lax.stop_gradient(nll_grad + gan_coef * gan_grad) * recon)
