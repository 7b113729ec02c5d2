"""The level of each image, the one place it is decided for ``Tokenizer.encode(levels=...)`` and ``encode --level``:
one level for all, the levels of a score manifest, a complexity scorer's score mapped through thresholds, a per-image
quality target (the coarsest level whose reconstruction reaches a PSNR), or what more tokens buy each image (its
quality at every level, measured or predicted, chosen by ``complexity.allocation``: within a token budget, for a mean
quality, or at a price per token).

  assign = LevelAssigner(scorer=JpegScorer(image_size=None), thresholds=(1.2, 2.5))
  levels = assign(ids, images)  # (N,) int32 level indices; images in [-1, 1], HWC
  assign = LevelAssigner(qualities=tok.level_predictor.predict_quality, measure="haarpsi", budget_tokens=256)
  latents = tok.encode(images, levels=LevelAssigner(target_psnr=30))  # the tokenizer lends its reconstructions

A tokenizer's own knob-free ``levels="auto"`` is an ``AutoLevels`` saved in its ``config.json``; ``auto_assigner``
turns it into a ``LevelAssigner``.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cat_jax import levels as L
from cat_jax.complexity import thresholds as complexity_thresholds


def score_images(scorer: Any, ids: Sequence[str], images: Sequence[np.ndarray]) -> list[float]:
  """``scorer``'s score of each image ([-1, 1] HWC arrays): the whole batch at once by a scorer with ``scores(images)``
  (JPEG, MSE, the level predictor), item by item by one with only ``score(item)`` (the caption LLM)."""
  from cat_jax.data.preprocess import from_model_range

  if hasattr(scorer, "scores"):
    return [float(s) for s in scorer.scores(images)]
  return [float(scorer.score({"id": str(i), "image": from_model_range(x)})["score"]) for i, x in zip(ids, images)]


def quality_table(images: Sequence[np.ndarray], reconstruct, measures: Sequence[str] = ("psnr",)
                  ) -> dict[str, np.ndarray]:
  """{measure: (N, 3)} each image's ([-1, 1] HWC, any sizes) quality at each level, measured on its reconstruction
  (``reconstruct(images, level)``) as every report measures it (``image_quality.quality``: 8-bit levels, PSNR capped
  at 50 dB) and oriented so that higher is better (a distortion such as GMSD negated: ``image_quality.oriented``)."""
  from cat_jax.metrics import image_quality

  table = {m: np.zeros((len(images), L.NUM_LEVELS)) for m in measures}
  by_shape: dict[tuple, list[int]] = {}
  for i, x in enumerate(images):  # one batched measurement per image size
    by_shape.setdefault(np.shape(x), []).append(i)
  for level in range(L.NUM_LEVELS):
    recon = [np.asarray(r) for r in reconstruct(list(images), level)]
    for ks in by_shape.values():
      a, b = np.stack([images[k] for k in ks]), np.stack([recon[k] for k in ks])
      for m in measures:
        table[m][ks, level] = image_quality.oriented(m, np.asarray(image_quality.quality(m, a, b)))
  return table


def coarsest_level_meeting(images: Sequence[np.ndarray], target_psnr: float, reconstruct, *,
                           with_missed: bool = False):
  """For each image ([-1, 1] HWC), the coarsest level whose reconstruction reaches ``target_psnr`` dB (the reported
  PSNR: 8-bit levels, capped at 50 dB), 8x when none does. Exact: reconstructs at 32x, then the images that missed
  at 16x; 8x needs no check. ``reconstruct(images, level)`` -> their reconstructions. Costs one to two
  reconstructions per image (on top of the encode at the chosen level). ``with_missed``: also return which images
  no level brings to the target (8x is then measured for the images 16x missed)."""
  from cat_jax.metrics.image_quality import reported_psnr

  levels = np.zeros(len(images), np.int32)
  todo = list(range(len(images)))
  for level in range(L.NUM_LEVELS - 1, -1 if with_missed else 0, -1):
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
  if with_missed:
    missed = np.zeros(len(images), bool)
    missed[todo] = True
    return levels, missed
  return levels


@dataclasses.dataclass(frozen=True)
class Assignment:
  """Levels (N,) int32, and per image whether no level reached the target asked for (None: there was none; for a
  mean-quality target every image is flagged when the mean is out of reach)."""

  levels: np.ndarray
  missed_target: np.ndarray | None = None

  @property
  def num_missed(self) -> int:
    return 0 if self.missed_target is None else int(np.sum(self.missed_target))


@dataclasses.dataclass(frozen=True, eq=False)
class LevelAssigner:
  """How levels are chosen, as one frozen object: exactly one of

  - ``level``: one level for all (an index or factor, ``cat_jax.levels.parse_level``);
  - ``manifest``: a score manifest's levels (a path or an {id: level} mapping; images are named by their ids);
  - ``scorer`` (``cat_jax.complexity.scorers``: ``.method`` and batched ``.scores(images)`` or per-item
    ``.score({"id", "image"})``) with ``thresholds`` (default ``(3, 6)`` for the LLM methods; raw scores such as JPEG
    bits per pixel need explicit ones) or ``budget_tokens`` (thresholds chosen per call so that its images average
    that many tokens at their own sizes);
  - ``target_psnr``: per image the coarsest level whose reconstruction reaches it (``coarsest_level_meeting``; the
    reconstructions come from ``assign(..., reconstruct=)``, which ``Tokenizer.encode`` passes);
  - ``qualities`` (``images -> {measure: (N, 3)}``: measured, ``quality_table``, or a quality predictor's
    ``predict_quality``) with ``measure`` and one of ``price`` (per image, quality per token per 256x256 pixels:
    ``allocation.at_price``), ``budget_tokens`` (the best mean quality within that many mean tokens at the images' own
    sizes: ``allocation.best_within_budget``) or ``target_quality`` (the fewest tokens for that mean quality:
    ``allocation.fewest_tokens_for``).

  ``assign(ids, images)`` returns an ``Assignment`` (levels, and which images no level brings to a target);
  calling the assigner returns the levels alone."""

  level: int | str | None = None
  manifest: str | os.PathLike | Mapping[str, Any] | None = None
  scorer: Any = None
  thresholds: Sequence[float] | None = None
  budget_tokens: float | None = None
  target_psnr: float | None = None
  qualities: Callable[[Sequence[np.ndarray]], Mapping[str, np.ndarray]] | None = None
  measure: str | None = None
  price: float | None = None
  target_quality: float | None = None

  def __post_init__(self):
    given = [name for name in ("level", "manifest", "scorer", "target_psnr", "qualities")
             if getattr(self, name) is not None]
    if len(given) != 1:
      raise ValueError(f"give exactly one of a level, a manifest, a scorer, a target PSNR or qualities, got "
                       f"{given or 'none'}")
    mode = given[0]
    allowed = {"scorer": {"thresholds", "budget_tokens"},
               "qualities": {"measure", "price", "budget_tokens", "target_quality"}}.get(mode, set())
    extra = [name for name in ("thresholds", "budget_tokens", "measure", "price", "target_quality")
             if getattr(self, name) is not None and name not in allowed]
    if extra:
      raise ValueError(f"{', '.join(extra)} only apply to levels from a scorer's scores (thresholds, budget_tokens) or "
                       f"from qualities (measure, price, budget_tokens, target_quality), not from a {mode}")
    normal = {name: float(getattr(self, name)) for name in ("budget_tokens", "target_psnr", "price", "target_quality")
              if getattr(self, name) is not None}
    if mode == "level":
      normal["level"] = L.parse_level(self.level)
    elif mode == "manifest":
      if isinstance(self.manifest, Mapping):
        normal["manifest"] = {str(k): L.parse_level(v) for k, v in self.manifest.items()}
      else:
        from cat_jax.data import load_levels
        normal["manifest"] = load_levels(os.fspath(self.manifest))
    elif mode == "scorer":
      if self.thresholds is not None and self.budget_tokens is not None:
        raise ValueError("give thresholds or budget_tokens, not both")
      thresholds = self.thresholds
      if thresholds is None and self.budget_tokens is None:
        if getattr(self.scorer, "method", None) not in complexity_thresholds.LLM_METHODS:
          raise ValueError(f"scorer {getattr(self.scorer, 'method', self.scorer)!r} gives raw scores: pass thresholds="
                           "(low, high) (e.g. from `python -m cat_jax.score`'s .thresholds.json)")
        thresholds = complexity_thresholds.DEFAULT_LLM_THRESHOLDS
      if thresholds is not None:
        normal["thresholds"] = tuple(float(t) for t in complexity_thresholds.check_thresholds(tuple(thresholds)))
    elif mode == "qualities":
      rules = [n for n in ("price", "budget_tokens", "target_quality") if getattr(self, n) is not None]
      if len(rules) != 1 or not self.measure:
        raise ValueError(f"levels from qualities need a measure and exactly one of price, budget_tokens or "
                         f"target_quality (got measure={self.measure!r}, {rules or 'no rule'})")
    for name, value in normal.items():
      object.__setattr__(self, name, value)

  def require(self, ids: Sequence[str], where: str = "the manifest") -> None:
    """Raises ValueError unless a manifest assigner knows every id (no-op for the others)."""
    if self.manifest is None:
      return
    missing = [i for i in ids if str(i) not in self.manifest]
    if missing:
      raise ValueError(f"{len(missing)} of {len(ids)} images are not in {where}, e.g. {missing[:3]}")

  def __call__(self, ids: Sequence[str], images: Sequence[np.ndarray], **kwargs) -> np.ndarray:
    """(N,) int32 level indices of the images named ``ids``."""
    return self.assign(ids, images, **kwargs).levels

  def assign(self, ids: Sequence[str], images: Sequence[np.ndarray], *, reconstruct=None) -> Assignment:
    """The levels of the images named ``ids`` ([-1, 1] HWC arrays) and which of them no level brings to a target.
    ``reconstruct(images, level)``: their reconstructions, for ``target_psnr``."""
    if self.target_psnr is not None:
      if reconstruct is None:
        raise ValueError("a target PSNR needs the tokenizer's reconstruct(images, level): pass the assigner to "
                         "Tokenizer.encode(levels=...)")
      levels, missed = coarsest_level_meeting(images, self.target_psnr, reconstruct, with_missed=True)
      return Assignment(levels, missed)
    if self.qualities is not None:
      return self.from_qualities(self.qualities(images), [np.shape(x)[:2] for x in images])
    if self.level is not None:
      return Assignment(np.full(len(ids), self.level, np.int32))
    if self.manifest is not None:
      self.require(ids)
      return Assignment(np.array([self.manifest[str(i)] for i in ids], np.int32))
    scores = score_images(self.scorer, ids, images)
    thresholds = self.thresholds
    if self.budget_tokens is not None:  # tokens as encode spends them: at each image's own size
      thresholds = complexity_thresholds.budget_thresholds(scores, self.budget_tokens,
                                                           image_hw=[tuple(np.shape(x)[:2]) for x in images])
    return Assignment(complexity_thresholds.levels_for_scores(scores, thresholds))

  def from_qualities(self, table: Mapping[str, np.ndarray], image_sizes: Sequence[tuple[int, int]]) -> Assignment:
    """The levels a qualities assigner chooses from a table it has (``{measure: (N, 3)}``, e.g. predicted already)
    for images of these (H, W)."""
    from cat_jax.complexity import allocation

    if self.measure not in table:
      raise ValueError(f"no {self.measure!r} qualities to choose levels by (there are {sorted(table)})")
    q = np.asarray(table[self.measure], np.float64)
    if self.price is not None:
      return Assignment(allocation.at_price(q, allocation.rate_table(len(q)), self.price))
    tokens = allocation.tokens_table(list(image_sizes))
    if self.budget_tokens is not None:
      return Assignment(allocation.best_within_budget(q, tokens, self.budget_tokens))
    levels = allocation.fewest_tokens_for(q, tokens, self.target_quality)
    missed = allocation.mean_of(q, levels) < self.target_quality - 1e-9
    return Assignment(levels, np.full(len(levels), missed))


@dataclasses.dataclass(frozen=True)
class AutoLevels:
  """A tokenizer's knob-free ``levels="auto"``, saved in its ``config.json`` as ``auto_levels`` (``to_dict``).

  ``rule="price"`` (a quality predictor's, ``price_auto_levels``): each image the level whose predicted ``measure``
  less ``price`` per token per 256x256 pixels is highest. ``rule="thresholds"`` (``calibrate_auto_levels``): a score
  (``scorer``: the level predictor's or JPEG bits per pixel at ``image_size``) through calibrated ``thresholds``.
  ``budget_tokens``: the mean tokens it was calibrated at; the rest records the calibration."""

  rule: str
  scorer: str
  image_size: int
  budget_tokens: float | None = None
  measure: str | None = None
  price: float | None = None
  thresholds: tuple[float, float] | None = None
  teacher: str | None = None
  calibration_images: int | None = None
  level_counts: tuple[int, ...] | None = None
  source: str | None = None  # the calibration data (scripts/calibrate_auto_levels.py)

  RULES = ("price", "thresholds")

  def __post_init__(self):
    if self.rule not in self.RULES:
      raise ValueError(f"unknown auto_levels rule {self.rule!r} (this version knows {self.RULES})")
    if self.rule == "price" and (self.measure is None or self.price is None):
      raise ValueError("a price rule needs a measure and a price")
    if self.rule == "thresholds" and self.thresholds is None:
      raise ValueError("a threshold rule needs thresholds")

  @classmethod
  def from_dict(cls, block: Mapping[str, Any]) -> "AutoLevels":
    """What ``config.json``'s ``auto_levels`` holds (a threshold rule has no ``rule`` key)."""
    block = dict(block.to_dict() if hasattr(block, "to_dict") else block)
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(block) - fields)
    if unknown:
      raise ValueError(f"auto_levels has keys this version does not know: {unknown}")
    block.setdefault("rule", "thresholds")
    for name in ("thresholds", "level_counts"):
      if block.get(name) is not None:
        block[name] = tuple(block[name])
    return cls(**block)

  def to_dict(self) -> dict[str, Any]:
    """The ``auto_levels`` block of ``config.json`` (JSON types; unset fields left out, a threshold rule without
    ``rule``, as files have always been written)."""
    out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
    if self.rule == "thresholds":
      del out["rule"]
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items() if v is not None}


