"""Stable-Diffusion-family VAEs -> a ``NestedVAE`` directory that ``cat_jax.Tokenizer.from_pretrained`` loads.

  python -m cat_jax.convert sd_vae --src PATH --out OUT [--preset sd|sdxl|sd3|flux] [--seed 0]

PATH is a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors`` or ``.bin``;
a pipeline folder with a ``vae/`` subfolder works too) or one original-layout checkpoint (ldm key names such as
``encoder.down.0.block.0.conv1.weight``, with or without a ``first_stage_model.`` / ``vae.`` prefix) as
``.safetensors`` or ``.ckpt``. Needs ``safetensors`` for .safetensors files and ``torch`` for .ckpt/.bin files.

The nested VAE with ``norm="group"``, a fixed ``norm_groups`` and ``shortcuts=False`` is the SD AutoencoderKL at its
8x exit: the source's 4 stages become stages 0..3, its mid blocks, output convs and (post-)quant convs the shared
heads, and the 8x exit/entry 1x1 projections are exact identities (``ch_mult`` repeats the last width, so they are
square). Stages 4 and 5 (16x, 32x), their down/upsamplers and the 16x/32x exit/entry projections do not exist in the
source: they are initialised fresh (seeded) and must be trained (``configs/cat.py:sd3`` / ``:sdxl``) before levels 1
and 2 mean anything. ``config.json`` lists which top-level modules came from where (``sd_vae``) and keeps the
latent scaling/shift factors (``latent_scaling``); see ``Tokenizer.latent_scaling``.
"""

from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping

import numpy as np

from cat_jax import weights

NUM_SOURCE_STAGES = 4  # an 8x VAE: three stride-2 downsamplers
DEFAULT_NORM_GROUPS = 32  # ldm's Normalize, and diffusers' default
IMAGE_SIZE = 256  # informational (the model is fully convolutional): CAT's training resolution

# Latent (scale, shift) of the public checkpoints; a downstream diffusion model sees (z - shift) * scale.
PRESETS = {
    "sd": (0.18215, 0.0),     # SD 1.x / 2.x (kl-f8, sd-vae-ft-mse, sd-vae-ft-ema)
    "sdxl": (0.13025, 0.0),   # SDXL (sdxl-vae, sdxl-vae-fp16-fix)
    "sd3": (1.5305, 0.0609),  # SD3 / SD3.5 (16 channels)
    "flux": (0.3611, 0.1159),  # FLUX.1 (16 channels)
}
IGNORED_PREFIXES = ("loss.",)  # an ldm training checkpoint's discriminator / LPIPS / logvar: not the VAE

# Source names of each part, per layout. ``{s}``: nested stage (0 = full resolution); ``{u}``: diffusers' up-block
# index, which counts from the lowest resolution (u = 3 - s); ``{i}``: mid-block ResBlock 0/1.
_NAMES = {
    "diffusers": dict(enc_res="encoder.down_blocks.{s}.resnets.{j}",
                      enc_down="encoder.down_blocks.{s}.downsamplers.0.conv",
                      mid_res="{part}.mid_block.resnets.{i}", mid_attn="{part}.mid_block.attentions.0",
                      dec_res="decoder.up_blocks.{u}.resnets.{j}", dec_up="decoder.up_blocks.{u}.upsamplers.0.conv",
                      norm_out="{part}.conv_norm_out", skip="conv_shortcut",
                      attn=dict(norm="group_norm", q="to_q", k="to_k", v="to_v", proj_out="to_out.0")),
    "ldm": dict(enc_res="encoder.down.{s}.block.{j}", enc_down="encoder.down.{s}.downsample.conv",
                mid_res="{part}.mid.block_{i1}", mid_attn="{part}.mid.attn_1",
                dec_res="decoder.up.{s}.block.{j}", dec_up="decoder.up.{s}.upsample.conv",
                norm_out="{part}.norm_out", skip="nin_shortcut",
                attn=dict(norm="norm", q="q", k="k", v="v", proj_out="proj_out")),
}
# Attention names of diffusers folders saved before diffusers 0.14 (diffusers still loads them).
_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


