"""A CAT tokenizer (nested KL-VAE, 8x / 16x / 32x with one set of weights) in PyTorch: this file needs torch only.

Written into a folder by ``python -m cat_jax.convert to_torch --src TOKENIZER --out DIR``, next to the weights
(``model.safetensors``) and ``config.json``:

    from modeling_cat import CATTokenizer              # with DIR on sys.path
    vae = CATTokenizer.from_pretrained(DIR)            # float32, eval mode; .to("cuda") as any module
    posterior = vae.encode(x, "16x")                   # x: (B, 3, H, W) in [-1, 1]; mean/logvar (B, C, H/16, W/16)
    x_hat = vae.decode(posterior.mean, "16x")          # or posterior.sample()

A level is 0 / 1 / 2, 8 / 16 / 32 or "8x" / "16x" / "32x". H and W must be multiples of the level's factor. The
computation is cat_jax's ``NestedVAE`` (NCHW, each level's latent on its own grid); cat_jax tests the two agree to
1e-4 at every level. The same classes are the PyTorch port that cat_jax's benchmarks train.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

FACTORS = (8, 16, 32)  # level 0 / 1 / 2
NUM_STAGES = 6  # H, H/2, ..., H/32
GATE_GAIN = 8.0  # the residual gate's logit scale (cat_jax.models.nested_vae.GATE_GAIN)
# RGB -> YCbCr (JPEG / BT.601 full range; rows Y, Cb, Cr): the fixed DCT patch code of the shortcut layout.
_YCBCR = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))


def parse_level(level: int | str) -> int:
  """0 / 1 / 2, 8 / 16 / 32 or '8x' / '16x' / '32x' -> the level index."""
  text = str(level).strip().lower().removesuffix("x")
  if text.isdigit() and int(text) in FACTORS:
    return FACTORS.index(int(text))
  if text.isdigit() and int(text) < len(FACTORS):
    return int(text)
  raise ValueError(f"unknown level {level!r}: use 0 / 1 / 2, 8 / 16 / 32 or '8x' / '16x' / '32x'")


def num_groups(channels: int, groups: int = 0) -> int:
  """GroupNorm groups: a fixed count, or 32 groups but at least 4 channels per group."""
  if groups:
    if channels % groups:
      raise ValueError(f"norm_groups={groups} does not divide a layer's {channels} channels")
    return groups
  return math.gcd(channels, min(32, max(1, channels // 4)))


def stage_of(level: int) -> int:
  return int(math.log2(FACTORS[level]))


def resize_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
  """Average groups of consecutive channels to narrow, repeat to widen (parameter-free channel matching)."""
  b, c, h, w = x.shape
  if c == channels:
    return x
  if c % channels == 0:
    return x.reshape(b, channels, c // channels, h, w).mean(2)
  if channels % c == 0:
    return x.repeat_interleave(channels // c, dim=1)
  if c > channels:  # uneven narrowing: channel i goes to output (i * channels) // c, averaged
    owner = (torch.arange(c, device=x.device) * channels) // c
    m = F.one_hot(owner, channels).to(x.dtype)
    return torch.einsum("bchw,co->bohw", x, m) / m.sum(0)[None, :, None, None]
  return x[:, (torch.arange(channels, device=x.device) * c) // channels]


# -- the fixed DCT patch code -----------------------------------------------------------------------------------------
def _zigzag(f: int) -> list[tuple[int, int]]:
  return sorted(((i, j) for i in range(f) for j in range(f)),
                key=lambda ij: (ij[0] + ij[1], ij[0] if (ij[0] + ij[1]) % 2 else ij[1]))


def code_matrices(f: int, channels: int) -> tuple[torch.Tensor, torch.Tensor]:
  """(encode (f*f*3, channels), decode (channels, f*f*3)) float32 matrices of the patch code on flattened (f, f, 3)
  RGB patches: the lowest-frequency orthonormal DCT coefficients (divided by f) of Y, Cb and Cr in zig-zag order,
  ``channels - 2 n_c`` of luma and ``n_c = max(1, round(3 channels / 16))`` of each chroma channel."""
  if channels < 3:
    raise ValueError(f"a patch code needs at least 3 channels, got {channels}")
  chroma = max(1, round(3 * channels / 16))
  counts = (channels - 2 * chroma, chroma, chroma)
  n = torch.arange(f, dtype=torch.float64)
  dct = torch.cos(math.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * f)) * math.sqrt(2.0 / f)
  dct[0] /= math.sqrt(2.0)
  ycbcr = torch.tensor(_YCBCR, dtype=torch.float64)
  inverse = torch.linalg.inv(ycbcr)
  columns, rows = [], []
  for colour, count in enumerate(counts):
    for i, j in _zigzag(f)[:count]:
      basis = torch.outer(dct[i], dct[j])
      columns.append((basis[:, :, None] * ycbcr[colour][None, None, :] / f).reshape(-1))
      rows.append((basis[:, :, None] * f * inverse[:, colour][None, None, :]).reshape(-1))
  return torch.stack(columns, 1).float(), torch.stack(rows, 0).float()


def encode_patches(x: torch.Tensor, f: int, channels: int) -> torch.Tensor:
  """RGB images (B, 3, H, W) -> codes (B, channels, H/f, W/f), float32."""
  b, c, h, w = x.shape
  with torch.autocast(x.device.type, enabled=False):
    patches = x.float().permute(0, 2, 3, 1).reshape(b, h // f, f, w // f, f, c).permute(0, 1, 3, 2, 4, 5)
    codes = patches.reshape(b, h // f, w // f, f * f * c) @ code_matrices(f, channels)[0].to(x.device)
  return codes.permute(0, 3, 1, 2)


def decode_patches(z: torch.Tensor, f: int) -> torch.Tensor:
  """Codes (B, C, H/f, W/f) -> RGB images (B, 3, H, W), float32."""
  b, c, h, w = z.shape
  with torch.autocast(z.device.type, enabled=False):
    pixels = z.float().permute(0, 2, 3, 1) @ code_matrices(f, c)[1].to(z.device)  # (B, h, w, f*f*3)
  return pixels.reshape(b, h, w, f, f, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h * f, w * f)


# -- layers -----------------------------------------------------------------------------------------------------------
class Normalize(nn.Module):
  """GroupNorm ('group') or per-position RMS norm over channels ('rms'), computed in float32 and cast back, or the
  identity ('none')."""

  def __init__(self, channels: int, kind: str = "group", groups: int = 0):
    super().__init__()
    if kind not in ("group", "rms", "none"):
      raise ValueError(f"norm must be 'group', 'rms' or 'none', got {kind!r}")
    self.kind, self.eps = kind, 1e-6
    self.num_groups = num_groups(channels, groups) if kind == "group" else 0
    if kind != "none":
      self.weight = nn.Parameter(torch.ones(channels))
    if kind == "group":
      self.bias = nn.Parameter(torch.zeros(channels))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.kind == "none":
      return x
    with torch.autocast(x.device.type, enabled=False):
      x32 = x.float()
      if self.kind == "group":
        y = F.group_norm(x32, self.num_groups, self.weight, self.bias, self.eps)
      else:
        y = x32 * torch.rsqrt(x32.square().mean(1, keepdim=True) + self.eps) * self.weight[None, :, None, None]
    return y.to(x.dtype)


class ResnetBlock(nn.Module):

  def __init__(self, in_channels: int, out_channels: int, norm: str = "group", groups: int = 0,
               shortcuts: bool = False):
    super().__init__()
    self.out_channels = out_channels
    self.norm1 = Normalize(in_channels, norm, groups)
    self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
    self.norm2 = Normalize(out_channels, norm, groups)
    self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
    self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels and not shortcuts else None

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    h = self.conv1(F.silu(self.norm1(x)))
    h = self.conv2(F.silu(self.norm2(h)))
    x = self.skip(x) if self.skip is not None else resize_channels(x, self.out_channels)
    return x + h


class AttnBlock(nn.Module):
  """Single-head self-attention over positions, scale 1/sqrt(C)."""

  def __init__(self, channels: int, norm: str = "group", groups: int = 0, **unused: Any):
    super().__init__()
    self.norm = Normalize(channels, norm, groups)
    self.q, self.k, self.v, self.proj_out = (nn.Linear(channels, channels) for _ in range(4))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    y = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
    y = F.scaled_dot_product_attention(self.q(y)[:, None], self.k(y)[:, None], self.v(y)[:, None])[:, 0]
    return x + self.proj_out(y).transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):

  def __init__(self, channels: int, shortcuts: bool = False, **unused: Any):
    super().__init__()
    self.shortcuts = shortcuts
    self.conv = nn.Conv2d(channels, channels, 3, stride=2)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric, as the SD VAE
    return y + F.avg_pool2d(x, 2) if self.shortcuts else y


class Upsample(nn.Module):

  def __init__(self, channels: int, shortcuts: bool = False, **unused: Any):
    super().__init__()
    self.shortcuts = shortcuts
    self.conv = nn.Conv2d(channels, channels, 3, padding=1)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    up = F.interpolate(x, scale_factor=2.0, mode="nearest")
    y = self.conv(up)
    return y + up if self.shortcuts else y


class MidBlock(nn.Module):

  def __init__(self, channels: int, attention: bool, **block: Any):
    super().__init__()
    self.res_0 = ResnetBlock(channels, channels, **block)
    self.attn = AttnBlock(channels, **block) if attention else None
    self.res_1 = ResnetBlock(channels, channels, **block)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.res_0(x)
    if self.attn is not None:
      x = self.attn(x)
    return self.res_1(x)


def _gate(logits: torch.Tensor) -> torch.Tensor:
  return 2.0 * torch.sigmoid(GATE_GAIN * logits.float())


class DiagonalGaussian:
  """The posterior: ``mean`` and ``logvar`` (B, C, h, w), float32."""

  def __init__(self, mean: torch.Tensor, logvar: torch.Tensor):
    self.mean, self.logvar = mean, logvar

  @property
  def std(self) -> torch.Tensor:
    return torch.exp(0.5 * self.logvar)

  def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
    noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
    return self.mean + self.std * noise

  def mode(self) -> torch.Tensor:
    return self.mean


def read_safetensors(path: str) -> dict[str, torch.Tensor]:
  """A safetensors file's tensors (the format: 8-byte little-endian header size, a JSON header, raw data), read
  with torch alone."""
  dtypes = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
  with open(path, "rb") as f:
    header_size = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(header_size))
    data = bytearray(f.read())
  out = {}
  for name, entry in header.items():
    if name == "__metadata__":
      continue
    if entry["dtype"] not in dtypes:
      raise ValueError(f"{path}: tensor {name} has dtype {entry['dtype']}, not a floating type")
    start, end = entry["data_offsets"]
    dtype = dtypes[entry["dtype"]]
    flat = (torch.frombuffer(data, dtype=dtype, count=(end - start) // dtype.itemsize, offset=start)
            if end > start else torch.empty(0, dtype=dtype))
    out[name] = flat.reshape(entry["shape"]).clone()
  return out


# -- the nested VAE ---------------------------------------------------------------------------------------------------
class NestedVAE(nn.Module):
  """The nested KL-VAE on NCHW images in [-1, 1]; ``level`` is 0 (8x), 1 (16x) or 2 (32x).

  ``norm`` ('group', 'rms', 'none'), ``norm_groups``, ``shortcuts`` (DC-AE shortcuts + the DCT patch code on the
  latent path), ``residual_gate`` and ``head_attention`` as cat_jax's model. ``logvar_init``, ``dtype`` and
  ``param_dtype`` only concern training in cat_jax and are ignored.
  """

  def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4, 4), num_res_blocks: int = 2,
               z_channels: int = 16, in_channels: int = 3, head_attention: bool = True,
               logvar_range: Sequence[float] = (-30.0, 20.0), norm: str = "group", norm_groups: int = 0,
               shortcuts: bool = False, residual_gate: bool = False, **unused: Any):
    super().__init__()
    unused = {k: v for k, v in unused.items() if k not in ("dtype", "param_dtype", "logvar_init")}
    if unused:
      raise ValueError(f"unknown NestedVAE arguments {sorted(unused)}")
    if len(ch_mult) != NUM_STAGES:
      raise ValueError(f"ch_mult needs {NUM_STAGES} entries, got {tuple(ch_mult)}")
    if residual_gate and not shortcuts:
      raise ValueError("residual_gate needs shortcuts=True")
    self.logvar_range = tuple(logvar_range)
    self.shortcuts, self.z_channels, self.residual_gate = shortcuts, z_channels, residual_gate
    block = dict(norm=norm, groups=norm_groups, shortcuts=shortcuts)
    widths = [ch * m for m in ch_mult]
    head = widths[-1]

    self.enc_conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
    self.enc_stages = nn.ModuleList()
    width = ch
    for s in range(NUM_STAGES):
      self.enc_stages.append(nn.ModuleList(
          ResnetBlock(width if b == 0 else widths[s], widths[s], **block) for b in range(num_res_blocks)))
      width = widths[s]
    self.enc_down = nn.ModuleList(Downsample(widths[s], shortcuts) for s in range(NUM_STAGES - 1))
    self.enc_exit = nn.ModuleList(nn.Conv2d(widths[stage_of(lvl)], head, 1) for lvl in range(len(FACTORS)))
    self.enc_mid = MidBlock(head, head_attention, **block)
    self.enc_norm_out = Normalize(head, norm, norm_groups)
    self.enc_conv_out = nn.Conv2d(head, 2 * z_channels, 3, padding=1)
    self.quant_conv = nn.Conv2d(2 * z_channels, 2 * z_channels, 1)
    self.enc_gate = nn.Conv2d(head, 1, 1) if residual_gate else None

    self.post_quant_conv = nn.Conv2d(z_channels, z_channels, 1)
    self.dec_conv_in = nn.Conv2d(z_channels, head, 3, padding=1)
    self.dec_mid = MidBlock(head, head_attention, **block)
    stage_input = lambda s: widths[min(s + 1, NUM_STAGES - 1)]  # what stage s receives from the stage above
    self.dec_entry = nn.ModuleList(nn.Conv2d(head, stage_input(stage_of(lvl)), 1) for lvl in range(len(FACTORS)))
    self.dec_stages = nn.ModuleList(
        nn.ModuleList(ResnetBlock(stage_input(s) if b == 0 else widths[s], widths[s], **block)
                      for b in range(num_res_blocks + 1))
        for s in range(NUM_STAGES))
    self.dec_up = nn.ModuleList(Upsample(widths[s], shortcuts) for s in range(1, NUM_STAGES))  # dec_up[s - 1]
    self.dec_norm_out = Normalize(widths[0], norm, norm_groups)
    self.dec_conv_out = nn.Conv2d(widths[0], in_channels, 3, padding=1)
    self.dec_gate = nn.Conv2d(widths[0], 1, 1) if residual_gate else None

  def _skip(self, projection: nn.Module, h: torch.Tensor) -> torch.Tensor:
    y = projection(h)
    return y + resize_channels(h, y.shape[1]) if self.shortcuts else y

  def encode_moments(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, logvar), float32, on the level's own grid (B, C, H/f, W/f)."""
    stage = stage_of(level)
    h = self.enc_conv_in(x)
    if self.shortcuts:
      h = h + resize_channels(x.to(h.dtype), h.shape[1])
    for s in range(stage + 1):
      for block in self.enc_stages[s]:
        h = block(h)
      if s < stage:
        h = self.enc_down[s](h)
    h = self.enc_mid(self._skip(self.enc_exit[level], h))
    h = F.silu(self.enc_norm_out(h))
    mean, logvar = self.quant_conv(self.enc_conv_out(h)).float().chunk(2, dim=1)
    if self.residual_gate:
      mean = mean * _gate(self.enc_gate(h))
    if self.shortcuts:
      mean = mean + encode_patches(x, FACTORS[level], self.z_channels)
    return mean, logvar.clamp(*self.logvar_range)

  def decode_features(self, z: torch.Tensor, level: int) -> torch.Tensor:
    """Decoder activations before ``output_head`` from a level-``level`` latent (B, C, H/f, W/f)."""
    h = self.dec_conv_in(self.post_quant_conv(z))
    if self.shortcuts:
      h = h + resize_channels(z.to(h.dtype), h.shape[1])
    h = self._skip(self.dec_entry[level], self.dec_mid(h))
    for s in reversed(range(stage_of(level) + 1)):
      if s == 0 and self.shortcuts:  # the full-resolution stage also sees the fixed code's image
        h = h + resize_channels(decode_patches(z, FACTORS[level]).to(h.dtype), h.shape[1])
      for block in self.dec_stages[s]:
        h = block(h)
      if s > 0:
        h = self.dec_up[s - 1](h)
    return h

  def decode_code(self, z: torch.Tensor, level: int) -> torch.Tensor:
    """With shortcuts: the latent read as the fixed code, the image the decoder's output adds to."""
    if not self.shortcuts:
      raise ValueError("the fixed code comes with shortcuts: decode_code needs shortcuts=True")
    return decode_patches(z, FACTORS[level])

  def output_head(self, features: torch.Tensor) -> torch.Tensor:
    h = F.silu(self.dec_norm_out(features))
    out = self.dec_conv_out(h).float()
    return out * _gate(self.dec_gate(h)) if self.residual_gate else out

  def decode_level(self, z: torch.Tensor, level: int) -> torch.Tensor:
    out = self.output_head(self.decode_features(z, level))
    return out + self.decode_code(z, level) if self.shortcuts else out

  def forward(self, x: torch.Tensor, level: int, noise: torch.Tensor | None = None):
    """(reconstruction, mean, logvar); the posterior mode without ``noise``."""
    mean, logvar = self.encode_moments(x, level)
    z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
    return self.decode_level(z, level), mean, logvar


