"""PSNR and SSIM, batched, in JAX.

Convention: images are NHWC and both arguments share one ``value_range=(lo, hi)``: (-1, 1) for our
images (the default), (0, 255) or (0, 1) for others. Each function returns one value per image, (B,),
float32; average them yourself (the literature reports the mean over images).

The values are those of the images mapped to [0, hi - lo], which is how the literature measures
(on uint8 images, or on [0, 1]); they equal scikit-image on each image:
``peak_signal_noise_ratio(x - lo, y - lo, data_range=hi - lo)`` and
``structural_similarity(x - lo, y - lo, data_range=hi - lo, channel_axis=-1, gaussian_weights=True,
sigma=1.5, use_sample_covariance=False)``, the Gaussian-window SSIM of Wang et al. (2004).
SSIM depends on the offset (its luminance term uses absolute means): scikit-image run directly on
[-1, 1] images gives other, lower numbers than on the same images in [0, 255].

Reported PSNR (``reported_psnr``, the one convention of the evaluator, the train loop's eval and the docs): both
images clipped to [-1, 1] and rounded to 8-bit levels (as an image written to PNG is), per image on [0, 1]
(equivalently [0, 255]), capped at ``PSNR_MAX_DB`` = 50 dB, then averaged over images.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

# The reporting convention (evaluator, train loop, docs): the mean over images of per-image PSNR, each capped at
# 50 dB (an error under 1/316 of the range), so a few exactly reconstructed flat images cannot dominate a mean.
PSNR_MAX_DB = 50.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scipy/skimage's default: an 11-tap window at sigma 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(x: jax.Array, y: jax.Array) -> None:
  if x.shape != y.shape or x.ndim != 4:
    raise ValueError(f"expected two NHWC batches of one shape, got {x.shape} and {y.shape}")


def _mean_per_image(v: jax.Array) -> jax.Array:
  # Rows first, then the image: short float32 sums keep the rounding error near 1e-7 also for
  # megapixel images.
  return jnp.mean(jnp.mean(v, axis=(2, 3)), axis=1)


def mse(x: jax.Array, y: jax.Array) -> jax.Array:
  """Mean squared error per image, (B,)."""
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  _check_pair(x, y)
  return _mean_per_image(jnp.square(x - y))


def psnr(x: jax.Array, y: jax.Array, *, value_range: tuple[float, float] = (-1.0, 1.0),
         max_db: float | None = None) -> jax.Array:
  """Peak signal-to-noise ratio in dB per image, (B,); ``inf`` where the images are equal, unless capped at
  ``max_db`` (what we report: ``PSNR_MAX_DB``)."""
  lo, hi = value_range
  db = 10.0 * jnp.log10((hi - lo) ** 2 / mse(x, y))
  return db if max_db is None else jnp.minimum(db, max_db)


def quantize_to_uint8_levels(images: jax.Array) -> jax.Array:
  """[-1, 1] images rounded to the 256 values an 8-bit image can hold (still in [-1, 1])."""
  return jnp.round((jnp.clip(images, -1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0


def reported_psnr(originals: jax.Array, reconstructions: jax.Array) -> jax.Array:
  """The PSNR we report, per image (B,): [-1, 1] images clipped and rounded to 8-bit levels, capped at 50 dB."""
  return psnr(quantize_to_uint8_levels(originals), quantize_to_uint8_levels(reconstructions),
              max_db=PSNR_MAX_DB)


def gaussian_kernel_1d(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
  """scipy.ndimage's normalised Gaussian taps (radius ``int(truncate * sigma + 0.5)``)."""
  radius = int(truncate * sigma + 0.5)
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  return taps / taps.sum()


def _separable_valid_filter(x: jax.Array, taps: np.ndarray) -> jax.Array:
  """Depthwise 'valid' filtering of NHWC ``x`` with ``taps`` along H and then W."""
  channels = x.shape[-1]
  k = jnp.asarray(taps, x.dtype)
  dn = ("NHWC", "HWIO", "NHWC")
  for kernel in (k[:, None, None, None], k[None, :, None, None]):
    x = jax.lax.conv_general_dilated(
        x, jnp.tile(kernel, (1, 1, 1, channels)), (1, 1), "VALID", dimension_numbers=dn,
        feature_group_count=channels, precision=jax.lax.Precision.HIGHEST)
  return x


def ssim(x: jax.Array, y: jax.Array, *, value_range: tuple[float, float] = (-1.0, 1.0),
         sigma: float = SSIM_SIGMA) -> jax.Array:
  """Structural similarity per image, (B,): Gaussian window (sigma 1.5, 11 taps), population
  covariances, K1=0.01, K2=0.03, averaged over the pixels at least one window radius from the border
  and over channels (as skimage, whose border strip is cropped before averaging).

  Images must be at least 11x11.
  """
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  _check_pair(x, y)
  taps = gaussian_kernel_1d(sigma)
  if min(x.shape[1:3]) < taps.size:
    raise ValueError(f"SSIM needs images of at least {taps.size}x{taps.size}, got {x.shape[1:3]}")
  # Map to [0, 1] (SSIM is scale-invariant as C1, C2 scale with the range, but not shift-invariant),
  # then subtract a per-image offset so the float32 variances E[x^2] - E[x]^2 lose little to
  # cancellation; the offset is added back to the means for the luminance term.
  lo, hi = value_range
  x, y = (x - lo) / (hi - lo), (y - lo) / (hi - lo)
  offset = jnp.mean(x + y, axis=(1, 2, 3), keepdims=True) / 2
  xc, yc = x - offset, y - offset
  c = x.shape[-1]
  stacked = jnp.concatenate([xc, yc, xc * xc, yc * yc, xc * yc], axis=-1)
  filtered = _separable_valid_filter(stacked, taps)
  ux_c, uy_c, uxx, uyy, uxy = (filtered[..., i * c:(i + 1) * c] for i in range(5))
  vx = uxx - ux_c * ux_c
  vy = uyy - uy_c * uy_c
  vxy = uxy - ux_c * uy_c
  ux, uy = ux_c + offset, uy_c + offset
  c1, c2 = SSIM_K1 ** 2, SSIM_K2 ** 2
  s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
  return _mean_per_image(s)