def calibrate_auto_levels(images: Sequence[np.ndarray], *, image_size: int, budget_tokens: float | None = None,
                          predictor: Any = None) -> AutoLevels:
  """A tokenizer's knob-free ``levels="auto"`` by thresholds: scores of ``images`` ([-1, 1] HWC, a sample of the
  training distribution) by the level ``predictor`` (``cat_jax.complexity.predictor.LevelPredictor``), or without one
  JPEG bits per pixel at ``image_size``, with thresholds such that the images average ``budget_tokens`` (default: the
  fixed-16x count at ``image_size``)."""
  hw = (int(image_size), int(image_size))
  budget = float(L.num_tokens(hw, 1) if budget_tokens is None else budget_tokens)
  scorer = _auto_scorer("predictor" if predictor is not None else "jpeg", int(image_size), predictor)
  scores = score_images(scorer, [str(k) for k in range(len(images))], images)
  thresholds = complexity_thresholds.budget_thresholds(scores, budget, image_hw=hw)
  levels = complexity_thresholds.levels_for_scores(scores, thresholds)
  return AutoLevels(rule="thresholds", scorer=scorer.method, image_size=int(image_size),
                    thresholds=tuple(float(t) for t in thresholds), budget_tokens=budget,
                    calibration_images=len(images),
                    level_counts=tuple(np.bincount(levels, minlength=L.NUM_LEVELS).tolist()),
                    teacher=predictor.teacher if predictor is not None else None)


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


