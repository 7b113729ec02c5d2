"""Complexity score -> compression level, by two thresholds.

Thresholds ``(low, high)`` with ``low <= high``: ``score <= low`` is simple (level 2, 32x), ``low < score <= high``
is level 1 (16x), ``score > high`` is complex (level 0, 8x); see ``cat_jax.levels`` for level indices.

Defaults: the LLM score (integer 1-9) uses the paper's 1-3 / 4-6 / 7-9 split, ``(3, 6)``. Raw scores (JPEG bpp,
MSE) have no fixed scale, so their default thresholds are the dataset's 1/3 and 2/3 quantiles (equal thirds).
Budget mode instead picks thresholds that give a target mean token count over the dataset, counted at one size for
every image or at each image's own size (``image_hw``: one (height, width) or one per image).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from cat_jax.levels import NUM_LEVELS

Thresholds = tuple[float, float]
ImageSizes = tuple[int, int] | Sequence[tuple[int, int]]  # one (height, width) for every image, or one per image

LLM_METHODS = ("caption_llm", "text_llm")
DEFAULT_LLM_THRESHOLDS: Thresholds = (3, 6)


def check_thresholds(thresholds: Sequence[float]) -> Thresholds:
  """``thresholds`` as a ``(low, high)`` tuple, or a ValueError explaining the form."""
  if len(thresholds) != NUM_LEVELS - 1:
    raise ValueError(f"thresholds must be (low, high), got {thresholds!r}")
  low, high = thresholds
  if not low <= high:
    raise ValueError(f"thresholds must satisfy low <= high, got {thresholds!r}")
  return low, high


def parse_thresholds(text: str) -> Thresholds:
  """``"3,6"`` -> ``(3, 6)``; ``"0.5,1.2"`` -> ``(0.5, 1.2)``."""
  values = [float(v) for v in text.split(",")]
  values = [int(v) if v.is_integer() else v for v in values]
  return check_thresholds(values)


def levels_for_scores(scores: Sequence[float], thresholds: Sequence[float]) -> np.ndarray:
  """Level index of each score (int32): 2 (32x) if ``score <= low``, 1 (16x) if ``score <= high``, else 0 (8x)."""
  low, high = check_thresholds(thresholds)
  s = np.asarray(scores)
  return np.where(s <= low, 2, np.where(s <= high, 1, 0)).astype(np.int32)


def level_counts(scores: Sequence[float], thresholds: Sequence[float]) -> list[int]:
  """Number of scores at each level index (0, 1, 2)."""
  return np.bincount(levels_for_scores(scores, thresholds), minlength=NUM_LEVELS).tolist()


def token_table(image_hw: ImageSizes, n: int) -> np.ndarray:
  """(n, 3) tokens of each of ``n`` images at each level: at one (height, width) for all, or at each image's own
  (``n`` of them); a side that is not a multiple of 32 counts as padded to one, as ``Tokenizer.encode`` stores it."""
  from cat_jax.complexity.allocation import tokens_table

  sizes = np.asarray(image_hw, np.int64)
  if sizes.ndim == 1:
    return np.tile(tokens_table([tuple(sizes)]), (n, 1))
  if sizes.shape != (n, 2):
    raise ValueError(f"expected one (height, width) for all images or one per image ({n}), got shape {sizes.shape}")
  return tokens_table([tuple(hw) for hw in sizes])


def _uniform(image_hw: ImageSizes) -> bool:
  return np.asarray(image_hw).ndim == 1


def mean_tokens(scores: Sequence[float], thresholds: Sequence[float], image_hw: ImageSizes = (256, 256)) -> float:
  """Mean token count over the scores' images at ``image_hw`` (one size, or each image's own) with these
  thresholds."""
  levels = levels_for_scores(scores, thresholds)
  table = token_table(image_hw, len(levels))
  return float(table[np.arange(len(levels)), levels].mean())


def quantile_thresholds(scores: Sequence[float], fractions: tuple[float, float] = (1 / 3, 2 / 3)) -> Thresholds:
  """Thresholds at the scores' quantiles: about ``fractions[0]`` of images at 32x and ``1 - fractions[1]`` at 8x (a
  fraction 0: a threshold below every score)."""
  s = np.asarray(scores, np.float64)
  if s.size == 0:
    raise ValueError("quantile thresholds need at least one score")
  low, high = (float(np.quantile(s, f, method="inverted_cdf")) if f > 0 else float(s.min() - 1.0) for f in fractions)
  return low, max(low, high)


def mix_thresholds(scores: Sequence[float], level_counts: Sequence[int]) -> Thresholds:
  """Quantile thresholds that split ``scores`` into the proportions of ``level_counts`` (8x, 16x, 32x): how the
  predictor's levels are compared with its teacher's, whatever budget the teacher's own thresholds were set for."""
  p = np.asarray(level_counts, np.float64) / max(1, int(np.sum(level_counts)))
  return quantile_thresholds(scores, (p[2], p[2] + p[1]))