class CATTokenizer(NestedVAE):
  """``NestedVAE`` with the user-facing API: ``from_pretrained``, ``encode(x, level)``, ``decode(z, level)``."""

  config: dict[str, Any]

  @classmethod
  def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> "CATTokenizer":
    """Loads ``config.json`` and ``model.safetensors`` written by ``python -m cat_jax.convert to_torch``."""
    directory = os.fspath(directory)
    with open(os.path.join(directory, "config.json")) as f:
      config = json.load(f)
    model = cls(**config["model"])
    model.load_state_dict(read_safetensors(os.path.join(directory, "model.safetensors")), strict=True)
    model.config = config
    return model.to(device).eval()

  def _check(self, x: torch.Tensor, level: int, what: str, scale: int) -> None:
    if x.ndim != 4:
      raise ValueError(f"{what} must be (B, C, H, W), got shape {tuple(x.shape)}")
    if scale > 1 and (x.shape[2] % scale or x.shape[3] % scale):
      raise ValueError(f"{what} is {x.shape[2]}x{x.shape[3]}: at {FACTORS[level]}x both sides must be multiples "
                       f"of {scale}")

  def encode(self, x: torch.Tensor, level: int | str) -> DiagonalGaussian:
    """The posterior of images ``x`` (B, 3, H, W) in [-1, 1] at ``level``: (B, C, H/f, W/f) mean and logvar."""
    level = parse_level(level)
    self._check(x, level, "images", FACTORS[level])
    return DiagonalGaussian(*self.encode_moments(x, level))

  def decode(self, z: torch.Tensor, level: int | str, code_only: torch.Tensor | None = None) -> torch.Tensor:
    """Images (B, 3, H, W), float32, unclipped, from latents (B, C, H/f, W/f) at ``level``; images flagged in
    ``code_only`` (B,) bool (from ``encode_keeping_code``, or cat_jax's ``Latents.code_only``) as the DCT patch code
    alone."""
    level = parse_level(level)
    self._check(z, level, "latents", 1)
    if z.shape[1] != self.z_channels:
      raise ValueError(f"latents have {z.shape[1]} channels, the model {self.z_channels}")
    images = self.decode_level(z, level)
    if code_only is None or not bool(torch.as_tensor(code_only).any()):
      return images
    if not self.shortcuts:
      raise ValueError("code_only latents need a model with a patch code (shortcuts=True)")
    return torch.where(torch.as_tensor(code_only, device=z.device).view(-1, 1, 1, 1),
                       self.decode_code(z, level), images)

  def encode_keeping_code(self, x: torch.Tensor, level: int | str) -> tuple[torch.Tensor, torch.Tensor]:
    """What cat_jax's ``Tokenizer.encode`` returns: per image the posterior mean or, where the learned path
    reconstructs the image worse than the DCT patch code (clipped MSE; a tie keeps the code), the code's
    coefficients; and that bit, (B,) bool. ``decode(z, level, code_only)`` reads both back."""
    level = parse_level(level)
    mean = self.encode(x, level).mean
    if not self.shortcuts:
      return mean, torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    code = encode_patches(x, FACTORS[level], self.z_channels)
    error = lambda y: (y.clamp(-1, 1) - x).square().mean(dim=(1, 2, 3))
    code_only = error(self.decode_code(code, level)) <= error(self.decode_level(mean, level))
    return torch.where(code_only.view(-1, 1, 1, 1), code, mean), code_only