def auto_assigner(auto: AutoLevels, *, predictor: Any = None, thresholds: Sequence[float] | None = None,
                  budget_tokens: float | None = None) -> LevelAssigner:
  """The ``LevelAssigner`` of a tokenizer's ``AutoLevels``. A price rule gives each image the level its predicted
  qualities earn at the saved price, or with ``budget_tokens`` the best predicted mean quality within that budget at
  the images' own sizes. A threshold rule maps a score through its calibrated thresholds, which ``thresholds`` or
  ``budget_tokens`` (at the images' own sizes) replace."""
  if auto.rule == "price":
    if predictor is None or getattr(predictor, "qualities", None) is None:
      raise ValueError("auto_levels prices levels by predicted qualities but the tokenizer has no quality predictor "
                       "(its folder lacks predictor.json / predictor.safetensors)")
    if thresholds is not None:
      raise ValueError("thresholds apply to score thresholds; this tokenizer's levels='auto' prices what more tokens "
                       "buy each image: pass budget_tokens= or price= instead")
    rule = {"budget_tokens": budget_tokens} if budget_tokens is not None else {"price": auto.price}
    return LevelAssigner(qualities=predictor.predict_quality, measure=auto.measure, **rule)
  scorer = _auto_scorer(auto.scorer, auto.image_size, predictor)
  if thresholds is None and budget_tokens is None:
    thresholds = auto.thresholds
  return LevelAssigner(scorer=scorer, thresholds=thresholds, budget_tokens=budget_tokens)


