"""The PyTorch baseline of train_bench.py: CAT's nested VAE, its patch discriminator and their train step.

The VAE is the one PyTorch port in the repository, ``cat_jax/convert/modeling_cat.py`` (what ``python -m
cat_jax.convert to_torch`` exports; NCHW, each level's latent on its own grid, ``F.scaled_dot_product_attention``).
Here: a port of ``cat_jax.models.discriminator.PatchDiscriminator`` and ``load_flax_params``, which copies Flax
parameters into either, so tests/test_torch_reference.py can check outputs and one train step agree.

``TorchTrainStep`` is the same G + D step as ``cat_jax.train.train_step`` with the GAN on: L1 reconstruction + KL +
hinge generator loss with taming's adaptive weight (gradient norms at the decoder's last conv), grad clipping,
AdamW, EMA, then a hinge discriminator update with AdamW. The learning-rate schedule is left out (a constant rate
costs the same).
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from cat_jax.convert.modeling_cat import FACTORS, NestedVAE
from cat_jax.convert.to_torch import torch_state_dict



def train_features(vae: NestedVAE, x: torch.Tensor, level: int, noise: torch.Tensor):
  """(decoder features, the fixed code's image (0 without shortcuts), mean, logvar) for a reparameterised sample
  ``mean + std * noise``."""
  mean, logvar = vae.encode_moments(x, level)
  z = mean + torch.exp(0.5 * logvar) * noise
  return vae.decode_features(z, level), vae.decode_code(z, level) if vae.shortcuts else 0.0, mean, logvar


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
def torch_state(params: Mapping, *, prefix: str = "") -> dict[str, torch.Tensor]:
  """A Flax parameter tree (or a gradient of one) as the PyTorch port's state dict: names and layouts."""
  return {k: torch.from_numpy(v) for k, v in torch_state_dict(params, prefix=prefix).items()}


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
  backward). ``autocast_dtype`` (e.g. torch.bfloat16) runs the VAE under autocast, and the discriminator too unless
  ``disc_float32`` (as ``config.disc.dtype='float32'``, the default, in the JAX step).
  """

  def __init__(self, vae: NestedVAE, disc: PatchDiscriminator, *, lr: float = 1e-4, d_lr: float = 1e-4,
               b1: float = 0.5, b2: float = 0.9, weight_decay: float = 1e-4, grad_clip: float = 1.0,
               ema_decay: float = 0.9999, recon: str = "l1", recon_weight: float = 1.0, log_mse_weight: float = 0.0,
               kl_weight: float = 1e-6, gan_weight: float = 0.5, perceptual: nn.Module | None = None,
               perceptual_weight: float = 0.0,
               compile: bool = True, autocast_dtype: torch.dtype | None = None, disc_float32: bool = False):
    if recon not in ("l1", "l2"):
      raise ValueError(f"recon must be 'l1' or 'l2', got {recon!r}")
    self.vae, self.disc = vae, disc
    self.recon, self.recon_weight, self.kl_weight, self.gan_weight = recon, recon_weight, kl_weight, gan_weight
    self.log_mse_weight = log_mse_weight
    self.grad_clip, self.ema_decay = grad_clip, ema_decay
    self.autocast_dtype = autocast_dtype
    self.disc_float32 = disc_float32
    device = next(vae.parameters()).device
    self.device_type = device.type
    fused = device.type == "cuda"
    self.g_params = list(vae.parameters())
    self.d_params = list(disc.parameters())
    self.g_opt = torch.optim.AdamW(self.g_params, lr=lr, betas=(b1, b2), weight_decay=weight_decay, fused=fused)
    self.d_opt = torch.optim.AdamW(self.d_params, lr=d_lr, betas=(b1, b2), weight_decay=weight_decay, fused=fused)
    self.ema = [p.detach().clone() for p in self.g_params]
    self.step_count = 0
    trunk = functools.partial(train_features, vae)
    self.trunk = torch.compile(trunk) if compile else trunk
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
    d_autocast = (torch.autocast(self.device_type, enabled=False) if self.disc_float32 else
                  contextlib.nullcontext())  # inside `autocast`: float32 or the VAE's autocast
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
      with d_autocast:
        g_loss = -self.disc_fn(recon.float() if self.disc_float32 else recon).float().mean()
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
    with autocast, d_autocast:
      real = self.disc_fn(images).float()
      fake = self.disc_fn(recon.detach().float() if self.disc_float32 else recon.detach()).float()
    d_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
    self.d_opt.zero_grad(set_to_none=True)
    d_loss.backward()
    d_grad_norm = torch.nn.utils.clip_grad_norm_(self.d_params, self.grad_clip)
    self.d_opt.step()
    self.step_count += 1
    return {"g_loss": total.detach(), "nll": nll.detach(), "recon_loss": rec.detach(), "kl": kl.detach(),
            "gan_g_loss": g_loss.detach(), "gan_adaptive_weight": weight, "d_loss": d_loss.detach(),
            "grad_norm": grad_norm, "d_grad_norm": d_grad_norm}
