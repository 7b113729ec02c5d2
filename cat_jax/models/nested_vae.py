r"""The nested KL-VAE of CAT: one set of weights, exits at 8x, 16x and 32x.

Architecture (Stable-Diffusion AutoencoderKL family, with one more downsampling stage per extra level):

  encoder trunk  conv_in -> stage 0 (H) -> ... -> stage 3 (H/8) -> stage 4 (H/16) -> stage 5 (H/32)
                                                  |                |                  |
  exit projections (1x1, channel-matched)       exit 0           exit 1             exit 2
                                                  \________________|__________________/
  shared latent head                     mid ResBlock + attention + ResBlock -> (mean, logvar)

  shared decoder head                    conv_in + mid ResBlock + attention + ResBlock
                                                  /                |                  \\
  entry projections (1x1, channel-matched)     entry 0          entry 1             entry 2
  decoder trunk                          stage 5 -> stage 4 -> stage 3 -> ... -> stage 0 -> conv_out
                                                (a level-2 latent enters at stage 5, level 1 at 4, level 0 at 3)

Levels (see ``cat_jax.levels``): 0 = 8x, 1 = 16x, 2 = 32x.

Why a latent *canvas*: the level is picked by ``jax.lax.switch`` (``nn.switch``) so that one compiled function
serves all three levels, and every branch of a switch must return the same shapes. Latents therefore travel on the
8x grid (B, H/8, W/8, C): a level-l latent fills the top-left (H/f, W/f) corner and the rest holds the prior
N(0, 1) (mean 0, log-variance 0), which adds exactly zero KL and is ignored by the decoder. Use
``crop_latent`` / ``pad_latent`` to move between the canvas and the level's own grid.

Only what differs between levels is inside the switch: every level runs the encoder's stages 0-3 (to the 8x
exit) and the decoder's stages 3-0 (from the 8x entry), at the same shapes, so those run outside it, once. A
traced-level step then holds one copy of the full-resolution stages instead of three (compile time). On CPU the
convolutions' gradients are computed in XLA:CPU's fast dimension order (``models/cpu_conv.py``), which it does
not pick itself inside a ``conditional``; with both, a traced-level train step runs within ~10% of a static-level
one on CPU (docs/performance.md).

Why batches are single-level: under ``vmap`` a per-example switch index turns into a ``select`` that executes every
branch for every example (3x the compute). Batches are bucketed by level so the index is a scalar.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from cat_jax import levels as L
from cat_jax.models import patch_code, with_dtypes
from cat_jax.models.cpu_conv import conv_general_dilated

Dtype = Any
NORMS = ("group", "rms", "none")


# Every convolution of the nested VAE (fast gradients inside the level switch on CPU: models/cpu_conv.py).
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


@flax.struct.dataclass
class DiagonalGaussian:
  """Posterior q(z|x) on the latent canvas: mean and (clipped) log-variance, NHWC."""

  mean: jax.Array
  logvar: jax.Array

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """A reparameterised sample (gradients flow to mean and logvar)."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over latent positions and channels: shape (B,)."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + jnp.exp(self.logvar) - 1.0 - self.logvar, axis=(1, 2, 3))


def crop_latent(canvas: jax.Array, level: int) -> jax.Array:
  """The level's own latent grid (B, H/f, W/f, C) from a canvas (B, H/8, W/8, C). ``level`` must be static."""
  scale = L.factor_for_level(level) // L.FACTORS[0]
  h, w = canvas.shape[1] // scale, canvas.shape[2] // scale
  return canvas[:, :h, :w, :]


def pad_latent(latent: jax.Array, level: int) -> jax.Array:
  """A canvas (B, H/8, W/8, C) holding ``latent`` (B, H/f, W/f, C) top-left, zeros elsewhere."""
  scale = L.factor_for_level(level) // L.FACTORS[0]
  h, w = latent.shape[1], latent.shape[2]
  return jnp.pad(latent, ((0, 0), (0, h * scale - h), (0, w * scale - w), (0, 0)))


