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


def parse_level(value) -> int:
  """A level index from any spelling: an index 0 / 1 / 2, a factor 8 / 16 / 32, or '8x' / '16x' / '32x'.

  Indices and factors do not overlap, so ints and digit strings of either kind are accepted everywhere a level is.
  """
  if isinstance(value, bool):
    raise ValueError(f"a level must be 0/1/2 or 8x/16x/32x, got {value!r}")
  text = str(value).strip().lower()
  number = text[:-1] if text.endswith("x") else text
  if number.isdigit():
    n = int(number)
    if not text.endswith("x") and 0 <= n < NUM_LEVELS:
      return n
    if n in FACTORS:
      return FACTORS.index(n)
  raise ValueError(f"a level must be an index {tuple(range(NUM_LEVELS))} or a factor "
                   f"{', '.join(f'{f}x' for f in FACTORS)}, got {value!r}")


def parse_levels(value) -> tuple[int, ...]:
  """Several levels in any spelling (``parse_level``): a list, or a comma-separated string such as '8x,32x' or
  '0,2'; None or '' means every level. Sorted, without repeats."""
  if value is None or (isinstance(value, str) and not value.strip()):
    return tuple(range(NUM_LEVELS))
  items = value.split(",") if isinstance(value, str) else value if isinstance(value, (list, tuple)) else [value]
  return tuple(sorted({parse_level(v) for v in items}))


def level_name(level: int) -> str:
  """'8x' / '16x' / '32x': how a level is printed."""
  return f"{factor_for_level(level)}x"
