"""Text legibility, TokBench-style: can a recogniser still read the words of a reconstruction?

Each word of an image of the text set (``cat_jax.data.text_set``) is cut out at its ground-truth box (plus
``text_set.CROP_MARGIN`` of its font size on every side) from the image given, the original or a reconstruction, and
read by the recogniser; the reading is compared with the true string. Per image:

  word_accuracy   the fraction of its words read exactly, after ``normalise`` (lower case, only the letters a-z
                  and digits kept: punctuation, spaces and accents the recogniser adds or drops do not count)
  one_minus_ned   the mean over its words of 1 - (Levenshtein distance of the normalised strings) / (the longer's
                  length), 1 where both are empty

``by_group`` averages both over the images of each size group (and over all images). The recogniser is PP-OCRv4's
text recogniser as the PyPI package ``rapidocr_onnxruntime`` ships it (its ONNX weights are inside the package:
nothing is downloaded), run on the CPU with onnxruntime: ``pip install 'cat_jax[ocr]'``. docs/guide.md ("Text
legibility") says why this recogniser and not Debian's tesseract, with the numbers.
"""

from __future__ import annotations

import functools
import re
from typing import Callable, Mapping, Sequence

import numpy as np

from cat_jax import levels as L
from cat_jax.data.preprocess import from_model_range
from cat_jax.data.text_set import CROP_MARGIN, TextImage

Recogniser = Callable[[Sequence[np.ndarray]], list[str]]  # uint8 RGB crops -> one string per crop

MISSING_RECOGNISER = ("text legibility needs the recogniser of the PyPI package rapidocr_onnxruntime (PP-OCRv4, its "
                      "weights inside the package, Python < 3.13): pip install 'cat_jax[ocr]' (or pip install "
                      "'rapidocr_onnxruntime~=1.4')")


def normalise(text: str) -> str:
  """Lower case, only a-z and 0-9 kept: the form in which a reading and the truth are compared."""
  return re.sub(r"[^0-9a-z]", "", text.lower())


def edit_distance(a: str, b: str) -> int:
  """Levenshtein distance (insertions, deletions and substitutions cost 1)."""
  row = list(range(len(b) + 1))
  for i, ca in enumerate(a, 1):
    diagonal, row[0] = row[0], i
    for j, cb in enumerate(b, 1):
      diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (ca != cb))
  return row[-1]


def one_minus_ned(read: str, true: str) -> float:
  """1 - normalised edit distance of the normalised strings: 1 for a match, 0 when no character is right."""
  read, true = normalise(read), normalise(true)
  longest = max(len(read), len(true))
  return 1.0 if longest == 0 else 1.0 - edit_distance(read, true) / longest


@functools.lru_cache(maxsize=1)
def rapidocr_recogniser() -> Recogniser:
  """PP-OCRv4's recogniser from ``rapidocr_onnxruntime`` (loaded once); a clear ``ImportError`` when it is missing."""
  try:
    from rapidocr_onnxruntime import RapidOCR
  except ImportError as e:
    raise ImportError(MISSING_RECOGNISER) from e
  engine = RapidOCR()

  def recognise(crops: Sequence[np.ndarray]) -> list[str]:
    if not crops:
      return []
    readings, _ = engine.text_rec([np.ascontiguousarray(c[..., ::-1]) for c in crops])  # it reads BGR, as OpenCV
    return [text for text, _score in readings]

  return recognise


def word_crops(image: np.ndarray, truth: TextImage) -> list[np.ndarray]:
  """The crops of ``truth``'s words in ``image`` (uint8 (H, W, 3)): each box plus ``CROP_MARGIN`` of the font size."""
  margin = max(1, int(round(CROP_MARGIN * truth.font_px)))
  h, w = image.shape[:2]
  return [image[max(0, y0 - margin):min(h, y1 + margin), max(0, x0 - margin):min(w, x1 + margin)]
          for x0, y0, x1, y1 in truth.boxes]


