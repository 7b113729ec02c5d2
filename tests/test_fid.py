"""FID parity with pytorch-fid: the Flax FID InceptionV3, the converter, streaming statistics and the
Fréchet distance.

The reference network is pytorch-fid's own ``InceptionV3([3])`` with random weights (the real ones
cannot be downloaded here), random batch-norm statistics included, copied through our converter.
"""

import copy

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from pytorch_fid import fid_score
from pytorch_fid import inception as pt_inception

from benchmarks.common import torch_fid_inception
from cat_jax.convert import __main__ as convert_main
from cat_jax.convert import inception as convert_inception
from cat_jax.metrics import fid
from cat_jax.models import inception


def _smooth_images(rng, n, h, w) -> np.ndarray:
  """Random [0, 1] NHWC images with structure at several scales (not pure pixel noise)."""
  coarse = torch.from_numpy(rng.random((n, 3, 8, 8), dtype=np.float32))
  img = F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)
  img = img + 0.15 * torch.from_numpy(rng.standard_normal((n, 3, h, w), dtype=np.float32))
  return img.clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _random_fid_inception() -> torch.nn.Module:
  """``pytorch_fid.inception.fid_inception_v3()`` without loading its state dict, randomised.

  Random convolutions with default batch-norm statistics give features that hardly depend on the
  image, so the batch-norm statistics are calibrated on random images (after randomising the affine
  parameters) and then perturbed: every layer then passes image content on, and every converted
  tensor matters.
  """
  torch.manual_seed(0)
  net = torch_fid_inception()
  gen = torch.Generator().manual_seed(1)
  batch_norms = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  for bn in batch_norms:
    bn.weight.data = torch.rand(bn.num_features, generator=gen) + 0.5
    bn.bias.data = torch.randn(bn.num_features, generator=gen) * 0.2
    bn.momentum = None  # running stats = plain average of the calibration batch's statistics
  calibration = _smooth_images(np.random.default_rng(100), 4, 64, 64)
  net.train()
  with torch.no_grad():
    _pool_features(net, torch.from_numpy(calibration * 2 - 1).permute(0, 3, 1, 2))
  for bn in batch_norms:
    bn.running_mean.data += 0.05 * torch.randn(bn.num_features, generator=gen)
    bn.running_var.data *= 0.8 + 0.4 * torch.rand(bn.num_features, generator=gen)
  # Scale the last block's outputs (ReLU commutes with positive scaling) so the features are of order
  # 1 (mean about 0.45, max about 6) as with the real weights: the absolute tolerance then means
  # roughly what it means for the real network.
  last = net.Mixed_7c
  for conv in (last.branch1x1, last.branch3x3_2a, last.branch3x3_2b, last.branch3x3dbl_3a,
               last.branch3x3dbl_3b, last.branch_pool):
    conv.bn.weight.data *= 0.2
    conv.bn.bias.data *= 0.2
  return net.eval()


def _pool_features(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
  """The network's blocks after a resize to 299, as pytorch-fid's wrapper runs them, on [-1, 1]
  input; only used to calibrate the batch-norm statistics."""
  x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
  for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
               "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
               "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b", "Mixed_7c"):
    x = getattr(net, name)(x)
  return x.mean(dim=(2, 3))


@pytest.fixture(scope="module")
def torch_fid_net():
  """pytorch-fid's InceptionV3 wrapper (resize, normalisation, blocks) around the random network."""
  net = _random_fid_inception()
  original = pt_inception.fid_inception_v3
  pt_inception.fid_inception_v3 = lambda: net
  try:
    yield net, pt_inception.InceptionV3([3]).eval()
  finally:
    pt_inception.fid_inception_v3 = original


@pytest.fixture(scope="module")
def jax_fid_fn(torch_fid_net, tmp_path_factory):
  """Our network, from the random torch weights through the converter CLI and ``load_inception``."""
  tmp = tmp_path_factory.mktemp("weights")
  torch.save(torch_fid_net[0].state_dict(), tmp / "pt_inception.pth")
  out = tmp / "inception.msgpack"
  rc = convert_main.main(["inception", "--out", str(out), "--torch-weights",
                          str(tmp / "pt_inception.pth")])
  assert rc == 0
  return inception.load_inception(out)


