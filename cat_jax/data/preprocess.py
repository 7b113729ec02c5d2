"""Image decoding and preprocessing: any file -> RGB -> resize shorter side -> crop -> [-1, 1].

Sources hand over encoded bytes (see ``cat_jax.data.sources``); everything here runs in
the grain worker processes. Unreadable images (corrupt, truncated, smaller than
``min_size`` on the shorter side, more than ``max_pixels`` pixels) raise ``BadImageError``
naming the image, and the pipeline either skips them (counted, with a warning that lists
the first few) or re-raises, by config. Nothing here crashes on a mode it has not seen:
grayscale, palette (with or without transparency), RGBA / LA (composited on white), CMYK,
16-bit and 32-bit integer and float images all become 8-bit RGB.

Arrays given by a user follow one convention, here and in ``cat_jax.Tokenizer`` (``as_model_images``): uint8 is
[0, 255], uint16 [0, 65535], floats (any float dtype, bfloat16 included) are [-1, 1] unless a ``value_range`` says
otherwise; floats outside it, NaN or inf are an error naming the image, never clipped. (H, W) and (H, W, 1) are
grayscale, (H, W, 2) gray + alpha, (H, W, 4) RGBA; transparency is composited on white.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import warnings
from typing import Any

import numpy as np
from PIL import Image, ImageOps

logger = logging.getLogger(__name__)

# Same default as Pillow's decompression-bomb guard (Pillow refuses twice this).
DEFAULT_MAX_PIXELS = 89_478_485
DEFAULT_MIN_SIZE = 32
BAD_IMAGE_POLICIES = ("skip", "raise")


class BadImageError(ValueError):
  """An image that cannot be used: ``path`` names it, ``reason`` says why."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"bad image {path}: {reason}")
    self.path = path
    self.reason = reason


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
  """How images become model inputs.

  Attributes:
    image_size: side of the square output.
    min_size: images whose shorter side is below this are bad (skipped or raised).
    max_pixels: images with more pixels than this are bad; at most twice Pillow's
      ``Image.MAX_IMAGE_PIXELS`` (Pillow refuses larger ones itself).
    on_bad_image: 'skip' (count, warn, go on) or 'raise' (stop with the path).
  """
  image_size: int = 256
  min_size: int = DEFAULT_MIN_SIZE
  max_pixels: int = DEFAULT_MAX_PIXELS
  on_bad_image: str = "skip"

  def __post_init__(self):
    if self.image_size <= 0 or self.min_size < 1 or self.max_pixels < 1:
      raise ValueError(f"image_size, min_size and max_pixels must be positive: {self}")
    if self.on_bad_image not in BAD_IMAGE_POLICIES:
      raise ValueError(f"on_bad_image must be one of {BAD_IMAGE_POLICIES}, got {self.on_bad_image!r}")


def _open(data: Any, path: str) -> Image.Image:
  if isinstance(data, Image.Image):
    return data
  if isinstance(data, np.ndarray):
    try:
      return Image.fromarray(from_model_range(array_to_model_range(data, what=path)))
    except ValueError as e:
      raise BadImageError(path, str(e)) from e
  if isinstance(data, (bytes, bytearray, memoryview)):
    try:
      with warnings.catch_warnings():
        # We apply our own max_pixels limit right after opening.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        return Image.open(io.BytesIO(bytes(data)))
    except Image.DecompressionBombError as e:
      raise BadImageError(path, f"too many pixels ({e})") from e
    except Exception as e:  # PIL raises many types for undecodable data.
      raise BadImageError(path, f"cannot identify image ({type(e).__name__}: {e})") from e
  raise BadImageError(path, f"unsupported image payload of type {type(data).__name__}")


def _to_uint8(arr: np.ndarray) -> np.ndarray:
  """Scales the integer or float pixels of a decoded file (PIL modes I, F) to uint8."""
  if arr.dtype == np.uint8:
    return arr
  if arr.dtype == np.bool_:
    return arr.astype(np.uint8) * 255
  if np.issubdtype(arr.dtype, np.floating):
    arr = np.nan_to_num(arr.astype(np.float32))
    scale = 255.0 if arr.size and float(arr.max()) <= 1.0 else 1.0
    return np.clip(np.round(arr * scale), 0, 255).astype(np.uint8)
  if arr.dtype == np.uint16 or (arr.size and int(arr.max()) > 255):
    # 16-bit data: 65535 -> 255 (dividing by 257 maps the ranges exactly).
    return np.clip(np.round(arr.astype(np.float32) / 257.0), 0, 255).astype(np.uint8)
  return np.clip(arr, 0, 255).astype(np.uint8)


