"""A PyTorch port of CAT's nested VAE and patch discriminator, and their train step: the baseline of train_bench.py.

Same architecture as ``cat_jax.models.nested_vae.NestedVAE`` (every option: GroupNorm, RMSNorm or none, DC-AE
shortcuts with the fixed DCT patch code on the latent path) and ``cat_jax.models.discriminator.PatchDiscriminator``
(stages, ResBlocks, the ``_num_groups`` GroupNorm rule with float32 statistics, single-head attention, asymmetric
downsampling, nearest upsampling, channel-matched exits/entries, shared heads), NCHW. ``load_flax_params`` copies
Flax parameters in, so tests/test_torch_reference.py can check the forward outputs agree.

Two deliberate differences, both invisible in the outputs:

* Latents live on each level's own grid (B, C, H/f, W/f), not on the JAX 8x canvas: the canvas exists only so that
  ``lax.switch`` branches share shapes, and its padding adds zero KL and is never decoded.
* Attention uses ``F.scaled_dot_product_attention`` (what a PyTorch user would write), with the same 1/sqrt(C) scale.

``TorchTrainStep`` is the same G + D step as ``cat_jax.train.train_step`` with the GAN on: L1 reconstruction + KL +
hinge generator loss with taming's adaptive weight (gradient norms at the decoder's last conv), grad clipping,
AdamW, EMA, then a hinge discriminator update with AdamW. The learning-rate schedule is left out (a constant rate
costs the same).
"""

from __future__ import annotations

import math
import re
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

FACTORS = (8, 16, 32)  # level 0/1/2, as cat_jax.levels
GATE_GAIN = 8.0  # as cat_jax.models.nested_vae.GATE_GAIN
NUM_STAGES = 6  # H, H/2, ..., H/32


