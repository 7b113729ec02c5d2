"""The class-conditional DiT on CAT latents: model, rectified flow, sampler, sharded step, resume, CLIs."""

import functools
import json
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from cat_jax import parallel
from conftest import ROOT, load_config, xla_flags
from cat_jax import train_dit as T
from cat_jax.data.latents import LatentDataset, LatentStatistics, make_latent_train_iterator
from cat_jax.generation import flow
from cat_jax.generation.dit import build_dit, init_dit, patchify, unpatchify
from cat_jax.generation.sampling import Generator



def _runlocal(**overrides):
  config = load_config("dit.py", "runlocal")
  config.update_from_flattened_dict(overrides)
  return config


def _tiny(patch_size=2, channels=4, num_classes=8):
  return build_dit(dict(size="tiny", patch_size=patch_size, in_channels=channels, num_classes=num_classes))


def _perturbed(params, seed=1, scale=0.05):
  """Params with every leaf nudged, so the zero-initialised output layers are no longer zero."""
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _apply(model):
  return jax.jit(lambda p, x, t, y, level: model.apply({"params": p}, x, t, y, level))


# -- model ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("patch_size", [1, 2, 4])
def test_forward_shapes_for_every_level_and_patch_size(patch_size):
  model = _tiny(patch_size)
  params = _perturbed(init_dit(model, jax.random.key(0)))
  apply_fn = _apply(model)
  for level, side in enumerate((8, 4, 2)):  # a 64x64 image at 8x / 16x / 32x
    x = jnp.ones((3, side, side, 4))
    if side % patch_size:
      with pytest.raises(ValueError, match=f"not divisible by patch_size={patch_size}"):
        apply_fn(params, x, jnp.full((3,), 0.5), jnp.array([0, 1, 8]), level)
      continue
    out = apply_fn(params, x, jnp.full((3,), 0.5), jnp.array([0, 1, 8]), level)
    assert out.shape == (3, side, side, 4) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all() and float(jnp.abs(out).max()) > 0
  x = jnp.arange(2 * 8 * 8 * 4, dtype=jnp.float32).reshape(2, 8, 8, 4)
  np.testing.assert_array_equal(unpatchify(patchify(x, patch_size), patch_size, 8, 8), x)
  with pytest.raises(ValueError, match=r"expects latents \(B, h, w, 4\)"):
    apply_fn(params, jnp.ones((1, 8, 8, 3)), jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), 0)


def test_paper_sizes_have_the_dit_paper_widths():
  counts = {}
  for size in ("S", "B", "L", "XL"):
    model = build_dit(dict(size=size, patch_size=2, in_channels=4, num_classes=1000))
    shapes = jax.eval_shape(functools.partial(init_dit, model), jax.random.key(0))
    counts[size] = sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))
  # DiT-XL/2 has 675M parameters with 4 latent channels and learned sigma; ours predicts 4 channels (no sigma)
  # and adds a 3-entry level embedding: within 0.1% of the paper's figure.
  assert abs(counts["XL"] - 675_129_632) / 675_129_632 < 1e-3, counts
  assert counts["S"] < counts["B"] < counts["L"] < counts["XL"]
  with pytest.raises(ValueError, match="model.size must be one of"):
    build_dit(dict(size="XXL"))


def test_adaln_zero_init_makes_the_output_exactly_zero():
  model = _tiny()
  params = init_dit(model, jax.random.key(0))
  x = jax.random.normal(jax.random.key(1), (4, 8, 8, 4))
  out = _apply(model)(params, x, jnp.array([0.0, 0.3, 0.7, 1.0]), jnp.array([0, 3, 7, 8]), 0)
  assert np.array_equal(np.asarray(out), np.zeros_like(out))
  for name in ("adaLN_modulation", "final_adaLN_modulation", "final_linear"):
    leaves = jax.tree.leaves(params["block_0"][name] if name == "adaLN_modulation" else params[name])
    assert all(not np.asarray(a).any() for a in leaves), name
  # Only the final layer being zero makes the output zero: with it nudged, the output moves.
  nudged = dict(params, final_linear=_perturbed(params["final_linear"]))
  assert float(jnp.abs(_apply(model)(nudged, x, jnp.full((4,), 0.5), jnp.zeros((4,), jnp.int32), 0)).max()) > 1e-3