def _torch_features(wrapper, images01: np.ndarray) -> np.ndarray:
  with torch.no_grad():
    out = wrapper(torch.from_numpy(images01).permute(0, 3, 1, 2))[0]
  return out[:, :, 0, 0].numpy().astype(np.float64)


@pytest.mark.parametrize("in_hw", [(64, 64), (17, 23), (331, 310), (300, 512)])
def test_resize_matches_torch_bilinear(in_hw):
  x = np.random.default_rng(0).random((2, *in_hw, 3), dtype=np.float32)
  ref = F.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                      align_corners=False).permute(0, 2, 3, 1).numpy()
  ours = np.asarray(inception.resize_bilinear(x, (299, 299)))
  np.testing.assert_allclose(ours, ref, atol=2e-6, rtol=0)


def test_features_match_pytorch_fid(torch_fid_net, jax_fid_fn):
  rng = np.random.default_rng(1)
  wrapper = torch_fid_net[1]
  small = _smooth_images(rng, 4, 64, 64)  # upsampled to 299
  large = _smooth_images(rng, 2, 320, 352)  # downsampled, where jax.image.resize would antialias
  for images in (small, large):
    ref = _torch_features(wrapper, images)
    ours = np.asarray(jax_fid_fn(images * 2.0 - 1.0), np.float64)
    assert ours.shape == (images.shape[0], 2048)
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=0)
  # The features depend on the image, not only on the weights.
  ref = _torch_features(wrapper, small)
  assert np.mean(ref.std(axis=0)) > 0.2 * np.mean(ref)
  # What remains is float32 rounding: ours is as close to a float64 run of the reference as the
  # reference itself is.
  with torch.no_grad():
    truth = copy.deepcopy(wrapper).double()(
        torch.from_numpy(small).double().permute(0, 3, 1, 2))[0][:, :, 0, 0].numpy()
  ours = np.asarray(jax_fid_fn(small * 2.0 - 1.0), np.float64)
  assert np.abs(ours - truth).max() <= 2 * np.abs(ref - truth).max()


def _frechet_distance_in_spanned_subspace(mu1, sigma1, mu2, sigma2, features):
  """pytorch-fid's ``calculate_frechet_distance`` evaluated in the subspace that ``features`` span.

  With fewer images than dims, both covariances and mu1 - mu2 lie in the span of the centred
  features, and the FID is invariant under the orthonormal change of basis to that span; scipy's
  sqrtm of the singular 2048x2048 product takes minutes here, of the reduced one milliseconds.
  """
  basis, _ = np.linalg.qr(features.T)
  return fid_score.calculate_frechet_distance(basis.T @ mu1, basis.T @ sigma1 @ basis,
                                              basis.T @ mu2, basis.T @ sigma2 @ basis)


def test_fid_of_image_files_matches_pytorch_fid(torch_fid_net, jax_fid_fn, tmp_path):
  rng = np.random.default_rng(2)
  real = _smooth_images(rng, 8, 64, 64)
  fake = np.clip(real * 0.8 + 0.1 + 0.1 * rng.standard_normal(real.shape), 0, 1)
  file_sets = []
  for name, images in (("real", real), ("fake", fake)):
    (tmp_path / name).mkdir()
    files = [tmp_path / name / f"{i}.png" for i in range(len(images))]
    for f, img in zip(files, images):
      PIL.Image.fromarray(np.round(img * 255).astype(np.uint8)).save(f)
    file_sets.append(files)

  # pytorch-fid's features of the files (its loader and network wrapper) and its statistics, as its
  # calculate_activation_statistics computes them.
  acts = [fid_score.get_activations(files, torch_fid_net[1], batch_size=8, dims=2048, device="cpu",
                                    num_workers=0) for files in file_sets]
  ref_stats = [(np.mean(a, axis=0), np.cov(a, rowvar=False)) for a in acts]
  span = np.concatenate([acts[0] - ref_stats[0][0], acts[1] - ref_stats[1][0],
                         (ref_stats[0][0] - ref_stats[1][0])[None]])
  ref = _frechet_distance_in_spanned_subspace(*ref_stats[0], *ref_stats[1], span)

  # Ours: the same PNG files as [-1, 1] images, in two batches, streamed into float64 statistics.
  stats = []
  for files in file_sets:
    s = fid.FidStatistics.zeros(2048)
    for chunk in (files[:4], files[4:]):
      u8 = np.stack([np.asarray(PIL.Image.open(f)) for f in chunk])
      s.update(jax_fid_fn(u8.astype(np.float32) / 127.5 - 1.0))
    stats.append(s)
  for ours_stats, (mu, sigma) in zip(stats, ref_stats):
    ours_mu, ours_sigma = ours_stats.mean_and_covariance()
    np.testing.assert_allclose(ours_mu, mu, atol=1e-5)
    np.testing.assert_allclose(ours_sigma, sigma, atol=2e-5)
  ours = fid.fid_from_statistics(*stats)
  assert ref > 0.1
  assert ours == pytest.approx(ref, rel=1e-3)


