"""The PyTorch baseline of benchmarks/train_bench.py is the same network and the same train step as ours.

Flax parameters are copied into the PyTorch port (cat_jax/convert/modeling_cat.py, the discriminator's in
benchmarks/torch_reference.py); encoder, decoder and discriminator outputs must agree at every level, and one torch
G + D step must report the same losses and gradient norms as ``cat_jax.train.train_step`` on the same images and
noise. Two model variants: the SD layout (GroupNorm, 1x1 skip
convs) and the demo/paper one (DC-AE shortcuts, RMSNorm, the DCT patch code on the latent path). JAX runs with
float32 matmuls and convolutions ('highest') so that both sides compute the same thing.
"""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch

from benchmarks import torch_reference as tr
from cat_jax import train
from cat_jax.convert import modeling_cat as port
from cat_jax.models.discriminator import PatchDiscriminator
from cat_jax.models.nested_vae import NestedVAE, crop_latent
from conftest import matmul_chain_tolerance, patch_code_tolerance

TINY = dict(ch=8, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1, z_channels=4, head_attention=True)
VARIANTS = {"sd": TINY, "shortcut_rms": dict(TINY, shortcuts=True, norm="rms", logvar_init=-10.0),
            "gated": dict(TINY, shortcuts=True, norm="rms", residual_gate=True)}
SIZE = 64




def _nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def vae_pair(request):
  config = VARIANTS[request.param]
  model = NestedVAE(**config)
  # Random values for every parameter (init's shapes, no init compile): non-trivial norm scales and biases, so a
  # scale/bias mix-up cannot pass, and the shortcut variant's zero-initialised residual branches compute something.
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), 0)["params"]
  rng = np.random.default_rng(1)

  def fill(path, leaf):
    name, shape = jax.tree_util.keystr(path[-1:]), leaf.shape
    if "scale" in name:
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(shape), jnp.float32)
    fan_in = int(np.prod(shape[:-1])) if "kernel" in name else 10
    return jnp.asarray(rng.standard_normal(shape) / np.sqrt(fan_in), jnp.float32)

  params = jax.tree_util.tree_map_with_path(fill, shapes)
  torch_model = tr.load_flax_params(tr.NestedVAE(**config), params).eval()
  return model, params, torch_model, config


def test_num_groups_rule_matches():
  from cat_jax.models.nested_vae import _num_groups
  for c in (3, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512):
    assert port.num_groups(c) == _num_groups(c, 0)


@pytest.mark.parametrize("c_in,c_out", [(8, 8), (16, 4), (4, 16), (8, 3), (3, 8)])
def test_resize_channels_matches(c_in, c_out):
  from cat_jax.models.nested_vae import resize_channels
  x = jax.random.normal(jax.random.key(9), (2, 4, 4, c_in))
  np.testing.assert_allclose(_nhwc(port.resize_channels(_nchw(x), c_out)), resize_channels(x, c_out), atol=1e-6)


@pytest.mark.parametrize("f", [8, 16, 32])
def test_patch_code_matches(f):
  from cat_jax.models import patch_code
  x = jax.random.uniform(jax.random.key(10), (2, 64, 64, 3), minval=-1.0, maxval=1.0)
  codes = patch_code.encode_patches(x, f, 16)
  # Two float32 sums of f*f*3 terms in different orders: each within the rounding bound, so twice it apart.
  tol = 2 * patch_code_tolerance(x, f, 16, decode=False) + 1e-7
  np.testing.assert_array_less(np.abs(_nhwc(port.encode_patches(_nchw(x), f, 16)) - codes), tol)
  _, decode = patch_code.code_matrices(f, 16)
  tol = 2 * patch_code.from_patches(matmul_chain_tolerance(codes, decode), f) + 1e-7
  got = _nhwc(port.decode_patches(_nchw(codes), f))
  np.testing.assert_array_less(np.abs(got - patch_code.decode_patches(codes, f)), tol)


def test_every_torch_parameter_is_loaded(vae_pair):
  _, params, torch_model, _ = vae_pair
  assert sum(p.numel() for p in torch_model.parameters()) == sum(v.size for v in jax.tree.leaves(params))


