"""The embedded default dataset: images of graded complexity, generated on the fly.

Needs no download. Every image is drawn deterministically from ``(seed, split, index)``
when it is read, never stored, so a few thousand 256x256 images cost nothing on disk
and each read takes a few milliseconds. Eight kinds, from simplest to most complex:

  grade 1 ``flat``        one flat colour                              -> level 2 (32x)
  grade 2 ``gradient``    a linear or radial two-colour gradient       -> level 2 (32x)
  grade 3 ``few_shapes``  one to three large shapes                    -> level 2 (32x)
  grade 5 ``many_shapes`` dozens of small overlapping outlined shapes  -> level 1 (16x)
  grade 6 ``photo``       a crop of a natural photo shipped by scikit-image -> level 1
  grade 7 ``chart``       a bar / line / scatter chart with axes, ticks, labels, legend -> level 0 (8x)
  grade 8 ``texture``     fine natural or synthetic texture             -> level 0 (8x)
  grade 9 ``dense_text``  a page of small text                          -> level 0 (8x)

Grades follow the 1-9 scale of the paper's complexity score; the built-in level of an
image is the level of its kind (``EmbeddedSource.builtin_levels()``), so the demo trains
with no score manifest. Every image comes with a caption written by its generator.
"""

from __future__ import annotations

import functools
import io
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont


class Kind(NamedTuple):
  name: str
  grade: int  # 1 (simplest) .. 9 (most complex), the paper's score scale.
  level: int  # built-in level index: 0 = 8x, 1 = 16x, 2 = 32x.


KINDS = (
    Kind("flat", 1, 2),
    Kind("gradient", 2, 2),
    Kind("few_shapes", 3, 2),
    Kind("many_shapes", 5, 1),
    Kind("photo", 6, 1),
    Kind("chart", 7, 0),
    Kind("texture", 8, 0),
    Kind("dense_text", 9, 0),
)
KIND_NAMES = tuple(k.name for k in KINDS)

DEFAULT_NUM_IMAGES = {"train": 4000, "validation": 400, "test": 400}
_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}

_COLOURS = (
    ("black", (20, 20, 20)), ("white", (245, 245, 245)), ("grey", (128, 128, 128)),
    ("red", (210, 40, 40)), ("dark red", (120, 20, 25)), ("orange", (240, 140, 30)),
    ("yellow", (240, 220, 50)), ("olive", (128, 128, 30)), ("green", (50, 160, 60)),
    ("dark green", (20, 80, 35)), ("teal", (30, 140, 140)), ("cyan", (60, 200, 220)),
    ("sky blue", (120, 180, 235)), ("blue", (40, 70, 200)), ("navy", (20, 30, 90)),
    ("purple", (120, 50, 160)), ("pink", (240, 140, 180)), ("brown", (120, 75, 40)),
    ("beige", (225, 210, 175)), ("light grey", (210, 210, 210)),
)
_LIGHT_BACKGROUNDS = ("white", "beige", "light grey", "sky blue", "pink", "yellow")
_WORDS = (
    "the of and model image token level data train scale latent content adaptive complexity "
    "pixel detail chart value table figure result sample network decoder encoder caption text "
    "shape colour light dark north south river market energy growth share percent total annual "
    "report survey public policy country city year month average rate index change high low "
    "number score label axis series point line bar group region method system analysis").split()


def _colour(rng: np.random.Generator, names=None) -> tuple[str, tuple[int, int, int]]:
  pool = [c for c in _COLOURS if names is None or c[0] in names]
  return pool[int(rng.integers(len(pool)))]


@functools.lru_cache(maxsize=64)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
  return ImageFont.load_default(size=max(6, int(size)))


def _words(rng: np.random.Generator, n: int) -> str:
  return " ".join(_WORDS[i] for i in rng.integers(len(_WORDS), size=n))


def _flat(rng, size):
  name, rgb = _colour(rng)
  return Image.new("RGB", (size, size), rgb), f"A plain {name} image with no detail."


