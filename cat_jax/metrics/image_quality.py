"""PSNR, SSIM, MS-SSIM, HaarPSI and GMSD, batched, in JAX, and the registry of measures by name.

Convention (PSNR, SSIM): images are NHWC and both arguments share one ``value_range=(lo, hi)``: (-1, 1) for our
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

MS-SSIM, HaarPSI and GMSD take RGB (or grey) NHWC images in [0, 1] and equal ``piq`` 0.8.0's
``multi_scale_ssim``, ``haarpsi`` and ``gmsd`` (``data_range=1.``, ``reduction='none'``); GMSD is a distortion
(0 for identical images, lower is better). Two differences: piq's MS-SSIM refuses images under 161 px a side; ours
uses the scales that fit (``ms_ssim_scales``) with renormalised weights and logs a warning once per size. And
HaarPSI of two black images is 1 (piq: inf).

The registry (``MEASURES``, ``quality``, ``qualities``): every quality that is reported or optimised goes through
it by name. ``quality(name, originals, reconstructions)`` takes our [-1, 1] images, rounds them to 8-bit levels as
``reported_psnr`` does, maps them to [0, 1] and gives one value per image; ``MEASURES[name].higher_is_better``
orients it (``oriented``), ``CHEAP_MEASURES`` are those cheap enough for the train loop's eval.
"""

from __future__ import annotations

import functools
import logging
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

logger = logging.getLogger(__name__)

# The reporting convention (evaluator, train loop, docs): the mean over images of per-image PSNR, each capped at
# 50 dB (an error under 1/316 of the range), so a few exactly reconstructed flat images cannot dominate a mean.
PSNR_MAX_DB = 50.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scipy/skimage's default: an 11-tap window at sigma 1.5
SSIM_WINDOW = 2 * int(SSIM_TRUNCATE * SSIM_SIGMA + 0.5) + 1  # 11 taps
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


def _correlate(x: jax.Array, taps, axis: int, padding: tuple[int, int] = (0, 0)) -> jax.Array:
  """NHWC ``x`` cross-correlated along ``axis`` (1: H, 2: W) with the 1-D ``taps``, after zero ``padding`` (before,
  after) on that axis; 'valid' positions only. Sums of shifted slices: exact float32 products and sums, and on a
  CPU 20x faster than XLA's grouped convolutions."""
  if padding != (0, 0):
    x = jnp.pad(x, [(0, 0)] * axis + [padding] + [(0, 0)] * (3 - axis))
  n = x.shape[axis] - len(taps) + 1
  return sum(float(t) * jax.lax.slice_in_dim(x, i, i + n, axis=axis) for i, t in enumerate(taps) if t != 0)


def _separable_valid_filter(x: jax.Array, taps: np.ndarray) -> jax.Array:
  """Depthwise 'valid' filtering of NHWC ``x`` with ``taps`` along H and then W."""
  return _correlate(_correlate(x, taps, 1), taps, 2)


def _ssim_maps(x: jax.Array, y: jax.Array, taps: np.ndarray) -> tuple[jax.Array, jax.Array]:
  """The SSIM and contrast-structure (cs) maps of [0, 1] NHWC images over the 'valid' window positions."""
  # Subtract a per-image offset so the float32 variances E[x^2] - E[x]^2 lose little to cancellation; the offset
  # is added back to the means for the luminance term.
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
  cs = (2 * vxy + c2) / (vx + vy + c2)
  return (2 * ux * uy + c1) / (ux * ux + uy * uy + c1) * cs, cs


@functools.partial(jax.jit, static_argnames=("value_range", "sigma"))
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
  # Map to [0, 1]: SSIM is scale-invariant (C1, C2 scale with the range) but not shift-invariant.
  lo, hi = value_range
  return _mean_per_image(_ssim_maps((x - lo) / (hi - lo), (y - lo) / (hi - lo), taps)[0])


# ---- Measures after piq 0.8.0 (multi_scale_ssim, haarpsi, gmsd with data_range=1, reduction='none') ----


def _check_unit_pair(x: jax.Array, y: jax.Array, name: str, min_side: int) -> tuple[jax.Array, jax.Array]:
  x, y = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)
  _check_pair(x, y)
  if x.shape[-1] not in (1, 3):
    raise ValueError(f"{name} takes RGB or grey images (3 or 1 channels), got {x.shape[-1]}")
  if min(x.shape[1:3]) < min_side:
    raise ValueError(f"{name} needs images of at least {min_side}x{min_side}, got {x.shape[1:3]}")
  return x, y