def default_thresholds(method: str, scores: Sequence[float]) -> Thresholds:
  """The paper's (3, 6) for the LLM score, the dataset's tercile boundaries for raw scores."""
  if method in LLM_METHODS:
    return DEFAULT_LLM_THRESHOLDS
  return quantile_thresholds(scores)


def _python_number(x: np.generic) -> float:
  return int(x) if np.issubdtype(type(x), np.integer) else float(x)


def budget_thresholds(scores: Sequence[float], target_mean_tokens: float, *,
                      image_hw: ImageSizes = (256, 256), tolerance: float = 0.01,
                      max_candidates: int = 512) -> Thresholds:
  """Thresholds whose mean token count over ``scores`` is closest to ``target_mean_tokens``, tokens counted at
  ``image_hw``: one (height, width) for every image, or each image's own (one per score, in their order).

  Many threshold pairs reach about the same mean. Among those within ``tolerance`` (relative) of the target, or
  tied with the closest reachable mean when none is, the pair that spreads images most evenly over the three
  levels (highest entropy of the level shares) wins, so the budget is met by ranking images rather than by
  sending nearly all of them to one level. Candidate thresholds are the distinct scores (at most
  ``max_candidates`` of their quantiles) plus one below the minimum ("no image at this level").

  Raises:
    ValueError: if there are no scores or the target is outside [mean tokens at 32x, mean tokens at 8x].
  """
  raw = np.asarray(scores)
  if raw.size == 0:
    raise ValueError("budget mode needs at least one score")
  order = np.argsort(raw, kind="stable")
  s, table = raw[order], token_table(image_hw, raw.size)[order].astype(np.float64)
  low_end, high_end = table[:, 2].mean(), table[:, 0].mean()
  if not low_end - 1e-9 <= target_mean_tokens <= high_end + 1e-9:
    where = (f"at {image_hw[0]}x{image_hw[1]}" if _uniform(image_hw) else
             "at these images' own sizes (their mean tokens at 32x and at 8x)")
    raise ValueError(f"target mean tokens {target_mean_tokens:g} is outside [{low_end:g}, {high_end:g}], the range "
                     f"reachable {where}")
  candidates = np.unique(s)
  if candidates.size > max_candidates:
    candidates = np.unique(np.quantile(s, np.linspace(0, 1, max_candidates), method="inverted_cdf"))
  candidates = np.concatenate([[candidates[0] - 1], candidates])
  at_or_below = np.searchsorted(s, candidates, side="right")
  n = float(s.size)
  # cum[k, l]: tokens of the k lowest-scored images, all at level l. Axis 0 indexes the low threshold, axis 1 the
  # high one: images <= low at 32x, <= high at 16x, the rest at 8x.
  cum = np.concatenate([np.zeros((1, NUM_LEVELS)), np.cumsum(table, axis=0)])
  k_low, k_high = np.meshgrid(at_or_below, at_or_below, indexing="ij")
  valid = k_high >= k_low
  k_mid = np.maximum(k_high, k_low)
  total = cum[k_low, 2] + cum[k_mid, 1] - cum[k_low, 1] + cum[-1, 0] - cum[k_mid, 0]
  mean = total / n
  n2, n1, n0 = k_low.astype(np.float64), (k_mid - k_low).astype(np.float64), (n - k_mid).astype(np.float64)
  error = np.where(valid, np.abs(mean - target_mean_tokens), np.inf)
  feasible = error <= max(tolerance * target_mean_tokens, error.min()) + 1e-9
  shares = np.stack([n0, n1, n2]) / n
  entropy = -np.sum(np.where(shares > 0, shares * np.log(np.where(shares > 0, shares, 1.0)), 0.0), axis=0)
  key = np.where(feasible, entropy - 1e-9 * error, -np.inf)
  i, j = np.unravel_index(np.argmax(key), key.shape)
  return _python_number(candidates[i]), _python_number(candidates[j])


def summarize(scores: Sequence[float], thresholds: Sequence[float], image_hw: ImageSizes = (256, 256)) -> dict:
  """Level counts and mean tokens of a threshold choice (for logs and the thresholds file); ``image_size`` is the
  one size tokens were counted at, or "each image's own"."""
  return {"thresholds": list(check_thresholds(thresholds)), "level_counts": level_counts(scores, thresholds),
          "mean_tokens": mean_tokens(scores, thresholds, image_hw),
          "image_size": [int(v) for v in image_hw] if _uniform(image_hw) else "each image's own",
          "num_images": int(np.asarray(scores).size)}
