"""Training: the sharded step, the GAN schedule, exact resume after SIGKILL, SIGTERM, NaN, multi-process, errors."""

import functools
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

from cat_jax import checkpoint as ckpt
from cat_jax import parallel
from cat_jax import train as T
from cat_jax.losses import gan as gan_losses
from cat_jax.losses.reconstruction import reconstruction_loss
from cat_jax.models.nested_vae import NestedVAE, build_model
from conftest import ROOT, load_config, runlocal_workdir_config, xla_flags


def _runlocal(**overrides):
  config = load_config("cat.py", "runlocal")
  config.update_from_flattened_dict(overrides)
  return config


def _step_setup(config):
  model, disc = build_model(config.model), T.make_discriminator(config)
  g_tx, d_tx, g_schedule = T.make_optimizers(config)
  init_fn = functools.partial(T.init_train_state, model=model, disc=disc, g_tx=g_tx, d_tx=d_tx,
                              image_size=config.data.image_size)
  step_fn = functools.partial(T.train_step, model=model, disc=disc, lpips_module=None, g_tx=g_tx, d_tx=d_tx,
                              g_schedule=g_schedule, config=config)
  return init_fn, step_fn


def _batch(n, size, seed=0):
  return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, (n, size, size, 3)), jnp.float32)


def test_sharded_step_on_4x2_mesh_equals_single_device():
  assert jax.device_count() >= 8
  # Adam's first update is about lr * sign(g) whatever |g|: a gradient element that is rounding noise (~1e-9)
  # would move by a full step in a direction set by the reduction order. A larger eps makes tiny gradients take
  # tiny steps, so the comparison below sees real differences only.
  config = _runlocal(**{"loss.disc_start": 0, "loss.lecam_weight": 0.1, "loss.r1_weight": 1.0,
                        "optimizer.eps": 1e-3})
  init_fn, step_fn = _step_setup(config)
  rng = jax.random.key(0)
  state = jax.jit(init_fn)(rng)
  images = _batch(8, 32)
  # A static level: on 8 simulated devices sharing 2 cores, the slow CPU backward pass of lax.switch can outlast
  # XLA's collective rendezvous timeout. The traced-level step is covered on one device below.
  step_at_level_1 = lambda state, images, rng: step_fn(state, images, 1, {}, rng)

  single = jax.devices()[0]
  state1 = jax.device_put(state, single)
  out1, metrics1 = jax.jit(step_at_level_1)(state1, jax.device_put(images, single), rng)

  mesh = parallel.make_mesh({"data": 4, "fsdp": 2}, devices=jax.devices()[:8])
  shardings = parallel.param_shardings(state, mesh, min_size=64)
  sharded_specs = [s.spec for s in jax.tree.leaves(shardings) if s.spec != jax.P()]
  assert sharded_specs, "the test must shard some parameters over fsdp"
  rep = parallel.replicated(mesh)
  jit_step = jax.jit(step_at_level_1, in_shardings=(shardings, parallel.batch_sharding(mesh), rep),
                     out_shardings=(shardings, rep))
  state8 = jax.device_put(state, shardings)
  out8, metrics8 = jit_step(state8, jax.device_put(images, parallel.batch_sharding(mesh)), rng)

  assert out8.params["enc_conv_in"]["kernel"].sharding.spec == shardings.params["enc_conv_in"]["kernel"].spec
  # Adam divides by sqrt(v): a gradient reduced in another order moves a parameter by up to ~1e-5 more.
  for a, b in zip(jax.tree.leaves(out1), jax.tree.leaves(out8)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)
  for k in metrics1:
    np.testing.assert_allclose(float(metrics1[k]), float(metrics8[k]), rtol=1e-4, atol=1e-5, err_msg=k)