class ConversionError(ValueError):
  """The source is not a Stable-Diffusion-family AutoencoderKL this converter can map."""


# -- reading the source ----------------------------------------------------------------------------------------------
def _to_numpy(value: Any) -> np.ndarray:
  if hasattr(value, "detach"):  # a torch tensor (fp16/bf16 included); avoids importing torch here
    value = value.detach().float().cpu().numpy()
  return np.asarray(value, dtype=np.float32)


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    from safetensors import safe_open
  except ImportError:
    raise ImportError(f"reading {path} needs the safetensors package: pip install safetensors") from None
  import ml_dtypes  # noqa: F401  (a jax dependency; lets numpy read bfloat16 tensors)

  with safe_open(str(path), framework="np") as f:
    return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}


def _load_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
  try:
    import torch
  except ImportError:
    raise ImportError(f"reading {path} needs torch (pip install torch), or convert a .safetensors file instead "
                      "(needs only safetensors)") from None
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):  # a Lightning / ldm checkpoint
    obj = obj["state_dict"]
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path} holds a {type(obj).__name__}, not a state dict")
  return {k: _to_numpy(v) for k, v in obj.items() if hasattr(v, "detach")}


def load_weights(path: str | pathlib.Path) -> dict[str, np.ndarray]:
  """A checkpoint file's tensors as float32 numpy arrays, by suffix: .safetensors, else a torch pickle."""
  path = pathlib.Path(path)
  return _load_safetensors(path) if path.suffix == ".safetensors" else _load_torch(path)


def read_source(src: str | pathlib.Path) -> tuple[dict[str, np.ndarray], dict | None, pathlib.Path]:
  """``(state dict, diffusers config or None, weights file)`` of a diffusers folder or a single checkpoint."""
  src = pathlib.Path(src).expanduser()
  if not src.exists():
    raise FileNotFoundError(f"no VAE at {src}: pass a diffusers AutoencoderKL folder (config.json + "
                            "diffusion_pytorch_model.safetensors) or an original .safetensors / .ckpt file")
  if src.is_file():
    return load_weights(src), None, src
  folder = src / "vae" if not (src / "config.json").is_file() and (src / "vae" / "config.json").is_file() else src
  if not (folder / "config.json").is_file():
    raise FileNotFoundError(f"{src} is a folder without config.json (nor vae/config.json); a diffusers "
                            "AutoencoderKL folder holds config.json and diffusion_pytorch_model.safetensors")
  config = json.loads((folder / "config.json").read_text())
  for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
               "diffusion_pytorch_model.fp16.safetensors", "diffusion_pytorch_model.fp16.bin"):
    if (folder / name).is_file():
      return load_weights(folder / name), config, folder / name
  raise FileNotFoundError(f"{folder} has config.json but no diffusion_pytorch_model.safetensors (or .bin)")


def check_diffusers_config(config: Mapping[str, Any]) -> None:
  """Raises ConversionError unless ``config`` describes a plain SD-style ``AutoencoderKL``."""
  problems = []
  if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
    problems.append(f"_class_name is {config['_class_name']!r}, not 'AutoencoderKL'")
  if any(t != "DownEncoderBlock2D" for t in config.get("down_block_types", ())):
    problems.append(f"down_block_types {config['down_block_types']} (only DownEncoderBlock2D)")
  if any(t != "UpDecoderBlock2D" for t in config.get("up_block_types", ())):
    problems.append(f"up_block_types {config['up_block_types']} (only UpDecoderBlock2D)")
  if config.get("act_fn", "silu") != "silu":
    problems.append(f"act_fn {config['act_fn']!r} (only silu)")
  if problems:
    raise ConversionError("not a Stable-Diffusion-style AutoencoderKL: " + "; ".join(problems))