def _num_groups(channels: int, groups: int) -> int:
  if groups:  # a fixed count, as in the source of converted weights (the SD VAE uses 32 at every width)
    if channels % groups:
      raise ValueError(f"norm_groups={groups} does not divide a layer's {channels} channels")
    return groups
  # Auto: 32 groups as the SD VAE for wide layers; narrow (test/demo) layers keep >= 4 channels per group so
  # that GroupNorm on a 1x1 latent grid does not normalise every value to zero.
  return math.gcd(channels, min(32, max(1, channels // 4)))


def resize_channels(x: jax.Array, channels: int) -> jax.Array:
  """Non-parametric channel shortcut (DC-AE's residual autoencoding): averages groups of consecutive channels to
  narrow, repeats each channel to widen. ``resize_channels(resize_channels(x, 2c), c) == x``."""
  c = x.shape[-1]
  if c == channels:
    return x
  if c % channels == 0:
    return x.reshape(*x.shape[:-1], channels, c // channels).mean(-1)
  if channels % c == 0:
    return jnp.repeat(x, channels // c, axis=-1)
  # Uneven counts (e.g. to 3 colour channels): the same rule through a fixed (c, channels) matrix.
  owner = (jnp.arange(c) * channels) // c if c > channels else None
  if owner is not None:
    m = jax.nn.one_hot(owner, channels, dtype=x.dtype)
    return (x @ m) / m.sum(0)
  return x[..., (jnp.arange(channels) * c) // channels]


class Normalize(nn.Module):
  """Normalisation computed in float32 (bf16 statistics drift), result cast back to ``dtype``.

  ``kind='group'``: GroupNorm (the SD VAE's); ``'rms'``: per-position RMS norm over channels (DC-AE's), which does not
  depend on the spatial size, so a 2x2 latent grid is normalised like a 32x32 one.
  """

  kind: str = "group"
  groups: int = 0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    if self.kind == "group":
      y = nn.GroupNorm(num_groups=_num_groups(x.shape[-1], self.groups), epsilon=1e-6, dtype=jnp.float32,
                       param_dtype=self.param_dtype)(x32)
    elif self.kind == "rms":
      y = nn.RMSNorm(epsilon=1e-6, dtype=jnp.float32, param_dtype=self.param_dtype)(x32)
    elif self.kind == "none":
      return x
    else:
      raise ValueError(f"norm must be one of {NORMS}, got {self.kind!r}")
    return y.astype(self.dtype)


class _Block(nn.Module):
  """Fields every building block shares: normalisation, DC-AE shortcuts, dtypes."""

  norm: str = "group"
  norm_groups: int = 0
  shortcuts: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def make_norm(self, name):
    return Normalize(self.norm, self.norm_groups, self.dtype, self.param_dtype, name=name)

  def conv(self, channels, kernel, name=None, residual=False, **kw):
    """A conv; ``residual=True`` marks the last layer of a residual branch, zero-initialised with shortcuts."""
    if residual and self.shortcuts:
      kw["kernel_init"] = nn.initializers.zeros
    return Conv(channels, (kernel, kernel), padding=kw.pop("padding", "SAME"), dtype=self.dtype,
                param_dtype=self.param_dtype, name=name, **kw)


class ResnetBlock(_Block):
  out_channels: int = 0

  @nn.compact
  def __call__(self, x):
    h = nn.swish(self.make_norm("norm1")(x))
    h = self.conv(self.out_channels, 3, "conv1")(h)
    h = nn.swish(self.make_norm("norm2")(h))
    h = self.conv(self.out_channels, 3, "conv2", residual=True)(h)
    if x.shape[-1] != self.out_channels:
      x = resize_channels(x, self.out_channels) if self.shortcuts else self.conv(self.out_channels, 1, "skip")(x)
    return x + h


class AttnBlock(_Block):
  """Single-head spatial self-attention, as in the SD VAE; softmax in float32."""

  @nn.compact
  def __call__(self, x):
    b, h, w, c = x.shape
    dense = lambda name, **kw: nn.Dense(c, dtype=self.dtype, param_dtype=self.param_dtype, name=name, **kw)
    y = self.make_norm("norm")(x).reshape(b, h * w, c)
    q, k, v = dense("q")(y), dense("k")(y), dense("v")(y)
    logits = jnp.einsum("bqc,bkc->bqk", q, k).astype(jnp.float32) / math.sqrt(c)
    attn = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
    y = jnp.einsum("bqk,bkc->bqc", attn, v)
    zero = dict(kernel_init=nn.initializers.zeros) if self.shortcuts else {}
    return x + dense("proj_out", **zero)(y).reshape(b, h, w, c)


class Downsample(_Block):
  """Stride-2 3x3 conv after asymmetric padding (the SD VAE's); with shortcuts, plus 2x2 average pooling."""

  @nn.compact
  def __call__(self, x):
    y = self.conv(x.shape[-1], 3, "Conv_0", residual=True, strides=(2, 2), padding="VALID")(
        jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))
    if self.shortcuts:  # DC-AE's space-to-channel + channel averaging; at constant width, a 2x2 average pool
      y = y + nn.avg_pool(x, (2, 2), strides=(2, 2))
    return y


class Upsample(_Block):
  """Nearest 2x then a 3x3 conv (the SD VAE's); with shortcuts, plus the nearest-upsampled input."""

  @nn.compact
  def __call__(self, x):
    # Nearest-neighbour 2x by broadcast + reshape: its gradient is a cheap sum, jnp.repeat's is a scatter-add.
    b, h, w, c = x.shape
    up = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
    y = self.conv(c, 3, "Conv_0", residual=True)(up)
    return y + up if self.shortcuts else y  # channel duplication then channel-to-space is nearest upsampling


class MidBlock(_Block):
  """ResBlock, (attention), ResBlock at constant width."""

  channels: int = 0
  attention: bool = True

  @nn.compact
  def __call__(self, x):
    kw = dict(norm=self.norm, norm_groups=self.norm_groups, shortcuts=self.shortcuts, dtype=self.dtype,
              param_dtype=self.param_dtype)
    x = ResnetBlock(out_channels=self.channels, name="res_0", **kw)(x)
    if self.attention:
      x = AttnBlock(name="attn", **kw)(x)
    return ResnetBlock(out_channels=self.channels, name="res_1", **kw)(x)


class NestedVAE(nn.Module):
  """CAT's nested KL-VAE. Inputs are NHWC floats in [-1, 1] with H and W multiples of 32.

  Attributes:
    ch: base width; stage i has ``ch * ch_mult[i]`` channels.
    ch_mult: one multiplier per resolution stage; its length must be 6 (H, H/2, ..., H/32).
    num_res_blocks: ResBlocks per encoder stage (the decoder has one more, as the SD VAE).
    z_channels: latent channels (default 16).
    head_attention: self-attention in the shared latent head and the shared decoder head.
    logvar_range: the posterior log-variance is clipped to this range.
    logvar_init: the posterior log-variance at initialisation (the SD VAE's 0 is a posterior std of 1, noise
      as large as the latents: a short run then spends its first thousands of steps shrinking it).
    residual_gate: with shortcuts, the learned residuals on the fixed code (the latent mean's and the decoded
      image's) are each multiplied by a per-position gate ``2 sigmoid(a)``, ``a`` a 1x1 conv of the features
      the residual is computed from, 1 at init. After an RMSNorm the residual cannot be small by itself; the gate
      lets the network leave the code untouched where it is already exact (flat and smooth regions).
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4, 4)
  num_res_blocks: int = 2
  z_channels: int = 16
  in_channels: int = 3
  head_attention: bool = True
  logvar_range: tuple[float, float] = (-30.0, 20.0)
  logvar_init: float = 0.0
  norm: str = "group"
  norm_groups: int = 0
  shortcuts: bool = False
  residual_gate: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  # The parameters of ``output_head``'s last layer, where the GAN's adaptive weight compares the losses' gradients.
  last_layer = "dec_conv_out"  # not a field (no annotation)

  def setup(self):
    num_stages = int(math.log2(L.MAX_FACTOR)) + 1
    if len(self.ch_mult) != num_stages:
      raise ValueError(f"ch_mult needs {num_stages} entries (one per stage H ... H/{L.MAX_FACTOR}), "
                       f"got {tuple(self.ch_mult)}")
    if self.norm not in NORMS:
      raise ValueError(f"norm must be one of {NORMS}, got {self.norm!r}")
    if self.residual_gate and not self.shortcuts:
      raise ValueError("residual_gate gates the residuals on the fixed code: it needs shortcuts=True")
    if self.shortcuts and (self.z_channels < 3 or self.in_channels != 3):
      raise ValueError(f"shortcuts carry a colour code in the latent: they need RGB inputs and z_channels >= 3, "
                       f"got in_channels={self.in_channels}, z_channels={self.z_channels}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block_kw = dict(norm=self.norm, norm_groups=self.norm_groups, shortcuts=self.shortcuts, **kw)
    widths = [self.ch * m for m in self.ch_mult]
    head_width = widths[-1]
    # With shortcuts, every layer that adds to a shortcut starts at zero, so the untrained model is exactly its
    # shortcut path (average-pool down, nearest up: close to the area+bicubic baseline) and learns the residual.
    beside_shortcut = dict(kw, kernel_init=nn.initializers.zeros) if self.shortcuts else kw
    conv1x1 = lambda c, name: Conv(c, (1, 1), name=name, **beside_shortcut)

    # Encoder trunk.
    self.enc_conv_in = Conv(self.ch, (3, 3), padding="SAME", **beside_shortcut)
    self.enc_stages = [[ResnetBlock(out_channels=widths[s], **block_kw) for _ in range(self.num_res_blocks)]
                       for s in range(num_stages)]
    self.enc_down = [Downsample(**block_kw) for _ in range(num_stages - 1)]
    # Channel-matched exits into the shared latent head.
    self.enc_exit = [conv1x1(head_width, f"enc_exit_{lvl}") for lvl in range(L.NUM_LEVELS)]
    self.enc_mid = MidBlock(channels=head_width, attention=self.head_attention, **block_kw)
    self.enc_norm_out = Normalize(self.norm, self.norm_groups, **kw)
    self.enc_conv_out = Conv(2 * self.z_channels, (3, 3), padding="SAME", **kw)
    z = self.z_channels
    logvar_bias = lambda key, shape, dtype: jnp.concatenate(  # [mean half, log-variance half]
        [jnp.zeros((z,), dtype), jnp.full((z,), self.logvar_init, dtype)])
    self.quant_conv = Conv(2 * z, (1, 1), bias_init=logvar_bias, name="quant_conv", **beside_shortcut)
    gate = lambda name: Conv(1, (1, 1), name=name, **dict(kw, kernel_init=nn.initializers.zeros))
    self.enc_gate = gate("enc_gate") if self.residual_gate else None

    # Shared decoder head.
    self.post_quant_conv = Conv(self.z_channels, (1, 1), name="post_quant_conv", **kw)
    self.dec_conv_in = Conv(head_width, (3, 3), padding="SAME", **beside_shortcut)
    self.dec_mid = MidBlock(channels=head_width, attention=self.head_attention, **block_kw)
    # Channel-matched entries: project to what the entry stage receives when coming from above.
    self.dec_entry = [conv1x1(self._dec_stage_input_width(self._stage_of(lvl)), f"dec_entry_{lvl}")
                      for lvl in range(L.NUM_LEVELS)]
    self.dec_stages = [[ResnetBlock(out_channels=widths[s], **block_kw) for _ in range(self.num_res_blocks + 1)]
                       for s in range(num_stages)]
    self.dec_up = [Upsample(**block_kw) for _ in range(num_stages - 1)]  # dec_up[s - 1]: H/2^s -> H/2^(s-1)
    self.dec_norm_out = Normalize(self.norm, self.norm_groups, **kw)
    self.dec_conv_out = Conv(self.in_channels, (3, 3), padding="SAME", **beside_shortcut)
    self.dec_gate = gate("dec_gate") if self.residual_gate else None

  # -- helpers -----------------------------------------------------------------------------------------------------
  @staticmethod
  def _stage_of(level: int) -> int:
    return int(math.log2(L.FACTORS[level]))

  def _skip(self, projection, h):
    """A level's channel-matched exit/entry: the 1x1 projection, plus the channel shortcut with ``shortcuts``."""
    y = projection(h)
    return y + resize_channels(h, y.shape[-1]) if self.shortcuts else y

  def _dec_stage_input_width(self, stage: int) -> int:
    return self.ch * self.ch_mult[min(stage + 1, len(self.ch_mult) - 1)]

  def _dispatch(self, level, branches, *operands):
    """Calls ``branches[level]``: directly for a Python int, through ``nn.switch`` for a traced scalar.

    At init every branch runs so that the parameter tree is the same whatever level init was called with.
    """
    if self.is_mutable_collection("params"):
      outs = [branch(self, *operands) for branch in branches]
      if _is_static_int(level):
        return outs[L.check_level(int(level))]
    if _is_static_int(level):
      return branches[L.check_level(int(level))](self, *operands)
    level = jnp.asarray(level)
    if level.ndim != 0 or not jnp.issubdtype(level.dtype, jnp.integer):
      raise ValueError(f"a traced level must be an integer scalar (batches are single-level), got "
                       f"shape {level.shape} dtype {level.dtype}")
    return nn.switch(level, branches, self, *operands)

  def _check_image(self, x):
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"expected images of shape (batch, height, width, {self.in_channels}) NHWC in [-1, 1], "
                       f"got shape {tuple(x.shape)}")
    h, w = x.shape[1:3]
    if h % L.MAX_FACTOR or w % L.MAX_FACTOR or h == 0 or w == 0:
      raise ValueError(f"image height and width must be positive multiples of {L.MAX_FACTOR} "
                       f"(e.g. (batch, 256, 256, {self.in_channels})), got {h}x{w}; resize or pad first")
    if not jnp.issubdtype(x.dtype, jnp.floating):
      raise ValueError(f"expected floating-point images in [-1, 1], got dtype {x.dtype}; "
                       "convert uint8 with x / 127.5 - 1")

  def _check_canvas(self, z):
    if z.ndim != 4 or z.shape[-1] != self.z_channels:
      raise ValueError(f"expected a latent canvas of shape (batch, height/8, width/8, {self.z_channels}), "
                       f"got shape {tuple(z.shape)}")
    if z.shape[1] % 4 or z.shape[2] % 4:
      raise ValueError(f"latent canvas height and width must be multiples of 4 (image sides multiples of 32), "
                       f"got {z.shape[1]}x{z.shape[2]}; use pad_latent(z, level) for a level's own grid")
    if not jnp.issubdtype(z.dtype, jnp.floating):
      raise ValueError(f"expected a floating-point latent, got dtype {z.dtype}")

  # -- static-shape branches ---------------------------------------------------------------------------------------
  def _encode_trunk(self, x):
    """The encoder stages every level runs (conv_in, stages 0 .. the 8x exit's), outside the level switch."""
    h = self.enc_conv_in(x.astype(self.dtype))
    if self.shortcuts:  # colour channels repeated across the first stage's width
      h = h + resize_channels(x.astype(self.dtype), h.shape[-1])
    first_exit = self._stage_of(0)
    for s in range(first_exit + 1):
      for block in self.enc_stages[s]:
        h = block(h)
      if s < first_exit:
        h = self.enc_down[s](h)
    return h

  def _encode_level(self, x, h, level: int):
    """From the shared trunk's output ``h`` (H/8): the level's further stages, exit and the shared head."""
    stage = self._stage_of(level)
    for s in range(self._stage_of(0), stage):
      h = self.enc_down[s](h)
      for block in self.enc_stages[s + 1]:
        h = block(h)
    h = self._skip(self.enc_exit[level], h)
    h = self.enc_mid(h)
    h = nn.swish(self.enc_norm_out(h))
    moments = self.quant_conv(self.enc_conv_out(h)).astype(jnp.float32)
    mean, logvar = jnp.split(moments, 2, axis=-1)
    if self.residual_gate:
      mean = mean * _gate(self.enc_gate(h))
    if self.shortcuts:  # the latent mean starts as the fixed code of the image (see patch_code)
      mean = mean + patch_code.encode_patches(x, L.factor_for_level(level), self.z_channels)
    logvar = jnp.clip(logvar, *self.logvar_range)
    return pad_latent(mean, level), pad_latent(logvar, level)

  def _decode_level(self, canvas, level: int):
    """The level's head and stages down to the H/8 grid, and the fixed code's image (shortcuts; else 0)."""
    z = crop_latent(canvas, level).astype(self.dtype)
    h = self.dec_conv_in(self.post_quant_conv(z))
    if self.shortcuts:  # and the head's input starts as repeated latent channels
      h = h + resize_channels(z, h.shape[-1])
    h = self._skip(self.dec_entry[level], self.dec_mid(h))
    for s in reversed(range(self._stage_of(0) + 1, self._stage_of(level) + 1)):
      for block in self.dec_stages[s]:
        h = block(h)
      h = self.dec_up[s - 1](h)
    code = (patch_code.decode_patches(z, L.factor_for_level(level)) if self.shortcuts
            else jnp.zeros((), jnp.float32))
    return h, code

  def _decode_trunk(self, h, code):
    """The decoder stages every level runs (the 8x entry's stage .. stage 0), outside the level switch."""
    for s in reversed(range(self._stage_of(0) + 1)):
      if s == 0 and self.shortcuts:  # at full resolution the trunk also sees the fixed code's image (deblocking)
        h = h + resize_channels(code.astype(h.dtype), h.shape[-1])
      for block in self.dec_stages[s]:
        h = block(h)
      if s > 0:
        h = self.dec_up[s - 1](h)
    return h

  # -- public API --------------------------------------------------------------------------------------------------
  def encode(self, x: jax.Array, level) -> DiagonalGaussian:
    """Posterior q(z | x) at ``level`` (int or traced int32 scalar), on the (B, H/8, W/8, C) latent canvas."""
    self._check_image(x)
    branches = [lambda mdl, x, h, lvl=lvl: mdl._encode_level(x, h, lvl) for lvl in range(L.NUM_LEVELS)]
    mean, logvar = self._dispatch(level, branches, x, self._encode_trunk(x))
    return DiagonalGaussian(mean=mean, logvar=logvar)

  def decode(self, z: jax.Array, level, code_only: jax.Array | None = None) -> jax.Array:
    """Image (B, H, W, 3) float32, unclipped, from a latent canvas (B, H/8, W/8, C) at ``level``: the learned path;
    images flagged in ``code_only`` ((B,) bool, from ``encode_keeping_code``) as the fixed code alone."""
    learned = self.output_head(self.decode_features(z, level))
    if not self.shortcuts:
      if code_only is not None:
        raise ValueError("code_only latents need a model with the fixed code (shortcuts=True)")
      return learned
    code = self.decode_code(z, level)
    learned = learned + code  # the decoder learns the residual on the code's image
    return learned if code_only is None else jnp.where(code_only[:, None, None, None], code, learned)

  def encode_keeping_code(self, x: jax.Array, level, rng: jax.Array | None = None,
                          valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The latent canvas and, per image, whether it is the fixed code ((B,) bool, ``Latents.code_only``).

    Per image, the posterior mode (a sample with ``rng``) or, where the learned path reconstructs the image worse
    than the fixed code (``code_is_closer``), the code: flat and smooth images stay exact and unseen content the
    residual does not fit cannot fall below the no-learning start. ``decode(z, level, code_only)`` reads both
    back. Without shortcuts (no code), the posterior's and all False. ``valid``: see ``code_is_closer``."""
    z, code_only, _ = self._keeping_code(x, level, rng, valid)
    return z, code_only

  def reconstruct(self, x: jax.Array, level, keep_code: bool = True,
                  valid: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``decode(*encode_keeping_code(x, level), level)`` (unclipped) and the code bits, each path decoded once; with
    ``keep_code=False`` the learned path and all False. What the tokenizer returns and evaluation measures."""
    if not (keep_code and self.shortcuts):
      return self(x, level)[0], jnp.zeros(x.shape[:1], bool)
    _, code_only, recon = self._keeping_code(x, level, None, valid)
    return recon, code_only

  def _keeping_code(self, x, level, rng, valid):
    posterior = self.encode(x, level)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    if not self.shortcuts:
      return z, jnp.zeros(x.shape[:1], bool), None
    learned = self.decode(z, level)
    code_z = self.encode_code(x, level)
    code = self.decode_code(code_z, level)
    code_only = self.code_is_closer(x, learned, code, valid)
    keep = code_only[:, None, None, None]
    return jnp.where(keep, code_z, z), code_only, jnp.where(keep, code, learned)

  @staticmethod
  def code_is_closer(images: jax.Array, learned: jax.Array, code: jax.Array,
                     valid: jax.Array | None = None) -> jax.Array:
    """Per image ((B,) bool), whether ``code`` is at least as close to ``images`` as ``learned`` (two
    reconstructions) after clipping to [-1, 1] (mean squared error; a tie keeps the code). ``valid`` (B, 2) int:
    the (height, width) of each image's own pixels, top left, when the rest is padding (the tokenizer's): the
    error is measured on those only, so the padding never decides."""
    if valid is None:
      error = lambda y: jnp.mean(jnp.square(jnp.clip(y, -1.0, 1.0) - images), axis=(1, 2, 3))
    else:
      rows = jnp.arange(images.shape[1])[None, :] < valid[:, :1]
      cols = jnp.arange(images.shape[2])[None, :] < valid[:, 1:]
      mask = (rows[:, :, None] & cols[:, None, :])[..., None].astype(jnp.float32)
      count = jnp.maximum(jnp.sum(mask, axis=(1, 2, 3)) * images.shape[3], 1.0)
      error = lambda y: jnp.sum(jnp.square(jnp.clip(y, -1.0, 1.0) - images) * mask, axis=(1, 2, 3)) / count
    return error(code) <= error(learned)

  def encode_code(self, x: jax.Array, level) -> jax.Array:
    """With shortcuts: the fixed code of ``x`` (``patch_code.encode_patches``: the lowest-frequency DCT coefficients
    of each patch, what the latent mean adds its residual to) on the level's latent canvas. No parameters."""
    self._check_code("encode_code")
    self._check_image(x)
    branches = [lambda mdl, x, lvl=lvl: pad_latent(
        patch_code.encode_patches(x, L.factor_for_level(lvl), mdl.z_channels), lvl) for lvl in range(L.NUM_LEVELS)]
    return self._dispatch(level, branches, x)

  def decode_code(self, z: jax.Array, level) -> jax.Array:
    """With shortcuts: the latent read as the fixed code (``patch_code.decode_patches``), (B, H, W, 3), the image the
    decoder's output adds to. No parameters."""
    self._check_code("decode_code")
    branches = [lambda mdl, z, lvl=lvl: patch_code.decode_patches(crop_latent(z, lvl), L.factor_for_level(lvl))
                for lvl in range(L.NUM_LEVELS)]
    return self._dispatch(level, branches, z)

  def code_reconstruction(self, x: jax.Array, level) -> jax.Array:
    """With shortcuts: ``x`` through the fixed code alone (unclipped), the no-learning start."""
    return self.decode_code(self.encode_code(x, level), level)

  def _check_code(self, what: str):
    if not self.shortcuts:
      raise ValueError(f"the fixed code comes with shortcuts: {what} needs shortcuts=True")

  def decode_features(self, z: jax.Array, level) -> jax.Array:
    """The decoder trunk's output, shape (B, H, W, ch): what ``output_head`` (shared by all levels) maps to RGB."""
    self._check_canvas(z)
    branches = [lambda mdl, z, lvl=lvl: mdl._decode_level(z, lvl) for lvl in range(L.NUM_LEVELS)]
    return self._decode_trunk(*self._dispatch(level, branches, z))

  def output_head(self, features: jax.Array) -> jax.Array:
    """Norm, swish and the decoder's last layer ``dec_conv_out`` (the GAN's adaptive weight looks at its
    gradients), times the residual gate if any. ``decode`` adds ``decode_code`` to it."""
    h = nn.swish(self.dec_norm_out(features))
    out = self.dec_conv_out(h).astype(jnp.float32)
    return out * _gate(self.dec_gate(h)) if self.residual_gate else out

  def __call__(self, x: jax.Array, level, rng: jax.Array | None = None):
    """Returns ``(reconstruction, posterior)``; samples z with ``rng``, else uses the posterior mode."""
    posterior = self.encode(x, level)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return self.decode(z, level), posterior


# The gate's logits are its 1x1 conv times this: at the shared learning rate an unscaled gate barely moved in a
# 1,000-step demo (mean 0.95-1.03 on every kind of image), a learning-rate multiplier for the gate alone.
GATE_GAIN = 8.0


def _gate(logits: jax.Array) -> jax.Array:
  """``2 sigmoid(GATE_GAIN logits)`` in float32: 1 where the logits are 0 (at init), 0 where very negative."""
  return 2.0 * jax.nn.sigmoid(GATE_GAIN * logits.astype(jnp.float32))


def _is_static_int(level) -> bool:
  if isinstance(level, bool):
    return False
  if isinstance(level, int):
    return True
  try:
    import numpy as np
    return isinstance(level, np.integer)
  except ImportError:  # pragma: no cover
    return False


def build_model(model_config) -> NestedVAE:
  """``NestedVAE(**model_config)``, accepting a ConfigDict or dict and dtype names like 'bfloat16'."""
  kwargs = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
  kwargs = with_dtypes(kwargs, "model")
  for key in ("ch_mult", "logvar_range"):
    if key in kwargs:
      kwargs[key] = tuple(kwargs[key])
  unknown = set(kwargs) - set(NestedVAE.__dataclass_fields__) - {"parent", "name"}
  if unknown:
    raise ValueError(f"unknown model config keys {sorted(unknown)}; valid keys: "
                     f"{sorted(k for k in NestedVAE.__dataclass_fields__ if k not in ('parent', 'name'))}")
  return NestedVAE(**kwargs)


# Parameter shapes do not depend on the image size: the smallest input every level accepts initialises all of them.
INIT_IMAGE_SIZE = 2 * L.MAX_FACTOR


def init_params(model: NestedVAE, rng: jax.Array, image_size: int = INIT_IMAGE_SIZE):
  """Parameters for all three levels (init runs every branch)."""
  x = jnp.zeros((1, image_size, image_size, model.in_channels), jnp.float32)
  return model.init(rng, x, 0)["params"]


def abstract_params(model: NestedVAE):
  """The parameter tree's shapes and dtypes (``jax.ShapeDtypeStruct`` leaves), computing nothing."""
  return jax.eval_shape(lambda rng: init_params(model, rng), jax.random.key(0))


def count_params(params) -> int:
  return sum(int(p.size) for p in jax.tree.leaves(params))