# -- objective and sampler ------------------------------------------------------------------------------------------
def test_flow_matching_loss_decreases_on_a_tiny_overfit_set():
  model = _tiny(num_classes=2)
  params = init_dit(model, jax.random.key(0))
  # Two classes, each one fixed 4x4x4 latent: the velocity field to learn is simple.
  protos = jax.random.normal(jax.random.key(2), (2, 4, 4, 4))
  labels = jnp.array([0, 1] * 8)
  x = protos[labels]
  tx = optax.adam(3e-3)
  opt = tx.init(params)
  loss_fn = lambda p, rng: flow.flow_matching_loss(_apply(model), p, x, labels, 1, rng, null_class=2,
                                                   class_dropout=0.0)
  eval_keys = jax.random.split(jax.random.key(9), 8)
  eval_loss = jax.jit(lambda p: jnp.mean(jax.vmap(lambda k: loss_fn(p, k))(eval_keys)))

  @jax.jit
  def step(p, opt, rng):
    g = jax.grad(loss_fn)(p, rng)
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt

  before = float(eval_loss(params))
  for i in range(100):
    params, opt = step(params, opt, jax.random.key(100 + i))
  after = float(eval_loss(params))
  # At init the velocity is 0, so the loss is E|x - noise|^2 = 2 per element (unit-variance data and noise).
  assert 1.5 < before < 2.5
  assert after < 0.5 * before, (before, after)


def test_cfg_scale_1_is_the_conditional_model_and_scale_0_the_unconditional():
  model = _tiny()
  params = _perturbed(init_dit(model, jax.random.key(0)))
  apply_fn = _apply(model)
  x = jax.random.normal(jax.random.key(1), (3, 4, 4, 4))
  t, labels = jnp.array([0.1, 0.5, 0.9]), jnp.array([0, 4, 7])
  conditional = apply_fn(params, x, t, labels, 1)
  unconditional = apply_fn(params, x, t, jnp.full((3,), model.null_class), 1)
  assert float(jnp.abs(conditional - unconditional).max()) > 1e-3  # the class matters
  guided = lambda s: flow.guided_velocity(apply_fn, params, labels, 1, s, null_class=model.null_class)(x, t)
  np.testing.assert_allclose(guided(1.0), conditional, atol=1e-5)
  np.testing.assert_allclose(guided(0.0), unconditional, atol=1e-5)
  np.testing.assert_allclose(guided(3.0), unconditional + 3.0 * (conditional - unconditional), atol=1e-4)


def test_euler_and_heun_integrate_a_known_flow_exactly():
  # dx/dt = x - t has the solution x(t) = t + 1 + (x0 - 1) e^t; Heun is second order, Euler first.
  noise = jnp.full((2, 1, 1, 1), 0.5)
  exact = 2.0 + (0.5 - 1.0) * np.e
  errors = {}
  for solver in flow.SOLVERS:
    for n in (10, 20):
      x1 = flow.integrate(lambda x, t: x - t[:, None, None, None], noise, num_steps=n, solver=solver)
      errors[solver, n] = abs(float(x1[0, 0, 0, 0]) - exact)
  assert errors["euler", 10] / errors["euler", 20] == pytest.approx(2.0, rel=0.1)
  assert errors["heun", 10] / errors["heun", 20] == pytest.approx(4.0, rel=0.1)
  assert errors["heun", 10] < 0.05 * errors["euler", 10]
  with pytest.raises(ValueError, match="solver must be one of"):
    flow.integrate(lambda x, t: x, noise, num_steps=2, solver="rk45")


