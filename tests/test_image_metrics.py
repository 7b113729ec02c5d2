"""PSNR and SSIM parity with scikit-image (the Gaussian-window settings papers use)."""

import jax
import numpy as np
import pytest
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cat_jax.metrics import image_quality


def _pair(rng, shape, value_range):
  """Originals with structure and reconstructions with per-image noise levels and a tone shift."""
  lo, hi = value_range
  coarse = rng.random((shape[0], 4, 4, shape[3]))
  x = np.kron(coarse, np.ones((1, -(-shape[1] // 4), -(-shape[2] // 4), 1)))[:, :shape[1], :shape[2]]
  x = np.clip(x + 0.1 * rng.standard_normal(shape), 0, 1)
  noise = rng.random((shape[0], 1, 1, 1)) * 0.2
  y = np.clip(0.9 * x + 0.05 + noise * rng.standard_normal(shape), 0, 1)
  return (lo + (hi - lo) * x).astype(np.float32), (lo + (hi - lo) * y).astype(np.float32)


def _skimage_ssim(x, y, data_range):
  return structural_similarity(x, y, data_range=data_range, channel_axis=-1, gaussian_weights=True,
                               sigma=1.5, use_sample_covariance=False)


CASES = [
    ((-1.0, 1.0), (3, 32, 40, 3)),  # our convention
    ((0.0, 255.0), (2, 48, 33, 3)),
    ((0.0, 1.0), (2, 11, 64, 1)),  # smallest allowed side, one channel
    ((-1.0, 1.0), (1, 256, 256, 3)),
]


@pytest.mark.parametrize("value_range,shape", CASES)
def test_psnr_matches_skimage(value_range, shape):
  x, y = _pair(np.random.default_rng(0), shape, value_range)
  lo, hi = value_range
  ours = np.asarray(image_quality.psnr(x, y, value_range=value_range), np.float64)
  ref = [peak_signal_noise_ratio(a - np.float64(lo), b - np.float64(lo), data_range=hi - lo)
         for a, b in zip(x, y)]
  assert ours.shape == (shape[0],)
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("value_range,shape", CASES)
def test_ssim_matches_skimage(value_range, shape):
  x, y = _pair(np.random.default_rng(1), shape, value_range)
  lo, hi = value_range
  ours = np.asarray(image_quality.ssim(x, y, value_range=value_range), np.float64)
  ref = [_skimage_ssim(a - np.float64(lo), b - np.float64(lo), hi - lo) for a, b in zip(x, y)]
  assert ours.shape == (shape[0],)
  assert np.ptp(ref) > 0.01 or shape[0] == 1  # the cases differ, so a constant would fail
  np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)


def test_our_convention_measures_as_skimage_on_uint8_images():
  rng = np.random.default_rng(2)
  x, y = _pair(rng, (2, 40, 40, 3), (0.0, 255.0))
  x8, y8 = np.round(x).astype(np.uint8), np.round(y).astype(np.uint8)
  # The same uint8 images in our [-1, 1] convention, default value_range.
  xs, ys = x8 / 127.5 - 1.0, y8 / 127.5 - 1.0
  ref_ssim = [_skimage_ssim(a, b, 255) for a, b in zip(x8, y8)]
  ref_psnr = [peak_signal_noise_ratio(a, b, data_range=255) for a, b in zip(x8, y8)]
  np.testing.assert_allclose(np.asarray(image_quality.ssim(xs, ys), np.float64), ref_ssim,
                             atol=1e-4, rtol=0)
  np.testing.assert_allclose(np.asarray(image_quality.psnr(xs, ys), np.float64), ref_psnr,
                             atol=1e-4, rtol=0)
  # skimage directly on [-1, 1] data (a common mistake) gives a different SSIM.
  wrong = [_skimage_ssim(a, b, 2.0) for a, b in zip(xs, ys)]
  assert np.max(np.abs(np.subtract(wrong, ref_ssim))) > 1e-2


def test_identical_images_and_jit():
  x, _ = _pair(np.random.default_rng(3), (2, 16, 16, 3), (-1.0, 1.0))
  psnr, ssim = jax.jit(lambda a, b: (image_quality.psnr(a, b), image_quality.ssim(a, b)))(x, x)
  assert np.all(np.isinf(np.asarray(psnr)))
  np.testing.assert_allclose(np.asarray(ssim), 1.0, atol=1e-6)
  # The reported convention caps each image at PSNR_MAX_DB; below the cap nothing changes.
  capped = image_quality.psnr(x, x, max_db=image_quality.PSNR_MAX_DB)
  np.testing.assert_array_equal(np.asarray(capped), image_quality.PSNR_MAX_DB)
  y = x + 0.1
  np.testing.assert_allclose(image_quality.psnr(x, y, max_db=50.0), image_quality.psnr(x, y), rtol=1e-6)
  assert float(image_quality.psnr(x, y).max()) < 50.0


def test_bad_shapes_raise():
  small = np.zeros((1, 10, 32, 3), np.float32)
  with pytest.raises(ValueError, match="at least 11x11"):
    image_quality.ssim(small, small)
  with pytest.raises(ValueError):
    image_quality.psnr(np.zeros((1, 8, 8, 3)), np.zeros((1, 8, 8, 1)))


# ---- MS-SSIM, HaarPSI and GMSD against piq 0.8.0, and the registry ----

# Parity tolerance, from float32 arithmetic. piq runs in float64 here, so the difference is our float32 rounding,
# u = 2^-24 = 6e-8 per operation (our filters are sums of shifted slices: plain float32 on every backend).
# Bounds with every rounding at its maximum and in one direction reach ~1e-3 for HaarPSI and MS-SSIM, too close to
# a one-pixel misalignment of HaarPSI's Haar filters (3e-3), so we use the standard probabilistic model (Higham,
# Accuracy and Stability of Numerical Algorithms, 2nd ed., section 2.8: n independent roundings add up to ~sqrt(n) u):
# - GMSD: a pixel's gradient magnitude (<= 1) passes ~150 roundings, ~12 u; the similarity's largest slope is
#   0.65 / sqrt(T) = 13 (T = 170 / 255^2), so each pixel of the map is off by <= 13 * 12 u = 1e-5, and a standard
#   deviation moves by at most the pixels' rms error: <= 1e-5.
# - HaarPSI (logit form, ln A - ln A' of two weighted sums): a Haar coefficient (<= 510 grey levels at the two
#   finest scales) is off by ~12 u * 510; the similarity's slope is <= 0.65 / sqrt(30) = 0.12 per level and the
#   sigmoid's relative slope <= 4.2: <= 1.8e-4 per term, averaged over N >= 3 * 32 * 32 terms (64x64, halved):
#   / sqrt(N) = 3e-6, plus ~sqrt(N) u = 3e-6 for each sum; the result's slope in ln A, ln A' is <= 2 / 4.2 = 0.48:
#   ~6e-6.
# - MS-SSIM: the 121-tap variances carry ~sqrt(22) u = 4.7 u of E[x^2] (the image's mean offset removed: <= 0.25
#   where a window's mean is within 0.5 of the image's); the contrast term's slope in them is
#   <= 4 / (sigma_x^2 + sigma_y^2 + C2) <= 4 / C2 = 4.4e3: <= 3e-4 per window, reached by flat windows only. The
#   result moves by sum_i w_i e_i / sqrt(N_i) over the scales (weights w_i summing to 1, N_i windows): at 32x32
#   (484 and 36 windows, weights 0.14, 0.86) 4.5e-5, at 64x64 (2916, 484, 36; 0.07, 0.45, 0.48) 3e-5, less above.
# So <= 1e-4 (SSIM's tolerance above). Measured: <= 4e-7. A 1% change of GMSD's T moves it by 2.5e-4: fails.
PIQ_ATOL = 1e-4
PIQ_FUNCTIONS = {"ms_ssim": "multi_scale_ssim", "haarpsi": "haarpsi", "gmsd": "gmsd"}
SIZES = [(64, 64), (256, 256), (96, 160)]


def _piq(name, x, y, **kwargs):
  """piq's value of [0, 1] NHWC float32 images, computed in float64."""
  import piq
  import torch
  to_torch = lambda a: torch.from_numpy(np.asarray(a, np.float64)).permute(0, 3, 1, 2)
  fn = getattr(piq, PIQ_FUNCTIONS[name])
  return fn(to_torch(x), to_torch(y), data_range=1.0, reduction="none", **kwargs).numpy()


def _piq_ms_ssim_weights(height, width):
  """piq's scale_weights for our small-image rule (None: piq's defaults, all five scales)."""
  import torch
  scales = image_quality.ms_ssim_scales(height, width)
  return {} if scales == 5 else {"scale_weights": torch.tensor(image_quality.MS_SSIM_WEIGHTS[:scales])}


def _photos(height, width, count=2, kinds=(4, 7)):
  """Embedded photos (and dense text) in [0, 1], cropped to height x width."""
  from cat_jax.data.embedded import generate
  side = max(height, width)
  indices = [kind + 8 * i for i in range(count) for kind in kinds][:count]
  images = [generate(index, split="validation", image_size=side)[0][:height, :width] for index in indices]
  return np.stack(images).astype(np.float32) / 255


def _distort(rng, x):
  """Per-image noise and a tone shift, clipped to [0, 1]."""
  noise = rng.uniform(0.01, 0.1, (x.shape[0], 1, 1, 1))
  return np.clip(0.95 * x + 0.02 + noise * rng.standard_normal(x.shape), 0, 1).astype(np.float32)


@pytest.mark.parametrize("name", list(PIQ_FUNCTIONS))
@pytest.mark.parametrize("height,width", SIZES)
def test_matches_piq_on_random_and_natural_images(name, height, width):
  rng = np.random.default_rng(height + width)
  count = 1 if height * width > 100 ** 2 else 2  # piq's float64 MS-SSIM takes seconds per 256x256 image
  random = rng.random((count, height, width, 3)).astype(np.float32)
  x = np.concatenate([random, _photos(height, width, count)])
  y = _distort(rng, x)
  kwargs = _piq_ms_ssim_weights(height, width) if name == "ms_ssim" else {}
  ref = _piq(name, x, y, **kwargs)
  ours = np.asarray(getattr(image_quality, name)(x, y))  # filters are sums of shifted slices: no matmul precision
  assert ours.shape == (2 * count,) and ours.dtype == np.float32
  assert np.ptp(ref) > 1e-3  # the images differ, so a constant would fail
  np.testing.assert_allclose(ours, ref, atol=PIQ_ATOL, rtol=0)


def test_ms_ssim_scale_count_adapts_to_small_images(caplog):
  assert [image_quality.ms_ssim_scales(s, s) for s in (10, 11, 32, 64, 160, 161, 256)] == [0, 1, 2, 3, 4, 5, 5]
  assert image_quality.ms_ssim_scales(96, 160) == 4  # the shorter side decides
  x = _photos(32, 32)
  y = _distort(np.random.default_rng(5), x)
  import piq
  with pytest.raises(ValueError, match="161x161"):  # piq itself refuses: 5 scales need 161 px
    _piq("ms_ssim", x, y)
  image_quality._warned_ms_ssim_sizes.discard((32, 32))  # logged once per size and process: another test may have
  with caplog.at_level("WARNING", logger=image_quality.__name__):
    ours = np.asarray(image_quality.ms_ssim(x, y))
  assert "uses 2 of its 5 scales" in caplog.text
  # The value is piq's with the first two weights (which piq normalises to sum 1).
  np.testing.assert_allclose(ours, _piq("ms_ssim", x, y, **_piq_ms_ssim_weights(32, 32)), atol=PIQ_ATOL, rtol=0)
  assert piq.__version__ == "0.8.0"
  with pytest.raises(ValueError, match="at least 11x11"):
    image_quality.ms_ssim(x[:, :10], y[:, :10])
  with pytest.raises(ValueError, match="at least 16x16"):
    image_quality.haarpsi(x[:, :15], y[:, :15])


@pytest.mark.parametrize("name", list(image_quality.MEASURES))
def test_identical_images_give_the_best_value(name):
  x = np.concatenate([_photos(64, 64), np.random.default_rng(6).random((1, 64, 64, 3), np.float32)]) * 2 - 1
  x = np.concatenate([x, -np.ones_like(x[:1])])  # and a black image (HaarPSI: no weights at all; piq gives inf)
  measure = image_quality.MEASURES[name]
  values = np.asarray(image_quality.quality(name, x, x))
  # HaarPSI is (log(sigmoid(4.2) / sigmoid(-4.2)) / 4.2)^2 = 1 up to a few roundings of the logs (<= 1e-6).
  np.testing.assert_allclose(values, measure.best, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(image_quality.MEASURES))
def test_more_blur_is_worse(name):
  from scipy.ndimage import gaussian_filter
  x = _photos(96, 96, count=3, kinds=(4, 6, 7)) * 2 - 1
  blurred = [gaussian_filter(x, sigma=(0, s, s, 0)) for s in (0.7, 1.5, 3.0)]
  values = np.stack([np.asarray(image_quality.oriented(name, image_quality.quality(name, x, b)))
                     for b in blurred])  # (strength, image), higher is better
  assert np.all(np.diff(values, axis=0) < 0), values


def test_jit_and_registry():
  rng = np.random.default_rng(7)
  x = _photos(64, 64) * 2 - 1
  y = np.clip(x + 0.1 * rng.standard_normal(x.shape), -1, 1).astype(np.float32)
  names = tuple(image_quality.MEASURES)
  jitted = jax.jit(lambda a, b: image_quality.qualities(names, a, b))(x, y)
  eager = image_quality.qualities(names, x, y)
  for name in names:
    np.testing.assert_allclose(np.asarray(jitted[name]), np.asarray(eager[name]), rtol=1e-6, atol=1e-7)
  assert set(image_quality.CHEAP_MEASURES) <= set(names)
  assert [n for n in names if not image_quality.MEASURES[n].higher_is_better] == ["gmsd"]
  np.testing.assert_array_equal(np.asarray(image_quality.oriented("gmsd", eager["gmsd"])), -eager["gmsd"])
  # quality() rounds to 8-bit levels as reported_psnr does: the same PSNR, and images off by under half a level,
  # or outside [-1, 1], measure as their levels.
  np.testing.assert_allclose(np.asarray(eager["psnr"]), np.asarray(image_quality.reported_psnr(x, y)), atol=1e-4)
  levels = np.array(image_quality.quantize_to_uint8_levels(x))
  levels[:, :4] = np.where(levels[:, :4] > 0, 1.0, -1.0)
  nudged = levels + rng.uniform(-0.45, 0.45, x.shape) / 127.5
  nudged[:, :4] *= 1.5
  for name in names:
    np.testing.assert_array_equal(np.asarray(image_quality.quality(name, nudged, y)),
                                  np.asarray(image_quality.quality(name, levels, y)))
  with pytest.raises(ValueError, match="unknown measure 'lpips'.*psnr, ssim"):
    image_quality.quality("lpips", x, y)
