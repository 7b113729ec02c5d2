"""LPIPS-VGG: Flax vs the `lpips` package (random VGG trunk, real v0.1 heads), converter, loss."""

import copy

import numpy as np
import pytest
import torch
import lpips
import skimage.data
import skimage.transform

import jax
import jax.numpy as jnp

from cat_jax.convert import __main__ as convert_main
from cat_jax import weights
from cat_jax.convert import lpips as convert_lpips
from cat_jax.losses.perceptual import perceptual_loss
from cat_jax.models import lpips as lpips_model

SIDE = 64
BATCH = 3

# lpips builds its trunk with torchvision's deprecated `pretrained=` argument.
pytestmark = pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")


@pytest.fixture(scope="module")
def torch_lpips():
  torch.manual_seed(0)
  return lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False)


@pytest.fixture(scope="module")
def params(torch_lpips):
  state = torch_lpips.state_dict()
  return convert_lpips.convert_torch_lpips(state, state)


@pytest.fixture(scope="module")
def lpips_fn(params):
  return lpips_model.LPIPSDistance(params)


def _to_torch(x):
  return torch.from_numpy(np.asarray(x)).permute(0, 3, 1, 2).contiguous()


def _torch_distance(model, x, y):
  with torch.no_grad():
    return model(_to_torch(x), _to_torch(y)).numpy().reshape(-1)


def _torch_grad(model, x, y):
  xt = _to_torch(x).requires_grad_(True)
  model(xt, _to_torch(y)).sum().backward()
  return xt.grad.permute(0, 2, 3, 1).numpy()


def _random_images(seed):
  rng = np.random.default_rng(seed)
  return rng.uniform(-1, 1, (BATCH, SIDE, SIDE, 3)).astype(np.float32)


def _photo(image):
  """Centre square crop, resized to SIDE x SIDE, in [-1, 1]."""
  h, w = image.shape[:2]
  s = min(h, w)
  top, left = (h - s) // 2, (w - s) // 2
  crop = image[top:top + s, left:left + s]
  small = skimage.transform.resize(crop, (SIDE, SIDE), anti_aliasing=True)  # floats in [0, 1]
  return (small * 2 - 1).astype(np.float32)


@pytest.fixture(scope="module")
def photos():
  return np.stack([_photo(skimage.data.astronaut()), _photo(skimage.data.coffee()),
                   _photo(skimage.data.chelsea())])


def test_matches_torch_on_random_images(torch_lpips, lpips_fn):
  x, y = _random_images(0), _random_images(1)
  ours = np.asarray(lpips_fn(x, y))
  ref = _torch_distance(torch_lpips, x, y)
  assert ours.shape == (BATCH,)
  assert np.all(ref > 0)
  np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)


def test_matches_torch_on_photos(torch_lpips, lpips_fn, photos):
  rng = np.random.default_rng(2)
  noisy = np.clip(photos + rng.normal(0, 0.1, photos.shape), -1, 1).astype(np.float32)
  other = np.roll(photos, 1, axis=0)  # each photo against a different one
  for y in (noisy, other):
    ours = np.asarray(lpips_fn(photos, y))
    ref = _torch_distance(torch_lpips, photos, y)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-4)
  # Different photos are further apart than a photo and its noisy copy.
  assert np.all(_torch_distance(torch_lpips, photos, other) >
                _torch_distance(torch_lpips, photos, noisy))


