"""The fixed linear patch code of the nested VAE's shortcut path: a JPEG-like DCT codec."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.fft import dctn

from cat_jax.metrics.baselines import area_bicubic
from cat_jax.models import nested_vae as nv
from cat_jax.models import patch_code as pc
from conftest import patch_code_tolerance


def _images(n=3, size=32, seed=0):
  return jnp.asarray(np.random.RandomState(seed).uniform(-1, 1, (n, size, size, 3)), jnp.float32)


@pytest.mark.parametrize("f, channels", [(8, 16), (16, 8), (32, 4), (8, 3)])
def test_code_is_orthogonal_projection_with_block_means_as_dc(f, channels):
  encode, decode = pc.code_matrices(f, channels)
  np.testing.assert_allclose(decode @ encode, np.eye(channels), atol=1e-5)
  x = _images(size=2 * f)
  z = pc.encode_patches(x, f, channels)
  assert z.shape == (3, 2, 2, channels)
  luma, chroma = pc.channel_split(channels)
  ycbcr = jnp.einsum("bhwc,kc->bhwk", x, pc._YCBCR)
  block_mean = ycbcr.reshape(3, 2, f, 2, f, 3).mean(axis=(2, 4))
  # Both sides are float32 sums over the f x f x 3 patch: each within the rounding bound, so twice it apart.
  tol = 2 * patch_code_tolerance(x, f, channels, decode=False)
  for k, channel in enumerate((0, luma, luma + chroma)):
    np.testing.assert_array_less(np.abs(z[..., channel] - block_mean[..., k]), tol[..., channel] + 1e-7)
  # Decoding a code and encoding the result gives the code back (a projection): decoding is a `channels`-term sum,
  # re-encoding an f*f*3-term one, on values the first bound already covers.
  x_back = pc.decode_patches(z, f)
  tol = patch_code_tolerance(x, f, channels, decode=False) + patch_code_tolerance(x_back, f, channels, decode=False)
  np.testing.assert_array_less(np.abs(pc.encode_patches(x_back, f, channels) - z), tol + 1e-7)


def test_luma_coefficients_are_scipys_dct_in_zigzag_order():
  x = _images(1, 8, seed=1)
  z = np.asarray(pc.encode_patches(x, 8, 16))[0, 0, 0]
  y = np.asarray(jnp.einsum("hwc,c->hw", x[0], pc._YCBCR[0]))
  coefficients = dctn(y, norm="ortho") / 8
  expected = [coefficients[i, j] for i, j in [(0, 0), (0, 1), (1, 0), (2, 0), (1, 1), (0, 2), (0, 3), (1, 2),
                                                (2, 1), (3, 0)]]
  np.testing.assert_allclose(z[:10], expected, atol=1e-5)


def test_flat_images_and_smooth_content_survive_and_the_code_beats_area_bicubic():
  flat = jnp.broadcast_to(jnp.asarray([0.3, -0.5, 0.8]), (1, 64, 64, 3))
  # Exact up to float32 rounding of a 3,072-term sum: the bound is under 2e-3 on the [-1, 1] range (above 60 dB);
  # the error seen is ~2e-5.
  tol = patch_code_tolerance(flat, 32, 8)
  assert tol.max() < 2e-3
  np.testing.assert_array_less(np.abs(pc.decode_patches(pc.encode_patches(flat, 32, 8), 32) - flat), tol)
  yy, xx = np.mgrid[0:64, 0:64] / 63.0
  smooth = jnp.asarray(np.stack([np.sin(3 * xx + yy), np.cos(2 * yy), xx * yy * 2 - 1], -1)[None], jnp.float32)
  for level, f in enumerate((8, 16, 32)):
    code_error = float(jnp.mean(jnp.square(pc.decode_patches(pc.encode_patches(smooth, f, 16), f) - smooth)))
    baseline_error = float(jnp.mean(jnp.square(area_bicubic(smooth, level) - smooth)))
    assert code_error < baseline_error, (f, code_error, baseline_error)
  with pytest.raises(ValueError, match="at least 3 channels"):
    pc.code_matrices(8, 2)


@pytest.mark.parametrize("residual_gate", [False, True])
def test_untrained_shortcut_model_is_exactly_the_patch_code(residual_gate):
  model = nv.NestedVAE(ch=8, ch_mult=(1, 1, 2, 2, 2, 2), num_res_blocks=1, z_channels=8, shortcuts=True,
                       norm="rms", head_attention=True, residual_gate=residual_gate)
  params = jax.jit(lambda rng: nv.init_params(model, rng, 64))(jax.random.key(0))  # faster than eager
  x = _images(2, 64, seed=2)
  for level, f in enumerate((8, 16, 32)):
    recon, posterior = model.apply({"params": params}, x, level)
    code = pc.encode_patches(x, f, 8)
    # The same sums, maybe in another order inside the compiled model: each side within the rounding bound.
    np.testing.assert_array_less(np.abs(nv.crop_latent(posterior.mode(), level) - code),
                                 2 * patch_code_tolerance(x, f, 8, decode=False) + 1e-7)
    np.testing.assert_array_less(np.abs(recon - pc.decode_patches(code, f)), 2 * patch_code_tolerance(x, f, 8) + 1e-7)
  with pytest.raises(ValueError, match="z_channels >= 3"):
    nv.init_params(nv.NestedVAE(ch=8, ch_mult=(1, 1, 2, 2, 2, 2), z_channels=2, shortcuts=True), jax.random.key(0), 64)


def test_a_closed_residual_gate_gives_the_code_whatever_the_residual_branches_hold():
  model = nv.NestedVAE(ch=8, ch_mult=(1, 1, 2, 2, 2, 2), num_res_blocks=1, z_channels=8, shortcuts=True,
                       norm="rms", head_attention=False, residual_gate=True)
  params = jax.jit(lambda rng: nv.init_params(model, rng, 32))(jax.random.key(0))
  # Every parameter nudged, so the residual branches are far from zero ...
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nudged = jax.tree.unflatten(treedef, [p + 0.3 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
  x = _images(2, 32, seed=3)
  code = pc.decode_patches(pc.encode_patches(x, 8, 8), 8)
  open_recon, _ = model.apply({"params": nudged}, x, 0)
  assert float(jnp.abs(open_recon - code).max()) > 0.05
  # ... then both gates closed (a very negative bias): the latent mean is the code and so is the image.
  closed = dict(nudged, enc_gate={"kernel": jnp.zeros_like(nudged["enc_gate"]["kernel"]), "bias": jnp.full((1,), -60.)},
                dec_gate={"kernel": jnp.zeros_like(nudged["dec_gate"]["kernel"]), "bias": jnp.full((1,), -60.)})
  recon, posterior = model.apply({"params": closed}, x, 0)
  np.testing.assert_array_less(np.abs(posterior.mean - pc.encode_patches(x, 8, 8)),
                               2 * patch_code_tolerance(x, 8, 8, decode=False) + 1e-7)
  np.testing.assert_array_less(np.abs(recon - code), 2 * patch_code_tolerance(x, 8, 8) + 1e-7)
  with pytest.raises(ValueError, match="needs shortcuts=True"):
    nv.init_params(nv.NestedVAE(ch=8, ch_mult=(1, 1, 2, 2, 2, 2), residual_gate=True), jax.random.key(0), 32)