def score_readings(readings: Sequence[str], words: Sequence[str]) -> dict[str, float]:
  """Word accuracy and mean 1 - NED of readings against the true words, position by position."""
  if len(readings) != len(words):
    raise ValueError(f"{len(readings)} readings for {len(words)} words")
  if not words:
    raise ValueError("an image with no words cannot be scored")
  return {"word_accuracy": float(np.mean([normalise(r) == normalise(w) for r, w in zip(readings, words)])),
          "one_minus_ned": float(np.mean([one_minus_ned(r, w) for r, w in zip(readings, words)]))}


def read_words(images: np.ndarray, truth: Sequence[TextImage], *, value_range: tuple[float, float] = (-1.0, 1.0),
               recognise: Recogniser | None = None) -> list[list[str]]:
  """The recogniser's reading of every true word box of every image: images (N, H, W, 3) in ``value_range``."""
  images = np.asarray(images)
  if images.ndim != 4 or len(images) != len(truth):
    raise ValueError(f"expected {len(truth)} images (N, H, W, 3), one per truth, got shape {images.shape}")
  for x, t in zip(images, truth):
    if x.shape != t.image.shape:
      raise ValueError(f"an image of shape {x.shape} for a truth drawn at {t.image.shape}")
  recognise = recognise or rapidocr_recogniser()
  lo, hi = value_range
  pixels = from_model_range((images.astype(np.float32) - lo) * (2.0 / (hi - lo)) - 1.0)
  crops = [word_crops(x, t) for x, t in zip(pixels, truth)]
  flat = recognise([c for per_image in crops for c in per_image])
  out, start = [], 0
  for per_image in crops:
    out.append(flat[start:start + len(per_image)])
    start += len(per_image)
  return out


def legibility(images: np.ndarray, truth: Sequence[TextImage], *, value_range: tuple[float, float] = (-1.0, 1.0),
               recognise: Recogniser | None = None) -> list[dict]:
  """Per image: ``{"group", "words", "word_accuracy", "one_minus_ned"}`` of the images (originals or
  reconstructions, (N, H, W, 3) in ``value_range``) read at the boxes of ``truth`` and scored against its words."""
  readings = read_words(images, truth, value_range=value_range, recognise=recognise)
  return [{"group": t.group, "words": len(t.words), **score_readings(r, t.words)} for r, t in zip(readings, truth)]


def by_group(rows: Sequence[Mapping]) -> dict[str, dict[str, float]]:
  """Per size group and ``"all"``: the mean over images of word_accuracy and one_minus_ned, images and words."""
  groups: dict[str, list[Mapping]] = {}
  for row in rows:
    groups.setdefault(row["group"], []).append(row)
    groups.setdefault("all", []).append(row)
  return {name: {"word_accuracy": float(np.mean([r["word_accuracy"] for r in members])),
                 "one_minus_ned": float(np.mean([r["one_minus_ned"] for r in members])),
                 "images": len(members), "words": int(sum(r["words"] for r in members))}
          for name, members in groups.items()}


def legibility_rows(reconstruct_fn: Callable[[np.ndarray, int], np.ndarray], images: np.ndarray,
                    truth: Sequence[TextImage], *, levels: Sequence[int] = (0, 1, 2), original: bool = True,
                    recognise: Recogniser | None = None) -> dict[str, dict[str, dict[str, float]]]:
  """``by_group`` of the originals (``"original"``, unless ``original=False``) and of ``reconstruct_fn(images,
  level)`` at each level (keyed ``"8x"``, ``"16x"``, ``"32x"``); images (N, H, W, 3) in [-1, 1], the set's images
  through ``to_model_range``, and so the reconstructions."""
  rows = {}
  if original:
    rows["original"] = by_group(legibility(images, truth, recognise=recognise))
  for level in levels:
    recon = np.clip(np.asarray(reconstruct_fn(images, level), np.float32), -1.0, 1.0)
    rows[L.level_name(level)] = by_group(legibility(recon, truth, recognise=recognise))
  return rows