def test_discriminator_only_steps_after_disc_start_and_gan_weight_is_adaptive():
  config = _runlocal(**{"loss.disc_start": 2})
  init_fn, step_fn = _step_setup(config)
  rng = jax.random.key(0)
  state = jax.jit(init_fn)(rng)
  d0 = state.d_params
  jit_step = jax.jit(step_fn, static_argnames="use_gan")
  weights = []
  for i in range(4):
    state, metrics = jit_step(state, _batch(4, 32, seed=i), jnp.int32(i % 3), {}, rng,
                              use_gan=T.gan_in_step(i + 1, config))
    weights.append(float(metrics["gan_adaptive_weight"]))
    moved = any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(d0), jax.tree.leaves(state.d_params)))
    assert moved == (i >= 2), f"step {i}: discriminator moved={moved}"
    assert float(metrics["gan_on"]) == float(i >= 2)
  assert weights[0] == weights[1] == 0.0
  assert weights[2] > 0 and weights[3] > 0 and np.isfinite(weights[2:]).all()
  assert int(state.step) == 4 and bool(state.all_finite)


def _env(devices=2, **extra):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(devices))
  env.update(extra)
  return env


def _train_cmd(workdir, *overrides):
  return [sys.executable, "-m", "cat_jax.train", "--config", str(ROOT / "configs/cat.py:runlocal"),
          "--workdir", str(workdir), *overrides]


def _steps(workdir):
  d = pathlib.Path(workdir) / "checkpoints"
  return sorted(int(p.name) for p in d.iterdir() if p.name.isdigit()) if d.exists() else []


def _restore_final(workdir):
  step = max(_steps(workdir))
  path = pathlib.Path(workdir) / "checkpoints" / str(step)
  with ocp.StandardCheckpointer() as c:
    return step, c.restore(path / "train_state"), c.restore(path / "ema_params")


class _TinyPerceptual(nn.Module):
  """Stands in for LPIPS (a per-image distance between learned features) without the VGG weights."""

  @nn.compact
  def __call__(self, x, y):
    conv = nn.Conv(4, (3, 3), name="features")
    return jnp.mean(jnp.square(nn.swish(conv(x)) - nn.swish(conv(y))), axis=(1, 2, 3))


def test_generator_gradient_equals_the_direct_formulation():
  """generator_loss_fn differentiates the losses once w.r.t. the reconstruction and reuses that for the adaptive
  weight; its parameter gradient and metrics equal the direct formulation's (taming's weight from separate
  gradients at the last layer, then the gradient of the weighted sum)."""
  config = _runlocal(**{"loss.disc_start": 0, "loss.lpips_weight": 0.5, "loss.kl_weight": 1e-2})
  cfg = config.loss
  model, disc = build_model(config.model), T.make_discriminator(config)
  init_fn, _ = _step_setup(config)
  state = jax.jit(init_fn)(jax.random.key(0))
  perceptual = _TinyPerceptual()
  x, level, rng = _batch(2, 32, seed=3), 1, jax.random.key(4)
  p_params = perceptual.init(jax.random.key(5), x, x)["params"]

  def direct(params):
    posterior = model.apply({"params": params}, x, level, method=NestedVAE.encode)
    z = posterior.sample(rng)
    decode = lambda head: model.apply({"params": dict(params, dec_conv_out=head)}, z, level, method=NestedVAE.decode)
    nll = lambda r: reconstruction_loss(x, r, cfg.recon) + cfg.lpips_weight * jnp.mean(perceptual.apply(
        {"params": p_params}, x, r))
    gan = lambda r: gan_losses.generator_loss(
        fake_logit=T.apply_discriminator(disc, state.d_params, state.d_batch_stats, r)[0], loss_type=cfg.gan_loss)
    head = jax.lax.stop_gradient(params["dec_conv_out"])
    weight = gan_losses.adaptive_generator_weight(nll_grad=jax.grad(lambda h: nll(decode(h)))(head)["kernel"],
                                                  gan_grad=jax.grad(lambda h: gan(decode(h)))(head)["kernel"])
    recon = decode(params["dec_conv_out"])
    total = nll(recon) + cfg.kl_weight * jnp.mean(posterior.kl()) + cfg.gan_weight * weight * gan(recon)
    return total, weight

  ours = functools.partial(T.generator_loss_fn, model=model, disc=disc, lpips_module=perceptual, loss_cfg=cfg,
                           d_batch_stats=state.d_batch_stats)
  (total, aux), grads = jax.jit(jax.value_and_grad(ours, has_aux=True))(
      state.params, state.d_params, x, level, rng, p_params)
  (want_total, want_weight), want_grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(state.params)
  assert float(aux["metrics"]["gan_g_loss"]) != 0 and float(aux["metrics"]["lpips"]) > 0
  np.testing.assert_allclose(float(aux["metrics"]["gan_adaptive_weight"]), float(want_weight), rtol=1e-5)
  np.testing.assert_allclose(float(aux["metrics"]["g_loss"]), float(want_total), rtol=1e-5)
  np.testing.assert_allclose(float(total), float(want_total), rtol=1e-5)
  flat, want_flat = jax.tree.leaves(grads), jax.tree.leaves(want_grads)
  assert len(flat) == len(want_flat) > 50
  for got, want in zip(flat, want_flat):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-7 * float(optax.tree.norm(want_grads)))



