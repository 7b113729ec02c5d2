"""Compression levels: index <-> downsampling factor <-> token count.

A *level* is an index into ``FACTORS``: level 0 is 8x (most tokens, for complex
images), level 1 is 16x, level 2 is 32x (fewest tokens, for simple images).
A 256x256 image has 1024 / 256 / 64 latent positions ("tokens") at levels 0 / 1 / 2.
"""

from __future__ import annotations

FACTORS = (8, 16, 32)
NUM_LEVELS = len(FACTORS)
MAX_FACTOR = max(FACTORS)


def check_level(level: int) -> int:
  """Returns ``level`` as a Python int, or raises a ValueError that explains levels."""
  if isinstance(level, bool) or not isinstance(level, int) or not 0 <= level < NUM_LEVELS:
    raise ValueError(
        f"level must be an int index in [0, {NUM_LEVELS}) meaning factors {FACTORS}, got "
        f"{level!r}; use level_for_factor({level!r}) if you meant a downsampling factor.")
  return level


def factor_for_level(level: int) -> int:
  """Spatial downsampling factor of a level (0 -> 8, 1 -> 16, 2 -> 32)."""
  return FACTORS[check_level(level)]


def level_for_factor(factor: int) -> int:
  """Level index of a downsampling factor (8 -> 0, 16 -> 1, 32 -> 2)."""
  if factor not in FACTORS:
    raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
  return FACTORS.index(factor)


def latent_hw(image_hw: tuple[int, int], level: int) -> tuple[int, int]:
  """Latent grid (height, width) of an image of ``image_hw`` at ``level``."""
  f = factor_for_level(level)
  h, w = image_hw
  if h % MAX_FACTOR or w % MAX_FACTOR:
    raise ValueError(f"image height and width must be multiples of {MAX_FACTOR}, got {h}x{w}")
  return h // f, w // f


def num_tokens(image_hw: tuple[int, int], level: int) -> int:
  """Latent positions of one image at ``level`` (256x256: 1024 / 256 / 64)."""
  h, w = latent_hw(image_hw, level)
  return h * w