def _stats(channels=4, num_classes=8):
  return LatentStatistics(mean={l: [0.1] * channels for l in range(3)}, std={l: [2.0] * channels for l in range(3)},
                          count={0: 3, 1: 2, 2: 3},
                          class_level_counts=[[0, 0, 5], [0, 0, 5], [0, 0, 5], [0, 5, 0], [0, 5, 0], [5, 0, 0],
                                              [4, 1, 0], [5, 0, 0]][:num_classes])


def test_sampling_is_deterministic_for_a_seed_and_levels_follow_the_class():
  model = _tiny()
  gen = Generator(model, _perturbed(init_dit(model, jax.random.key(0))), _stats(), image_size=64, num_steps=3,
                  solver="euler", cfg_scale=2.0, batch_size=4)
  labels = [0, 3, 5, 6, 7]
  a = gen.sample_latents(labels, 1, seed=7)
  b = gen.sample_latents(labels, 1, seed=7)
  c = gen.sample_latents(labels, 1, seed=8)
  assert a.shape == (5, 4, 4, 4)
  np.testing.assert_array_equal(a, b)
  assert float(np.abs(a - c).max()) > 1e-2
  levels = gen.choose_levels(labels * 20, "auto", seed=0)
  np.testing.assert_array_equal(levels.reshape(20, 5)[:, [0, 1, 2, 4]], [[2, 1, 0, 0]] * 20)  # one-level classes
  assert set(gen.choose_levels([6] * 200, "auto").tolist()) == {0, 1}  # class 6: 4:1 of 8x and 16x
  np.testing.assert_array_equal(gen.choose_levels(labels, "32x"), [2] * 5)
  with pytest.raises(ValueError, match=r"classes \[8\] are out of range"):
    gen.choose_levels([8], 0)
  with pytest.raises(ValueError, match="a level must be"):
    gen.choose_levels([0], "64x")