def to_rgb(img: Image.Image) -> Image.Image:
  """Any PIL mode -> 8-bit RGB; transparency is composited on white."""
  mode = img.mode
  if mode == "RGB":
    return img
  if mode.startswith("I") or mode == "F":  # 16/32-bit integer or float: scale, do not clip.
    gray = _to_uint8(np.asarray(img))
    return Image.fromarray(gray, "L").convert("RGB")
  has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
  if has_alpha:
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGBX.


def open_checked(data: Any, *, path: str, min_size: int = DEFAULT_MIN_SIZE,
                 max_pixels: int = DEFAULT_MAX_PIXELS, draft_size: int | None = None) -> Image.Image:
  """Opens ``data`` and decodes it to an RGB PIL image, or raises ``BadImageError``.

  Dimensions are checked from the header before any pixel is decoded. ``draft_size``
  lets JPEGs decode directly at a reduced scale whose shorter side stays >= it.
  """
  img = _open(data, path)
  w, h = img.size
  if min(w, h) < min_size:
    raise BadImageError(path, f"{w}x{h} is smaller than min_size={min_size}")
  if w * h > max_pixels:
    raise BadImageError(path, f"{w}x{h} has more than max_pixels={max_pixels} pixels")
  try:
    if draft_size and img.format == "JPEG" and img.mode in ("RGB", "L"):
      img.draft(img.mode, (draft_size, draft_size))
    img.load()
    try:
      img = ImageOps.exif_transpose(img)
    except Exception:  # A broken EXIF block should not cost us a good image.
      pass
    return to_rgb(img)
  except BadImageError:
    raise
  except Exception as e:  # Truncated or corrupt pixel data.
    raise BadImageError(path, f"cannot decode ({type(e).__name__}: {e})") from e


