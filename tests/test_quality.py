"""The tokenizer reconstructs: a short CPU training beats the no-learning baseline at every level.

These would have caught the nested VAE that trained without error but scored 10 dB below area+bicubic
downsampling (see docs/tokenizer_quality.md). Step counts are fixed; nothing here is timed.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cat_jax import levels as L
from cat_jax import train as T
from cat_jax.data.embedded import generate
from cat_jax.data.heldout import heldout_image
from cat_jax.metrics import image_quality
from cat_jax.metrics.baselines import area_bicubic
from cat_jax.models.nested_vae import build_model
from test_train import _runlocal

SIZE = 64
STEPS = 150


def _psnr(recon, images):
  return float(jnp.mean(image_quality.psnr(jnp.clip(recon, -1, 1), images, max_db=image_quality.PSNR_MAX_DB)))


@pytest.fixture(scope="module")
def trained():
  """The demo's model family, trained for a few steps on 24 embedded images (every level on every image)."""
  config = _runlocal(**{"loss.disc_start": 10**9, "optimizer.lr": 1e-3, "optimizer.warmup_steps": 10,
                        "num_steps": STEPS})
  config.model = dict(config.model, ch=8, z_channels=16, shortcuts=True, norm="rms", logvar_init=-10.0)
  images = jnp.asarray(np.stack([generate(i, split="train", image_size=SIZE)[0] for i in range(24)]),
                       jnp.float32) / 127.5 - 1.0
  model, disc = build_model(config.model), T.make_discriminator(config)
  g_tx, d_tx, schedule = T.make_optimizers(config)
  state = jax.jit(functools.partial(T.init_train_state, model=model, disc=disc, g_tx=g_tx, d_tx=d_tx,
                                    image_size=SIZE))(jax.random.key(0))
  step = jax.jit(functools.partial(T.train_step, model=model, disc=disc, lpips_module=None, g_tx=g_tx, d_tx=d_tx,
                                   g_schedule=schedule, config=config, use_gan=False), static_argnums=(2,))
  untrained = state.params
  rng = np.random.default_rng(0)
  for i in range(STEPS):
    batch = images[rng.choice(len(images), 8, replace=False)]
    state, _ = step(state, batch, i % L.NUM_LEVELS, {}, jax.random.key(1))
  reconstruct = jax.jit(lambda p, x, level: model.apply({"params": p}, x, level)[0], static_argnums=2)
  return reconstruct, untrained, state.params, images


def _l1(recon, images):
  return float(jnp.mean(jnp.abs(jnp.clip(recon, -1, 1) - images)))


def test_short_training_beats_area_bicubic_at_every_level_and_lowers_the_untrained_error(trained):
  reconstruct, untrained, params, images = trained
  photos = jnp.asarray(np.stack([heldout_image(i, crops_per_image=2, image_size=SIZE) for i in range(16)]),
                       jnp.float32) / 127.5 - 1.0
  for name, x in (("training images", images), ("held-out photos", photos)):
    previous = np.inf
    for level in range(L.NUM_LEVELS):
      model_db = _psnr(reconstruct(params, x, level), x)
      baseline_db = _psnr(area_bicubic(x, level), x)
      assert model_db > baseline_db + 0.5, (name, level, model_db, baseline_db)
      assert model_db < previous, (name, level, "PSNR must fall from 8x to 16x to 32x")
      previous = model_db
  # Training adds to what the untrained (patch-code) model already does. Measured in L1, the objective: the
  # capped mean PSNR can fall while every textured image improves, because flat images the linear code
  # reproduces exactly (50 dB) come back within a grey level (~47 dB) once the residual branches are nonzero.
  untrained_l1 = np.mean([_l1(reconstruct(untrained, images, level), images) for level in range(L.NUM_LEVELS)])
  trained_l1 = np.mean([_l1(reconstruct(params, images, level), images) for level in range(L.NUM_LEVELS)])
  assert trained_l1 < 0.98 * untrained_l1, (trained_l1, untrained_l1)


def test_a_flat_colour_comes_back_within_a_few_grey_levels_at_32x(trained):
  reconstruct, _, params, _ = trained
  teal = jnp.broadcast_to(jnp.asarray([30, 140, 140], jnp.float32) / 127.5 - 1.0, (1, SIZE, SIZE, 3))
  recon = np.asarray(jnp.clip(reconstruct(params, teal, L.level_for_factor(32)), -1, 1))
  grey_levels = np.abs(recon - np.asarray(teal)) * 127.5
  assert grey_levels.max() <= 4.0, grey_levels.max()  # of 255; the untrained code is exact, training adds ~2.6


LEARNING_STEPS = 300
# Content images of the validation split gain this much over the DCT code in LEARNING_STEPS steps. Measured
# (2026-12-03): the demo's recipe (L2 + a little per-image log MSE + gated residuals) +0.72 dB; the recipe the demo
# had when issue #26 was filed (L1, no gate) +0.39 dB on the same images and steps: the margin sits between them.
CONTENT_GAIN_DB = 0.55


def test_a_short_training_learns_past_the_dct_code_on_content_and_keeps_smooth_images():
  """The demo's model family (ch 8), 8x only, LEARNING_STEPS steps on 128 embedded training images: on 80 validation
  images it never saw, the tokenizer's output (``NestedVAE.reconstruct``: per image the learned path or the code)
  beats the DCT code it starts from by CONTENT_GAIN_DB on images the code reconstructs below 40 dB, and smooth images
  (the code at 40 dB or more) lose nothing."""
  from cat_jax.metrics.baselines import dct_code
  from cat_jax.models.nested_vae import NestedVAE
  from conftest import load_config

  config = load_config("cat.py", "demo")
  config.model = dict(config.model, ch=8)
  config.optimizer.warmup_steps = 20
  to_model = lambda split, n: np.stack([generate(i, split=split, image_size=SIZE)[0] for i in range(n)]).astype(
      np.float32) / 127.5 - 1.0
  train, val = to_model("train", 128), jnp.asarray(to_model("validation", 80))
  model, disc = build_model(config.model), T.make_discriminator(config)
  g_tx, d_tx, schedule = T.make_optimizers(config)
  state = jax.jit(functools.partial(T.init_train_state, model=model, disc=disc, g_tx=g_tx, d_tx=d_tx,
                                    image_size=SIZE))(jax.random.key(0))
  step = jax.jit(functools.partial(T.train_step, model=model, disc=disc, lpips_module=None, g_tx=g_tx, d_tx=d_tx,
                                   g_schedule=schedule, config=config, use_gan=False), static_argnums=(2,),
                 donate_argnums=0)
  rng = np.random.default_rng(0)
  for i in range(LEARNING_STEPS):
    state, _ = step(state, jnp.asarray(train[rng.choice(len(train), 16, replace=False)]), 0, {}, jax.random.key(i))
  psnr = lambda y: np.asarray(image_quality.psnr(jnp.clip(y, -1, 1), val, max_db=image_quality.PSNR_MAX_DB))
  code = psnr(dct_code(val, 0, config.model["z_channels"]))
  smooth = code >= 40.0
  assert 10 <= smooth.sum() <= 40, smooth.sum()  # both kinds are there
  recon, kept = model.apply({"params": state.ema_params}, val, 0, method=NestedVAE.reconstruct)
  gain = psnr(recon) - code
  assert gain[~smooth].mean() > CONTENT_GAIN_DB, gain[~smooth].mean()
  assert gain[smooth].mean() >= -0.5, gain[smooth].mean()
  assert 0 < np.mean(kept) < 1  # some images gain, some keep the code