def num_groups(channels: int, groups: int = 0) -> int:
  """``cat_jax.models.nested_vae._num_groups``: a fixed count, or 32 groups but at least 4 channels per group."""
  if groups:
    if channels % groups:
      raise ValueError(f"norm_groups={groups} does not divide a layer's {channels} channels")
    return groups
  return math.gcd(channels, min(32, max(1, channels // 4)))


def stage_of(level: int) -> int:
  return int(math.log2(FACTORS[level]))


def resize_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
  """``nested_vae.resize_channels`` on NCHW: average groups of consecutive channels to narrow, repeat to widen."""
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


# -- the fixed DCT patch code (cat_jax.models.patch_code), NCHW ------------------------------------------------------
def _patch_matrix(f: int, channels: int, which: int, like: torch.Tensor) -> torch.Tensor:
  from cat_jax.models.patch_code import code_matrices  # numpy only: no JAX computation in this process
  return torch.from_numpy(code_matrices(f, channels)[which]).to(like.device)


def _float32(fn):
  """Runs ``fn`` outside autocast: the patch code is float32 in the Flax model too."""
  def wrapped(*args):
    with torch.autocast(args[0].device.type, enabled=False):
      return fn(*args)
  return wrapped


@_float32
def encode_patches(x: torch.Tensor, f: int, channels: int) -> torch.Tensor:
  """RGB images (B, 3, H, W) -> codes (B, channels, H/f, W/f), float32 (``patch_code.encode_patches``)."""
  b, c, h, w = x.shape
  patches = x.float().permute(0, 2, 3, 1).reshape(b, h // f, f, w // f, f, c).permute(0, 1, 3, 2, 4, 5)
  codes = patches.reshape(b, h // f, w // f, f * f * c) @ _patch_matrix(f, channels, 0, x)
  return codes.permute(0, 3, 1, 2)


@_float32
def decode_patches(z: torch.Tensor, f: int) -> torch.Tensor:
  """Codes (B, C, H/f, W/f) -> RGB images (B, 3, H, W), float32 (``patch_code.decode_patches``)."""
  b, c, h, w = z.shape
  pixels = z.float().permute(0, 2, 3, 1) @ _patch_matrix(f, c, 1, z)  # (B, h, w, f*f*3)
  return pixels.reshape(b, h, w, f, f, 3).permute(0, 5, 1, 3, 2, 4).reshape(b, 3, h * f, w * f)


class Normalize(nn.Module):
  """The Flax ``Normalize``: GroupNorm ('group') or per-position RMS norm over channels ('rms') computed in float32
  and cast back to the input's dtype, or the identity ('none')."""

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

  def __init__(self, channels: int, norm: str = "group", groups: int = 0, **unused: Any):
    super().__init__()
    self.norm = Normalize(channels, norm, groups)
    self.q, self.k, self.v, self.proj_out = (nn.Linear(channels, channels) for _ in range(4))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    y = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, HW, C)
    q, k, v = self.q(y), self.k(y), self.v(y)
    y = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]
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


class NestedVAE(nn.Module):
  """The nested KL-VAE; NCHW images in [-1, 1]; ``level`` is a Python int (0 = 8x, 1 = 16x, 2 = 32x).

  ``norm``, ``norm_groups``, ``shortcuts`` (DC-AE shortcuts + the DCT patch code) and ``residual_gate`` as the Flax
  model; ``logvar_init`` only sets an initial bias, so it is accepted and ignored (weights come from
  ``load_flax_params``).
  """

  def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4, 4), num_res_blocks: int = 2,
               z_channels: int = 16, in_channels: int = 3, head_attention: bool = True,
               logvar_range: tuple[float, float] = (-30.0, 20.0), norm: str = "group", norm_groups: int = 0,
               shortcuts: bool = False, residual_gate: bool = False, **unused: Any):
    super().__init__()
    unused = {k: v for k, v in unused.items() if k not in ("dtype", "param_dtype", "logvar_init")}
    if unused:
      raise ValueError(f"unknown NestedVAE arguments {sorted(unused)}")
    if len(ch_mult) != NUM_STAGES:
      raise ValueError(f"ch_mult needs {NUM_STAGES} entries, got {tuple(ch_mult)}")
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

  def encode(self, x: torch.Tensor, level: int) -> tuple[torch.Tensor, torch.Tensor]:
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
      if s == 0 and self.shortcuts:  # the full-resolution stage also sees the patch code's image
        h = h + resize_channels(decode_patches(z, FACTORS[level]).to(h.dtype), h.shape[1])
      for block in self.dec_stages[s]:
        h = block(h)
      if s > 0:
        h = self.dec_up[s - 1](h)
    return h

  def decode_base(self, z: torch.Tensor, level: int) -> torch.Tensor | float:
    """The patch code's image with shortcuts (the decoder's output adds to it), else 0."""
    return decode_patches(z, FACTORS[level]) if self.shortcuts else 0.0

  def output_head(self, features: torch.Tensor) -> torch.Tensor:
    h = F.silu(self.dec_norm_out(features))
    out = self.dec_conv_out(h).float()
    return out * _gate(self.dec_gate(h)) if self.residual_gate else out

  def decode(self, z: torch.Tensor, level: int) -> torch.Tensor:
    return self.output_head(self.decode_features(z, level)) + self.decode_base(z, level)

  def train_features(self, x: torch.Tensor, level: int, noise: torch.Tensor):
    """(decoder features, decode_base, mean, logvar) for a reparameterised sample ``mean + std * noise``."""
    mean, logvar = self.encode(x, level)
    z = mean + torch.exp(0.5 * logvar) * noise
    return self.decode_features(z, level), self.decode_base(z, level), mean, logvar

  def forward(self, x: torch.Tensor, level: int, noise: torch.Tensor | None = None):
    """(reconstruction, mean, logvar); the posterior mode without ``noise``."""
    mean, logvar = self.encode(x, level)
    z = mean if noise is None else mean + torch.exp(0.5 * logvar) * noise
    return self.decode(z, level), mean, logvar


class PatchDiscriminator(nn.Module):
  """taming's NLayerDiscriminator with 'group' (GroupNorm, bias-free convs) or 'none' normalisation."""

  def __init__(self, base_channels: int = 64, num_layers: int = 3, norm: str = "group", num_groups: int = 32,
               in_channels: int = 3, **unused: Any):
    super().__init__()
    unused = {k: v for k, v in unused.items() if k not in ("dtype", "param_dtype")}
    if unused:
      raise ValueError(f"unknown PatchDiscriminator arguments {sorted(unused)}")
    if norm not in ("group", "none"):
      raise ValueError(f"norm must be 'group' or 'none' (spectral is not ported), got {norm!r}")
    group = norm == "group"
    self.layers = nn.ModuleDict()
    self.layers["conv_0"] = nn.Conv2d(in_channels, base_channels, 4, 2, 1)
    prev = base_channels
    for n in range(1, num_layers + 1):
      features = base_channels * min(2**n, 8)
      self.layers[f"conv_{n}"] = nn.Conv2d(prev, features, 4, 2 if n < num_layers else 1, 1, bias=not group)
      if group:
        self.layers[f"norm_{n}"] = nn.GroupNorm(math.gcd(num_groups, features), features, eps=1e-6)
      prev = features
    self.layers["logits"] = nn.Conv2d(prev, 1, 4, 1, 1)

  def forward(self, images: torch.Tensor) -> torch.Tensor:
    x = images
    for name, layer in self.layers.items():
      x = layer(x)
      if name != "logits" and not (name.startswith("conv_") and f"norm_{name[5:]}" in self.layers):
        x = F.leaky_relu(x, 0.2)
    return x


# -- Flax -> torch parameters ---------------------------------------------------------------------------------------
def _flatten(tree: Mapping, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], Any]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, prefix + (k,)))
    else:
      out[prefix + (k,)] = v
  return out


