"""DiT (Peebles & Xie, 2023) on CAT's adaptive latents: one network for the 8x, 16x and 32x latent grids.

  latent (B, h, w, C) of one level
    -> patchify (p x p patches) -> linear embed -> + 2-D sin-cos position embedding of the level's (h/p, w/p) grid
    -> depth x adaLN-Zero block (attention + MLP; shift / scale / gate from the conditioning vector c)
    -> final adaLN + linear -> unpatchify -> (B, h, w, C) velocity (cat_jax.generation.flow)
  c = timestep embedding + class embedding (index ``num_classes`` is the null class of classifier-free guidance)
      + level embedding (0 = 8x, 1 = 16x, 2 = 32x)

Every adaLN modulation and the final linear layer start at zero (adaLN-Zero), so at init each block is the identity
and the network's output is exactly zero. The sequence length is the level's own: a 32x batch attends over 16x fewer
tokens than an 8x one, which is where CAT's generation speed-up comes from. Sizes S/B/L/XL are the DiT paper's
(``SIZES``); ``tiny`` (tests) and ``mini`` (the CPU demo) are ours.
"""

from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import levels as L
from cat_jax.models import with_dtypes

# hidden size, depth, attention heads (DiT paper, Table 1), plus two CPU-sized ones.
SIZES = {
    "tiny": dict(hidden_size=64, depth=2, num_heads=2),
    "mini": dict(hidden_size=128, depth=4, num_heads=4),
    "S": dict(hidden_size=384, depth=12, num_heads=6),
    "B": dict(hidden_size=768, depth=12, num_heads=12),
    "L": dict(hidden_size=1024, depth=24, num_heads=16),
    "XL": dict(hidden_size=1152, depth=28, num_heads=16),
}


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> np.ndarray:
  """(grid_h * grid_w, dim) float32 2-D sin-cos embedding, row-major (MAE / DiT): half the channels encode the
  row, half the column."""
  if dim % 4:
    raise ValueError(f"hidden_size must be a multiple of 4 for the 2-D sin-cos embedding, got {dim}")

  def one_axis(positions):
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))
    angles = positions.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  rows, cols = np.meshgrid(np.arange(grid_h, dtype=np.float64), np.arange(grid_w, dtype=np.float64), indexing="ij")
  return np.concatenate([one_axis(rows), one_axis(cols)], axis=1).astype(np.float32)