def _relative_error(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_input_gradients_match_torch_on_random_images(torch_lpips, lpips_fn):
  x, y = _random_images(5), _random_images(6)
  ours = np.asarray(jax.grad(lambda a: lpips_fn(a, y).sum())(jnp.asarray(x)))
  ref = _torch_grad(torch_lpips, x, y)
  assert np.linalg.norm(ref) > 0
  assert _relative_error(ours, ref) <= 1e-3


def test_input_gradients_match_torch_on_photos(torch_lpips, params, lpips_fn, photos):
  """Photos have flat saturated regions (astronaut's black background, coffee's highlights):
  there, float32 rounding flips near-ties in max-pool/ReLU and moves gradient between pixels,
  so even torch float32 is ~3e-3 from torch float64. We therefore check (a) the exact gradient
  in float64 against torch float64, tightly, and (b) that our float32 gradient is as close to
  that exact gradient as torch's own float32 one."""
  rng = np.random.default_rng(3)
  y = np.clip(photos + rng.normal(0, 0.2, photos.shape), -1, 1).astype(np.float32)
  torch64 = copy.deepcopy(torch_lpips).double()
  xt = _to_torch(photos.astype(np.float64)).requires_grad_(True)
  torch64(xt, _to_torch(y.astype(np.float64))).sum().backward()
  exact = xt.grad.permute(0, 2, 3, 1).numpy()
  with jax.enable_x64(True):
    fn64 = lpips_model.LPIPSDistance(jax.tree.map(lambda a: np.asarray(a, np.float64), params),
                                     dtype=jnp.float64)
    ours64 = np.asarray(jax.grad(lambda a: fn64(a, jnp.asarray(y, jnp.float64)).sum())(
        jnp.asarray(photos, jnp.float64)))
  assert ours64.dtype == np.float64
  assert _relative_error(ours64, exact) <= 1e-6

  ours32 = np.asarray(jax.grad(lambda a: lpips_fn(a, y).sum())(jnp.asarray(photos)))
  torch32 = _torch_grad(torch_lpips, photos, y)
  assert _relative_error(ours32, exact) <= max(1e-3, 1.5 * _relative_error(torch32, exact))


def test_identical_images_are_at_distance_zero(lpips_fn, photos):
  np.testing.assert_allclose(np.asarray(lpips_fn(photos, photos)), 0.0, atol=1e-7)


def test_gradient_reaches_inputs_but_not_params(params, photos):
  y = np.roll(photos, 1, axis=0)

  def loss(p, x):
    return perceptual_loss(lpips_model.LPIPSDistance(p, validate=False), x, y)

  grad_params, grad_x = jax.grad(loss, argnums=(0, 1))(params, jnp.asarray(photos))
  assert all(np.all(np.asarray(g) == 0) for g in jax.tree.leaves(grad_params))
  grad_x = np.asarray(grad_x)
  assert np.all(np.isfinite(grad_x)) and np.abs(grad_x).max() > 0


def test_perceptual_loss_is_batch_mean(lpips_fn, photos):
  y = np.roll(photos, 1, axis=0)
  loss = perceptual_loss(lpips_fn, photos, y)
  assert loss.shape == ()
  np.testing.assert_allclose(float(loss), float(np.mean(np.asarray(lpips_fn(photos, y)))),
                             rtol=1e-6)


def test_normalize_channels_matches_reference_and_has_finite_grad():
  rng = np.random.default_rng(4)
  feats = rng.normal(size=(2, 5, 5, 8)).astype(np.float32)
  feats[0, 1, 2] = 0.0  # a dead position: torch's sqrt'(0) gives NaN there
  ref = lpips.normalize_tensor(_to_torch(feats)).permute(0, 2, 3, 1).numpy()
  np.testing.assert_allclose(np.asarray(lpips_model.normalize_channels(jnp.asarray(feats))), ref,
                             rtol=1e-6, atol=1e-7)
  grad = jax.grad(lambda f: lpips_model.normalize_channels(f).sum())(jnp.asarray(feats))
  assert np.all(np.isfinite(np.asarray(grad)))


@pytest.mark.parametrize("shape_x, shape_y, message", [
    ((2, 32, 32), (2, 32, 32), "rank 4"),
    ((2, 3, 32, 32), (2, 3, 32, 32), "channels last"),
    ((2, 32, 32, 1), (2, 32, 32, 1), "3 RGB"),
    ((2, 8, 8, 3), (2, 8, 8, 3), "at least 16x16"),
    ((2, 32, 32, 3), (1, 32, 32, 3), "same shape"),
])
def test_bad_shapes_raise(lpips_fn, shape_x, shape_y, message):
  with pytest.raises(ValueError, match=message):
    lpips_fn(jnp.zeros(shape_x), jnp.zeros(shape_y))


def test_check_range():
  lpips_model.check_range(np.linspace(-1, 1, 10))  # fine, no warning
  with pytest.raises(ValueError, match=r"\[-1, 1\]"):
    lpips_model.check_range(np.array([0.0, 255.0]))
  with pytest.warns(UserWarning, match=r"\[0, 1\]"):
    lpips_model.check_range(np.array([0.0, 0.5, 1.0]))


def test_check_inputs_flag_catches_uint8_range(params):
  fn = lpips_model.LPIPSDistance(params, check_inputs=True, validate=False)
  x = np.full((1, 16, 16, 3), 200.0, np.float32)
  with pytest.raises(ValueError, match="x / 127.5 - 1"):
    fn(x, x)


def test_wrong_param_tree_is_rejected(params):
  broken = {k: v for k, v in params.items() if k != "lin4"}
  with pytest.raises(ValueError, match="do not match"):
    lpips_model.LPIPSDistance(broken)


def test_converter_names_missing_keys(torch_lpips):
  state = torch_lpips.state_dict()
  with pytest.raises(KeyError, match="lin4"):
    convert_lpips.convert_torch_lpips(state, {"lin0.model.1.weight": np.zeros((1, 64, 1, 1))})
  without_conv5_3 = {k: v for k, v in state.items() if not k.startswith("net.slice5.28.")}
  with pytest.raises(KeyError, match="conv5_3"):
    convert_lpips.convert_torch_lpips(without_conv5_3, state)


def _torchvision_vgg_state(model):
  """The trunk of ``model`` (an lpips.LPIPS) as a torchvision vgg16 state dict (features.i.*)."""
  state = {}
  for key, value in model.state_dict().items():
    if key.startswith("net.slice"):
      state["features." + key.split(".", 2)[2]] = value.clone()
  # A real torchvision file also holds the classifier, which the converter must ignore.
  state["classifier.0.weight"] = torch.zeros(4, 3)
  return state


def test_cli_reports_missing_vgg_file(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  expected = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
  with pytest.raises(FileNotFoundError) as info:
    convert_lpips.convert_cli(None, str(tmp_path / "out.msgpack"))
  message = str(info.value)
  assert "vgg16-397923af.pth" in message
  assert "https://download.pytorch.org/models/vgg16-397923af.pth" in message
  assert str(expected) in message
  assert convert_main.main(["lpips", "--out", str(tmp_path / "o.msgpack")]) == 2
  assert str(expected) in capsys.readouterr().err
  assert not (tmp_path / "out.msgpack").exists()


def test_cli_round_trip(tmp_path, monkeypatch, torch_lpips, photos):
  monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
  vgg_file = weights.torch_hub_checkpoints_dir() / convert_lpips.VGG16_FILENAME
  vgg_file.parent.mkdir(parents=True)
  torch.save(_torchvision_vgg_state(torch_lpips), vgg_file)

  out = tmp_path / "lpips.msgpack"
  convert_lpips.convert_cli(None, str(out))
  fn = lpips_model.LPIPS.load(out)
  y = np.roll(photos, 1, axis=0)
  np.testing.assert_allclose(np.asarray(fn(photos, y)), _torch_distance(torch_lpips, photos, y),
                             rtol=0, atol=1e-4)

  # The explicit --torch-weights path through the dispatcher gives the same file content.
  moved = tmp_path / "elsewhere.pth"
  vgg_file.rename(moved)
  out2 = tmp_path / "lpips2.msgpack"
  assert convert_main.main(["lpips", "--out", str(out2), "--torch-weights", str(moved)]) == 0
  jax.tree.map(np.testing.assert_array_equal, weights.load_params(out), weights.load_params(out2))