# Every trainer run below has the same steps to compile: the same num_steps (the learning-rate schedule's horizon
# is compiled in), the GAN on from the first step (one executable, not two), the same 2 devices, the traced level
# (one executable for every level); so the first run compiles and the others load it from the session's
# compilation cache (conftest.py).
RUN_ARGS = ["--config.num_steps=24", "--config.loss.disc_start=0", "--config.log_every=1000",
            "--config.eval_every=0", "--config.keep_checkpoints=2"]  # eval_every=0: no evaluation at all


def test_exact_resume_after_sigkill(tmp_path):
  args = [*RUN_ARGS, "--config.checkpoint_every=8"]
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  subprocess.run(_train_cmd(straight, *args), env=_env(), check=True, capture_output=True, timeout=900)

  proc = subprocess.Popen(_train_cmd(killed, *args), env=_env(), stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
  deadline = time.time() + 900
  while time.time() < deadline and not _steps(killed):
    time.sleep(0.02)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  at_kill = _steps(killed)
  # The kill comes before the end: orbax starts a save only after the previous one is finished, so when step 8
  # appears the run is at most at step 23.
  assert at_kill and max(at_kill) < 24, f"the run must be killed mid-way, had checkpoints {at_kill}"

  subprocess.run(_train_cmd(killed, *args), env=_env(), check=True, capture_output=True, timeout=900)
  step_a, state_a, ema_a = _restore_final(straight)
  step_b, state_b, ema_b = _restore_final(killed)
  assert step_a == step_b == 24
  leaves_a, leaves_b = jax.tree.leaves((state_a, ema_a)), jax.tree.leaves((state_b, ema_b))
  assert len(leaves_a) == len(leaves_b) > 10
  for a, b in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))  # bitwise
  # The resumed run appended to the same metrics log.
  rows = [json.loads(line) for line in (killed / "metrics.jsonl").read_text().splitlines()]
  assert rows and all(r["step"] <= 24 for r in rows)
  assert not any(k.startswith("eval/") for r in rows for k in r)  # eval_every=0
  assert not (killed / "images").exists()


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  # One level (8x): the level is traced, so the same executable as the SIGKILL test's.
  args = [*RUN_ARGS, "--config.checkpoint_every=4", "--config.data.levels=8x"]
  proc = subprocess.Popen(_train_cmd(tmp_path, *args), env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 900
  while time.time() < deadline and not _steps(tmp_path):
    time.sleep(0.02)
  # Step 4's checkpoint is there, so the run is at most at step 11 (a save waits for the one before it): the
  # signal comes well before the end, however loaded the machine.
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=600)
  assert proc.returncode == 0, out
  assert "Preempted" in out
  assert "Levels: traced (lax.switch)" in out  # the default on every backend, CPU included
  steps = _steps(tmp_path)
  assert steps and max(steps) < 24
  saved = max(steps)
  _, state, _ = _restore_final(tmp_path)
  assert int(state["step"]) == saved  # the checkpoint holds the step it was taken at


