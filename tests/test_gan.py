"""GAN losses, reconstruction losses and the patch discriminator."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cat_jax.losses import gan
from cat_jax.losses import reconstruction
from cat_jax.models.discriminator import PatchDiscriminator, patch_logits_hw

NORMS = ("none", "group", "spectral")


# ----------------------------------------------------------------------------- losses by hand


def test_hinge_discriminator_loss_by_hand():
  real, fake = np.array([2.0, -0.5]), np.array([-2.0, 0.3])
  # real: relu(1-2)=0, relu(1+0.5)=1.5 -> 0.75; fake: relu(1-2)=0, relu(1+0.3)=1.3 -> 0.65
  expected = 0.5 * (0.75 + 0.65)
  got = gan.discriminator_loss(real_logit=real, fake_logit=fake, loss_type="hinge")
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # Patch grids are averaged over every logit.
  got = gan.discriminator_loss(real_logit=real.reshape(1, 1, 2, 1), fake_logit=fake.reshape(1, 2, 1, 1))
  np.testing.assert_allclose(got, expected, rtol=1e-6)


def test_non_saturating_discriminator_loss_by_hand():
  real, fake = np.array([2.0, -0.5, 0.0]), np.array([-2.0, 0.3, 4.0])
  # BCE with label 1: log(1 + exp(-r)); label 0: log(1 + exp(f)).
  real_term = np.mean([math.log1p(math.exp(-2.0)), math.log1p(math.exp(0.5)), math.log(2.0)])
  fake_term = np.mean([math.log1p(math.exp(-2.0)), math.log1p(math.exp(0.3)), math.log1p(math.exp(4.0))])
  got = gan.discriminator_loss(real_logit=real, fake_logit=fake, loss_type="non_saturating")
  np.testing.assert_allclose(got, 0.5 * (real_term + fake_term), rtol=1e-6)


def test_generator_losses_by_hand():
  fake = np.array([0.5, -1.5, 3.0])
  np.testing.assert_allclose(gan.generator_loss(fake_logit=fake, loss_type="hinge"),
                             -(0.5 - 1.5 + 3.0) / 3, rtol=1e-6)
  expected = np.mean([math.log1p(math.exp(-0.5)), math.log1p(math.exp(1.5)), math.log1p(math.exp(-3.0))])
  np.testing.assert_allclose(gan.generator_loss(fake_logit=fake, loss_type="non_saturating"),
                             expected, rtol=1e-6)


def test_non_saturating_is_finite_for_large_logits():
  big = jnp.array([200.0, -200.0])
  assert np.isfinite(gan.discriminator_loss(real_logit=big, fake_logit=big, loss_type="non_saturating"))
  np.testing.assert_allclose(gan.generator_loss(fake_logit=big, loss_type="non_saturating"), 100.0,
                             rtol=1e-6)  # (0 + 200) / 2


def test_unknown_loss_type_raises():
  with pytest.raises(ValueError, match="non_saturating"):
    gan.discriminator_loss(real_logit=jnp.zeros(2), fake_logit=jnp.zeros(2), loss_type="wgan")
  with pytest.raises(ValueError, match="hinge"):
    gan.generator_loss(fake_logit=jnp.zeros(2), loss_type="non-saturating")


def test_losses_of_bfloat16_logits_are_float32():
  logits = jnp.array([0.1, 0.2], jnp.bfloat16)
  assert gan.discriminator_loss(real_logit=logits, fake_logit=logits).dtype == jnp.float32
  assert gan.generator_loss(fake_logit=logits).dtype == jnp.float32


def test_lecam_regularizer_by_hand():
  real, fake = jnp.array([1.0, -0.2]), jnp.array([0.4, -1.0])
  ema_real, ema_fake = 0.3, -0.1
  # relu(real - ema_fake) = [1.1, 0] -> 1.21 / 2; relu(ema_real - fake) = [0, 1.3] -> 1.69 / 2
  expected = 1.21 / 2 + 1.69 / 2
  got = gan.lecam_regularizer(real_logit=real, fake_logit=fake, ema_real=ema_real, ema_fake=ema_fake)
  np.testing.assert_allclose(got, expected, rtol=1e-6)
  # The EMAs are constants of the loss.
  g_ema = jax.grad(lambda e: gan.lecam_regularizer(real_logit=real, fake_logit=fake, ema_real=e,
                                                   ema_fake=e))(0.2)
  assert g_ema == 0.0
  # d/d real_0 = 2 * 1.1 / 2; d/d fake_1 = -2 * 1.3 / 2.
  g_real = jax.grad(lambda r: gan.lecam_regularizer(real_logit=r, fake_logit=fake, ema_real=ema_real,
                                                    ema_fake=ema_fake))(real)
  np.testing.assert_allclose(g_real, [1.1, 0.0], rtol=1e-6)


def test_lecam_ema_update_by_hand():
  ema_real, ema_fake = gan.lecam_ema_update(
      ema_real=0.5, ema_fake=-0.2, real_logit=jnp.array([[0.2], [0.6]]),
      fake_logit=jnp.array([-1.0, 0.3]), decay=0.9)
  np.testing.assert_allclose(ema_real, 0.9 * 0.5 + 0.1 * 0.4, rtol=1e-6)
  np.testing.assert_allclose(ema_fake, 0.9 * -0.2 + 0.1 * -0.35, rtol=1e-6)


def test_reconstruction_losses_by_hand():
  x = jnp.array([[0.5, -1.0], [0.25, 1.0]])
  y = jnp.array([[0.0, 0.0], [0.5, 1.0]])
  # differences 0.5, -1, -0.25, 0
  np.testing.assert_allclose(reconstruction.l1_loss(x, y), 1.75 / 4, rtol=1e-6)
  np.testing.assert_allclose(reconstruction.l2_loss(x, y), (0.25 + 1.0 + 0.0625) / 4, rtol=1e-6)
  np.testing.assert_allclose(reconstruction.reconstruction_loss(x, y, kind="l1"), 1.75 / 4, rtol=1e-6)
  np.testing.assert_allclose(reconstruction.reconstruction_loss(x, y, kind="l2"), 1.3125 / 4, rtol=1e-6)
  # log_mse: per image (axis 0) the log of its MSE plus the floor at the 50 dB cap (4e-5 on [-1, 1]), then the mean.
  floor = reconstruction.LOG_MSE_FLOOR
  assert floor == pytest.approx(4 * 10 ** -5)
  want = (np.log((0.25 + 1.0) / 2 + floor) + np.log(0.0625 / 2 + floor)) / 2
  np.testing.assert_allclose(reconstruction.reconstruction_loss(x, y, kind="log_mse"), want, rtol=1e-6)
  # An exact image sits at log(floor), and -10 log10(MSE_0..1) = PSNR: the loss is minus the capped mean PSNR, scaled.
  np.testing.assert_allclose(reconstruction.log_mse_loss(y, y), np.log(floor), rtol=1e-6)
  assert reconstruction.l1_loss(x.astype(jnp.bfloat16), y.astype(jnp.bfloat16)).dtype == jnp.float32
  with pytest.raises(ValueError, match="l2"):
    reconstruction.reconstruction_loss(x, y, kind="huber")
  with pytest.raises(ValueError, match="shape"):
    reconstruction.l1_loss(x, y[:1])


# ----------------------------------------------------------------------------- adaptive weight


def _central_difference_grad(f, w, h=1e-6):
  grad = np.zeros_like(w)
  for idx in np.ndindex(w.shape):
    step = np.zeros_like(w)
    step[idx] = h
    grad[idx] = (f(w + step) - f(w - step)) / (2 * h)
  return grad


def test_adaptive_generator_weight_matches_finite_differences():
  rng = np.random.default_rng(0)
  features = rng.normal(size=(5, 3))  # decoder activations before its last layer
  kernel = rng.normal(size=(3, 2))  # the last layer
  target = rng.normal(size=(5, 2))
  critic = rng.normal(size=(2,))  # a fixed smooth "discriminator" on the output

  def nll_np(w):
    return np.mean((features @ w - target) ** 2)

  def gan_np(w):
    return -np.mean(np.tanh(features @ w) @ critic)

  expected = (np.linalg.norm(_central_difference_grad(nll_np, kernel))
              / (np.linalg.norm(_central_difference_grad(gan_np, kernel)) + 1e-4))

  feats = jnp.asarray(features, jnp.float32)
  nll_grad = jax.grad(lambda w: reconstruction.l2_loss(feats @ w, jnp.asarray(target, jnp.float32)))(
      jnp.asarray(kernel, jnp.float32))
  gan_grad = jax.grad(lambda w: gan.generator_loss(fake_logit=jnp.tanh(feats @ w) @ jnp.asarray(
      critic, jnp.float32)))(jnp.asarray(kernel, jnp.float32))
  got = gan.adaptive_generator_weight(nll_grad=nll_grad, gan_grad=gan_grad)
  np.testing.assert_allclose(got, expected, rtol=1e-4)


def test_adaptive_generator_weight_clips_pytrees_and_stops_gradient():
  nll = {"kernel": jnp.array([[3.0, 0.0]]), "bias": jnp.array([4.0])}  # global norm 5
  gan_grad = {"kernel": jnp.array([[0.0, 2.0]]), "bias": jnp.array([0.0])}  # global norm 2
  np.testing.assert_allclose(gan.adaptive_generator_weight(nll_grad=nll, gan_grad=gan_grad),
                             5.0 / (2.0 + 1e-4), rtol=1e-6)
  zeros = jax.tree.map(jnp.zeros_like, gan_grad)
  # 5 / 1e-4 = 5e4 is clipped to max_weight.
  np.testing.assert_allclose(gan.adaptive_generator_weight(nll_grad=nll, gan_grad=zeros), 1e4)
  np.testing.assert_allclose(
      gan.adaptive_generator_weight(nll_grad=nll, gan_grad=zeros, max_weight=7.0), 7.0)
  g = jax.grad(lambda s: gan.adaptive_generator_weight(nll_grad=s * nll["kernel"],
                                                       gan_grad=gan_grad["kernel"]))(1.0)
  assert g == 0.0


# ----------------------------------------------------------------------------- R1


def test_r1_of_a_linear_discriminator_is_its_squared_weight_norm():
  rng = np.random.default_rng(1)
  w = jnp.asarray(rng.normal(size=(4, 4, 3)), jnp.float32)
  images = jnp.asarray(rng.uniform(-1, 1, size=(3, 4, 4, 3)), jnp.float32)

  def linear_d(weights):
    return lambda x: jnp.einsum("bhwc,hwc->b", x, weights)[:, None, None, None]

  np.testing.assert_allclose(gan.r1_penalty(linear_d(w), images), np.sum(np.square(w)), rtol=1e-5)
  # Differentiable w.r.t. the discriminator: d/dw sum(w^2) = 2w.
  np.testing.assert_allclose(jax.grad(lambda v: gan.r1_penalty(linear_d(v), images))(w), 2 * w,
                             rtol=1e-5)


def test_r1_scores_an_image_by_the_mean_of_its_patch_logits():
  rng = np.random.default_rng(2)
  w = jnp.asarray(rng.normal(size=(3,)), jnp.float32)
  images = jnp.asarray(rng.uniform(-1, 1, size=(2, 4, 5, 3)), jnp.float32)
  # One logit per pixel: score = mean_hw sum_c w_c x_hwc, so grad = w_c / (H W) at every pixel.
  patch_d = lambda x: jnp.einsum("bhwc,c->bhw", x, w)[..., None]
  expected = 4 * 5 * np.sum(np.square(w)) / (4 * 5) ** 2
  np.testing.assert_allclose(gan.r1_penalty(patch_d, images), expected, rtol=1e-5)


def test_r1_of_a_quadratic_discriminator_averages_per_image_norms():
  rng = np.random.default_rng(3)
  w = rng.normal(size=(2, 2, 1))
  images = rng.uniform(-1, 1, size=(3, 2, 2, 1))
  quad_d = lambda x: jnp.sum(jnp.asarray(w, jnp.float32) * x**2, axis=(1, 2, 3))[:, None]
  per_image = [np.sum((2 * w * images[b]) ** 2) for b in range(3)]  # grad of sum(w x^2) is 2 w x
  np.testing.assert_allclose(gan.r1_penalty(quad_d, jnp.asarray(images, jnp.float32)),
                             np.mean(per_image), rtol=1e-5)


@pytest.mark.parametrize("norm", ("group", "spectral"))
def test_r1_of_the_patch_discriminator_is_a_mean_of_per_image_penalties(norm):
  images = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, size=(3, 16, 16, 3)), jnp.float32)
  disc = PatchDiscriminator(base_channels=8, num_layers=1, norm=norm)
  variables = disc.init(jax.random.key(0), images)
  apply = lambda x: disc.apply(variables, x, update_stats=False)
  batch = gan.r1_penalty(apply, images)
  singles = [gan.r1_penalty(apply, images[b:b + 1]) for b in range(3)]
  assert float(batch) > 0
  np.testing.assert_allclose(batch, np.mean(singles), rtol=1e-4)


# ----------------------------------------------------------------------------- surrogate


def test_the_surrogate_has_the_weighted_losses_gradient():
  """d/dp <nll'(r) + c gan'(r), r(p)> with the first factor held = d/dp (nll(r(p)) + c gan(r(p))): the chain rule,
  the losses differentiated w.r.t. r once."""
  p = jnp.array([0.3, -1.2, 2.0])
  recon = lambda p: jnp.stack([jnp.sin(p), p ** 2])
  nll = lambda r: jnp.mean(jnp.abs(r - 0.5))
  adversarial = lambda r: -jnp.mean(r ** 3)
  coef, r = 0.7, recon(p)
  d_nll, d_gan = jax.grad(nll)(r), jax.grad(adversarial)(r)
  got = jax.grad(lambda p: gan.surrogate_generator_loss(recon(p), nll_grad=d_nll, gan_grad=d_gan, gan_coef=coef))(p)
  want = jax.grad(lambda p: nll(recon(p)) + coef * adversarial(recon(p)))(p)
  assert float(jnp.abs(want).min()) > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-5)  # float32: a few products and sums of O(1) terms


# ----------------------------------------------------------------------------- discriminator


def _taming_side(n, num_layers):
  # 4x4 conv, padding 1: stride 2 -> floor((n + 2 - 4) / 2) + 1; stride 1 -> n - 1.
  for _ in range(num_layers):
    n = (n - 2) // 2 + 1
  return n - 1 - 1


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("hw,num_layers", [((32, 32), 3), ((64, 48), 2), ((40, 56), 1)])
def test_discriminator_output_shapes(norm, hw, num_layers):
  disc = PatchDiscriminator(base_channels=8, num_layers=num_layers, norm=norm)
  images = jnp.zeros((2, *hw, 3))
  variables = disc.init(jax.random.key(0), images)
  assert ("batch_stats" in variables) == (norm == "spectral")
  logits = disc.apply(variables, images)
  expected_hw = (_taming_side(hw[0], num_layers), _taming_side(hw[1], num_layers))
  assert logits.shape == (2, *expected_hw, 1)
  assert patch_logits_hw(hw, num_layers) == expected_hw


def test_discriminator_default_is_taming_nlayer_size():
  disc = PatchDiscriminator()
  shapes = jax.eval_shape(disc.init, jax.random.key(0), jnp.zeros((1, 256, 256, 3)))
  logits = jax.eval_shape(disc.apply, shapes, jnp.zeros((1, 256, 256, 3)))
  assert logits.shape == (1, 30, 30, 1)  # taming's NLayerDiscriminator on 256x256
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes["params"]))
  # taming: conv 3->64 (+bias), 64->128, 128->256, 256->512 (no bias, 2 norm affine params per channel),
  # 512->1 (+bias); all 4x4.
  convs = 16 * (3 * 64 + 64 * 128 + 128 * 256 + 256 * 512 + 512 * 1)
  assert count == convs + 64 + 1 + 2 * (128 + 256 + 512)


def test_discriminator_dtype_and_errors():
  disc = PatchDiscriminator(base_channels=8, num_layers=2, dtype=jnp.bfloat16)
  variables = disc.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3)))
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(variables))
  assert disc.apply(variables, jnp.zeros((1, 16, 16, 3))).dtype == jnp.bfloat16
  with pytest.raises(ValueError, match="too small"):
    disc.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  with pytest.raises(ValueError, match="norm"):
    PatchDiscriminator(norm="batch").init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))


def test_spectral_norm_makes_the_output_invariant_to_kernel_scale():
  images = jnp.asarray(np.random.default_rng(4).uniform(-1, 1, size=(2, 32, 32, 3)), jnp.float32)

  def scale_kernels(params, s):
    return jax.tree.map_with_path(
        lambda path, p: p * s if path[-1].key == "kernel" else p, params)

  for norm, invariant in (("spectral", True), ("none", False)):
    disc = PatchDiscriminator(base_channels=8, num_layers=2, norm=norm)
    variables = disc.init(jax.random.key(0), images)
    out = disc.apply(variables, images)
    scaled = dict(variables, params=scale_kernels(variables["params"], 3.0))
    out_scaled = disc.apply(scaled, images)
    assert np.allclose(out, out_scaled, rtol=1e-4, atol=1e-5) == invariant, norm


# ----------------------------------------------------------------------------- training


def _random_textures(rng, n, size=32):
  """Uniform noise on 1, 2 or 4 pixel cells: sharp edges at several scales, in [-1, 1]."""
  out = []
  for _ in range(n):
    cell = int(rng.choice([1, 2, 4]))
    noise = rng.uniform(-1, 1, (size // cell, size // cell, 3))
    out.append(np.repeat(np.repeat(noise, cell, axis=0), cell, axis=1))
  return np.stack(out).astype(np.float32)


def _gaussian_blur(images, sigma=1.0):
  taps = np.arange(-2, 3)
  k = np.exp(-taps**2 / (2 * sigma**2))
  k /= k.sum()
  padded = np.pad(images, ((0, 0), (2, 2), (2, 2), (0, 0)), mode="reflect")
  h, w = images.shape[1:3]
  rows = sum(k[i] * padded[:, :, i:i + w] for i in range(5))
  return sum(k[i] * rows[:, i:i + h] for i in range(5)).astype(np.float32)


@pytest.mark.parametrize("norm", NORMS)
def test_discriminator_learns_to_tell_images_from_blurred_copies(norm):
  rng = np.random.default_rng(0)
  train, held_out = _random_textures(rng, 16), _random_textures(rng, 16)
  disc = PatchDiscriminator(base_channels=16, num_layers=2, norm=norm)
  variables = disc.init(jax.random.key(0), train[:1])
  params, stats = variables["params"], variables.get("batch_stats", {})
  optimizer = optax.adam(1e-3, b1=0.5)
  opt_state = optimizer.init(params)
  batch = jnp.concatenate([train, _gaussian_blur(train)])

  @jax.jit
  def train_step(params, stats, opt_state):
    def loss_fn(p):
      logits, updates = disc.apply({"params": p, "batch_stats": stats}, batch, update_stats=True,
                                   mutable=["batch_stats"])
      loss = gan.discriminator_loss(real_logit=logits[:16], fake_logit=logits[16:], loss_type="hinge")
      return loss, updates.get("batch_stats", {})
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  def accuracy(params, stats):
    x = jnp.concatenate([held_out, _gaussian_blur(held_out)])
    scores = disc.apply({"params": params, "batch_stats": stats}, x).mean(axis=(1, 2, 3))
    return float(np.mean((np.asarray(scores) > 0) == np.repeat([True, False], 16)))

  assert accuracy(params, stats) < 0.9  # untrained: no separation
  first_stats = stats
  for _ in range(60):
    params, stats, opt_state, loss = train_step(params, stats, opt_state)
  assert float(loss) < 0.1
  assert accuracy(params, stats) >= 0.9
  if norm == "spectral":  # the power-iteration vectors were really updated
    assert not np.allclose(first_stats["conv_0_spectral"]["conv_0/kernel/u"],
                           stats["conv_0_spectral"]["conv_0/kernel/u"])