# -- the trainer ----------------------------------------------------------------------------------------------------
def test_sharded_train_step_on_8_devices_equals_single_device():
  assert jax.device_count() >= 8
  config = _runlocal(**{"optimizer.warmup_steps": 1})
  model, tx = build_dit(config.model), T.make_optimizer(config)
  state = jax.jit(functools.partial(T.init_train_state, model=model, tx=tx))(jax.random.key(0))
  step_fn = functools.partial(T.train_step, model=model, tx=tx, config=config)
  latents = jax.random.normal(jax.random.key(1), (8, 4, 4, 4))
  labels = jnp.arange(8) % 8
  rng = jax.random.key(2)

  single = jax.devices()[0]
  out1, metrics1 = jax.jit(step_fn, static_argnums=4)(jax.device_put(state, single), latents, labels, rng, 1)
  out1, metrics1 = jax.jit(step_fn, static_argnums=4)(out1, latents, labels, rng, 1)  # two steps: Adam's state too

  mesh = parallel.make_mesh({"data": 4, "fsdp": 2}, devices=jax.devices()[:8])
  shardings = parallel.param_shardings(state, mesh, min_size=256)
  assert any(s.spec != jax.P() for s in jax.tree.leaves(shardings)), "the test must shard some parameters"
  rep, batch = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  jit8 = jax.jit(step_fn, in_shardings=(shardings, batch, batch, rep), out_shardings=(shardings, rep),
                 static_argnums=4)
  out8, metrics8 = jit8(jax.device_put(state, shardings), latents, labels, rng, 1)
  out8, metrics8 = jit8(out8, latents, labels, rng, 1)
  for a, b in zip(jax.tree.leaves(out1), jax.tree.leaves(out8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
  for k in metrics1:
    np.testing.assert_allclose(float(metrics1[k]), float(metrics8[k]), rtol=1e-5, err_msg=k)
  assert int(out8.step) == 2 and bool(out8.all_finite) and float(metrics8["loss"]) > 0


@pytest.fixture(scope="module")
def encoded(tmp_path_factory):
  """An untrained runlocal tokenizer (saved) and the 48 runlocal embedded images encoded with it."""
  tmp = tmp_path_factory.mktemp("dit_encoded")
  config = _runlocal(**{"num_steps": 1})
  T.encode_latents(config, str(tmp))  # writes <tmp>/tokenizer and <tmp>/latents
  return tmp / "tokenizer", tmp / "latents"


def test_latent_pipeline_is_level_bucketed_labelled_and_process_split(encoded):
  _, latents = encoded
  dataset = LatentDataset(latents)
  assert len(dataset) == 48
  np.testing.assert_array_equal(dataset.labels[:8], np.arange(8))  # embedded kinds cycle
  np.testing.assert_array_equal(np.bincount(dataset.levels), [18, 12, 18])
  whole = make_latent_train_iterator(dataset, batch_size=8, seed=0, process_index=0, process_count=1)
  halves = [make_latent_train_iterator(dataset, batch_size=4, seed=0, process_index=p, process_count=2)
            for p in range(2)]
  shapes = {0: (8, 8, 4), 1: (4, 4, 4), 2: (2, 2, 4)}
  for _ in range(6):
    batch, parts = next(whole), [next(h) for h in halves]
    level = int(batch["level"])
    assert batch["latent"].shape == (8, *shapes[level])
    assert all(dataset.levels[[i for i, r in enumerate(dataset.rows) if r["id"] in batch["id"]]] == level)
    assert sorted(batch["id"].tolist()) == sorted(parts[0]["id"].tolist() + parts[1]["id"].tolist())
  stats = LatentStatistics.measure(dataset, 8)
  assert stats.class_level_counts[0] == [0, 0, 6] and stats.class_level_counts[7] == [6, 0, 0]
  normalised = np.concatenate([stats.normalize(dataset[i]["latent"][None], 0)
                               for i in np.flatnonzero(dataset.levels == 0)])
  np.testing.assert_allclose(normalised.mean(axis=(0, 1, 2)), 0, atol=1e-5)
  np.testing.assert_allclose(normalised.std(axis=(0, 1, 2)), 1, atol=1e-4)


def _env():
  import os
  return dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
              XLA_FLAGS=xla_flags(2))


def _steps(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def test_exact_resume_after_sigkill(tmp_path, encoded):
  tokenizer, latents = encoded
  args = ["--config.num_steps=16", "--config.checkpoint_every=4", "--config.log_every=1000",
          "--config.sample_every=0", "--config.keep_checkpoints=2", f"--config.data.latents={latents}",
          f"--config.tokenizer.path={tokenizer}"]
  cmd = lambda w: [sys.executable, "-m", "cat_jax.train_dit", "--config", str(ROOT / "configs/dit.py:runlocal"),
                   "--workdir", str(w), *args]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(cmd(straight), env=_env(), check=True, capture_output=True, timeout=600)
  proc = subprocess.Popen(cmd(killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 600
  while time.time() < deadline and not any(s >= 4 for s in _steps(killed)):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  at_kill = _steps(killed)
  assert at_kill and max(at_kill) < 16, f"the run must be killed mid-way, had checkpoints {at_kill}"
  subprocess.run(cmd(killed), env=_env(), check=True, capture_output=True, timeout=600)
  restored = []
  for w in (straight, killed):
    with ocp.StandardCheckpointer() as c:
      path = w / "checkpoints" / "16"
      restored.append((c.restore(path / "train_state"), c.restore(path / "ema_params")))
  leaves_a, leaves_b = jax.tree.leaves(restored[0]), jax.tree.leaves(restored[1])
  assert len(leaves_a) == len(leaves_b) > 10
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
  assert int(restored[0][0]["step"]) == 16


def test_runlocal_end_to_end_then_sample_cli(tmp_path, capsys):
  from cat_jax import sample

  config = _runlocal()
  state = T.train_and_evaluate(config, str(tmp_path))  # encodes its own latents with an untrained tokenizer
  assert int(state.step) == config.num_steps == 6
  assert _steps(tmp_path) == [3, 6]
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train/loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  assert all(np.isfinite(r["train/loss"]) for r in train_rows) and any("train/level" in k for k in train_rows[-1])
  assert (tmp_path / "images" / "samples_step0000006.png").exists()
  stats = json.loads((tmp_path / "latent_stats.json").read_text())
  assert sorted(stats["mean"]) == ["0", "1", "2"] and len(stats["class_level_counts"]) == 8

  out = tmp_path / "grid.png"
  assert sample.main(["--workdir", str(tmp_path), "--classes", "0,5,7", "--per_class", "3", "--level", "auto",
                      "--out", str(out), "--report", "--jpeg_report"]) == 0
  from PIL import Image
  assert Image.open(out).size == (3 * 64 + 2 * 2, 3 * 64 + 2 * 2)
  report = json.loads(out.with_suffix(".json").read_text())
  assert report["levels"] == [2] * 3 + [0] * 6  # flat -> 32x; chart, dense_text -> 8x (their only level)
  # The JPEG-bpp report (issue 14's complexity check): a row per class, real flat images far simpler than charts.
  printed = capsys.readouterr().out.splitlines()
  rows = {int(r.split(" | ")[0]): [float(v) for v in r.split(" | ")[1:3]] for r in printed if r[:1].isdigit()}
  assert sorted(rows) == [0, 5, 7] and all(v > 0 for r in rows.values() for v in r)
  assert rows[0][1] < 0.5 * rows[5][1]  # real bpp: flat vs chart
  assert any(r.startswith("Spearman rank correlation, generated vs real: ") for r in printed)
  assert sample.main(["--workdir", str(tmp_path), "--classes", "0,8", "--out", str(out)]) == 2
  assert sample.main(["--workdir", str(tmp_path), "--fid_samples", "10", "--out", str(out)]) == 2


def test_class_rank_correlation_is_spearman_over_common_classes():
  from cat_jax.sample import class_rank_correlation

  a = {0: 1.0, 1: 3.0, 2: 2.0, 5: 0.5}
  assert class_rank_correlation(a, {0: 0.1, 1: 9.0, 2: 8.0, 5: 0.2, 7: 4.0}) == pytest.approx(0.8)  # one swap of four
  assert class_rank_correlation(a, {y: -v for y, v in a.items()}) == pytest.approx(-1.0)
  assert class_rank_correlation({3: 1.0}, {3: 2.0}) == 1.0


def test_generation_fid_matches_the_frechet_distance_of_its_features(tmp_path):
  from cat_jax.metrics.fid import FidStatistics, fid_from_statistics
  from cat_jax.sample import generation_fid

  class FakeGenerator:  # images whose mean colour is their class
    num_classes = 3

    def choose_levels(self, labels, level, seed=0):
      return np.full(len(labels), 1, np.int32)

    def generate(self, labels, levels, seed=0):
      rng = np.random.default_rng(seed)
      return np.asarray(labels)[:, None, None, None] / 3 + 0.1 * rng.normal(size=(len(labels), 4, 4, 3)), None

  features = lambda images: np.asarray(images).reshape(len(images), -1)[:, :6]
  reference = FidStatistics.from_features(np.random.default_rng(0).normal(size=(64, 6)))
  result = generation_fid(FakeGenerator(), features, reference, num_samples=40, batch_size=16)
  assert result["num_samples"] == 40 and result["num_reference"] == 64 and result["level_counts"] == [0, 40, 0]
  labels = np.random.default_rng([0, 0xF1D]).integers(0, 3, 40)
  feats = np.concatenate([features(FakeGenerator().generate(labels[s:s + 16], None, seed=s)[0])
                          for s in range(0, 40, 16)])
  assert result["gfid"] == pytest.approx(fid_from_statistics(FidStatistics.from_features(feats), reference),
                                         rel=1e-9)


def test_demo_config_trains_on_the_shipped_demo_tokenizer():
  from cat_jax.tokenizer import Tokenizer

  config = load_config("dit.py", "demo")
  tok = Tokenizer.from_pretrained(config.tokenizer.path)
  assert tok.model.z_channels == config.model.in_channels
  assert tok.image_size == config.data.image_size == config.data.source_kwargs["image_size"]