def _torch_key(path: tuple[str, ...]) -> str:
  parts: list[str] = []
  for p in path:
    if p in ("GroupNorm_0", "RMSNorm_0"):
      continue
    if m := re.fullmatch(r"(enc_stages|dec_stages)_(\d+)_(\d+)", p):
      parts += m.groups()
    elif m := re.fullmatch(r"(enc_exit|dec_entry|enc_down|dec_up)_(\d+)", p):
      parts += m.groups()
    elif p == "Conv_0":
      parts.append("conv")
    elif p in ("kernel", "scale"):
      parts.append("weight")
    else:
      parts.append(p)
  return ".".join(parts)


def _torch_value(path: tuple[str, ...], value) -> torch.Tensor:
  a = np.asarray(value, np.float32)
  if path[-1] == "kernel":
    a = a.transpose(3, 2, 0, 1) if a.ndim == 4 else a.T  # HWIO -> OIHW, (in, out) -> (out, in)
  return torch.from_numpy(np.array(a, np.float32, order="C"))  # a writable copy


def torch_state(params: Mapping, *, prefix: str = "") -> dict[str, torch.Tensor]:
  """A Flax parameter tree (or a gradient of one) as the PyTorch port's state dict: names and layouts."""
  return {prefix + _torch_key(path): _torch_value(path, v) for path, v in _flatten(params).items()}


def load_flax_params(module: nn.Module, params: Mapping, *, prefix: str = "") -> nn.Module:
  """Copies a Flax parameter tree into ``module`` (NestedVAE or PatchDiscriminator); every tensor must match."""
  module.load_state_dict(torch_state(params, prefix=prefix), strict=True)
  return module


def load_flax_discriminator(module: PatchDiscriminator, params: Mapping) -> PatchDiscriminator:
  return load_flax_params(module, params, prefix="layers.")


# -- the train step -------------------------------------------------------------------------------------------------
def _adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, eps: float = 1e-4,
                     max_weight: float = 1e4) -> torch.Tensor:
  nll_grad, = torch.autograd.grad(nll, last_layer, retain_graph=True)
  gan_grad, = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
  return (nll_grad.float().norm() / (gan_grad.float().norm() + eps)).clamp(0.0, max_weight).detach()


