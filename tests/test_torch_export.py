"""`python -m cat_jax.convert to_torch`: the exported PyTorch folder computes what the JAX tokenizer computes.

Every layout the configs use (SD: GroupNorm + 1x1 skips + attention; the paper's: DC-AE shortcuts, RMSNorm, the
DCT patch code; with the residual gate; without normalisation) with random weights, and the shipped `demo`, are
exported; a subprocess in which importing jax, flax, cat_jax or safetensors fails loads each folder's own
modeling_cat.py and encodes and decodes at every level. Encode mean/logvar and decode must agree with JAX (float32,
'highest' matmul precision) within 1e-4 max abs; a diffusers AutoencoderKL converted in and exported back out
agrees with diffusers at 8x.
"""

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from cat_jax import Tokenizer
from cat_jax.convert import __main__ as convert_main
from cat_jax.convert import to_torch
from cat_jax.models.nested_vae import NestedVAE, crop_latent

TOL = 1e-4  # max abs, float32 ('highest' on the JAX side)
SIZE = 64
TINY = dict(ch=8, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=1, z_channels=4, head_attention=True)
LAYOUTS = {"sd": dict(TINY, norm="group"),
           "shortcut_rms": dict(TINY, shortcuts=True, norm="rms", logvar_init=-10.0),
           "gated": dict(TINY, z_channels=16, shortcuts=True, norm="rms", residual_gate=True, head_attention=False),
           "no_norm": dict(TINY, shortcuts=True, norm="none", num_res_blocks=2)}
# Without normalisation, unit-variance random kernels grow activations ~100x over the trunk (decodes up to ~350),
# where float32 rounding alone is ~1e-4: halved kernels keep outputs O(1), as a trained model's are.
KERNEL_SCALE = {"no_norm": 0.5}

# Runs in a fresh interpreter that cannot import JAX, cat_jax or safetensors: the exported folder is torch only.
TORCH_ONLY = textwrap.dedent("""
    import importlib.util, sys
    class Blocked:
      def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("jax", "jaxlib", "flax", "cat_jax", "safetensors"):
          raise ImportError(f"{name} is blocked in this test")
    sys.meta_path.insert(0, Blocked())
    import torch
    jobs = torch.load(sys.argv[1])
    out = {}
    for name, job in jobs.items():
      spec = importlib.util.spec_from_file_location(f"modeling_cat_{name}", job["dir"] + "/modeling_cat.py")
      module = importlib.util.module_from_spec(spec)
      spec.loader.exec_module(module)
      vae = module.CATTokenizer.from_pretrained(job["dir"])
      with torch.no_grad():
        for level, spelling in enumerate(("8x", 16, "32x")):
          posterior = vae.encode(job["images"], spelling)
          out[name, level] = (posterior.mean, posterior.logvar, vae.decode(job["latents"][level], level))
          if "content" in job:  # the JAX tokenizer's per-image choice of the patch code, and decoding it
            z, code_only = vae.encode_keeping_code(job["content"], level)
            out[name, level, "kept"] = (z, code_only, vae.decode(z, level, code_only))
    out["jax_loaded"] = any(m.split(".")[0] in ("jax", "cat_jax") for m in sys.modules)
    torch.save(out, sys.argv[2])
""")




def _random_tokenizer(config: dict, seed: int, kernel_scale: float = 1.0) -> Tokenizer:
  """Random values for every parameter (non-trivial norm scales, the zero-initialised residual branches too)."""
  model = NestedVAE(**config)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)), 0)["params"]
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if "scale" in name:
      return jnp.asarray(1.0 + 0.1 * rng.standard_normal(leaf.shape), jnp.float32)
    fan_in = int(np.prod(leaf.shape[:-1])) if "kernel" in name else 10
    scale = kernel_scale if "kernel" in name else 1.0
    return jnp.asarray(scale * rng.standard_normal(leaf.shape) / np.sqrt(fan_in), jnp.float32)

  return Tokenizer(model, jax.tree_util.tree_map_with_path(fill, shapes), batch_size=2,
                   config={"model": config, "data": {"image_size": SIZE}})


