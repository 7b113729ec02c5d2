"""Stable Diffusion VAEs: converter parity with diffusers (folders and original single files), clear errors on bad
layouts, Tokenizer.from_pretrained on converted weights, and warm-started training."""

import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from cat_jax import Tokenizer
from cat_jax import train as T
from cat_jax import warm_start, weights
from cat_jax.convert import __main__ as convert_main
from cat_jax.convert import sd_vae
from cat_jax.models.nested_vae import NestedVAE, build_model
from conftest import load_config


TOL = 1e-4  # max abs, float32 with highest matmul precision (conftest)


def _vae(widths, latent_channels, groups, layers=2, seed=0, **kwargs) -> AutoencoderKL:
  """A small random diffusers AutoencoderKL; GroupNorm affines are perturbed too, so scale/bias mix-ups show."""
  torch.manual_seed(seed)
  vae = AutoencoderKL(block_out_channels=widths, down_block_types=("DownEncoderBlock2D",) * len(widths),
                      up_block_types=("UpDecoderBlock2D",) * len(widths), latent_channels=latent_channels,
                      norm_num_groups=groups, layers_per_block=layers, **kwargs).eval()
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  return vae


def _images(n=2, side=64, seed=0) -> np.ndarray:
  return np.random.RandomState(seed).uniform(-1, 1, (n, side, side, 3)).astype(np.float32)


def _reference(vae, x):
  """diffusers' posterior mean, log-variance and decoded mean, NHWC."""
  with torch.no_grad():
    posterior = vae.encode(torch.from_numpy(x).permute(0, 3, 1, 2)).latent_dist
    decoded = vae.decode(posterior.mean).sample
  nhwc = lambda t: t.permute(0, 2, 3, 1).numpy()
  return nhwc(posterior.mean), nhwc(posterior.logvar), nhwc(decoded)