def price_auto_levels(predictor: Any) -> AutoLevels:
  """The ``AutoLevels`` of a quality predictor: each image the level that maximises its predicted quality in the
  predictor's first measure minus ``price`` per token per 256x256 pixels (``allocation.at_price``), the price
  calibrated when the predictor was trained (the fixed-16x mean tokens on its training images)."""
  if getattr(predictor, "qualities", None) is None or predictor.price is None:
    raise ValueError("a price rule needs a quality predictor with a calibrated price (python -m "
                     "cat_jax.train_predictor --config.teacher=quality:TOKENIZER)")
  return AutoLevels(rule="price", scorer="predictor", measure=predictor.measures[0], price=float(predictor.price),
                    budget_tokens=predictor.budget_tokens, image_size=int(predictor.image_size),
                    teacher=predictor.teacher)


def predictor_auto_levels(predictor: Any) -> AutoLevels:
  """The ``AutoLevels`` of a score predictor's own thresholds (calibrated when it was trained)."""
  if predictor.thresholds is None:
    raise ValueError("the predictor has no calibrated thresholds: pass images= to calibrate them here")
  calibration = (predictor.info or {}).get("calibration", {})
  counts = calibration.get("level_counts")
  return AutoLevels(rule="thresholds", scorer="predictor", image_size=int(predictor.image_size),
                    teacher=predictor.teacher, thresholds=tuple(float(t) for t in predictor.thresholds),
                    budget_tokens=predictor.budget_tokens, calibration_images=calibration.get("images"),
                    level_counts=None if counts is None else tuple(counts))