def canonical_state_dict(state: Mapping[str, np.ndarray]) -> tuple[dict[str, np.ndarray], str, list[str]]:
  """Strips a ``first_stage_model.`` / ``vae.`` prefix and training-only keys; returns (state, layout, notes)."""
  notes = []
  for prefix in ("first_stage_model.", "vae."):
    if any(k.startswith(prefix) for k in state):
      dropped = sum(not k.startswith(prefix) for k in state)
      state = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
      notes.append(f"took the {len(state)} tensors under '{prefix}'"
                   + (f", ignored {dropped} others" if dropped else ""))
      break
  ignored = [k for k in state if k.startswith(IGNORED_PREFIXES)]
  if ignored:
    state = {k: v for k, v in state.items() if not k.startswith(IGNORED_PREFIXES)}
    notes.append(f"ignored {len(ignored)} training-loss tensors ({', '.join(IGNORED_PREFIXES)}*)")
  if any(k.startswith(("encoder.down_blocks.", "encoder.mid_block.")) for k in state):
    layout = "diffusers"
    renamed = {}
    for k, v in state.items():
      if ".mid_block.attentions." in k:
        for old, new in _LEGACY_ATTENTION.items():
          k = k.replace(old, new)
      renamed[k] = v
    state = renamed
  elif any(k.startswith(("encoder.down.", "encoder.mid.")) for k in state):
    layout = "ldm"
  else:
    raise ConversionError(
        "neither a diffusers AutoencoderKL (encoder.down_blocks.*) nor an original ldm VAE (encoder.down.*, "
        f"optionally under first_stage_model.); its first keys are {sorted(state)[:8]}")
  return state, layout, notes


# -- architecture ----------------------------------------------------------------------------------------------------
def infer_architecture(state: Mapping[str, np.ndarray], layout: str) -> dict[str, Any]:
  """Widths, ResBlocks per stage, latent channels and optional parts, read from the tensors' shapes."""
  names = _NAMES[layout]
  conv1 = lambda s, j: names["enc_res"].format(s=s, j=j) + ".conv1.weight"
  widths = []
  while conv1(len(widths), 0) in state:
    widths.append(int(state[conv1(len(widths), 0)].shape[0]))
  if len(widths) != NUM_SOURCE_STAGES:
    raise ConversionError(
        f"the source has {len(widths)} encoder stages (a {2 ** max(len(widths) - 1, 0)}x VAE); the nested model's 8x "
        f"exit needs an 8x VAE with {NUM_SOURCE_STAGES} stages (SD 1.x/2.x/XL, SD3, FLUX)")
  num_res_blocks = 0
  while conv1(0, num_res_blocks) in state:
    num_res_blocks += 1
  for key in ("encoder.conv_in.weight", "encoder.conv_out.weight", "decoder.conv_out.weight"):
    if key not in state:
      raise ConversionError(f"the source lacks {key}")
  ch = widths[0]
  if any(w % ch for w in widths):
    raise ConversionError(f"stage widths {widths} are not multiples of the first ({ch})")
  in_channels, out_channels = state["encoder.conv_in.weight"].shape[1], state["decoder.conv_out.weight"].shape[0]
  if in_channels != out_channels:
    raise ConversionError(f"the source maps {in_channels} input channels to {out_channels} output channels; the "
                          "nested model reconstructs its input channels")
  attn = names["mid_attn"].format(part="encoder") + "." + names["attn"]["q"] + ".weight"
  return dict(widths=widths, num_res_blocks=num_res_blocks,
              z_channels=int(state["encoder.conv_out.weight"].shape[0]) // 2, in_channels=int(in_channels),
              attention=attn in state, quant_conv="quant_conv.weight" in state,
              post_quant_conv="post_quant_conv.weight" in state)


