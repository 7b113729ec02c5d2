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
