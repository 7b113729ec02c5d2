"""ReconstructionEvaluator: per-level and overall metrics equal the reference tools run on all images
at once (scikit-image on the uint8 images, pytorch-fid's Fréchet distance on np.cov statistics)."""

import pickle
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from cat_jax import levels
from cat_jax.metrics.evaluator import ReconstructionEvaluator

HW = (32, 32)


def fake_inception(images):
  """A cheap deterministic 4-d "feature" of [-1, 1] images."""
  x = jnp.asarray(images)
  return 10.0 * jnp.stack([x.mean(axis=(1, 2, 3)), x.std(axis=(1, 2, 3)), x[..., 0].mean(axis=(1, 2)),
                    jnp.abs(x[:, 1:] - x[:, :-1]).mean(axis=(1, 2, 3))], axis=-1)


def fake_lpips(x, y):
  return jnp.mean(jnp.abs(x - y), axis=(1, 2, 3)) * 0.5


def _batch(rng, n):
  """uint8-valued originals in [-1, 1] and float reconstructions, partly outside [-1, 1]."""
  u8 = rng.integers(0, 256, size=(n, *HW, 3))
  originals = (u8 / 127.5 - 1.0).astype(np.float32)
  noise = rng.random((n, 1, 1, 1)) * 0.3
  recon = (originals * 0.9 + noise * rng.standard_normal(originals.shape)).astype(np.float32)
  return originals, recon


def _to_uint8(images):
  return np.round((np.clip(images, -1, 1) + 1) * np.float32(127.5)).astype(np.uint8)


# (batch size, level): level 0 and 2 from several batches, level 1 only from the mixed batch.
BATCHES = [(4, 0), (5, 2), (5, 0), (4, np.array([0, 1, 2, 1]))]


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  return [(*_batch(rng, n), lv) for n, lv in BATCHES]


def _expected(data):
  """Reference metrics from all images at once, grouped by level."""
  per_level = {}
  for x, y, lv in data:
    for i, l in enumerate(np.broadcast_to(lv, (x.shape[0],))):
      per_level.setdefault(int(l), []).append((_to_uint8(x[i]), _to_uint8(y[i])))
  groups = {f"level{l}": pairs for l, pairs in sorted(per_level.items())}
  groups["all"] = [p for pairs in per_level.values() for p in pairs]
  out = {}
  for name, pairs in groups.items():
    x8 = np.stack([p[0] for p in pairs])
    y8 = np.stack([p[1] for p in pairs])
    out[f"num_images/{name}"] = len(pairs)
    out[f"psnr/{name}"] = np.mean([min(peak_signal_noise_ratio(a, b, data_range=255), 50.0)  # reported cap
                                   for a, b in zip(x8, y8)])
    out[f"ssim/{name}"] = np.mean([
        structural_similarity(a, b, data_range=255, channel_axis=-1, gaussian_weights=True,
                              sigma=1.5, use_sample_covariance=False) for a, b in zip(x8, y8)])
    xs, ys = x8 / 127.5 - 1.0, y8 / 127.5 - 1.0
    out[f"lpips/{name}"] = float(np.mean(np.asarray(fake_lpips(xs, ys))))
    fx = np.asarray(fake_inception(xs), np.float64)
    fy = np.asarray(fake_inception(ys), np.float64)
    out[f"rfid/{name}"] = calculate_frechet_distance(
        fx.mean(0), np.cov(fx, rowvar=False), fy.mean(0), np.cov(fy, rowvar=False))
    tokens = [levels.num_tokens(HW, int(name[-1]))] * len(pairs) if name != "all" else [
        levels.num_tokens(HW, l) for l, pairs_l in per_level.items() for _ in pairs_l]
    out[f"tokens_per_image/{name}"] = float(np.mean(tokens))
  return out


def _run(data, evaluator=None):
  evaluator = evaluator or ReconstructionEvaluator(fake_inception, fake_lpips)
  for x, y, lv in data:
    tokens = np.vectorize(lambda l: levels.num_tokens(HW, int(l)))(lv)
    evaluator.update(x, jnp.asarray(y), lv, num_tokens=tokens)
  return evaluator