def timestep_embedding(t: jax.Array, dim: int = 256, max_period: float = 10_000.0) -> jax.Array:
  """Sinusoidal embedding (B, dim) of times ``t`` (B,) in [0, 1], scaled to [0, 1000] as DiT's steps."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = 1000.0 * t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def patchify(x: jax.Array, p: int) -> jax.Array:
  """(B, h, w, C) -> (B, h/p * w/p, p * p * C), patches in row-major order."""
  b, h, w, c = x.shape
  if h % p or w % p:
    raise ValueError(f"latent grid {h}x{w} is not divisible by patch_size={p}")
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(tokens: jax.Array, p: int, h: int, w: int) -> jax.Array:
  """Inverse of ``patchify``: (B, h/p * w/p, p * p * C) -> (B, h, w, C)."""
  b, _, d = tokens.shape
  c = d // (p * p)
  x = tokens.reshape(b, h // p, w // p, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h, w, c)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
  """Pre-norm attention + MLP, each scaled, shifted and gated by the conditioning (adaLN-Zero)."""

  hidden_size: int
  num_heads: int
  mlp_ratio: float = 4.0
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    dense = lambda n, **kw: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, **kw)
    norm = lambda: nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32)
    mod = dense(6 * self.hidden_size, kernel_init=nn.initializers.zeros, name="adaLN_modulation")(nn.silu(c))
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
    h = modulate(norm()(x), shift_msa, scale_msa)
    h = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                                        kernel_init=nn.initializers.xavier_uniform(), name="attn")(h, h)
    x = x + gate_msa[:, None] * h
    h = modulate(norm()(x), shift_mlp, scale_mlp)
    h = dense(int(self.hidden_size * self.mlp_ratio), kernel_init=nn.initializers.xavier_uniform(), name="fc1")(h)
    h = dense(self.hidden_size, kernel_init=nn.initializers.xavier_uniform(), name="fc2")(nn.gelu(h, approximate=True))
    return x + gate_mlp[:, None] * h


class DiT(nn.Module):
  """Class- and level-conditional DiT over one level's latent grid; predicts the flow velocity.

  ``__call__(x, t, y, level)``: ``x`` (B, h, w, in_channels) normalised latents of one level (h, w divisible by
  ``patch_size``), ``t`` (B,) times in [0, 1], ``y`` (B,) int classes in [0, num_classes] (``num_classes`` = the
  null class), ``level`` an int or int32 scalar / (B,) level index. Returns (B, h, w, in_channels).
  """

  in_channels: int = 16
  patch_size: int = 2
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  num_levels: int = L.NUM_LEVELS
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @property
  def null_class(self) -> int:
    return self.num_classes

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, y: jax.Array, level) -> jax.Array:
    if x.ndim != 4 or x.shape[-1] != self.in_channels:
      raise ValueError(f"DiT expects latents (B, h, w, {self.in_channels}), got shape {x.shape}")
    b, h, w, _ = x.shape
    p = self.patch_size
    dense = lambda n, **kw: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype, **kw)
    embed = lambda n, name: nn.Embed(n, self.hidden_size, embedding_init=nn.initializers.normal(0.02),
                                     param_dtype=self.param_dtype, name=name)

    tokens = dense(self.hidden_size, kernel_init=nn.initializers.xavier_uniform(), name="patch_embed")(
        patchify(x.astype(self.dtype), p))
    tokens = tokens + jnp.asarray(sincos_pos_embed_2d(self.hidden_size, h // p, w // p), self.dtype)[None]

    t_emb = timestep_embedding(t)
    t_emb = dense(self.hidden_size, kernel_init=nn.initializers.normal(0.02), name="t_embed_0")(t_emb)
    t_emb = dense(self.hidden_size, kernel_init=nn.initializers.normal(0.02), name="t_embed_1")(nn.silu(t_emb))
    levels = jnp.broadcast_to(jnp.asarray(level, jnp.int32), (b,))
    c = (t_emb + embed(self.num_classes + 1, "y_embed")(y.astype(jnp.int32))
         + embed(self.num_levels, "level_embed")(levels)).astype(self.dtype)

    for i in range(self.depth):
      tokens = DiTBlock(self.hidden_size, self.num_heads, self.mlp_ratio, dtype=self.dtype,
                        param_dtype=self.param_dtype, name=f"block_{i}")(tokens, c)

    mod = dense(2 * self.hidden_size, kernel_init=nn.initializers.zeros, name="final_adaLN_modulation")(nn.silu(c))
    shift, scale = jnp.split(mod, 2, axis=-1)
    tokens = modulate(nn.LayerNorm(epsilon=1e-6, use_scale=False, use_bias=False, dtype=jnp.float32)(tokens),
                      shift, scale)
    tokens = dense(p * p * self.in_channels, kernel_init=nn.initializers.zeros, name="final_linear")(tokens)
    return unpatchify(tokens, p, h, w).astype(jnp.float32)


def build_dit(model_config) -> DiT:
  """``DiT(**model_config)``; ``size`` ('tiny', 'S', 'B', 'L', 'XL') fills hidden_size / depth / num_heads, and
  dtype names ('bfloat16') are accepted."""
  kwargs = dict(model_config.to_dict() if hasattr(model_config, "to_dict") else model_config)
  size = kwargs.pop("size", None)
  if size is not None:
    if size not in SIZES:
      raise ValueError(f"model.size must be one of {sorted(SIZES)}, got {size!r}")
    kwargs = {**SIZES[size], **kwargs}
  kwargs = with_dtypes(kwargs, "model")
  return DiT(**kwargs)


def init_dit(model: DiT, rng: jax.Array, grid: int = 8):
  """Parameters (shapes do not depend on the grid size: any level initialises all of them)."""
  grid = max(grid, model.patch_size)
  x = jnp.zeros((1, grid, grid, model.in_channels), jnp.float32)
  return model.init(rng, x, jnp.zeros((1,)), jnp.zeros((1,), jnp.int32), 0)["params"]