def test_non_finite_loss_stops_with_clear_message_keeping_last_good_checkpoint(tmp_path):
  # One level: a learning rate of 1e30 is compiled into the step, so this run cannot reuse the others' executables;
  # it also runs the loop's static-level path (one executable per level).
  args = ["--config.num_steps=30", "--config.checkpoint_every=1", "--config.log_every=1", "--config.data.levels=0",
          "--config.eval_every=0", "--config.optimizer.lr=1e30", "--config.optimizer.warmup_steps=0",
          "--config.optimizer.grad_clip=1e30", "--config.static_level=True"]
  proc = subprocess.run(_train_cmd(tmp_path, *args), env=_env(), capture_output=True, text=True, timeout=900)
  assert proc.returncode != 0
  assert "non-finite loss or gradient" in proc.stderr
  assert "Levels: static (one executable per level)" in proc.stderr
  assert _steps(tmp_path), "no checkpoint was kept before the loss went non-finite"
  for step in _steps(tmp_path):
    path = tmp_path / "checkpoints" / str(step)
    with ocp.StandardCheckpointer() as c:
      saved = c.restore(path / "train_state")
    assert bool(saved["all_finite"])
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(saved["params"]))


def test_runlocal_end_to_end_in_process(runlocal_workdir, tmp_path):
  """configs/cat.py:runlocal on a 4x2 FSDP mesh, trained once per session by conftest.py's ``runlocal_workdir``
  (test_tokenizer.py and test_evaluate.py read it too)."""
  workdir = pathlib.Path(runlocal_workdir)
  config = runlocal_workdir_config()
  assert _steps(workdir) == [3, 6]
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  train_rows = [r for r in rows if "train/g_loss" in r]
  assert [r["step"] for r in train_rows] == [2, 4, 6]
  assert any(k.startswith("train/level") for k in train_rows[0])
  assert all(np.isfinite(r["train/g_loss"]) for r in train_rows)
  assert [r["train/gan_on"] for r in train_rows] == [0.0, 0.5, 1.0]  # the GAN from the 4th update (disc_start=3)
  eval_rows = [r for r in rows if "eval/loss" in r]
  assert [r["step"] for r in eval_rows] == [0, 3, 6]
  assert {f"eval/level{lvl}/{m}{baseline}" for lvl in range(3) for m in ("psnr", "gmsd", "haarpsi")
          for baseline in ("", "_area_bicubic", "_dct_code")} <= set(eval_rows[-1])  # 32x32: HaarPSI's 16 fit
  assert list((workdir / "tensorboard").iterdir())
  # Re-running a finished run restores and stops at once (on a copy: the run is shared).
  shutil.copytree(workdir, tmp_path / "again")
  again = T.train_and_evaluate(config, str(tmp_path / "again"))
  step, saved_state, saved_ema = _restore_final(workdir)
  assert int(again.step) == step == config.num_steps
  for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(saved_state["params"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Inference restores the EMA (default) or the raw parameters alone, placed as asked.
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), again.params)
  for use_ema, expected in ((True, saved_ema), (False, saved_state["params"])):
    params, step = ckpt.restore_inference_params(str(workdir), abstract, use_ema=use_ema)
    assert step == config.num_steps
    assert jax.tree.leaves(params)[0].sharding == jax.tree.leaves(abstract)[0].sharding
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_eval_levels_evaluate_only_those_levels_in_any_spelling():
  from cat_jax import levels as L

  assert L.parse_levels(None) == L.parse_levels("") == (0, 1, 2)
  assert L.parse_levels("32x, 8x") == L.parse_levels("2,0") == L.parse_levels([32, "0"]) == (0, 2)
  assert L.parse_levels(16) == L.parse_levels("16x") == (1,)
  with pytest.raises(ValueError, match="a level must be"):
    L.parse_levels("8x,64x")

  calls = []

  def eval_fn(params, images, level):  # a stand-in model: level l darkens by l / 4
    calls.append(int(level))
    recon = images - level / 4
    return {"": recon}, {"l1": jnp.abs(recon - images).mean((1, 2, 3))}

  class Writer:
    def write_images(self, step, images):
      self.images = images

  writer, batch = Writer(), {"image": jnp.zeros((2, 8, 8, 3)), "mask": jnp.array([True, False])}
  out = T.evaluate_reconstruction(eval_fn, None, [batch, batch], writer=writer, levels=L.parse_levels("32x,8x"))
  assert calls == [0, 2, 0, 2]
  assert {k: out[k] for k in out if k.endswith("l1") or k == "eval/loss"} == {
      "eval/level0/l1": 0.0, "eval/level2/l1": 0.5, "eval/loss": 0.25}
  # PSNR of a uniform error: 0 and -0.5 are the 8-bit levels 128 and 64 (round half to even).
  assert out["eval/level2/psnr"] == pytest.approx(20 * np.log10(255 / 64), abs=1e-4)
  assert out["eval/level0/psnr"] == 50.0 and "eval/level0/ssim" not in out  # 8x8: under SSIM's 11x11 window
  (name, grid), = writer.images.items()
  assert name == "reconstructions/original_8x_32x" and grid.shape[0] == 3 * 8 + 2 * 2  # one image, 3 rows
  with pytest.raises(ValueError, match="a level must be"):  # from the config, before anything is compiled
    T.train_and_evaluate(_runlocal(**{"data.eval_levels": "4x"}), "/nonexistent/never/written")


