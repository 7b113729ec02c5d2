"""Image decoding and preprocessing: any file -> RGB -> resize shorter side -> crop -> [-1, 1].

Sources hand over encoded bytes (see ``cat_jax.data.sources``); everything here runs in
the grain worker processes. Unreadable images (corrupt, truncated, smaller than
``min_size`` on the shorter side, more than ``max_pixels`` pixels) raise ``BadImageError``
naming the image, and the pipeline either skips them (counted, with a warning that lists
the first few) or re-raises, by config. Nothing here crashes on a mode it has not seen:
grayscale, palette (with or without transparency), RGBA / LA (composited on white), CMYK,
16-bit and 32-bit integer and float images all become 8-bit RGB.
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
    arr = data
    if arr.ndim == 3 and arr.shape[-1] == 1:
      arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
      raise BadImageError(path, f"array of shape {data.shape} is not HxW, HxWx3 or HxWx4")
    if arr.dtype != np.uint8:
      arr = _to_uint8(arr)
    return Image.fromarray(arr)
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
  """Scales integer or float pixel data of any depth to uint8."""
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


def to_model_range(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1]."""
  return image.astype(np.float32) * np.float32(1 / 127.5) - np.float32(1.0)


def from_model_range(image: np.ndarray) -> np.ndarray:
  """float [-1, 1] -> uint8 [0, 255] (rounded, clipped)."""
  return np.clip(np.round((np.asarray(image, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)


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
