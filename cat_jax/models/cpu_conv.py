"""The nested VAE's convolution: ``lax.conv_general_dilated``, except that on CPU a stride-1 NHWC convolution's
gradients are computed as two convolutions in XLA:CPU's canonical dimension order (see ``conv_general_dilated``)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

_NHWC = ("NHWC", "HWIO", "NHWC")


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, precision=None, **kwargs):
  """``lax.conv_general_dilated``, except that on CPU a stride-1 NHWC convolution's gradients are computed as two
  convolutions in XLA:CPU's canonical dimension order.

  XLA:CPU brings convolutions to that order itself, but not inside the branches of a ``conditional`` (our level
  switch), where lax's gradient convolutions (kernel-major weight gradients, transposed-kernel input gradients)
  then run ~13x slower (docs/performance.md). The values are the same; other backends get lax's own gradient.
  """
  plain = lambda: lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                           dimension_numbers, feature_group_count, precision=precision, **kwargs)
  if jax.default_backend() != "cpu" or kwargs or feature_group_count != 1 or lhs.ndim != 4:
    return plain()
  if set(window_strides) != {1} or set(lhs_dilation or (1,)) != {1} or set(rhs_dilation or (1,)) != {1}:
    return plain()
  if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != lax.conv_dimension_numbers(
      lhs.shape, rhs.shape, _NHWC):
    return plain()
  kernel = rhs.shape[:2]
  pads = (lax.padtype_to_pads(lhs.shape[1:3], kernel, (1, 1), padding) if isinstance(padding, str) else padding)
  pads = tuple((int(lo), int(hi)) for lo, hi in pads)
  if not all(0 <= p < k for (lo, hi), k in zip(pads, kernel) for p in (lo, hi)):
    return plain()
  return _conv_canonical_grad(lhs, rhs, pads, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_canonical_grad(x, w, pads, precision):
  return lax.conv_general_dilated(x, w, (1, 1), pads, dimension_numbers=_NHWC, precision=precision)


def _conv_canonical_grad_fwd(x, w, pads, precision):
  return _conv_canonical_grad(x, w, pads, precision), (x, w)


def _conv_canonical_grad_bwd(pads, precision, residuals, g):
  x, w = residuals
  kernel = w.shape[:2]
  # Input gradient: the output gradient convolved with the flipped kernel, inputs and outputs swapped.
  dx_pads = tuple((k - 1 - lo, k - 1 - hi) for (lo, hi), k in zip(pads, kernel))
  w_flipped = jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2)
  dx = lax.conv_general_dilated(g, w_flipped, (1, 1), dx_pads, dimension_numbers=_NHWC, precision=precision)
  # Kernel gradient: channels as the batch, the batch as the features, the output gradient as the kernel.
  dw = lax.conv_general_dilated(x.transpose(3, 1, 2, 0), g.transpose(1, 2, 0, 3), (1, 1), pads,
                                dimension_numbers=_NHWC, precision=precision).transpose(1, 2, 0, 3)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_conv_canonical_grad.defvjp(_conv_canonical_grad_fwd, _conv_canonical_grad_bwd)