def _gradient(rng, size):
  (n1, c1), (n2, c2) = _colour(rng), _colour(rng)
  while n2 == n1:
    n2, c2 = _colour(rng)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
  style = ("horizontal", "vertical", "diagonal", "radial")[int(rng.integers(4))]
  t = {"horizontal": xx, "vertical": yy, "diagonal": (xx + yy) / 2,
       "radial": np.clip(np.hypot(xx - 0.5, yy - 0.5) / 0.7071, 0, 1)}[style]
  arr = (1 - t[..., None]) * np.array(c1, np.float32) + t[..., None] * np.array(c2, np.float32)
  where = "from the centre " if style == "radial" else ""
  return (Image.fromarray(np.round(arr).astype(np.uint8)),
          f"A smooth {style} gradient {where}from {n1} to {n2}.")


def _shape(draw, rng, kind, box, fill, outline=None, width=1):
  x0, y0, x1, y1 = box
  if kind == "circle":
    r = min(x1 - x0, y1 - y0) / 2
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=outline, width=width)
  elif kind == "ellipse":
    draw.ellipse(box, fill=fill, outline=outline, width=width)
  elif kind == "square":
    s = min(x1 - x0, y1 - y0)
    draw.rectangle((x0, y0, x0 + s, y0 + s), fill=fill, outline=outline, width=width)
  elif kind == "rectangle":
    draw.rectangle(box, fill=fill, outline=outline, width=width)
  elif kind == "triangle":
    draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill, outline=outline, width=width)
  else:  # line
    draw.line(box, fill=fill, width=max(width, 2))


def _box(rng, size, lo, hi):
  w, h = rng.uniform(lo, hi, size=2) * size
  x0, y0 = rng.uniform(0, size - w), rng.uniform(0, size - h)
  return (float(x0), float(y0), float(x0 + w), float(y0 + h))


def _few_shapes(rng, size):
  bg_name, bg = _colour(rng, _LIGHT_BACKGROUNDS)
  img = Image.new("RGB", (size, size), bg)
  draw = ImageDraw.Draw(img)
  n = int(rng.integers(1, 4))
  parts = []
  for _ in range(n):
    kind = ("circle", "square", "rectangle", "triangle", "ellipse")[int(rng.integers(5))]
    name, rgb = _colour(rng)
    while name == bg_name:
      name, rgb = _colour(rng)
    _shape(draw, rng, kind, _box(rng, size, 0.3, 0.6), fill=rgb)
    parts.append(f"a {name} {kind}")
  listed = parts[0] if n == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
  count = {1: "one large shape", 2: "two large shapes", 3: "three large shapes"}[n]
  return img, f"A {bg_name} background with {count}: {listed}."