def model_config(arch: Mapping[str, Any], norm_groups: int) -> dict[str, Any]:
  """``NestedVAE`` fields for the source: its stages 0..3, then two more at the last width (16x, 32x)."""
  ch = arch["widths"][0]
  ch_mult = tuple(w // ch for w in arch["widths"])
  return dict(ch=ch, ch_mult=ch_mult + (ch_mult[-1],) * 2, num_res_blocks=arch["num_res_blocks"],
              z_channels=arch["z_channels"], in_channels=arch["in_channels"], head_attention=arch["attention"],
              norm="group", norm_groups=norm_groups, shortcuts=False, dtype="float32", param_dtype="float32")


# Top-level NestedVAE modules the 8x path uses and the source provides (or, for the 1x1s, makes identities).
def pretrained_modules(num_res_blocks: int) -> list[str]:
  s = range(NUM_SOURCE_STAGES)
  return (["enc_conv_in"] + [f"enc_stages_{i}_{j}" for i in s for j in range(num_res_blocks)]
          + [f"enc_down_{i}" for i in s[:-1]] + ["enc_exit_0", "enc_mid", "enc_norm_out", "enc_conv_out", "quant_conv",
                                                  "post_quant_conv", "dec_conv_in", "dec_mid", "dec_entry_0"]
          + [f"dec_stages_{i}_{j}" for i in s for j in range(num_res_blocks + 1)]
          + [f"dec_up_{i}" for i in s[:-1]] + ["dec_norm_out", "dec_conv_out"])


def _mapping(arch: Mapping[str, Any], layout: str, has_skip) -> list[tuple[str, str, str]]:
  """``(flax module path 'a/b', source prefix, kind)`` for every converted layer; kind: conv, norm or dense."""
  names, m = _NAMES[layout], []
  last = NUM_SOURCE_STAGES - 1

  def resnet(path, src):
    m.extend([(f"{path}/norm1", f"{src}.norm1", "norm"), (f"{path}/conv1", f"{src}.conv1", "conv"),
              (f"{path}/norm2", f"{src}.norm2", "norm"), (f"{path}/conv2", f"{src}.conv2", "conv")])
    if has_skip(path):
      m.append((f"{path}/skip", f"{src}.{names['skip']}", "conv"))

  def mid(path, part):
    for i in range(2):
      resnet(f"{path}/res_{i}", names["mid_res"].format(part=part, i=i, i1=i + 1))
    if arch["attention"]:
      src = names["mid_attn"].format(part=part)
      m.append((f"{path}/attn/norm", f"{src}.{names['attn']['norm']}", "norm"))
      m.extend((f"{path}/attn/{n}", f"{src}.{names['attn'][n]}", "dense") for n in ("q", "k", "v", "proj_out"))

  m.append(("enc_conv_in", "encoder.conv_in", "conv"))
  for s in range(NUM_SOURCE_STAGES):
    for j in range(arch["num_res_blocks"]):
      resnet(f"enc_stages_{s}_{j}", names["enc_res"].format(s=s, j=j))
    if s < last:
      m.append((f"enc_down_{s}/Conv_0", names["enc_down"].format(s=s), "conv"))
  mid("enc_mid", "encoder")
  m += [("enc_norm_out", names["norm_out"].format(part="encoder"), "norm"),
        ("enc_conv_out", "encoder.conv_out", "conv")]
  m += [(name, name, "conv") for name in ("quant_conv", "post_quant_conv") if arch[name]]
  m.append(("dec_conv_in", "decoder.conv_in", "conv"))
  mid("dec_mid", "decoder")
  for s in range(NUM_SOURCE_STAGES):
    for j in range(arch["num_res_blocks"] + 1):
      resnet(f"dec_stages_{s}_{j}", names["dec_res"].format(s=s, u=last - s, j=j))
    if s > 0:
      m.append((f"dec_up_{s - 1}/Conv_0", names["dec_up"].format(s=s, u=last - s), "conv"))
  m += [("dec_norm_out", names["norm_out"].format(part="decoder"), "norm"),
        ("dec_conv_out", "decoder.conv_out", "conv")]
  return m


# torch -> flax, per kind: (flax leaf path under the module, source suffix, transform)
_KINDS = {
    "conv": [("kernel", "weight", lambda w: w.transpose(2, 3, 1, 0)), ("bias", "bias", None)],  # OIHW -> HWIO
    "norm": [("GroupNorm_0/scale", "weight", None), ("GroupNorm_0/bias", "bias", None)],
    # diffusers' Linear (O, I) and ldm's 1x1 conv (O, I, 1, 1) both become a Dense kernel (I, O).
    "dense": [("kernel", "weight", lambda w: w.reshape(w.shape[0], -1).T), ("bias", "bias", None)],
}


def _default_init(rng: np.random.Generator, name: str, shape) -> np.ndarray:
  """Flax's default initialisers (kernels lecun_normal, norm scales 1, biases 0) in numpy: running ``model.init``
  on CPU costs a minute of compilation, and only the new stages keep these values."""
  if name == "kernel":
    x = rng.standard_normal(shape)
    while (outside := np.abs(x) > 2).any():  # truncated at 2 standard deviations, like jax's truncated_normal
      x[outside] = rng.standard_normal(int(outside.sum()))
    return (x * math.sqrt(1.0 / math.prod(shape[:-1])) / 0.87962566103423978).astype(np.float32)
  if name in ("scale", "bias"):
    return np.full(shape, 1.0 if name == "scale" else 0.0, np.float32)
  raise ConversionError(f"no default initialiser for a parameter named {name!r} of shape {shape}")


def _listing(keys, limit: int = 12) -> str:
  keys = sorted(keys)
  return ", ".join(keys[:limit]) + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def convert_state_dict(state: Mapping[str, np.ndarray], layout: str, *, norm_groups: int = DEFAULT_NORM_GROUPS,
                       seed: int = 0) -> tuple[dict, dict[str, Any], dict[str, list[str]]]:
  """Maps a canonical (prefix-free) state dict onto a fresh ``NestedVAE``.

  Returns ``(params, model config, parts)`` where ``parts`` lists the top-level modules taken from the source
  (``pretrained``), set to exact identities (``identity``) and initialised fresh (``fresh``).

  Raises:
    ConversionError: naming every missing, unexpected or wrongly shaped source tensor.
  """
  import flax.traverse_util

  from cat_jax.models.nested_vae import abstract_params, build_model

  arch = infer_architecture(state, layout)
  config = model_config(arch, norm_groups)
  model = build_model(config)
  shapes = abstract_params(model)
  rng = np.random.default_rng(seed)
  flat = {"/".join(k): _default_init(rng, k[-1], v.shape)
          for k, v in flax.traverse_util.flatten_dict(shapes).items()}

  has_skip = lambda path: f"{path}/skip/kernel" in flat
  missing, wrong_shape, used = [], [], set()
  for path, src, kind in _mapping(arch, layout, has_skip):
    for leaf, suffix, transform in _KINDS[kind]:
      key, target = f"{src}.{suffix}", f"{path}/{leaf}"
      if key not in state:
        missing.append(key)
        continue
      used.add(key)
      value = state[key] if transform is None else transform(state[key])
      if value.shape != flat[target].shape:
        wrong_shape.append(f"{key} {tuple(state[key].shape)} (expected {flat[target].shape} for {target})")
        continue
      flat[target] = np.ascontiguousarray(value, np.float32)
  unexpected = set(state) - used
  if missing or unexpected or wrong_shape:
    lines = [f"the {layout} VAE does not match the layout the converter expects "
             f"(widths {arch['widths']}, {arch['num_res_blocks']} ResBlocks per encoder stage):"]
    lines += [f"  missing keys: {_listing(missing)}"] if missing else []
    lines += [f"  unexpected keys: {_listing(unexpected)}"] if unexpected else []
    lines += [f"  wrong shapes: {_listing(wrong_shape, 6)}"] if wrong_shape else []
    raise ConversionError("\n".join(lines))

  identity = ["enc_exit_0", "dec_entry_0"] + [n for n in ("quant_conv", "post_quant_conv") if not arch[n]]
  for name in identity:  # square by construction (model_config repeats the last width)
    c = flat[f"{name}/kernel"].shape[-1]
    flat[f"{name}/kernel"] = np.eye(c, dtype=np.float32).reshape(1, 1, c, c)
    flat[f"{name}/bias"] = np.zeros((c,), np.float32)
  pretrained = pretrained_modules(arch["num_res_blocks"])
  parts = dict(pretrained=[n for n in pretrained if n not in identity], identity=identity,
               fresh=sorted({k.split("/")[0] for k in flat} - set(pretrained)))
  params = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})
  return params, config, parts


