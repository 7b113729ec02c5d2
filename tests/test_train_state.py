"""Trainer state beyond parameters (the spectral-norm discriminator's power iteration), and how checkpoints save it."""

import functools

import grain
import jax
import numpy as np

from cat_jax import checkpoint as ckpt
from cat_jax import train as T
from cat_jax.models.nested_vae import build_model
from test_train import _batch, _runlocal


def test_spectral_discriminator_state_is_stepped_checkpointed_and_resumed(tmp_path):
  config = _runlocal(**{"disc.norm": "spectral", "loss.disc_start": 1})
  model, disc = build_model(config.model), T.make_discriminator(config)
  g_tx, d_tx, g_schedule = T.make_optimizers(config)
  init_fn = functools.partial(T.init_train_state, model=model, disc=disc, g_tx=g_tx, d_tx=d_tx,
                              image_size=config.data.image_size)
  state = jax.jit(init_fn)(jax.random.key(0))
  assert set(state.d_batch_stats) == {"conv_0_spectral", "conv_1_spectral", "logits_spectral"}
  step = jax.jit(functools.partial(T.train_step, model=model, disc=disc, lpips_module=None, g_tx=g_tx, d_tx=d_tx,
                                   g_schedule=g_schedule, config=config), static_argnums=2,
                 static_argnames="use_gan")
  leaves = lambda s: [np.asarray(x) for x in jax.tree.leaves(s.d_batch_stats)]
  rng = jax.random.key(1)

  before = leaves(state)
  state, _ = step(state, _batch(4, 32), 0, {}, rng, use_gan=False)  # before disc_start: the discriminator stays
  assert all(np.array_equal(a, b) for a, b in zip(before, leaves(state)))
  state, metrics = step(state, _batch(4, 32, seed=1), 0, {}, rng)  # the GAN is on: one power iteration
  assert any(not np.array_equal(a, b) for a, b in zip(before, leaves(state)))
  assert np.isfinite(float(metrics["d_loss"])) and bool(state.all_finite)
  # sigma is the kernel's largest singular value as estimated from u: close to the true one, never above.
  kernel = np.asarray(state.d_params["conv_0"]["kernel"]).reshape(-1, config.disc.base_channels)
  sigma = float(np.asarray(state.d_batch_stats["conv_0_spectral"]["conv_0/kernel/sigma"]))
  assert 0.5 * np.linalg.norm(kernel, 2) < sigma <= 1.0001 * np.linalg.norm(kernel, 2)

  # The checkpoint holds the vectors; a resumed step continues exactly as the uninterrupted one.
  checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=False)
  data_iter = iter(grain.MapDataset.range(4).to_iter_dataset())
  checkpointer.save(2, state.replace(ema_params=None), state.ema_params, data_iter)
  checkpointer.wait()
  abstract = jax.eval_shape(init_fn, jax.random.key(0))
  single = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=single), abstract)
  restored, ema, _ = checkpointer.restore(2, abstract.replace(ema_params=None), abstract.ema_params, data_iter)
  checkpointer.close()
  restored = restored.replace(ema_params=ema)
  for a, b in zip(leaves(state), leaves(restored)):
    np.testing.assert_array_equal(a, b)
  straight, _ = step(state, _batch(4, 32, seed=2), 0, {}, rng)
  resumed, _ = step(restored, _batch(4, 32, seed=2), 0, {}, rng)
  for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_a_cpu_save_of_replicated_arrays_compiles_nothing(tmp_path):
  """Arrays replicated over two data-parallel CPU devices go to the host as they are: orbax's replica-parallel
  saving compiled a slice program per array shape there (seconds of every short CPU run's first save)."""
  mesh = jax.make_mesh((2,), ("data",), devices=jax.devices()[:2])
  replicated = jax.sharding.NamedSharding(mesh, jax.P())
  # Shapes no other test uses, so that nothing is already compiled for them in this process.
  tree = {f"w{i}": jax.device_put(np.arange(2 * 37 * (i + 1), dtype=np.float32).reshape(2, -1), replicated)
          for i in range(3)}
  events = []
  listener = lambda event, duration, **kwargs: events.append(event)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    checkpointer = ckpt.Checkpointer(str(tmp_path), async_save=False)
    checkpointer.save(1, tree, tree, iter(grain.MapDataset.range(4).to_iter_dataset()))
    checkpointer.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert not [e for e in events if e.startswith("/jax/core/compile")], events
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated), tree)
  restored, _, _ = checkpointer.restore(1, abstract, abstract, iter(grain.MapDataset.range(4).to_iter_dataset()))
  checkpointer.close()
  for name, a in tree.items():
    np.testing.assert_array_equal(np.asarray(restored[name]), np.asarray(a))
    assert restored[name].sharding == replicated