def _many_shapes(rng, size):
  bg_name, bg = _colour(rng, _LIGHT_BACKGROUNDS)
  img = Image.new("RGB", (size, size), bg)
  draw = ImageDraw.Draw(img)
  n = int(rng.integers(30, 80))
  for _ in range(n):
    kind = ("circle", "rectangle", "triangle", "ellipse", "line")[int(rng.integers(5))]
    fill = tuple(int(v) for v in rng.integers(0, 256, size=3))
    outline = tuple(int(v) for v in rng.integers(0, 256, size=3))
    _shape(draw, rng, kind, _box(rng, size, 0.03, 0.2), fill=fill, outline=outline,
           width=max(1, size // 128))
  return img, (f"{n} small overlapping shapes (circles, ellipses, rectangles, triangles and "
               f"lines) in many colours with outlines on a {bg_name} background.")


# (skimage.data function, caption); all of these ship with scikit-image (no download).
_PHOTOS = (
    ("astronaut", "a photograph of an astronaut in a white spacesuit in front of a flag"),
    ("camera", "a black-and-white photograph of a man standing behind a camera on a tripod"),
    ("chelsea", "a photograph of a tabby cat's face"),
    ("coffee", "a photograph of a cup of coffee on a saucer with a spoon"),
    ("rocket", "a photograph of a rocket on a launch pad under a blue sky"),
    ("coins", "a grayscale photograph of old coins on a dark background"),
    ("moon", "a grayscale photograph of the cratered surface of the moon"),
    ("hubble_deep_field", "a telescope image of many distant galaxies on black space"),
    ("immunohistochemistry", "a microscope image of stained tissue with many cells"),
)
_TEXTURES = (
    ("grass", "a close-up of grass"),
    ("gravel", "a close-up of gravel"),
    ("brick", "a close-up of a brick wall"),
)


@functools.lru_cache(maxsize=None)
def _skimage_rgb(name: str) -> np.ndarray:
  try:
    import skimage.data  # Imported lazily: only photo and texture images need it.
  except ImportError as e:
    raise ImportError("the embedded dataset's photo and texture images use the photos that "
                      "scikit-image ships: pip install scikit-image") from e
  arr = np.asarray(getattr(skimage.data, name)())
  if arr.ndim == 2:
    arr = np.repeat(arr[..., None], 3, axis=-1)
  return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def _random_crop(rng, arr, size, min_frac):
  h, w = arr.shape[:2]
  side = int(min(h, w) * rng.uniform(min_frac, 1.0))
  y0, x0 = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
  img = Image.fromarray(arr[y0:y0 + side, x0:x0 + side]).resize((size, size), Image.BICUBIC)
  if rng.random() < 0.5:
    img = img.transpose(Image.FLIP_LEFT_RIGHT)
  return img


def _photo(rng, size):
  name, caption = _PHOTOS[int(rng.integers(len(_PHOTOS)))]
  img = _random_crop(rng, _skimage_rgb(name), size, 0.6)
  return img, f"A crop of {caption}."


def _texture(rng, size):
  style = int(rng.integers(3))
  if style == 0:  # A natural texture, tinted.
    name, what = _TEXTURES[int(rng.integers(len(_TEXTURES)))]
    cname, tint = _colour(rng, ("green", "brown", "olive", "grey", "orange", "teal"))
    gray = np.asarray(_random_crop(rng, _skimage_rgb(name), size, 0.7), np.float32)[..., :1]
    arr = gray / 255.0 * (0.5 * np.array(tint, np.float32) + 127)
    article = "An" if cname[0] in "aeiou" else "A"
    return (Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)),
            f"{article} {cname}-tinted {what[2:]}, full of fine detail.")
  if style == 1:  # Multi-octave colour noise.
    arr = np.zeros((size, size, 3), np.float32)
    for octave in range(4):
      cells = max(2, size >> (4 - octave))
      noise = rng.uniform(0, 255, size=(cells, cells, 3)).astype(np.uint8)
      up = Image.fromarray(noise).resize((size, size), Image.BILINEAR)
      arr += np.asarray(up, np.float32) * (0.5 ** (3 - octave))
    arr = arr / (1 + 0.5 + 0.25 + 0.125)
    arr += rng.normal(0, 25, size=arr.shape)
    return (Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)),
            "A fine-grained, multi-coloured noise texture like static, with no objects.")
  # Thin random stripes with grain.
  (n1, c1), (n2, c2) = _colour(rng), _colour(rng)
  freq = rng.uniform(0.3, 0.9)
  angle = rng.uniform(0, np.pi)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  phase = (xx * np.cos(angle) + yy * np.sin(angle)) * freq
  phase += rng.normal(0, 0.6, size=phase.shape)
  t = (0.5 + 0.5 * np.sin(phase))[..., None]
  arr = (1 - t) * np.array(c1, np.float32) + t * np.array(c2, np.float32)
  arr += rng.normal(0, 18, size=arr.shape)
  return (Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)),
          f"A dense pattern of thin, wavy {n1} and {n2} stripes with a grainy surface.")