def test_local_rows_are_the_rows_this_process_holds_in_order_once():
  class Shard:
    def __init__(self, start, rows):
      self.index, self.data = (slice(start, start + len(rows)), slice(None)), np.asarray(rows)

  class Global:  # a batch of 8 rows; this process holds rows 4-5 (twice: a replica) and 0-1
    is_fully_addressable = False
    addressable_shards = [Shard(4, [[4], [5]]), Shard(0, [[0], [1]]), Shard(4, [[4], [5]])]

  assert parallel.local_rows(Global()).tolist() == [[0], [1], [4], [5]]
  assert parallel.local_rows(jnp.arange(3)).tolist() == [0, 1, 2]


class _Identity:
  """A stand-in model without shortcuts whose reconstruction is its input."""
  shortcuts = False

  def apply(self, variables, images, level, method=None):  # as NestedVAE.reconstruct: (recon, code_only)
    return images, jnp.zeros(images.shape[:1], bool)


def test_eval_logs_the_cheap_measures_per_level_for_the_model_and_both_baselines():
  from cat_jax import levels as L
  from cat_jax.metrics import image_quality as iq
  from cat_jax.metrics.baselines import dct_code
  from cat_jax.models.nested_vae import init_params

  config = _runlocal()
  size = config.data.image_size  # 32: every cheap measure fits
  model = build_model(config.model)
  params = init_params(model, jax.random.key(0))
  images = _batch(3, size, seed=5)
  batch = {"image": images, "mask": jnp.array([True, True, False])}  # the padded last image is left out
  eval_fn = jax.jit(functools.partial(T.eval_step, model=model))
  out = T.evaluate_reconstruction(eval_fn, params, [batch])
  assert T.eval_measures(size, size) == iq.CHEAP_MEASURES == ("psnr", "gmsd", "haarpsi")
  for lvl in range(L.NUM_LEVELS):
    for baseline in ("", "_area_bicubic", "_dct_code"):
      for m in iq.CHEAP_MEASURES:
        assert np.isfinite(out[f"eval/level{lvl}/{m}{baseline}"])
      assert 0.0 <= out[f"eval/level{lvl}/haarpsi{baseline}"] <= 1.0
      assert out[f"eval/level{lvl}/gmsd{baseline}"] >= 0.0
    # The registry's numbers (8-bit levels inside), averaged over the unmasked images; float32 sums of 2 values.
    direct = iq.qualities(("haarpsi", "gmsd"), images[:2], dct_code(images[:2], lvl, model.z_channels))
    assert out[f"eval/level{lvl}/haarpsi_dct_code"] == pytest.approx(float(np.mean(direct["haarpsi"])), abs=1e-6)
    assert out[f"eval/level{lvl}/gmsd_dct_code"] == pytest.approx(float(np.mean(direct["gmsd"])), abs=1e-6)
  # Random pixels lose detail with every halving of the grid: HaarPSI falls from 8x to 32x for both baselines.
  for baseline in ("_area_bicubic", "_dct_code"):
    haarpsi = [out[f"eval/level{lvl}/haarpsi{baseline}"] for lvl in range(L.NUM_LEVELS)]
    assert haarpsi[0] > haarpsi[2]
  line = T.eval_line(out, (0, 2))
  assert line.count("HaarPSI") == 3 and line.count("; ") == 3 and "\n" not in line  # model, 2 baselines, code share

  # A reconstruction equal to its input gets each measure's best value (HaarPSI: 1 up to float32 sums, ~1e-6;
  # GMSD: a similarity map of exact ones).
  same = T.evaluate_reconstruction(jax.jit(functools.partial(T.eval_step, model=_Identity())), {}, [batch])
  assert same["eval/level0/psnr"] == iq.PSNR_MAX_DB and same["eval/level0/l1"] == 0.0
  assert same["eval/level0/haarpsi"] == pytest.approx(1.0, abs=1e-5)
  assert same["eval/level0/gmsd"] == 0.0

  # Below a measure's min_side it is left out, the others stay: 8x8 images are under HaarPSI's 16x16.
  assert iq.MEASURES["haarpsi"].min_side == 16 and T.eval_measures(16, 16) == iq.CHEAP_MEASURES
  assert T.eval_measures(8, 8) == T.eval_measures(15, 64) == ("psnr", "gmsd")
  small = {"image": _batch(2, 8, seed=6), "mask": jnp.array([True, True])}
  out = T.evaluate_reconstruction(jax.jit(functools.partial(T.eval_step, model=_Identity()), static_argnums=2),
                                  {}, [small], level_arg=int, levels=(0,))
  assert {k for k in out if "haarpsi" in k} == set()
  assert {"eval/level0/psnr", "eval/level0/gmsd", "eval/level0/gmsd_area_bicubic"} <= set(out)
  assert "HaarPSI" not in T.eval_line(out, (0,))


def test_incompatible_config_is_a_clear_error(runlocal_workdir, tmp_path):
  shutil.copytree(runlocal_workdir, tmp_path / "run")
  with pytest.raises(ValueError, match=r"model.ch: checkpoint has 8, config has 16"):
    T.train_and_evaluate(_runlocal(num_steps=2, **{"model.ch": 16}), str(tmp_path / "run"))


def test_missing_dataset_and_weights_give_instructions(tmp_path):
  config = _runlocal(**{"data.source": "tfds:imagenet2012"})
  config.data.source_kwargs = {"data_dir": str(tmp_path / "tfds")}
  with pytest.raises(FileNotFoundError, match="manual"):
    T.train_and_evaluate(config, str(tmp_path / "w1"))
  config = _runlocal(**{"loss.lpips_weight": 1.0})
  config.lpips_path = str(tmp_path / "missing_lpips.msgpack")
  with pytest.raises(FileNotFoundError, match="python -m cat_jax.convert lpips"):
    T.train_and_evaluate(config, str(tmp_path / "w2"))
  with pytest.raises(ValueError, match="divisible"):
    T.train_and_evaluate(_runlocal(batch_size=6), str(tmp_path / "w3"))