def _avg_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 average pooling with stride 2; an odd last row or column is dropped (torch's avg_pool2d)."""
  b, h, w, c = x.shape
  return x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


def _halve(x: jax.Array) -> jax.Array:
  """piq's subsampling in GMSD and HaarPSI: when a side is odd, a zero row and column go below and right of the
  image, then 2x2 average pooling."""
  pad = max(x.shape[1] % 2, x.shape[2] % 2)
  return _avg_pool_2x2(jnp.pad(x, ((0, 0), (0, pad), (0, pad), (0, 0))))


def _rgb_to_yiq(x: jax.Array) -> jax.Array:
  """NTSC YIQ of RGB (piq.functional.rgb2yiq); grey images pass unchanged (their one channel is Y)."""
  if x.shape[-1] == 1:
    return x
  r, g, b = x[..., 0:1], x[..., 1:2], x[..., 2:3]
  return jnp.concatenate([0.299 * r + 0.587 * g + 0.114 * b,
                          0.5959 * r - 0.2746 * g - 0.3213 * b,
                          0.2115 * r - 0.5227 * g + 0.3112 * b], axis=-1)


def _similarity(a: jax.Array, b: jax.Array, constant: float) -> jax.Array:
  return (2 * a * b + constant) / (a * a + b * b + constant)


def _sum_per_image(v: jax.Array) -> jax.Array:
  return jnp.sum(jnp.sum(v, axis=(2, 3)), axis=1)  # rows first, as _mean_per_image


# MS-SSIM's weights of scales 1 (full size) to 5 (Wang et al. 2003), as piq uses them: unnormalised (their sum is
# 1.0001) with all five scales. Images too small for five scales get the first ones, renormalised to sum 1 (what
# piq computes when given those weights as ``scale_weights``).
MS_SSIM_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def ms_ssim_scales(height: int, width: int) -> int:
  """How many scales MS-SSIM uses at this size: the most (up to 5) that pass piq's size rule
  ``min(height, width) >= (11 - 1) * 2 ** (scales - 1) + 1``, i.e. 5 from 161 px, 4 from 81, 3 from 41, 2 from 21,
  1 (plain SSIM with piq's averaging) from 11; 0 below 11 (MS-SSIM is then undefined)."""
  scales = 0
  while scales < len(MS_SSIM_WEIGHTS) and min(height, width) >= (SSIM_WINDOW - 1) * 2 ** scales + 1:
    scales += 1
  return scales


_warned_ms_ssim_sizes = set()  # the sizes whose smaller scale count was logged


def ms_ssim(x: jax.Array, y: jax.Array) -> jax.Array:
  """Multi-scale SSIM per image, (B,), of [0, 1] NHWC images, as ``piq.multi_scale_ssim(x, y, data_range=1.)``:
  at each scale the SSIM statistics of an 11-tap Gaussian window (sigma 1.5, 'valid' positions), per channel;
  between scales, when a side is odd the first row and column are repeated above and left, then 2x2 average
  pooling; the contrast-structure means of the finer scales and the SSIM mean of the coarsest, each clipped at 0
  and raised to its scale's weight, multiplied, then averaged over channels.

  Images smaller than 161 px on a side use ``ms_ssim_scales(h, w)`` scales (where piq raises instead) with the
  first weights renormalised, and a warning is logged once per size. At least 11x11. Jitted.
  """
  x, y = _check_unit_pair(x, y, "MS-SSIM", SSIM_WINDOW)
  scales = ms_ssim_scales(*x.shape[1:3])
  if scales < len(MS_SSIM_WEIGHTS) and x.shape[1:3] not in _warned_ms_ssim_sizes:
    _warned_ms_ssim_sizes.add(x.shape[1:3])
    logger.warning("MS-SSIM at %dx%d uses %d of its 5 scales (5 need 161x161 or more), weights renormalised",
                   x.shape[1], x.shape[2], scales)
  return _ms_ssim(x, y)


@jax.jit
def _ms_ssim(x: jax.Array, y: jax.Array) -> jax.Array:
  scales = ms_ssim_scales(*x.shape[1:3])
  weights = np.asarray(MS_SSIM_WEIGHTS[:scales])
  if scales < len(MS_SSIM_WEIGHTS):
    weights = weights / weights.sum()
  taps = gaussian_kernel_1d()
  per_scale = []
  for scale in range(scales):
    if scale > 0:
      pad = max(x.shape[1] % 2, x.shape[2] % 2)
      x, y = (_avg_pool_2x2(jnp.pad(v, ((0, 0), (pad, 0), (pad, 0), (0, 0)), mode="edge")) for v in (x, y))
    ssim_map, cs_map = _ssim_maps(x, y, taps)
    last = scale == scales - 1
    per_scale.append(jnp.mean(jnp.mean(ssim_map if last else cs_map, axis=2), axis=1))  # (B, C)
  per_channel = jnp.prod(jnp.maximum(jnp.stack(per_scale), 0.0) ** weights[:, None, None].astype(np.float32),
                         axis=0)
  return jnp.mean(per_channel, axis=-1)


GMSD_T = 170 / 255 ** 2


@jax.jit
def gmsd(x: jax.Array, y: jax.Array) -> jax.Array:
  """Gradient magnitude similarity deviation per image, (B,), of [0, 1] NHWC images (Xue et al. 2013), as
  ``piq.gmsd(x, y, data_range=1.)``: the luminance Y of YIQ, halved (``_halve``), Prewitt gradient magnitudes
  (3x3, zero padding), their similarity map (2 g_x g_y + T) / (g_x^2 + g_y^2 + T) with T = 170 / 255^2, and its
  standard deviation over the image. A distortion: 0 for identical images, larger is worse. At least 2x2.
  """
  x, y = _check_unit_pair(x, y, "GMSD", 2)
  lum = _halve(jnp.concatenate([_rgb_to_yiq(x)[..., :1], _rgb_to_yiq(y)[..., :1]], axis=-1))
  # Prewitt: [1, 1, 1] / 3 across the direction of [-1, 0, 1].
  grad_x = _correlate(_correlate(lum, (1 / 3,) * 3, 1, (1, 1)), (-1.0, 0.0, 1.0), 2, (1, 1))
  grad_y = _correlate(_correlate(lum, (-1.0, 0.0, 1.0), 1, (1, 1)), (1 / 3,) * 3, 2, (1, 1))
  magnitude = jnp.sqrt(jnp.square(grad_x) + jnp.square(grad_y))
  gms = _similarity(magnitude[..., :1], magnitude[..., 1:], GMSD_T)
  deviation = gms - _mean_per_image(gms)[:, None, None, None]
  return jnp.sqrt(_mean_per_image(jnp.square(deviation)))


HAARPSI_SCALES = 3
HAARPSI_C = 30.0
HAARPSI_ALPHA = 4.2


@jax.jit
def haarpsi(x: jax.Array, y: jax.Array) -> jax.Array:
  """Haar wavelet-based perceptual similarity per image, (B,), of [0, 1] NHWC images (Reisenhofer et al. 2018),
  as ``piq.haarpsi(x, y, data_range=1.)``: YIQ on [0, 255], halved (``_halve``); Haar filters of sizes 2, 4, 8
  on Y (MATLAB's conv2 'same' alignment, zero padding), horizontal and vertical; per orientation the similarity
  (C = 30) of the magnitudes of the two finest scales, weighted by the larger magnitude at the coarsest; for
  colour, the similarity of |I| and |Q| after a 2x2 mean, weighted by the mean of both weights; the weighted mean
  of sigmoid(4.2 * similarity), mapped back by (logit / 4.2)^2. 1 for identical images (also two black ones,
  where piq gives inf). At least 16x16.
  """
  x, y = _check_unit_pair(x, y, "HaarPSI", 2 ** (HAARPSI_SCALES + 1))
  colour = x.shape[-1] == 3
  x_yiq, y_yiq = (_halve(_rgb_to_yiq(v * 255.0)) for v in (x, y))
  lum = jnp.concatenate([x_yiq[..., :1], y_yiq[..., :1]], axis=-1)  # channels: x, y
  magnitudes = []  # per scale, (horizontal, vertical): |coefficients| of x and y as two channels
  for scale in range(HAARPSI_SCALES):
    # piq.functional.haar_filter: 1 / size over a size x size square, its lower half negated (horizontal), and its
    # transpose (vertical); padded as MATLAB's conv2(..., 'same').
    size = 2 ** (scale + 1)
    signs, mean = (1.0,) * (size // 2) + (-1.0,) * (size // 2), (1 / size,) * size
    padding = (size // 2 - 1, size // 2)
    magnitudes.append([jnp.abs(_correlate(_correlate(lum, a, 1, padding), b, 2, padding))
                       for a, b in ((signs, mean), (mean, signs))])
  sims, weights = [], []
  for orientation in range(2):
    fine = [magnitudes[scale][orientation] for scale in range(HAARPSI_SCALES - 1)]
    sims.append(sum(_similarity(m[..., :1], m[..., 1:], HAARPSI_C) for m in fine) / len(fine))
    weights.append(jnp.max(magnitudes[-1][orientation], axis=-1, keepdims=True))
  if colour:
    iq_x, iq_y = (jnp.abs(_correlate(_correlate(v[..., 1:], (0.5, 0.5), 1, (0, 1)), (0.5, 0.5), 2, (0, 1)))
                  for v in (x_yiq, y_yiq))  # piq: a 2x2 mean, stride 1, after a zero row and column below, right
    sims.append(jnp.mean(_similarity(iq_x, iq_y, HAARPSI_C), axis=-1, keepdims=True))
    weights.append((weights[0] + weights[1]) / 2)
  sim, weight = jnp.concatenate(sims, axis=-1), jnp.concatenate(weights, axis=-1)
  # piq: score = (sum(sigmoid(4.2 sim) w) + eps) / (sum(w) + eps), then logit(score). Its complement
  # 1 - score = sum(sigmoid(-4.2 sim) w) / (sum(w) + eps) is summed directly here: 1 - score in float32 would lose
  # ~70x the precision of score where score nears sigmoid(4.2) = 0.985 (images that look alike).
  eps = float(np.finfo(np.float32).eps)
  agree = _sum_per_image(jax.nn.sigmoid(HAARPSI_ALPHA * sim) * weight) + eps
  disagree = _sum_per_image(jax.nn.sigmoid(-HAARPSI_ALPHA * sim) * weight)
  # No weight anywhere only when both images are black (with the zero padding any other image has edges): equal
  # images, 1, where piq gives inf.
  return jnp.where(disagree > 0, jnp.square((jnp.log(agree) - jnp.log(disagree)) / HAARPSI_ALPHA), 1.0)


# ---- The registry: every quality that is reported or optimised, by name ----


class Measure(NamedTuple):
  """A measure of the registry. ``fn(originals, reconstructions)`` takes [0, 1] NHWC images and gives (B,)."""
  fn: Callable[[jax.Array, jax.Array], jax.Array]
  higher_is_better: bool  # False for distortions (GMSD)
  unit: str  # "dB" or "" (unitless)
  best: float  # the value of identical images
  min_side: int  # the smallest image side it is defined for


MEASURES = {
    "psnr": Measure(lambda a, b: psnr(a, b, value_range=(0.0, 1.0), max_db=PSNR_MAX_DB), True, "dB", PSNR_MAX_DB,
                    1),
    "ssim": Measure(lambda a, b: ssim(a, b, value_range=(0.0, 1.0)), True, "", 1.0, SSIM_WINDOW),
    "ms_ssim": Measure(ms_ssim, True, "", 1.0, SSIM_WINDOW),
    "haarpsi": Measure(haarpsi, True, "", 1.0, 2 ** (HAARPSI_SCALES + 1)),
    "gmsd": Measure(gmsd, False, "", 0.0, 2),
}
# Cheap enough for the train loop's eval: at most ~3x PSNR's time per 256² image (benchmarks/measure_cost.py;
# SSIM and MS-SSIM cost ~7-8x, docs/guide.md).
CHEAP_MEASURES = ("psnr", "gmsd", "haarpsi")


def _measure(name: str) -> Measure:
  if name not in MEASURES:
    raise ValueError(f"unknown measure {name!r}; the measures are {', '.join(MEASURES)}")
  return MEASURES[name]


def to_unit_levels(images: jax.Array) -> jax.Array:
  """[-1, 1] images clipped and rounded to 8-bit levels (as ``reported_psnr``), as values k / 255 in [0, 1]."""
  return jnp.round((jnp.clip(jnp.asarray(images, jnp.float32), -1.0, 1.0) + 1.0) * 127.5) / 255.0


def qualities(names, originals: jax.Array, reconstructions: jax.Array) -> dict[str, jax.Array]:
  """The named measures (``MEASURES``) of our [-1, 1] NHWC images, each per image (B,): both images clipped and
  rounded to 8-bit levels first, as every reported number is. Jit-able with ``names`` static."""
  measures = {name: _measure(name) for name in names}
  a, b = to_unit_levels(originals), to_unit_levels(reconstructions)
  return {name: m.fn(a, b) for name, m in measures.items()}


def quality(name: str, originals: jax.Array, reconstructions: jax.Array) -> jax.Array:
  """One measure of our [-1, 1] NHWC images, per image (B,); see ``qualities``."""
  return qualities((name,), originals, reconstructions)[name]


def oriented(name: str, values: jax.Array) -> jax.Array:
  """``values`` of measure ``name`` turned so that higher is better (a distortion is negated)."""
  return values if _measure(name).higher_is_better else -values