def _to_ldm(state: dict, num_stages: int = 4) -> dict:
  """diffusers AutoencoderKL keys -> the original ldm names (attention as 1x1 convs, as in SD's own files)."""
  up = lambda m: str(num_stages - 1 - int(m))
  rules = [(r"encoder\.down_blocks\.(\d+)\.resnets\.", lambda m: f"encoder.down.{m[1]}.block."),
           (r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", lambda m: f"encoder.down.{m[1]}.downsample."),
           (r"decoder\.up_blocks\.(\d+)\.resnets\.", lambda m: f"decoder.up.{up(m[1])}.block."),
           (r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{up(m[1])}.upsample."),
           (r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}."),
           (r"mid_block\.attentions\.0\.", lambda m: "mid.attn_1."),
           (r"attn_1\.group_norm\.", lambda m: "attn_1.norm."), (r"attn_1\.to_out\.0\.", lambda m: "attn_1.proj_out."),
           (r"attn_1\.to_([qkv])\.", lambda m: f"attn_1.{m[1]}."),
           (r"conv_shortcut", lambda m: "nin_shortcut"), (r"conv_norm_out", lambda m: "norm_out")]
  out = {}
  for key, value in state.items():
    for pattern, repl in rules:
      key = re.sub(pattern, repl, key)
    if re.search(r"attn_1\.(q|k|v|proj_out)\.weight$", key):
      value = value[:, :, None, None]
    out[key] = value.clone().contiguous()
  return out


def _check_ldm_writer(vae, ldm):
  """Our ldm names are the ones diffusers' own single-file converter reads back to this very state dict."""
  back = convert_ldm_vae_checkpoint(ldm, vae.config)
  state = vae.state_dict()
  assert sorted(back) == sorted(state)
  for key in state:
    np.testing.assert_array_equal(back[key].numpy(), state[key].numpy())


def _assert_parity(tok: Tokenizer, vae, x):
  mean, logvar, decoded = _reference(vae, x)
  latents = tok.encode(x, levels=0)
  np.testing.assert_allclose(np.stack(latents.values), mean, atol=TOL, rtol=0)
  np.testing.assert_allclose(tok.decode(latents, clip=False), decoded, atol=TOL, rtol=0)
  posterior = tok.model.apply({"params": tok.params}, jnp.asarray(x), 0, method=NestedVAE.encode)
  np.testing.assert_allclose(np.asarray(posterior.logvar), logvar, atol=TOL, rtol=0)
  recon = tok.model.apply({"params": tok.params}, posterior.mode(), 0, method=NestedVAE.decode)
  np.testing.assert_allclose(np.asarray(recon), decoded, atol=TOL, rtol=0)
  assert np.abs(decoded).max() > 0.5 and np.abs(mean).max() > 0.1  # the comparison is not between near-zeros


@pytest.fixture(scope="module")
def sd_like(tmp_path_factory):
  """A 4-channel SD-layout VAE (two ResBlocks per stage, 32 groups at every width) saved as a diffusers folder."""
  vae = _vae((32, 64, 64, 64), latent_channels=4, groups=32, scaling_factor=0.13025)
  folder = tmp_path_factory.mktemp("sd_like") / "vae"
  vae.save_pretrained(folder)
  return vae, folder


def test_diffusers_folder_matches_diffusers_at_8x(sd_like, tmp_path, capsys):
  vae, folder = sd_like
  out = tmp_path / "converted"
  assert convert_main.main(["sd_vae", "--src", str(folder.parent), "--out", str(out)]) == 0  # finds vae/
  printed = capsys.readouterr().out
  assert "initialised fresh" in printed and "enc_stages_4_0" in printed and "dec_up_4" in printed
  config = json.loads((out / "config.json").read_text())
  assert config["model"]["ch_mult"] == [1, 2, 2, 2, 2, 2] and config["model"]["norm_groups"] == 32
  assert config["latent_scaling"] == {"scale": 0.13025, "shift": 0.0}
  assert config["sd_vae"]["identity"] == ["enc_exit_0", "dec_entry_0"]
  assert {"enc_stages_5_1", "enc_exit_1", "dec_entry_2", "enc_down_3"} <= set(config["sd_vae"]["fresh"])
  assert not set(config["sd_vae"]["fresh"]) & set(config["sd_vae"]["pretrained"])

  tok = Tokenizer.from_pretrained(out)
  assert tok.latent_scaling == {"scale": 0.13025, "shift": 0.0}
  assert tok.image_size == 256
  np.testing.assert_array_equal(np.asarray(tok.params["enc_exit_0"]["kernel"])[0, 0], np.eye(64))
  np.testing.assert_array_equal(np.asarray(tok.params["dec_entry_0"]["bias"]), np.zeros(64))
  _assert_parity(tok, vae, _images())
  # The fresh stages give the other levels finite (untrained) outputs of the right shapes.
  z = tok.encode(_images(1), levels=2)
  assert z.values[0].shape == (2, 2, 4) and np.isfinite(tok.decode(z)).all()


def test_original_single_file_16_channels_matches_diffusers(tmp_path, capsys):
  # The SD3 / FLUX layout: 16 channels, no quant convs (they become exact identities).
  vae = _vae((32, 64, 64, 64), latent_channels=16, groups=32, seed=1, use_quant_conv=False,
             use_post_quant_conv=False)
  ldm = _to_ldm(vae.state_dict())
  _check_ldm_writer(vae, ldm)
  full = {f"first_stage_model.{k}": v for k, v in ldm.items()}
  full["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(3)  # a whole SD checkpoint: VAE part taken
  path = tmp_path / "sd3_vae.safetensors"
  safetensors.torch.save_file(full, path)

  out = tmp_path / "converted"
  assert convert_main.main(["sd_vae", "--src", str(path), "--out", str(out), "--preset", "sd3"]) == 0
  printed = capsys.readouterr().out
  assert "took the" in printed and "first_stage_model." in printed and "ignored 1 others" in printed
  tok = Tokenizer.from_pretrained(out)
  assert tok.latent_scaling == {"scale": 1.5305, "shift": 0.0609}
  assert tok.config.sd_vae.layout == "ldm"
  assert set(tok.config.sd_vae.identity) == {"enc_exit_0", "dec_entry_0", "quant_conv", "post_quant_conv"}
  _assert_parity(tok, vae, _images(seed=1))

  # Explicit factors override the preset.
  assert convert_main.main(["sd_vae", "--src", str(path), "--out", str(tmp_path / "c2"), "--scaling-factor", "0.5",
                            "--shift-factor", "0.25", "--preset", "flux"]) == 0
  assert json.loads((tmp_path / "c2" / "config.json").read_text())["latent_scaling"] == {"scale": 0.5, "shift": 0.25}


def test_ckpt_bin_and_legacy_attention_names_convert_to_the_same_params(tmp_path):
  vae = _vae((32, 64, 64, 64), latent_channels=4, groups=32, layers=1, seed=2)  # ldm's GroupNorms have 32 groups
  vae.save_pretrained(tmp_path / "st")
  reference, config, _ = sd_vae.convert(tmp_path / "st")
  assert config["model"]["num_res_blocks"] == 1

  # A diffusers folder from before diffusers 0.14: .bin weights, attention named query/key/value/proj_attn.
  vae.save_pretrained(tmp_path / "bin", safe_serialization=False)
  state = torch.load(tmp_path / "bin" / "diffusion_pytorch_model.bin", weights_only=True)
  legacy = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
  state = {re.sub(r"attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.", lambda m: f"attentions.0.{legacy[m[1]]}.", k): v
           for k, v in state.items()}
  assert any(".query." in k for k in state)
  torch.save(state, tmp_path / "bin" / "diffusion_pytorch_model.bin")
  # An ldm training checkpoint: {"state_dict": ...} with the loss module's tensors beside the VAE's.
  ldm = _to_ldm(vae.state_dict())
  ldm["loss.logvar"] = torch.zeros(())
  ldm["loss.discriminator.main.0.weight"] = torch.zeros(4, 3, 4, 4)
  torch.save({"state_dict": ldm, "global_step": 7}, tmp_path / "kl-f8.ckpt")

  for src in (tmp_path / "bin", tmp_path / "kl-f8.ckpt"):
    params, _, report = sd_vae.convert(src, scaling_factor=0.18215)
    jax.tree.map(np.testing.assert_array_equal, params, reference)
  assert any("ignored 2 training-loss tensors" in line for line in report)


def test_bad_layouts_stop_with_the_keys_named(sd_like, tmp_path, capsys):
  vae, _ = sd_like
  state = {k: v.numpy() for k, v in vae.state_dict().items()}

  extra = dict(state, **{"encoder.mid_block.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(sd_vae.ConversionError, match=r"unexpected keys: encoder\.mid_block\.extra\.weight"):
    sd_vae.convert_state_dict(extra, "diffusers")
  missing = {k: v for k, v in state.items() if k != "decoder.up_blocks.0.resnets.2.conv1.weight"}
  with pytest.raises(sd_vae.ConversionError, match=r"missing keys: decoder\.up_blocks\.0\.resnets\.2\.conv1\.weight"):
    sd_vae.convert_state_dict(missing, "diffusers")
  ldm = {k: v.numpy() for k, v in _to_ldm(vae.state_dict()).items()}
  ldm["encoder.mid.attn_1.q.weight"] = ldm["encoder.mid.attn_1.q.weight"][:32]
  with pytest.raises(sd_vae.ConversionError, match=r"wrong shapes: encoder\.mid\.attn_1\.q\.weight \(32, 64, 1, 1\)"):
    sd_vae.convert_state_dict(ldm, "ldm")
  with pytest.raises(sd_vae.ConversionError, match=r"neither a diffusers AutoencoderKL.*input_blocks"):
    sd_vae.canonical_state_dict({"model.diffusion_model.input_blocks.0.0.weight": np.zeros(3)})
  four_x = {k: v.numpy() for k, v in _vae((16, 32, 32), latent_channels=4, groups=8, layers=1).state_dict().items()}
  with pytest.raises(sd_vae.ConversionError, match="3 encoder stages .a 4x VAE.*8x VAE with 4 stages"):
    sd_vae.convert_state_dict(four_x, "diffusers")
  with pytest.raises(sd_vae.ConversionError, match="_class_name is 'AutoencoderTiny'"):
    sd_vae.check_diffusers_config({"_class_name": "AutoencoderTiny"})

  # Through the command line: one line on stderr and exit status 2.
  path = tmp_path / "vae.safetensors"
  safetensors.torch.save_file(_to_ldm(vae.state_dict()), path)
  assert convert_main.main(["sd_vae", "--src", str(path), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err
  assert "does not say its latent scaling factor" in err and "--preset sd" in err and "sdxl (0.13025" in err
  assert convert_main.main(["sd_vae", "--src", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
  assert "no VAE at" in capsys.readouterr().err
  assert convert_main.main(["sd_vae", "--out", str(tmp_path / "o")]) == 2
  assert "sd_vae needs --src PATH" in capsys.readouterr().err
  assert not (tmp_path / "o").exists()


# -- training from converted weights ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
  """A runlocal-sized VAE (widths 8..16, 4 groups, one ResBlock per stage) converted into a directory."""
  vae = _vae((8, 16, 16, 16), latent_channels=4, groups=4, layers=1, seed=3)
  root = tmp_path_factory.mktemp("small")
  vae.save_pretrained(root / "vae")
  params, config, _ = sd_vae.convert(root / "vae")
  sd_vae.save(root / "converted", params, config)
  return vae, root / "converted", config


def _warm_config(converted, config, **overrides):
  c = load_config("cat.py", "runlocal")
  c.model = config["model"]
  c.init_from = str(converted)
  c.update_from_flattened_dict(overrides)
  return c


def test_freeze_holds_the_pretrained_modules_for_n_updates_only(small):
  _, converted, config = small
  params = jax.tree.map(jnp.asarray, weights.read_params(converted))
  grads = jax.tree.map(jnp.ones_like, params)
  g_tx, _, _ = T.make_optimizers(_warm_config(converted, config, freeze_pretrained_steps=2))
  opt_state = g_tx.init(params)
  moved = []
  for _ in range(3):
    updates, opt_state = g_tx.update(grads, opt_state, params)
    moved.append({name: bool(any(np.abs(np.asarray(u)).max() > 0 for u in jax.tree.leaves(tree)))
                  for name, tree in updates.items()})
  pretrained = set(config["sd_vae"]["pretrained"]) | set(config["sd_vae"]["identity"])
  for step in range(3):
    for name, did_move in moved[step].items():
      assert did_move == (name not in pretrained or step == 2), (step, name)

  with pytest.raises(ValueError, match="needs --config.init_from"):
    T.make_optimizers(_warm_config(converted, config, freeze_pretrained_steps=5, init_from=""))
  with pytest.raises(ValueError, match=r"model.z_channels: init_from has 4, config has 8"):
    warm_start.load_params(str(converted), dict(config["model"], z_channels=8))
  with pytest.raises(FileNotFoundError, match="python -m cat_jax.convert sd_vae"):
    warm_start.read_init_config(str(converted.parent))


def _psnr(recon, images):
  """The reported PSNR (image_quality.reported_psnr), in numpy: 8-bit levels, per image, capped at 50 dB."""
  to_8bit = lambda x: np.round((np.clip(x, -1, 1) + 1) * 127.5) / 127.5 - 1
  mse = np.mean(np.square((to_8bit(recon) - to_8bit(images)) / 2.0), axis=(1, 2, 3))
  return np.minimum(10.0 * np.log10(1.0 / np.maximum(mse, 1e-10)), 50.0)


def test_warm_start_reproduces_the_source_at_8x_and_trains_only_the_new_stages(small, tmp_path):
  vae, converted, config = small
  c = _warm_config(converted, config, freeze_pretrained_steps=-1, num_steps=2)
  # Every training batch at 16x (the runlocal default is a str); the evaluation at 8x only, the level compared below.
  c.data = dict(c.data.to_dict(), levels="16x", eval_levels="8x")
  state = T.train_and_evaluate(c, str(tmp_path))
  assert int(state.step) == 2
  loaded = weights.read_params(converted)
  pretrained = set(config["sd_vae"]["pretrained"]) | set(config["sd_vae"]["identity"])
  for name in loaded:
    same = all(np.array_equal(np.asarray(a), b) for a, b in zip(jax.tree.leaves(state.params[name]),
                                                                  jax.tree.leaves(loaded[name])))
    if name in pretrained:
      assert same, name  # frozen throughout (not even weight decay)
    elif name.startswith(("enc_stages_4", "dec_stages_4", "enc_exit_1", "dec_entry_1")):
      assert not same, name  # level-1 batches train the 16x stage

  # The 8x path is the source's: after training (frozen) and at step 0, as the step-0 evaluation measured it.
  x = _images(4, 32, seed=3)
  _, _, decoded = _reference(vae, x)
  model = build_model(c.model)
  for params in (state.params, state.ema_params):
    recon, _ = model.apply({"params": params}, jnp.asarray(x), 0)
    np.testing.assert_allclose(np.asarray(recon), decoded, atol=TOL, rtol=0)
  rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  step0 = next(r for r in rows if r["step"] == 0 and "eval/level0/psnr" in r)
  assert not any(k.startswith(("eval/level1/", "eval/level2/")) for r in rows for k in r)
  batch = next(iter(T._make_data(c, split=c.data.eval_split, train=False, process_batch=c.batch_size)))
  images, mask = np.asarray(batch["image"]), np.asarray(batch["mask"], bool)
  _, _, source_recon = _reference(vae, images)
  np.testing.assert_allclose(step0["eval/level0/psnr"], _psnr(source_recon, images)[mask].mean(), rtol=1e-5)


@pytest.mark.parametrize("variant,latent_channels", [("sd3", 16), ("sdxl", 4)])
def test_config_variants_are_the_converted_full_size_models(variant, latent_channels):
  with torch.device("meta"):  # the real SD layout, shapes only
    vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=latent_channels)
  arch = sd_vae.infer_architecture(vae.state_dict(), "diffusers")
  config = load_config("cat.py", variant)
  warm_start.check_model_matches(sd_vae.model_config(arch, norm_groups=32), config.model)
  assert config.freeze_pretrained_steps > 0 and config.init_from is None