@pytest.mark.parametrize("level", [0, 1, 2])
def test_forward_matches_flax(vae_pair, level):
  model, params, torch_model, _ = vae_pair
  x = jax.random.uniform(jax.random.key(2), (2, SIZE, SIZE, 3), minval=-1.0, maxval=1.0)
  posterior = model.apply({"params": params}, x, level, method=NestedVAE.encode)
  noise = jax.random.normal(jax.random.key(3), crop_latent(posterior.mean, level).shape)
  z = crop_latent(posterior.mean, level) + crop_latent(posterior.std, level) * noise
  recon = model.apply({"params": params}, posterior.mean + jnp.pad(
      crop_latent(posterior.std, level) * noise,
      [(0, 0), (0, posterior.mean.shape[1] - z.shape[1]), (0, posterior.mean.shape[2] - z.shape[2]), (0, 0)]),
      level, method=NestedVAE.decode)

  with torch.no_grad():
    mean, logvar = torch_model.encode_moments(_nchw(x), level)
    recon_t = torch_model.decode_level(mean + torch.exp(0.5 * logvar) * _nchw(noise), level)
  np.testing.assert_allclose(_nhwc(mean), crop_latent(posterior.mean, level), atol=1e-4, rtol=0)
  np.testing.assert_allclose(_nhwc(logvar), crop_latent(posterior.logvar, level), atol=1e-4, rtol=0)
  assert recon.shape == (2, SIZE, SIZE, 3)
  assert float(jnp.std(recon)) > 1e-3  # the comparison below is not between two constants
  np.testing.assert_allclose(_nhwc(recon_t), recon, atol=1e-4, rtol=0)


@pytest.mark.parametrize("norm", ["group", "none"])
def test_discriminator_matches_flax(norm):
  disc = PatchDiscriminator(base_channels=8, num_layers=2, norm=norm)
  x = jax.random.uniform(jax.random.key(4), (2, 32, 32, 3), minval=-1.0, maxval=1.0)
  params = disc.init(jax.random.key(5), x)["params"]
  torch_disc = tr.load_flax_discriminator(tr.PatchDiscriminator(base_channels=8, num_layers=2, norm=norm), params)
  with torch.no_grad():
    got = _nhwc(torch_disc(_nchw(x)))
  want = disc.apply({"params": params}, x)
  assert want.shape == (2, 6, 6, 1)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)


def test_train_step_matches_flax(vae_pair):
  model, params, _, model_config = vae_pair
  config = ml_collections.ConfigDict(dict(
      model=model_config, disc=dict(base_channels=8, num_layers=1, norm="group"),
      optimizer=dict(lr=1e-3, d_lr=1e-3, b1=0.5, b2=0.9, eps=1e-8, weight_decay=1e-4, warmup_steps=2, end_lr_factor=0.1,
                     grad_clip=1.0),
      loss=dict(recon="l1", recon_weight=1.0, log_mse_weight=1e-2, lpips_weight=0.0, kl_weight=1e-2, gan_weight=0.5,
                gan_loss="hinge", adaptive_gan_weight=True, disc_start=0, lecam_weight=0.0, r1_weight=0.0),
      num_steps=10, ema_decay=0.99))
  level, size = 0, 32
  disc = train.make_discriminator(config)
  g_tx, d_tx, g_schedule = train.make_optimizers(config)
  # init_train_state's state, reusing the fixture's VAE parameters (a second VAE init costs seconds on a CPU).
  d_params = disc.init(jax.random.key(6), jnp.zeros((1, size, size, 3)))["params"]
  state = train.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=g_tx.init(params),
                           ema_params=params, d_params=d_params, d_opt_state=d_tx.init(d_params),
                           d_batch_stats={}, lecam_ema=jnp.zeros((2,)), all_finite=jnp.ones((), bool))
  images = jax.random.uniform(jax.random.key(7), (2, size, size, 3), minval=-1.0, maxval=1.0)
  base_rng = jax.random.key(8)
  step = functools.partial(train.train_step, model=model, disc=disc, lpips_module=None, g_tx=g_tx, d_tx=d_tx,
                           g_schedule=g_schedule, config=config)
  _, metrics = jax.jit(step, static_argnums=2)(state, images, level, None, base_rng)
  # The noise train_step draws for step 0, on the level's own grid.
  canvas = (2, size // 8, size // 8, config.model.z_channels)
  noise = crop_latent(jax.random.normal(jax.random.fold_in(base_rng, 0), canvas), level)

  vae = tr.load_flax_params(tr.NestedVAE(**config.model), state.params)
  torch_disc = tr.load_flax_discriminator(tr.PatchDiscriminator(**config.disc), state.d_params)
  torch_step = tr.TorchTrainStep(vae, torch_disc, kl_weight=config.loss.kl_weight,
                                 log_mse_weight=config.loss.log_mse_weight, gan_weight=config.loss.gan_weight,
                                 compile=False)
  got = torch_step(_nchw(images), level, noise=_nchw(noise))
  assert float(metrics["gan_adaptive_weight"]) > 0  # the GAN branch really ran
  np.testing.assert_allclose(float(got["recon_loss"]), float(metrics["recon_loss"]), rtol=1e-4)  # g_loss: + log MSE
  for key in ("kl", "gan_g_loss", "gan_adaptive_weight", "g_loss", "d_loss", "grad_norm",
              "d_grad_norm"):
    np.testing.assert_allclose(float(got[key]), float(metrics[key]), rtol=1e-4, err_msg=key)