class TorchTrainStep:
  """One generator + EMA + discriminator update, as ``cat_jax.train.train_step`` with the GAN on.

  The VAE trunk (up to the decoder's last conv) and the discriminator are ``torch.compile``d separately when
  ``compile`` is set: the adaptive weight differentiates w.r.t. the last conv only, which must stay outside the
  trunk's compiled graph (a compiled graph is one autograd node; reaching a weight inside it would run its whole
  backward). ``autocast_dtype`` (e.g. torch.bfloat16) runs both networks under autocast.
  """

  def __init__(self, vae: NestedVAE, disc: PatchDiscriminator, *, lr: float = 1e-4, d_lr: float = 1e-4,
               b1: float = 0.5, b2: float = 0.9, weight_decay: float = 1e-4, grad_clip: float = 1.0,
               ema_decay: float = 0.9999, recon: str = "l1", recon_weight: float = 1.0, log_mse_weight: float = 0.0,
               kl_weight: float = 1e-6, gan_weight: float = 0.5, perceptual: nn.Module | None = None,
               perceptual_weight: float = 0.0,
               compile: bool = True, autocast_dtype: torch.dtype | None = None):
    if recon not in ("l1", "l2"):
      raise ValueError(f"recon must be 'l1' or 'l2', got {recon!r}")
    self.vae, self.disc = vae, disc
    self.recon, self.recon_weight, self.kl_weight, self.gan_weight = recon, recon_weight, kl_weight, gan_weight
    self.log_mse_weight = log_mse_weight
    self.grad_clip, self.ema_decay = grad_clip, ema_decay
    self.autocast_dtype = autocast_dtype
    device = next(vae.parameters()).device
    self.device_type = device.type
    fused = device.type == "cuda"
    self.g_params = list(vae.parameters())
    self.d_params = list(disc.parameters())
    self.g_opt = torch.optim.AdamW(self.g_params, lr=lr, betas=(b1, b2), weight_decay=weight_decay, fused=fused)
    self.d_opt = torch.optim.AdamW(self.d_params, lr=d_lr, betas=(b1, b2), weight_decay=weight_decay, fused=fused)
    self.ema = [p.detach().clone() for p in self.g_params]
    self.step_count = 0
    self.trunk = torch.compile(vae.train_features) if compile else vae.train_features
    self.disc_fn = torch.compile(disc) if compile else disc
    self.perceptual_weight = perceptual_weight if perceptual is not None else 0.0
    if perceptual is not None:
      perceptual.requires_grad_(False)
      self.perceptual_fn = torch.compile(perceptual) if compile else perceptual

  def _nll(self, images: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the loss before KL and GAN, the reconstruction term alone)."""
    diff = recon.float() - images.float()
    rec = diff.abs().mean() if self.recon == "l1" else diff.square().mean()
    nll = self.recon_weight * rec
    if self.log_mse_weight > 0:  # cat_jax.losses.reconstruction.log_mse_loss: per image log(MSE + the 50 dB floor)
      nll = nll + self.log_mse_weight * torch.log(diff.square().flatten(1).mean(1) + 4e-5).mean()
    if self.perceptual_weight > 0:  # e.g. lpips.LPIPS: NCHW in [-1, 1] -> (B, 1, 1, 1)
      nll = nll + self.perceptual_weight * self.perceptual_fn(images, recon).float().mean()
    return nll, rec

  def __call__(self, images: torch.Tensor, level: int, noise: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``images`` NCHW in [-1, 1]; returns the step's losses and gradient norms as (unsynchronised) tensors."""
    autocast = torch.autocast(self.device_type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)
    if noise is None:
      f = FACTORS[level]
      z_channels = self.vae.post_quant_conv.in_channels
      noise = torch.randn(images.shape[0], z_channels, images.shape[2] // f, images.shape[3] // f,
                          device=images.device)

    # Generator.
    self.disc.requires_grad_(False)  # the G step needs gradients through D, not of its weights
    with autocast:
      features, base, mean, logvar = self.trunk(images, level, noise)
      recon = self.vae.output_head(features) + base
      nll, rec = self._nll(images, recon)
      g_loss = -self.disc_fn(recon).float().mean()
    kl = 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(dim=(1, 2, 3)).mean()
    weight = _adaptive_weight(nll, g_loss, self.vae.dec_conv_out.weight)
    total = nll + self.kl_weight * kl + self.gan_weight * weight * g_loss
    self.g_opt.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(self.g_params, self.grad_clip)
    self.g_opt.step()
    with torch.no_grad():
      decay = min(self.ema_decay, (1.0 + self.step_count) / (10.0 + self.step_count))
      torch._foreach_lerp_(self.ema, [p.detach() for p in self.g_params], 1.0 - decay)

    # Discriminator.
    self.disc.requires_grad_(True)
    with autocast:
      real = self.disc_fn(images).float()
      fake = self.disc_fn(recon.detach()).float()
    d_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    self.d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    d_grad_norm = torch.nn.utils.clip_grad_norm_(self.d_params, self.grad_clip)
    self.d_opt.step()
    self.step_count += 1
    return {"g_loss": total.detach(), "nll": nll.detach(), "recon_loss": rec.detach(), "kl": kl.detach(),
            "gan_g_loss": g_loss.detach(), "gan_adaptive_weight": weight, "d_loss": d_loss.detach(),
            "grad_norm": grad_norm, "d_grad_norm": d_grad_norm}