def test_streaming_statistics_equal_all_at_once():
  rng = np.random.default_rng(3)
  features = rng.standard_normal((301, 16)) * rng.random(16) * 3 + rng.random(16) * 5
  features = features.astype(np.float32).astype(np.float64)  # as from a float32 network
  stats = fid.FidStatistics.zeros(16)
  for start, stop in ((0, 1), (1, 64), (64, 200), (200, 301)):
    stats.update(features[start:stop].astype(np.float32))
  mu, sigma = stats.mean_and_covariance()
  np.testing.assert_allclose(mu, features.mean(0), rtol=1e-12, atol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(features, rowvar=False), rtol=1e-9, atol=1e-12)

  # Two shards merged give the same.
  merged = fid.FidStatistics.from_features(features[:100]).merge(
      fid.FidStatistics.from_features(features[100:]))
  np.testing.assert_allclose(merged.mean_and_covariance()[1], sigma, rtol=1e-12, atol=1e-12)


def test_frechet_distance_of_gaussians_with_known_value():
  # Commuting covariances share eigenvectors, so FID = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2.
  rng = np.random.default_rng(4)
  d = 32
  q, _ = np.linalg.qr(rng.standard_normal((d, d)))
  a, b = rng.random(d) * 4 + 0.1, rng.random(d) * 2 + 0.1
  mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = fid.frechet_distance(mu1, (q * a) @ q.T, mu2, (q * b) @ q.T)
  assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_matches_scipy_sqrtm_and_pytorch_fid():
  rng = np.random.default_rng(5)
  d = 64
  x = rng.standard_normal((500, d)) @ rng.standard_normal((d, d))
  y = rng.standard_normal((400, d)) @ rng.standard_normal((d, d)) + 0.3
  mu1, s1, mu2, s2 = x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False)
  sqrtm = scipy.linalg.sqrtm(s1 @ s2).real
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(sqrtm)
  got = fid.frechet_distance(mu1, s1, mu2, s2)
  assert got == pytest.approx(expected, rel=1e-9)
  assert got == pytest.approx(fid_score.calculate_frechet_distance(mu1, s1, mu2, s2), rel=1e-9)
  assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8 * np.trace(s1))


def test_frechet_distance_rank_deficient_matches_pytorch_fid():
  # Fewer samples than dims: singular covariances, where pytorch-fid may need its eps fallback.
  rng = np.random.default_rng(6)
  x, y = rng.random((20, 256)), rng.random((25, 256)) * 1.2
  args = (x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False))
  assert fid.frechet_distance(*args) == pytest.approx(
      fid_score.calculate_frechet_distance(*args), rel=1e-4)


def test_convert_cli_without_torch_file_explains_download(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  rc = convert_main.main(["inception", "--out", str(tmp_path / "x.msgpack")])
  assert rc == 2
  err = capsys.readouterr().err
  assert convert_inception.TORCH_WEIGHTS_URL in err
  assert str(tmp_path / "torch" / "hub" / "checkpoints" / convert_inception.TORCH_WEIGHTS_NAME) in err
  assert not (tmp_path / "x.msgpack").exists()


def test_converter_rejects_pytorch_fid_wrapper_keys(torch_fid_net):
  with pytest.raises(ValueError):
    convert_inception.convert_state_dict(torch_fid_net[1].state_dict())
