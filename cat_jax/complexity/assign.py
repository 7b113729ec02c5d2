"""The level of each image, the one place it is decided for ``Tokenizer.encode(levels=...)`` and ``encode --level``:
one level for all, the levels of a score manifest, a complexity scorer's score mapped through thresholds, or a
quality target (the coarsest level whose reconstruction reaches a PSNR).

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
  """``scorer``'s score of each image ([-1, 1] HWC arrays, given to the scorer as uint8 as scorers take them; a
  scorer with a batched ``scores(images)``, the level predictor, takes them all at once)."""
  from cat_jax.data.preprocess import from_model_range

  if hasattr(scorer, "scores"):
    return list(scorer.scores(images))
  return [float(scorer.score({"id": str(i), "image": from_model_range(x)})["score"]) for i, x in zip(ids, images)]


def coarsest_level_meeting(images: Sequence[np.ndarray], target_psnr: float, reconstruct) -> np.ndarray:
  """For each image ([-1, 1] HWC), the coarsest level whose reconstruction reaches ``target_psnr`` dB (the reported
  PSNR: 8-bit levels, capped at 50 dB), 8x when none does. Exact: reconstructs at 32x, then the images that missed
  at 16x; 8x needs no check. ``reconstruct(images, level)`` -> their reconstructions. Costs one to two
  reconstructions per image (on top of the encode at the chosen level)."""
  from cat_jax.metrics.image_quality import reported_psnr

  levels = np.zeros(len(images), np.int32)
  todo = list(range(len(images)))
  for level in range(L.NUM_LEVELS - 1, 0, -1):
    if not todo:
      break
    recon = [np.asarray(r) for r in reconstruct([images[i] for i in todo], level)]
    psnr = np.empty(len(todo))
    by_shape: dict[tuple, list[int]] = {}
    for k, i in enumerate(todo):  # one batched PSNR per image size
      by_shape.setdefault(images[i].shape, []).append(k)
    for ks in by_shape.values():
      psnr[ks] = np.asarray(reported_psnr(np.stack([images[todo[k]] for k in ks]), np.stack([recon[k] for k in ks])))
    met = (psnr >= target_psnr).tolist()
    levels[[i for i, ok in zip(todo, met) if ok]] = level
    todo = [i for i, ok in zip(todo, met) if not ok]
  return levels


class LevelAssigner:
  """Exactly one of ``level`` (an index or factor, ``cat_jax.levels.parse_level``), ``manifest`` (a path or an
  {id: level} mapping), ``scorer`` (``.method`` and ``.score({"id", "image"}) -> {"score": ...}``, see
  ``cat_jax.complexity.scorers``) with ``thresholds`` (default ``(3, 6)`` for the LLM methods; raw scores such as
  JPEG bits per pixel need explicit ones) or ``budget_tokens`` (thresholds chosen per call so its images average
  that many tokens at ``image_size``), or ``target_psnr`` with ``reconstruct(images, level)`` (a tokenizer's:
  ``coarsest_level_meeting``)."""

  def __init__(self, *, level: Any = None, manifest: str | os.PathLike | Mapping[str, Any] | None = None,
               scorer: Any = None, thresholds: Sequence[float] | None = None, target_psnr: float | None = None,
               reconstruct=None, budget_tokens: float | None = None, image_size: int | None = None):
    given = [name for name, value in (("level", level), ("manifest", manifest), ("scorer", scorer),
                                      ("target_psnr", target_psnr)) if value is not None]
    if len(given) != 1:
      raise ValueError(f"give exactly one of a level, a manifest, a scorer or a target PSNR, got {given or 'none'}")
    self.target_psnr = None if target_psnr is None else float(target_psnr)
    self.reconstruct = reconstruct
    if target_psnr is not None and reconstruct is None:
      raise ValueError("a target PSNR needs the tokenizer's reconstruct(images, level)")
    self.level = None if level is None else L.parse_level(level)
    self.manifest = None
    if manifest is not None:
      if isinstance(manifest, Mapping):
        self.manifest = {str(k): L.parse_level(v) for k, v in manifest.items()}
      else:
        from cat_jax.data import load_levels
        self.manifest = load_levels(os.fspath(manifest))
    self.scorer = scorer
    if (thresholds is not None or budget_tokens is not None) and scorer is None:
      raise ValueError("thresholds and budget_tokens only apply to levels from a scorer's scores")
    if thresholds is not None and budget_tokens is not None:
      raise ValueError("give thresholds or budget_tokens, not both")
    self.budget_tokens = None if budget_tokens is None else float(budget_tokens)
    self.image_size = image_size
    if self.budget_tokens is not None and not image_size:
      raise ValueError("budget_tokens needs the image_size its token counts are at")
    if scorer is not None and thresholds is None and budget_tokens is None:
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
    if self.target_psnr is not None:
      return coarsest_level_meeting(images, self.target_psnr, self.reconstruct)
    scores = score_images(self.scorer, ids, images)
    thresholds = self.thresholds
    if self.budget_tokens is not None:
      hw = (int(self.image_size), int(self.image_size))
      thresholds = complexity_thresholds.budget_thresholds(scores, self.budget_tokens, image_hw=hw)
    return complexity_thresholds.levels_for_scores(scores, thresholds)


def calibrate_auto_levels(images: Sequence[np.ndarray], *, image_size: int, budget_tokens: float | None = None,
                          predictor: Any = None) -> dict[str, Any]:
  """A tokenizer's knob-free ``levels="auto"``: scores of ``images`` ([-1, 1] HWC, a sample of the training
  distribution) by the level ``predictor`` (``cat_jax.complexity.predictor.LevelPredictor``), or without one JPEG bits
  per pixel at ``image_size``, with thresholds such that the images average ``budget_tokens`` (default: the
  fixed-16x count at ``image_size``). The dict goes into the tokenizer's ``config.json`` as ``auto_levels``;
  ``auto_assigner`` turns it back into a ``LevelAssigner``."""
  hw = (int(image_size), int(image_size))
  budget = float(L.num_tokens(hw, 1) if budget_tokens is None else budget_tokens)
  scorer = _auto_scorer("predictor" if predictor is not None else "jpeg", int(image_size), predictor)
  scores = score_images(scorer, [str(k) for k in range(len(images))], images)
  thresholds = complexity_thresholds.budget_thresholds(scores, budget, image_hw=hw)
  levels = complexity_thresholds.levels_for_scores(scores, thresholds)
  block = {"scorer": scorer.method, "image_size": int(image_size), "thresholds": [float(t) for t in thresholds],
           "budget_tokens": budget, "calibration_images": len(images),
           "level_counts": np.bincount(levels, minlength=L.NUM_LEVELS).tolist()}
  if predictor is not None:
    block["teacher"] = predictor.teacher
  return block


def _auto_scorer(name: str, image_size: int, predictor: Any = None):
  from cat_jax.complexity.scorers import JpegScorer

  if name == "jpeg":
    return JpegScorer(image_size=image_size)
  if name == "predictor":
    if predictor is None:
      raise ValueError("auto_levels uses a level predictor but the tokenizer has none (its folder lacks "
                       "predictor.json / predictor.safetensors)")
    from cat_jax.complexity.predictor import PredictorScorer
    return PredictorScorer(predictor, image_size=None)
  raise ValueError(f"unknown auto_levels scorer {name!r} (this version knows 'predictor' and 'jpeg')")


def auto_assigner(auto_levels: Mapping[str, Any], *, predictor: Any = None, thresholds: Sequence[float] | None = None,
                  budget_tokens: float | None = None) -> LevelAssigner:
  """The ``LevelAssigner`` of a tokenizer's ``auto_levels`` (``calibrate_auto_levels``); ``thresholds`` or
  ``budget_tokens`` replace its calibrated thresholds."""
  size = int(auto_levels["image_size"])
  scorer = _auto_scorer(auto_levels.get("scorer"), size, predictor)
  if thresholds is None and budget_tokens is None:
    thresholds = tuple(auto_levels["thresholds"])
  return LevelAssigner(scorer=scorer, thresholds=thresholds, budget_tokens=budget_tokens, image_size=size)