def decode_image(data: Any, *, path: str = "<image>", min_size: int = 1,
                 max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Encoded bytes (or an array / PIL image) -> uint8 HxWx3 RGB array at full resolution."""
  return np.asarray(open_checked(data, path=path, min_size=min_size, max_pixels=max_pixels))


def crop_box(width: int, height: int, size: int, rng: np.random.Generator | None = None
             ) -> tuple[float, float, float, float]:
  """Box in source pixels that becomes the ``size``x``size`` output.

  The shorter side is resized to ``size``; the crop along the longer side is centred when
  ``rng`` is None, uniformly random otherwise.
  """
  scale = size / min(width, height)
  side = size / scale  # == min(width, height): the crop is square in source pixels.
  slack_x, slack_y = width - side, height - side
  if rng is None:
    x0, y0 = slack_x / 2, slack_y / 2
  else:
    x0, y0 = rng.uniform(0, slack_x) if slack_x > 0 else 0.0, rng.uniform(0, slack_y) if slack_y > 0 else 0.0
  return (x0, y0, x0 + side, y0 + side)


def resize_and_crop(img: Image.Image, size: int, rng: np.random.Generator | None = None) -> np.ndarray:
  """RGB PIL image -> uint8 ``size``x``size``x3: shorter side to ``size``, then crop.

  One antialiased bicubic resampling of just the cropped box (random crop when ``rng``
  is given, centre crop otherwise).
  """
  box = crop_box(img.width, img.height, size, rng)
  out = img.resize((size, size), Image.BICUBIC, box=box, reducing_gap=3.0)
  return np.asarray(out, dtype=np.uint8)


@dataclasses.dataclass(frozen=True)
class Sizing:
  """The size a command line computes an image at: its own (native, the default: fully convolutional tokenizers
  take any size), ``image_size`` (shorter side resized to it, centre crop: the square of training and the paper's
  evaluation) or ``max_side`` (resized so the longer side is at most it, aspect ratio kept; smaller images are left
  as they are)."""
  image_size: int | None = None
  max_side: int | None = None

  def __post_init__(self):
    for name in ("image_size", "max_side"):
      value = getattr(self, name)
      if value is not None and (isinstance(value, bool) or int(value) < 1):
        raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")
    if self.image_size is not None and self.max_side is not None:
      raise ValueError("give image_size (shorter side, centre crop) or max_side (longer side), not both")

  @property
  def native(self) -> bool:
    return self.image_size is None and self.max_side is None

  def describe(self) -> str:
    if self.image_size is not None:
      return f"shorter side resized to {self.image_size}, centre crop {self.image_size}x{self.image_size}"
    if self.max_side is not None:
      return f"resized to at most {self.max_side} on the longer side, aspect kept"
    return "native size (no resize)"

  def sized_hw(self, hw: tuple[int, int]) -> tuple[int, int]:
    """The (height, width) ``apply`` gives an image of ``hw``."""
    h, w = int(hw[0]), int(hw[1])
    if self.image_size is not None:
      return self.image_size, self.image_size
    if self.max_side is not None and max(h, w) > self.max_side:
      scale = self.max_side / max(h, w)
      return max(1, round(h * scale)), max(1, round(w * scale))
    return h, w

  def apply(self, img: Image.Image) -> np.ndarray:
    """RGB PIL image -> uint8 (H, W, 3) at this size."""
    if self.image_size is not None:
      return resize_and_crop(img, self.image_size)
    h, w = self.sized_hw((img.height, img.width))
    if (h, w) != (img.height, img.width):
      img = img.resize((w, h), Image.BICUBIC, reducing_gap=3.0)
    return np.asarray(img, dtype=np.uint8)


def load_sized(data: Any, sizing: Sizing, *, path: str = "<image>", min_size: int = DEFAULT_MIN_SIZE,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
  """Encoded image -> (float32 (H, W, 3) in [-1, 1] at ``sizing``, the original (height, width)), or
  ``BadImageError`` (unreadable, truncated, shorter side below ``min_size``, more than ``max_pixels``)."""
  img = open_checked(data, path=path, min_size=min_size, max_pixels=max_pixels)  # no JPEG draft: the true size
  return to_model_range(sizing.apply(img)), (img.height, img.width)


def describe_sizes(paths, limit: int = 2000) -> str:
  """"N files, K sizes, from a x b to c x d (width x height)" from the image files' headers (the first ``limit``),
  for a command's first lines; unreadable files are left out (each command reports them with their reason)."""
  sizes = []
  for path in list(paths)[:limit]:
    try:
      with Image.open(path) as img:
        sizes.append(img.size)
    except Exception:  # noqa: BLE001
      continue
  n = len(paths)
  files = f"{n} file{'s' if n != 1 else ''}"
  if not sizes:
    return f"{files}, none readable"
  note = f" among the first {limit}" if n > limit else ""
  if len(set(sizes)) == 1:
    return f"{files}, one size{note}: {sizes[0][0]}x{sizes[0][1]} (width x height)"
  pixels = [w * h for w, h in sizes]
  small, large = sizes[int(np.argmin(pixels))], sizes[int(np.argmax(pixels))]
  return (f"{files}, {len(set(sizes))} sizes{note} from {small[0]}x{small[1]} to {large[0]}x{large[1]} "
          "(width x height)")


def to_model_range(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def from_model_range(image: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] (rounded, clipped)."""
  return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


MODEL_RANGE = (-1.0, 1.0)
# Floats this far outside the declared range (a fraction of it) still count as inside: rounding of a resize or a
# bfloat16 cast, not a wrong convention.
RANGE_SLACK = 1e-3
_is_float = lambda dtype: np.issubdtype(dtype, np.floating) or dtype.name in ("bfloat16", "float8_e4m3fn",
                                                                              "float8_e5m2")


def array_to_model_range(image: Any, *, value_range: tuple[float, float] = MODEL_RANGE,
                         what: str = "image") -> np.ndarray:
  """One image array (see the module docstring's convention) -> float32 (H, W, 3) in [-1, 1]; ``ValueError`` naming
  ``what`` for a shape, dtype or value outside the convention."""
  arr = np.asarray(image)
  if arr.ndim == 2:
    arr = arr[..., None]
  if arr.ndim != 3 or arr.shape[-1] not in (1, 2, 3, 4) or 0 in arr.shape:
    raise ValueError(f"{what} has shape {np.shape(image)}; expected (H, W) or (H, W, C) with C = 1 (gray), 2 (gray + "
                     "alpha), 3 (RGB) or 4 (RGBA), H and W >= 1")
  if arr.dtype == np.uint8 or arr.dtype == np.bool_:
    unit = arr.astype(np.float32) * np.float32(1 / 255 if arr.dtype == np.uint8 else 1)
  elif arr.dtype == np.uint16:
    unit = arr.astype(np.float32) / np.float32(65535)
  elif _is_float(arr.dtype):
    x = arr.astype(np.float32)
    if not np.all(np.isfinite(x)):
      raise ValueError(f"{what} has NaN or inf values; give finite pixels")
    lo, hi = (float(v) for v in value_range)
    slack = RANGE_SLACK * (hi - lo)
    if x.min() < lo - slack or x.max() > hi + slack:
      raise ValueError(f"{what} has values in [{x.min():.4g}, {x.max():.4g}], outside value_range ({lo:g}, {hi:g}) "
                       "for float images; pass value_range=(0, 1) or (0, 255) for such images, or give uint8")
    unit = np.clip((x - lo) / (hi - lo), 0.0, 1.0)
  else:
    raise ValueError(f"{what} has dtype {arr.dtype}; give uint8 [0, 255], uint16 [0, 65535] or floats in "
                     f"value_range (default [-1, 1])")
  if unit.shape[-1] in (2, 4):  # composite on white
    alpha = unit[..., -1:]
    unit = unit[..., :-1] * alpha + (1.0 - alpha)
  if unit.shape[-1] == 1:
    unit = np.repeat(unit, 3, axis=-1)
  return (unit * 2.0 - 1.0).astype(np.float32)


def image_to_model_range(image: Any, *, value_range: tuple[float, float] = MODEL_RANGE,
                         what: str = "image") -> np.ndarray:
  """A PIL image, an image file's path or an array -> float32 (H, W, 3) in [-1, 1] at full resolution."""
  import os

  if isinstance(image, Image.Image):
    return to_model_range(np.asarray(to_rgb(image)))
  if isinstance(image, (str, os.PathLike)):
    from cat_jax import storage

    try:
      data = storage.as_path(image).read_bytes()
    except OSError as e:
      raise BadImageError(os.fspath(image), f"cannot read file ({type(e).__name__}: {e})") from e
    return to_model_range(decode_image(data, path=os.fspath(image)))
  return array_to_model_range(image, value_range=value_range, what=what)


def preprocess(data: Any, config: PreprocessConfig, *, path: str = "<image>",
               rng: np.random.Generator | None = None) -> np.ndarray:
  """Encoded image -> float32 ``(image_size, image_size, 3)`` in [-1, 1], or ``BadImageError``.

  ``rng`` given: random crop (training); ``None``: centre crop (evaluation).
  """
  img = open_checked(data, path=path, min_size=config.min_size, max_pixels=config.max_pixels,
                     draft_size=config.image_size)
  return to_model_range(resize_and_crop(img, config.image_size, rng))


class BadImageReport:
  """Counts skipped images and logs a warning with the count and the first few.

  Warnings are logged at the 1st, 2nd, 4th, 8th, ... distinct bad image so long runs stay
  readable.
  """

  def __init__(self, what: str = "images", keep: int = 5):
    self.what = what
    self.keep = keep
    self.count = 0
    self.first: list[str] = []
    self._seen: set[str] = set()

  def add(self, reasons: list[str] | tuple[str, ...]) -> None:
    new = [r for r in reasons if r not in self._seen]
    if not new:
      return
    before = self.count
    for r in new:
      self._seen.add(r)
      self.count += 1
      if len(self.first) < self.keep:
        self.first.append(r)
    # Warn whenever the count crosses a power of two.
    if before == 0 or (self.count.bit_length() > before.bit_length()):
      logger.warning(
          "Skipped %d unusable %s so far (corrupt, truncated, too small or too large); first "
          "%d: %s. Set on_bad_image='raise' to stop at the first one instead.",
          self.count, self.what, len(self.first), "; ".join(self.first))