def _chart(rng, size):
  title = _words(rng, int(rng.integers(2, 5))).capitalize()
  kind = ("bar", "line", "scatter")[int(rng.integers(3))]
  img = Image.new("RGB", (size, size), "white")
  draw = ImageDraw.Draw(img)
  small, medium = _font(size / 26), _font(size / 18)
  left, right, top, bottom = 0.16 * size, 0.96 * size, 0.14 * size, 0.82 * size
  draw.text((size / 2, 0.02 * size), title, fill="black", font=medium, anchor="ma")
  n_series = int(rng.integers(1, 4))
  n_points = int(rng.integers(5, 13))
  values = rng.uniform(0.05, 1.0, size=(n_series, n_points))
  y_max = float(rng.choice([10, 50, 100, 500, 1000]))
  for t in range(6):  # Gridlines and y tick labels.
    y = bottom - t / 5 * (bottom - top)
    draw.line((left, y, right, y), fill=(220, 220, 220))
    draw.text((left - 3, y), f"{y_max * t / 5:g}", fill="black", font=small, anchor="rm")
  draw.line((left, top, left, bottom), fill="black", width=max(1, size // 200))
  draw.line((left, bottom, right, bottom), fill="black", width=max(1, size // 200))
  palette = [c for c in _COLOURS if c[0] in ("red", "blue", "green", "orange", "purple", "teal")]
  colours = [palette[i] for i in rng.permutation(len(palette))[:n_series]]
  step = (right - left) / n_points
  label_every = 1 if n_points <= 6 else 2
  for i in range(0, n_points, label_every):  # x tick labels
    draw.text((left + (i + 0.5) * step, bottom + 3), str(2000 + i), fill="black", font=small,
              anchor="ma")
  for s, (_, rgb) in enumerate(colours):
    pts = [(left + (i + 0.5) * step, bottom - v * (bottom - top)) for i, v in enumerate(values[s])]
    if kind == "bar":
      width = step * 0.8 / n_series
      for i, (x, y) in enumerate(pts):
        x0 = x - step * 0.4 + s * width
        draw.rectangle((x0, y, x0 + max(width - 1, 0), bottom), fill=rgb)  # >= 1 px at small sizes
        if n_series == 1:
          draw.text((x, y - 2), f"{values[s, i] * y_max:.0f}", fill="black", font=small, anchor="md")
    elif kind == "line":
      draw.line(pts, fill=rgb, width=max(1, size // 128))
      for x, y in pts:
        draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=rgb)
    else:
      for x, y in pts:
        jitter = rng.normal(0, step / 6, size=2)
        draw.ellipse((x + jitter[0] - 3, y + jitter[1] - 3, x + jitter[0] + 3, y + jitter[1] + 3),
                     fill=rgb)
  legend = [_words(rng, 1) for _ in range(n_series)]
  for s, ((_, rgb), name) in enumerate(zip(colours, legend)):
    y = top + 4 + s * size / 22
    draw.rectangle((right - 0.22 * size, y, right - 0.22 * size + 6, y + 6), fill=rgb)
    draw.text((right - 0.22 * size + 9, y + 3), name, fill="black", font=small, anchor="lm")
  x_label, y_label = _words(rng, 1), _words(rng, 2)
  draw.text(((left + right) / 2, 0.92 * size), x_label, fill="black", font=small, anchor="ma")
  label = Image.new("RGB", (int(0.5 * size), int(size / 20) + 2), "white")
  ImageDraw.Draw(label).text((label.width / 2, 1), y_label, fill="black", font=small, anchor="ma")
  img.paste(label.rotate(90, expand=True), (1, int(size / 2 - label.width / 2)))
  series = "one series" if n_series == 1 else f"{n_series} series"
  return img, (f"A {kind} chart titled '{title}' with {series} over {n_points} years "
               f"({', '.join(legend)}), a y axis labelled '{y_label}' from 0 to {y_max:g}, "
               f"an x axis labelled '{x_label}', tick labels, gridlines and a legend.")


def _dense_text(rng, size):
  bg_name, bg = _colour(rng, ("white", "beige", "light grey"))
  img = Image.new("RGB", (size, size), bg)
  draw = ImageDraw.Draw(img)
  heading = _words(rng, int(rng.integers(2, 5))).title()
  font_px = max(6, int(size / rng.uniform(26, 34)))
  font = _font(font_px)
  draw.text((size * 0.04, size * 0.02), heading, fill="black", font=_font(font_px * 1.6))
  columns = int(rng.integers(1, 3))
  col_w = size * 0.92 / columns
  chars = max(4, int(col_w / (font_px * 0.55)))
  y0 = size * 0.04 + font_px * 2.2
  n_lines = int((size * 0.97 - y0) / (font_px * 1.15))
  for c in range(columns):
    for line in range(n_lines):
      text = _words(rng, chars // 4)[:chars]
      draw.text((size * 0.04 + c * col_w, y0 + line * font_px * 1.15), text, fill=(25, 25, 25),
                font=font)
  cols = "one column" if columns == 1 else "two columns"
  return img, (f"A {bg_name} page of dense small black text in {cols} of {n_lines} lines under "
               f"the heading '{heading}'.")


_GENERATORS: dict[str, Callable[[np.random.Generator, int], tuple[Image.Image, str]]] = {
    "flat": _flat, "gradient": _gradient, "few_shapes": _few_shapes,
    "many_shapes": _many_shapes, "photo": _photo, "chart": _chart, "texture": _texture,
    "dense_text": _dense_text,
}


def kind_of(index: int) -> Kind:
  """The kind of the embedded image at ``index`` (kinds cycle, so any prefix is balanced)."""
  return KINDS[index % len(KINDS)]


def generate(index: int, *, seed: int = 0, split: str = "train",
             image_size: int = 256) -> tuple[np.ndarray, str, Kind]:
  """Draws embedded image ``index``: (uint8 HxWx3 array, caption, kind). Deterministic."""
  if split not in _SPLIT_CODES:
    raise ValueError(f"embedded split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
  kind = kind_of(index)
  rng = np.random.default_rng([int(seed), _SPLIT_CODES[split], int(index)])
  img, caption = _GENERATORS[kind.name](rng, int(image_size))
  return np.asarray(img.convert("RGB"), np.uint8), caption, kind


class EmbeddedSource:
  """The embedded default dataset as a source: ``'image'`` is PNG-encoded bytes.

  Args:
    split: 'train', 'validation' or 'test' (different images for each).
    num_images: number of images (default 4000 for train, 400 otherwise).
    seed: generator seed; ids include it when it is not 0.
    image_size: side of the square images drawn (256 by default; smaller for fast tests).
  """

  def __init__(self, split: str = "train", *, num_images: int | None = None, seed: int = 0,
               image_size: int = 256):
    if split not in _SPLIT_CODES:
      raise ValueError(f"embedded split must be one of {sorted(_SPLIT_CODES)}, got {split!r}")
    self.split = split
    self.num_images = DEFAULT_NUM_IMAGES[split] if num_images is None else int(num_images)
    if self.num_images <= 0:
      raise ValueError(f"num_images must be positive, got {num_images}")
    self.seed = int(seed)
    self.image_size = int(image_size)

  def __len__(self) -> int:
    return self.num_images

  def _check(self, index: int) -> int:
    index = int(index)
    if not 0 <= index < self.num_images:
      raise IndexError(f"index {index} out of range for {self.num_images} embedded images")
    return index

  def id_of(self, index: int) -> str:
    prefix = f"embedded/{self.split}" if self.seed == 0 else f"embedded-s{self.seed}/{self.split}"
    return f"{prefix}/{self._check(index):06d}"

  def ids(self) -> list[str]:
    """All ids in index order, without drawing any image."""
    return [self.id_of(i) for i in range(self.num_images)]

  def kind(self, index: int) -> Kind:
    return kind_of(self._check(index))

  def builtin_levels(self) -> dict[str, int]:
    """Level of every image from its generator's complexity grade (no manifest needed)."""
    return {self.id_of(i): kind_of(i).level for i in range(self.num_images)}

  def __getitem__(self, index: int) -> dict:
    index = self._check(index)
    arr, caption, kind = generate(index, seed=self.seed, split=self.split,
                                  image_size=self.image_size)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return {"id": self.id_of(index), "image": buf.getvalue(), "caption": caption,
            "kind": kind.name, "grade": kind.grade}

  def __repr__(self) -> str:
    return (f"EmbeddedSource(split={self.split!r}, num_images={self.num_images}, "
            f"seed={self.seed}, image_size={self.image_size})")