def _nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def _jax_reference(tok: Tokenizer, images: np.ndarray) -> dict:
  """Per level: (posterior mean, logvar, decode of the mean), NHWC, each on the level's own grid."""
  out = {}
  for level in range(3):
    posterior = tok.model.apply({"params": tok.params}, jnp.asarray(images), level, method=NestedVAE.encode)
    mean, logvar = crop_latent(posterior.mean, level), crop_latent(posterior.logvar, level)
    decoded = tok.model.apply({"params": tok.params}, posterior.mean, level, method=NestedVAE.decode)
    out[level] = tuple(np.asarray(a) for a in (mean, logvar, decoded))
  return out


def _run_torch_only(jobs: dict, tmp_path) -> dict:
  torch.save(jobs, tmp_path / "jobs.pt")
  script = tmp_path / "torch_only.py"
  script.write_text(TORCH_ONLY)
  subprocess.run([sys.executable, str(script), str(tmp_path / "jobs.pt"), str(tmp_path / "out.pt")], check=True,
                 timeout=600)
  return torch.load(tmp_path / "out.pt")


def test_every_layout_and_the_shipped_tokenizer_match_jax_in_a_torch_only_process(tmp_path):
  images = np.random.default_rng(0).uniform(-1, 1, (2, SIZE, SIZE, 3)).astype(np.float32)
  tokenizers = {name: _random_tokenizer(config, seed, KERNEL_SCALE.get(name, 1.0))
                for seed, (name, config) in enumerate(LAYOUTS.items())}
  tokenizers["demo"] = Tokenizer.from_pretrained("demo")
  from cat_jax.data.embedded import generate
  content = np.stack([generate(i, split="validation", image_size=SIZE)[0] for i in range(6)]) / 127.5 - 1.0
  content = np.concatenate([content, np.full((1, SIZE, SIZE, 3), 0.3)]).astype(np.float32)
  jobs, want = {}, {}
  for name, tok in tokenizers.items():
    folder = to_torch.export(tok, tmp_path / name)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors", "modeling_cat.py"]
    want[name] = _jax_reference(tok, images)
    jobs[name] = {"dir": str(folder), "images": _nchw(images),
                  "latents": [_nchw(want[name][level][0]) for level in range(3)]}
  jobs["demo"]["content"] = _nchw(content)
  got = _run_torch_only(jobs, tmp_path)
  assert got.pop("jax_loaded") is False
  worst = {}
  for name in tokenizers:
    for level in range(3):
      for what, g, w in zip(("mean", "logvar", "decode"), got[name, level], want[name][level]):
        g = g.numpy().transpose(0, 2, 3, 1)
        assert g.shape == w.shape, (name, level, what)
        worst[name, level, what] = float(np.abs(g - w).max())
      assert 0.1 < np.abs(want[name][level][2]).max() < 50, (name, level)  # neither near-zeros nor blown up
  for level in range(3):  # the shipped demo keeps the code for some images (the flat one always), as in JAX
    latents = tokenizers["demo"].encode(content, level)
    z, code_only, decoded = got["demo", level, "kept"]
    assert code_only.tolist() == latents.code_only.tolist() and 0 < sum(code_only.tolist()) < 7, level
    worst["demo", level, "kept code"] = float(np.abs(z.numpy().transpose(0, 2, 3, 1) - np.stack(latents.values)).max())
    worst["demo", level, "decode kept"] = float(np.abs(np.clip(decoded.numpy().transpose(0, 2, 3, 1), -1, 1)
                                                       - tokenizers["demo"].decode(latents)).max())
  assert max(worst.values()) < TOL, {k: v for k, v in worst.items() if v >= TOL}