# -- scaling factors and the command line ----------------------------------------------------------------------------
def latent_scaling(diffusers_config: Mapping[str, Any] | None, *, preset: str | None = None,
                   scaling_factor: float | None = None, shift_factor: float | None = None) -> dict[str, Any]:
  """``{"scale", "shift"}`` (plus per-channel ``mean``/``std`` when the diffusers config has them).

  Precedence: explicit factors, then ``preset``, then the diffusers config. A single checkpoint carries no factors,
  so it needs a preset or an explicit ``scaling_factor``.
  """
  if preset is not None and preset not in PRESETS:
    raise ConversionError(f"unknown preset {preset!r}; one of {sorted(PRESETS)}")
  cfg = dict(diffusers_config or {})
  scale, shift = PRESETS[preset] if preset else (cfg.get("scaling_factor"), cfg.get("shift_factor"))
  scale = scaling_factor if scaling_factor is not None else scale
  shift = shift_factor if shift_factor is not None else shift
  if scale is None:
    raise ConversionError(
        "a single checkpoint does not say its latent scaling factor; pass --preset "
        + "|".join(f"{k} ({v[0]}, shift {v[1]})" for k, v in PRESETS.items())
        + " or --scaling-factor X [--shift-factor Y]")
  out = dict(scale=float(scale), shift=float(shift or 0.0))
  for key in ("latents_mean", "latents_std"):
    if cfg.get(key) is not None:
      out[key.split("_")[1]] = [float(v) for v in cfg[key]]
  return out


