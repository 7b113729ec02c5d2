"""A fixed linear code for f x f image patches: the lowest-frequency 2-D DCT coefficients in YCbCr, as JPEG.

The nested VAE's shortcut path (``NestedVAE(shortcuts=True)``): the encoder adds ``encode_patches(x, f, z)`` to the
latent mean and the decoder adds ``decode_patches(z, f)`` to its output, so the untrained model is this codec (a
linear code with ``z`` numbers per latent position, which already beats area+bicubic downsampling, 3 numbers per
position, by several dB) and the networks learn what a linear code misses: the residual-autoencoding idea of DC-AE
(Chen et al. 2024) carried to the latent.

Channel layout of a code with ``z`` channels: ``n_c = max(1, round(3 z / 16))`` coefficients of each chroma channel
and ``z - 2 n_c`` of luma (16 -> 10 Y + 3 Cb + 3 Cr), ordered Y, Cb, Cr, each in JPEG's zig-zag order, so channels
0, n_y and n_y + n_c are the block means of Y, Cb and Cr. Coefficients are those of the orthonormal DCT divided by
``f``: a DC coefficient is the block's mean, in the image's range, at every factor.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

# RGB -> YCbCr (JPEG / BT.601 full range; rows Y, Cb, Cr).
_YCBCR = np.array([[0.299, 0.587, 0.114], [-0.168736, -0.331264, 0.5], [0.5, -0.418688, -0.081312]])


def _zigzag(f: int) -> list[tuple[int, int]]:
  """(row, col) frequencies of an f x f DCT in JPEG's zig-zag order."""
  return sorted(((i, j) for i in range(f) for j in range(f)),
                key=lambda ij: (ij[0] + ij[1], ij[0] if (ij[0] + ij[1]) % 2 else ij[1]))


def _dct_matrix(f: int) -> np.ndarray:
  """Orthonormal DCT-II: row k is the k-th basis vector over f samples."""
  n = np.arange(f)
  m = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / (2 * f)) * np.sqrt(2.0 / f)
  m[0] /= np.sqrt(2.0)
  return m


def channel_split(channels: int) -> tuple[int, int]:
  """(luma, chroma-per-channel) coefficient counts of a code with ``channels`` channels."""
  if channels < 3:
    raise ValueError(f"a patch code needs at least 3 channels (one mean per colour), got {channels}")
  chroma = max(1, round(3 * channels / 16))
  return channels - 2 * chroma, chroma


@functools.lru_cache(maxsize=None)
def code_matrices(f: int, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """(encode (f*f*3, channels), decode (channels, f*f*3)) float32 matrices on flattened (f, f, 3) RGB patches.

  ``decode @ encode`` projects a patch onto the kept frequencies; ``encode @ decode`` is the identity.
  """
  luma, chroma = channel_split(channels)
  dct = _dct_matrix(f)
  columns = []  # each: a (f, f, 3) RGB patch -> one coefficient
  for colour, count in ((0, luma), (1, chroma), (2, chroma)):
    for i, j in _zigzag(f)[:count]:
      basis = np.outer(dct[i], dct[j])  # (f, f)
      columns.append(basis[:, :, None] * _YCBCR[colour][None, None, :] / f)
  encode = np.stack([c.reshape(-1) for c in columns], axis=1)
  # Orthonormal DCT and an invertible colour transform: the inverse maps coefficients back through both.
  inverse_colour = np.linalg.inv(_YCBCR)
  rows = []
  for colour, count in ((0, luma), (1, chroma), (2, chroma)):
    for i, j in _zigzag(f)[:count]:
      basis = np.outer(dct[i], dct[j]) * f
      rows.append(basis[:, :, None] * inverse_colour[:, colour][None, None, :])
  decode = np.stack([r.reshape(-1) for r in rows], axis=0)
  return encode.astype(np.float32), decode.astype(np.float32)


def to_patches(x: jax.Array, f: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/f, W/f, f*f*C), each patch flattened row-major as (f, f, C)."""
  b, h, w, c = x.shape
  return x.reshape(b, h // f, f, w // f, f, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, h // f, w // f, f * f * c)


def from_patches(p: jax.Array, f: int, channels: int = 3) -> jax.Array:
  """Inverse of ``to_patches``."""
  b, h, w, _ = p.shape
  return p.reshape(b, h, w, f, f, channels).transpose(0, 1, 3, 2, 4, 5).reshape(b, h * f, w * f, channels)


def encode_patches(x: jax.Array, f: int, channels: int) -> jax.Array:
  """RGB images (B, H, W, 3) -> codes (B, H/f, W/f, channels), float32."""
  encode, _ = code_matrices(f, channels)
  return to_patches(jnp.asarray(x, jnp.float32), f) @ encode


def decode_patches(z: jax.Array, f: int) -> jax.Array:
  """Codes (B, H/f, W/f, channels) -> RGB images (B, H, W, 3), float32."""
  _, decode = code_matrices(f, z.shape[-1])
  return from_patches(jnp.asarray(z, jnp.float32) @ decode, f)