def test_a_diffusers_vae_converted_in_and_exported_out_matches_diffusers_at_8x(tmp_path):
  from diffusers import AutoencoderKL

  torch.manual_seed(0)
  vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, norm_num_groups=32,
                      layers_per_block=2).eval()
  with torch.no_grad():
    for name, p in vae.named_parameters():
      if "norm" in name:
        p.add_(0.2 * torch.randn_like(p))
  vae.save_pretrained(tmp_path / "diffusers")
  assert convert_main.main(["sd_vae", "--src", str(tmp_path / "diffusers"), "--out", str(tmp_path / "cat")]) == 0
  assert convert_main.main(["to_torch", "--src", str(tmp_path / "cat"), "--out", str(tmp_path / "pt")]) == 0
  sys.path.insert(0, str(tmp_path / "pt"))
  try:
    import modeling_cat
    exported = modeling_cat.CATTokenizer.from_pretrained(tmp_path / "pt")
  finally:
    sys.path.remove(str(tmp_path / "pt"))
    sys.modules.pop("modeling_cat", None)
  x = torch.from_numpy(np.random.default_rng(1).uniform(-1, 1, (2, 3, SIZE, SIZE)).astype(np.float32))
  with torch.no_grad():
    want = vae.encode(x).latent_dist
    got = exported.encode(x, "8x")
    decoded_want, decoded_got = vae.decode(want.mean).sample, exported.decode(want.mean, "8x")
  for a, b in ((got.mean, want.mean), (got.logvar, want.logvar), (decoded_got, decoded_want)):
    assert float((a - b).abs().max()) < TOL
  assert float(decoded_want.abs().max()) > 0.5
  scaling = json.loads((tmp_path / "pt" / "config.json").read_text())["latent_scaling"]
  assert scaling == json.loads((tmp_path / "cat" / "config.json").read_text())["latent_scaling"]


def test_options_the_torch_module_lacks_are_refused_by_name():
  assert to_torch.check_exportable(dict(TINY, norm="rms", dtype="bfloat16"))["norm"] == "rms"
  with pytest.raises(ValueError, match=r"model\.norm='layer'"):
    to_torch.check_exportable(dict(TINY, norm="layer"))
  with pytest.raises(ValueError, match=r"model\.rotary_heads=4 \(the PyTorch module has no such option\)"):
    to_torch.check_exportable(dict(TINY, rotary_heads=4))


def test_the_fixed_code_needs_shortcuts_in_torch_as_in_jax():
  from cat_jax.convert import modeling_cat

  z = torch.zeros(1, TINY["z_channels"], 8, 8)
  with pytest.raises(ValueError, match="shortcuts"):
    modeling_cat.NestedVAE(**LAYOUTS["sd"]).decode_code(z, 0)
  with pytest.raises(ValueError, match="shortcuts"):
    _random_tokenizer(LAYOUTS["sd"], seed=0).model.apply({}, jnp.zeros((1, 8, 8, 4)), 0, method=NestedVAE.decode_code)
  assert modeling_cat.NestedVAE(**LAYOUTS["shortcut_rms"]).decode_code(z, 0).shape == (1, 3, 64, 64)


def test_to_torch_cli_one_line_errors(tmp_path, capsys):
  assert convert_main.main(["to_torch", "--src", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "missing does not exist" in err and "\n" not in err
  assert convert_main.main(["to_torch", "--out", str(tmp_path / "o")]) == 2
  assert "needs --src" in capsys.readouterr().err
  with pytest.raises(SystemExit) as e:
    convert_main.main(["lpips", "--step", "3", "--out", str(tmp_path / "o")])
  assert e.value.code == 2
  assert "--step applies to to_torch and release" in capsys.readouterr().err
  # A torch folder is not a cat_jax folder: loading it in JAX says what it is.
  to_torch.export(Tokenizer.from_pretrained("demo"), tmp_path / "pt")
  with pytest.raises(ValueError, match="for PyTorch"):
    Tokenizer.from_pretrained(tmp_path / "pt")


def test_to_torch_from_a_training_workdir(runlocal_workdir, tmp_path, capsys):
  assert convert_main.main(["to_torch", "--src", runlocal_workdir, "--step", "3", "--out", str(tmp_path / "pt")]) == 0
  assert "step 3" in capsys.readouterr().out
  config = json.loads((tmp_path / "pt" / "config.json").read_text())
  assert config["step"] == 3 and config["source"] == runlocal_workdir and config["model"]["shortcuts"] is True
  tok = Tokenizer.from_checkpoint(runlocal_workdir, step=3)
  want = to_torch.torch_state_dict(jax.device_get(tok.params))
  from safetensors.numpy import load_file
  got = load_file(str(tmp_path / "pt" / "model.safetensors"))
  assert sorted(got) == sorted(want)
  for key in want:
    np.testing.assert_array_equal(got[key], want[key], err_msg=key)