def _assert_matches(result, expected):
  assert set(result) == set(expected)
  for key, value in expected.items():
    # rfid with 2 images per level is near-singular, where pytorch-fid adds 1e-6 to the diagonal.
    assert result[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


def test_evaluator_matches_reference_tools_per_level_and_overall(data):
  result = _run(data).result()
  expected = _expected(data)
  _assert_matches(result, expected)
  assert result["rfid/all"] > 0.1
  assert result["num_images/level1"] == 2
  assert result["psnr/level0"] != pytest.approx(result["psnr/level2"], rel=1e-3)


def test_merge_of_shards_equals_one_pass(data):
  """As ``evaluate`` merges its processes' evaluators (pickled, without their functions): the sums, the FID
  statistics and the per-image values, in order."""
  first, second = _run(data[:2]), pickle.loads(pickle.dumps(_run(data[2:])))
  assert second.inception_fn is None and second.lpips_fn is None
  merged = first.merge(second)
  _assert_matches(merged.result(), _expected(data))
  assert merged.per_image == _run(data).per_image


def test_sync_across_simulated_processes(data):
  """Two "processes" (threads) with different levels seen, merged through a barrier-based allgather of objects."""
  barrier = threading.Barrier(2)
  slots = [None, None]

  def make_allgather(rank):
    def allgather(x):
      slots[rank] = pickle.loads(pickle.dumps(x))  # as parallel.allgather_objects sends it
      barrier.wait()
      every = list(slots)
      barrier.wait()
      return every
    return allgather

  shards = [_run(data[:1]), _run(data[1:])]  # the first has seen level 0 only
  errors = []

  def work(rank):
    try:
      shards[rank].sync_across_processes(make_allgather(rank))
    except Exception as e:  # pragma: no cover - surfaced below
      errors.append(e)
      barrier.abort()

  threads = [threading.Thread(target=work, args=(r,)) for r in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join(timeout=60)
  assert not errors
  expected = _expected(data)
  _assert_matches(shards[0].result(), expected)
  _assert_matches(shards[1].result(), expected)


def test_without_networks_and_tokens_only_psnr_ssim(data):
  evaluator = ReconstructionEvaluator()
  x, y, lv = data[0]
  evaluator.update(x, y, lv)
  result = evaluator.result()
  assert set(result) == {"num_images/level0", "psnr/level0", "ssim/level0", "num_images/all",
                         "psnr/all", "ssim/all"}
  assert result["psnr/all"] == pytest.approx(_expected([data[0]])["psnr/all"], rel=1e-6)


def test_bad_inputs_raise(data):
  x, y, _ = data[0]
  evaluator = ReconstructionEvaluator()
  with pytest.raises(ValueError, match="level"):
    evaluator.update(x, y, 3)
  with pytest.raises(ValueError, match="shape"):
    evaluator.update(x, y, np.array([0, 1]))
  with pytest.raises(ValueError):
    evaluator.update(x, y[:, :16], 0)
  assert evaluator.result() == {}


def test_single_level_overall_equals_that_level(data):
  result = _run(data[:1]).result()
  _assert_matches(result, _expected(data[:1]))
  assert result["rfid/all"] == result["rfid/level0"] > 0


def test_evaluators_of_the_same_originals_share_one_covariance_root(data):
  """Rows of one evaluation (same originals, same order, different reconstructions and level splits): the overall
  real statistics are bit-identical, so a shared ``fid_roots`` holds one root for "all" and results do not change."""
  other_levels = [(x, y * 0.5, np.zeros(x.shape[0], int)) for x, y, _ in data]  # all at level 0, other recons
  first, second = _run(data), _run(other_levels)
  roots = {}
  shared = [first.result(roots), second.result(roots)]
  assert shared == [_run(data).result(), _run(other_levels).result()]
  assert shared[1]["rfid/all"] != pytest.approx(shared[0]["rfid/all"], rel=1e-3)
  # first: levels 0, 1, 2 and all; second: level 0 (= all, reused) -- its real set is first's "all" set.
  assert len(roots) == 4


def test_train_loop_eval_psnr_is_the_evaluators():
  """One PSNR convention: the train loop's eval (a jitted eval_step, measured per process, padding left out) and the
  evaluator give the same mean PSNR on the same float reconstructions (8-bit rounding included: without it the two
  differ by ~0.01 dB here)."""
  import jax

  from cat_jax import train
  from cat_jax.metrics import image_quality

  rng = np.random.default_rng(7)
  originals, recon = _batch(rng, 6)
  recon = recon * 0.999 + 0.0007  # between the 8-bit levels

  class Fixed:  # a "model" whose reconstruction is ``recon`` whatever the parameters
    shortcuts = False  # no patch code to keep

    def apply(self, variables, images, level, method=None):  # method: NestedVAE.reconstruct
      return jnp.asarray(recon), jnp.zeros(len(recon), bool)

  mask = np.array([1, 1, 1, 1, 1, 0], bool)  # the padded last image is left out by both
  eval_fn = jax.jit(lambda p, x, level: train.eval_step(p, x, level, model=Fixed()))
  train_psnr = train.evaluate_reconstruction(eval_fn, {}, [{"image": originals, "mask": mask}], levels=(0,))[
      "eval/level0/psnr"]
  ev = ReconstructionEvaluator()
  ev.update(originals[:5], recon[:5], 0)
  assert train_psnr == pytest.approx(ev.result()["psnr/all"], abs=1e-4)
  unrounded = float(np.mean(image_quality.psnr(originals[:5], np.clip(recon[:5], -1, 1))))
  assert abs(unrounded - train_psnr) > 1e-3  # the test can tell the two conventions apart


def test_measurements_picked_per_image_equal_updating_with_the_chosen_reconstructions():
  """evaluate's one pass measures each level's reconstructions once and lets each setting pick per image."""
  from cat_jax.metrics.evaluator import Measurements

  rng = np.random.default_rng(3)
  originals, _ = _batch(rng, 5)
  per_level_recon = [_batch(rng, 5)[1] for _ in range(levels.NUM_LEVELS)]
  level = np.array([2, 0, 1, 0, 2])
  direct = ReconstructionEvaluator(fake_inception, fake_lpips)
  chosen = np.stack(per_level_recon)[level, np.arange(5)]
  direct.update(originals, chosen, level, num_tokens=7)
  measurer = ReconstructionEvaluator(fake_inception, fake_lpips)
  per_level = [measurer.measure(originals, r) for r in per_level_recon]
  picked = ReconstructionEvaluator(fake_inception, fake_lpips)
  picked.add(Measurements.pick(per_level, level), level, num_tokens=7)
  assert picked.result() == pytest.approx(direct.result(), rel=1e-6)
  assert picked.per_image == direct.per_image