def convert(src: str | pathlib.Path, *, preset: str | None = None, scaling_factor: float | None = None,
            shift_factor: float | None = None, seed: int = 0) -> tuple[dict, dict[str, Any], list[str]]:
  """Reads and converts ``src``; returns ``(params, config.json contents, report lines)``."""
  state, diffusers_config, weights_file = read_source(src)
  if diffusers_config is not None:
    check_diffusers_config(diffusers_config)
  state, layout, notes = canonical_state_dict(state)
  norm_groups = int((diffusers_config or {}).get("norm_num_groups", DEFAULT_NORM_GROUPS))
  params, model, parts = convert_state_dict(state, layout, norm_groups=norm_groups, seed=seed)
  scaling = latent_scaling(diffusers_config, preset=preset, scaling_factor=scaling_factor, shift_factor=shift_factor)
  config = dict(model=model, data=dict(image_size=IMAGE_SIZE), latent_scaling=scaling, step=None,
                sd_vae=dict(source=str(weights_file), layout=layout, seed=seed, **parts,
                            note="levels 1 and 2 (16x, 32x) run through freshly initialised stages: train them "
                                 "(configs/cat.py:sd3 or :sdxl, docs/sd_vae.md) before using those levels"))
  widths = [model["ch"] * m for m in model["ch_mult"]]
  report = [f"read {len(state)} tensors ({layout} layout) from {weights_file}"] + notes + [
      f"nested VAE: widths {widths}, {model['num_res_blocks']} ResBlocks per encoder stage, {model['z_channels']} "
      f"latent channels, {norm_groups} GroupNorm groups, mid attention {model['head_attention']}",
      f"8x path from the source: {len(parts['pretrained'])} modules; exact identities: {', '.join(parts['identity'])}",
      f"initialised fresh (seed {seed}, untrained; levels 1 and 2 need training): {', '.join(parts['fresh'])}",
      f"latent scaling: {scaling} (a diffusion model sees (z - shift) * scale)"]
  return params, config, report


def save(out: str | pathlib.Path, params, config: Mapping[str, Any]) -> None:
  """Writes ``out/config.json`` and ``out/model.safetensors`` (the ``Tokenizer.from_pretrained`` format)."""
  weights.write_folder(out, config, params)


def convert_cli(src: str | None, out: str, *, preset: str | None = None, scaling_factor: float | None = None,
                shift_factor: float | None = None, seed: int = 0) -> None:
  """``python -m cat_jax.convert sd_vae --src PATH --out OUT``: converts, prints what came from where, saves."""
  if src is None:
    raise FileNotFoundError("sd_vae needs --src PATH: a diffusers AutoencoderKL folder or an original "
                            ".safetensors / .ckpt VAE (nothing is downloaded; see docs/sd_vae.md)")
  params, config, report = convert(src, preset=preset, scaling_factor=scaling_factor, shift_factor=shift_factor,
                                   seed=seed)
  save(out, params, config)
  for line in report:
    print(line)
