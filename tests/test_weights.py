"""Weight folders: a training run released (`python -m cat_jax.convert release`) holds exactly the run's EMA and raw
generators and its discriminator with the spectral-norm state, and `--config.init_from` restores all of them."""

import jax
import numpy as np
import pytest

from cat_jax import train as T
from cat_jax import warm_start, weights
from cat_jax.convert import __main__ as convert_main
from conftest import load_config


def _assert_trees_equal(saved, live, what):
  flat_saved, flat_live = weights.flatten(saved), weights.flatten(jax.device_get(live))
  assert sorted(flat_saved) == sorted(flat_live), what
  for key, value in flat_live.items():
    np.testing.assert_array_equal(flat_saved[key], value, err_msg=f"{what}: {key}")


@pytest.fixture(scope="module")
def spectral_run(tmp_path_factory):
  """configs/cat.py:runlocal with a spectral-norm discriminator that trains from step 1, 4 steps."""
  config = load_config("cat.py", "runlocal")
  config.update_from_flattened_dict({"disc.norm": "spectral", "loss.disc_start": 1, "num_steps": 4,
                                     "eval_every": 0, "checkpoint_every": 4})
  workdir = tmp_path_factory.mktemp("spectral_run")
  state = T.train_and_evaluate(config, str(workdir))
  return config, str(workdir), state


def test_release_holds_the_runs_generators_and_discriminator(spectral_run, tmp_path, capsys):
  config, workdir, state = spectral_run
  assert convert_main.main(["release", "--src", workdir, "--out", str(tmp_path / "rel")]) == 0
  assert "step 4" in capsys.readouterr().out
  assert sorted(p.name for p in (tmp_path / "rel").iterdir()) == [
      "config.json", "discriminator.safetensors", "generator.safetensors", "model.safetensors"]
  _assert_trees_equal(weights.read_params(tmp_path / "rel"), state.ema_params, "EMA generator")
  _assert_trees_equal(weights.read_params(tmp_path / "rel", weights.GENERATOR), state.params, "raw generator")
  disc = weights.read_params(tmp_path / "rel", weights.DISCRIMINATOR)
  _assert_trees_equal(disc["params"], state.d_params, "discriminator")
  _assert_trees_equal(disc["batch_stats"], state.d_batch_stats, "spectral-norm vectors")
  assert weights.read_config(tmp_path / "rel")["step"] == 4

  # --config.init_from restores all of it into a fresh state; the optimiser states stay fresh.
  model, disc_module = T.build_model(config.model), T.make_discriminator(config)
  g_tx, d_tx, _ = T.make_optimizers(config)
  fresh = T.init_train_state(jax.random.key(7), model=model, disc=disc_module, g_tx=g_tx, d_tx=d_tx,
                             image_size=config.data.image_size)
  assert not np.array_equal(jax.tree.leaves(fresh.d_params)[0], jax.tree.leaves(state.d_params)[0])
  config.init_from = str(tmp_path / "rel")
  started = warm_start.warm_start(fresh, config)
  for what, got, want in (("params", started.params, state.params), ("ema", started.ema_params, state.ema_params),
                          ("d_params", started.d_params, state.d_params),
                          ("d_batch_stats", started.d_batch_stats, state.d_batch_stats)):
    _assert_trees_equal(jax.device_get(got), want, what)
  assert int(started.step) == 0

  # Another discriminator in the run's config: refused by name, with the way out.
  config.disc.base_channels = 16
  with pytest.raises(ValueError, match=r"(?s)disc\.base_channels: init_from has 8, config has 16.*remove .*"
                                       r"discriminator\.safetensors"):
    warm_start.warm_start(fresh, config)
  # Without the discriminator file, a different discriminator starts fresh.
  (tmp_path / "rel" / "discriminator.safetensors").unlink()
  started = warm_start.warm_start(fresh, config)
  _assert_trees_equal(jax.device_get(started.d_params), fresh.d_params, "fresh discriminator")


def test_release_errors_are_one_line(tmp_path, capsys):
  assert convert_main.main(["release", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "is not a directory" in err
  (tmp_path / "empty").mkdir()
  assert convert_main.main(["release", "--src", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
  assert capsys.readouterr().err.startswith("error: ")
