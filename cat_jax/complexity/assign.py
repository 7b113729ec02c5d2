"""The level of each image, the one place it is decided for ``Tokenizer.encode(levels=...)`` and ``encode --level``:
one level for all, the levels of a score manifest, or a complexity scorer's score mapped through thresholds.

  assign = LevelAssigner(scorer=JpegScorer(image_size=None), thresholds=(1.2, 2.5))
  levels = assign(ids, images)  # (N,) int32 level indices; images in [-1, 1], HWC
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import numpy as np

from cat_jax import levels as L
from cat_jax.complexity import thresholds as complexity_thresholds


def score_images(scorer: Any, ids: Sequence[str], images: Sequence[np.ndarray]) -> list[float]:
  """``scorer``'s score of each image ([-1, 1] HWC arrays, given to the scorer as uint8 as scorers take them)."""
  from cat_jax.data.preprocess import from_model_range

  return [float(scorer.score({"id": str(i), "image": from_model_range(x)})["score"]) for i, x in zip(ids, images)]


class LevelAssigner:
  """Exactly one of ``level`` (an index or factor, ``cat_jax.levels.parse_level``), ``manifest`` (a path or an
  {id: level} mapping) or ``scorer`` (``.method`` and ``.score({"id", "image"}) -> {"score": ...}``, see
  ``cat_jax.complexity.scorers``) with ``thresholds`` (default ``(3, 6)`` for the LLM methods; raw scores such as
  JPEG bits per pixel need explicit ones)."""

  def __init__(self, *, level: Any = None, manifest: str | os.PathLike | Mapping[str, Any] | None = None,
               scorer: Any = None, thresholds: Sequence[float] | None = None):
    given = [name for name, value in (("level", level), ("manifest", manifest), ("scorer", scorer))
             if value is not None]
    if len(given) != 1:
      raise ValueError(f"give exactly one of a level, a manifest or a scorer, got {given or 'none'}")
    self.level = None if level is None else L.parse_level(level)
    self.manifest = None
    if manifest is not None:
      if isinstance(manifest, Mapping):
        self.manifest = {str(k): L.parse_level(v) for k, v in manifest.items()}
      else:
        from cat_jax.data import load_levels
        self.manifest = load_levels(os.fspath(manifest))
    self.scorer = scorer
    if thresholds is not None and scorer is None:
      raise ValueError("thresholds only apply to levels from a scorer's scores")
    if scorer is not None and thresholds is None:
      if getattr(scorer, "method", None) not in complexity_thresholds.LLM_METHODS:
        raise ValueError(f"scorer {getattr(scorer, 'method', scorer)!r} gives raw scores: pass thresholds=(low, "
                         "high) (e.g. from `python -m cat_jax.score`'s .thresholds.json)")
      thresholds = complexity_thresholds.DEFAULT_LLM_THRESHOLDS
    self.thresholds = None if thresholds is None else tuple(float(t) for t in thresholds)

  def require(self, ids: Sequence[str], where: str = "the manifest") -> None:
    """Raises ValueError unless a manifest assigner knows every id (no-op for the others)."""
    if self.manifest is None:
      return
    missing = [i for i in ids if str(i) not in self.manifest]
    if missing:
      raise ValueError(f"{len(missing)} of {len(ids)} images are not in {where}, e.g. {missing[:3]}")

  def __call__(self, ids: Sequence[str], images: Sequence[np.ndarray]) -> np.ndarray:
    """(N,) int32 level indices of the images named ``ids``."""
    if self.level is not None:
      return np.full(len(ids), self.level, np.int32)
    if self.manifest is not None:
      self.require(ids)
      return np.array([self.manifest[str(i)] for i in ids], np.int32)
    return complexity_thresholds.levels_for_scores(score_images(self.scorer, ids, images), self.thresholds)
