"""The text legibility set: images of words at known sizes, with every word's string and box (TokBench-style).

Needs no download: drawn deterministically from ``(seed, index)`` with the embedded generator's font (Pillow's
bundled Aileron) and vocabulary. Each image holds a few lines of words of one size group; the size of a word is its
font size (its em: the cap height is about 0.72 of it) relative to the image height, so a group keeps its meaning at
512² (there its words are twice as many pixels high as at 256²):

  group   font size / image height   at 256²       at 512²
  tiny    0.024 - 0.031               6 - 8 px      12 - 16 px   barely legible at 256²
  small   0.039 - 0.051              10 - 13 px     20 - 26 px
  medium  0.062 - 0.078              16 - 20 px     32 - 40 px
  large   0.109 - 0.141              28 - 36 px     56 - 72 px   easily legible

Images cycle through the groups (any prefix of the set is balanced). Three in five images are dark text on a light
page, one in five light text on a dark ground, one in five coloured text on a coloured ground. Words are drawn one by
one with a gap of 0.4 em (wider than a space, so a word's box plus ``CROP_MARGIN`` of its font size never takes in a
neighbour); a word's box is the box of its ink, (x0, y0, x1, y1) in pixels, x1 and y1 exclusive.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from cat_jax.data.embedded import _WORDS, _colour, _font
from cat_jax.data.preprocess import to_model_range


class SizeGroup(NamedTuple):
  name: str
  lo: float  # font size / image height, inclusive
  hi: float


SIZE_GROUPS = (
    SizeGroup("tiny", 6 / 256, 8 / 256),
    SizeGroup("small", 10 / 256, 13 / 256),
    SizeGroup("medium", 16 / 256, 20 / 256),
    SizeGroup("large", 28 / 256, 36 / 256),
)
GROUP_NAMES = tuple(g.name for g in SIZE_GROUPS)
VOCABULARY = tuple(_WORDS)
CROP_MARGIN = 0.1  # of the font size, on every side of a word's ink box
WORD_GAP = 0.4  # of the font size, between words on a line
MAX_WORDS = 16  # per image: a recogniser's cost grows with words, not pixels
_DARK_GROUNDS = ("black", "navy", "dark green", "dark red")
_LIGHT_INKS = ("white", "yellow")
_COLOUR_GROUNDS = ("sky blue", "pink", "yellow", "orange", "cyan")
_DARK_INKS = ("navy", "dark red", "dark green", "purple", "black")


class TextImage(NamedTuple):
  image: np.ndarray  # uint8 (H, W, 3)
  words: tuple[str, ...]
  boxes: np.ndarray  # int32 (n, 4): x0, y0, x1, y1 of each word's ink, x1 and y1 exclusive
  group: str
  font_px: int


def group_of(index: int) -> SizeGroup:
  return SIZE_GROUPS[index % len(SIZE_GROUPS)]


def _inks(rng: np.random.Generator) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
  """(background, ink) colours: dark on light 3 times in 5, light on dark and colour on colour once each."""
  style = rng.integers(5)
  if style < 3:
    return _colour(rng, ("white", "beige", "light grey"))[1], _colour(rng, ("black",))[1]
  if style == 3:
    return _colour(rng, _DARK_GROUNDS)[1], _colour(rng, _LIGHT_INKS)[1]
  return _colour(rng, _COLOUR_GROUNDS)[1], _colour(rng, _DARK_INKS)[1]


def _styled(rng: np.random.Generator, word: str) -> str:
  style = rng.integers(6)
  return word.upper() if style == 0 else word.title() if style < 3 else word


def render(index: int, *, seed: int = 0, image_size: int = 256) -> TextImage:
  """Draws text image ``index`` of the set: the image and its words' strings and boxes. Deterministic."""
  group = group_of(index)
  rng = np.random.default_rng([int(seed), 7, int(index)])
  size = int(image_size)
  font_px = max(6, int(round(size * rng.uniform(group.lo, group.hi))))
  font = _font(font_px)
  ground, ink = _inks(rng)
  img = Image.new("RGB", (size, size), ground)
  draw = ImageDraw.Draw(img)
  edge = max(2, int(0.04 * size))
  line_h = int(np.ceil(1.5 * font_px))
  n_lines = min(int((size - 2 * edge) // line_h), int(rng.integers(3, 7)))
  # Lines spread over the height with random gaps between them.
  spare = size - 2 * edge - n_lines * line_h
  gaps = np.sort(rng.integers(0, spare + 1, size=n_lines))
  words, boxes = [], []
  for line in range(n_lines):
    y = edge + line * line_h + int(gaps[line])
    x = edge + int(rng.integers(0, max(1, size // 5)))
    per_line = int(rng.integers(1, 5))
    for _ in range(per_line):
      if len(words) == MAX_WORDS:
        break
      word = _styled(rng, VOCABULARY[int(rng.integers(len(VOCABULARY)))])
      box = draw.textbbox((x, y), word, font=font)
      if box[2] > size - edge:
        break
      draw.text((x, y), word, fill=ink, font=font)
      words.append(word)
      boxes.append(box)
      x = box[2] + int(np.ceil(WORD_GAP * font_px))
  boxes = np.asarray(boxes, np.int32).reshape(-1, 4)
  return TextImage(np.asarray(img, np.uint8), tuple(words), boxes, group.name, font_px)


def text_set(num_images: int, *, seed: int = 0, image_size: int = 256) -> list[TextImage]:
  """The first ``num_images`` images of the set (cycling through ``SIZE_GROUPS``)."""
  if num_images <= 0:
    raise ValueError(f"num_images must be positive, got {num_images}")
  return [render(i, seed=seed, image_size=image_size) for i in range(num_images)]


def model_images(texts: list[TextImage]) -> np.ndarray:
  """The images of ``texts`` stacked as float32 (N, H, W, 3) in [-1, 1], as the tokenizer and the measures take them."""
  return to_model_range(np.stack([t.image for t in texts]))
