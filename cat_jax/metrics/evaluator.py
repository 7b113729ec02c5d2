"""One object that accumulates rFID, LPIPS, PSNR and SSIM over batches, per level and overall.

Protocol (what the numbers mean):
- Inputs are NHWC images in [-1, 1], originals and their reconstructions. Both are clipped to [-1, 1]
  and, with ``quantize=True`` (default), rounded to 8-bit levels first, as images written to PNG are:
  this is what pytorch-fid sees when run on saved files and what published tokenizer evaluations do.
- PSNR and SSIM are per image (``cat_jax.metrics.image_quality``: scikit-image's values on the same
  images as uint8 [0, 255], with the Gaussian-window SSIM settings of the literature) and averaged
  over images. Each image's PSNR is capped at ``image_quality.PSNR_MAX_DB`` (50 dB; scikit-image gives
  ``inf`` for an exact match), so a few exactly reconstructed flat images cannot dominate the mean.
- LPIPS is the mean of ``lpips_fn(originals, reconstructions)``, a (B,) distance on [-1, 1] images.
- ``measures``: further full-reference measures of ``image_quality.MEASURES`` that need no weights (MS-SSIM,
  HaarPSI, GMSD), per image on the same 8-bit images (``image_quality.qualities``) and averaged over images.
- ``extras``: per-image values the caller measured itself (the train loop's L1, the share of images keeping the
  code), given in ``Measurements.measures`` and averaged per level like the measures.
- rFID is the FID between the Inception features of the originals and those of the reconstructions,
  from streaming float64 statistics (``cat_jax.metrics.fid``); it needs at least 2 images.

Keys of ``result()``: ``{metric}/level{k}`` for every level that received images and ``{metric}/all``
over all of them, for metric in psnr, ssim, each of ``measures`` and ``extras``, lpips (with ``lpips_fn``), rfid (with
``inception_fn``), num_images, and tokens_per_image (when ``update`` was given token counts).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from cat_jax import levels
from cat_jax.metrics import fid as fid_lib
from cat_jax.metrics import image_quality
from cat_jax.metrics.image_quality import quantize_to_uint8_levels

ImagesFn = Callable[[jax.Array], Any]
PairFn = Callable[[jax.Array, jax.Array], Any]


@jax.jit
def _psnr(x: jax.Array, y: jax.Array) -> jax.Array:
  return image_quality.psnr(x, y, value_range=(-1.0, 1.0), max_db=image_quality.PSNR_MAX_DB)


_ssim = jax.jit(functools.partial(image_quality.ssim, value_range=(-1.0, 1.0)))


_qualities = jax.jit(image_quality.qualities, static_argnums=0)


@dataclasses.dataclass
class _Sums:
  """Per-level running sums; arrays of shape (NUM_LEVELS,), float64 / int64."""
  num_images: np.ndarray
  psnr: np.ndarray
  ssim: np.ndarray
  lpips: np.ndarray
  tokens: np.ndarray
  images_with_tokens: np.ndarray
  images_with_ssim: np.ndarray
  measures: np.ndarray  # (number of further measures, NUM_LEVELS)

  @classmethod
  def zeros(cls, num_measures: int = 0) -> "_Sums":
    f = lambda: np.zeros((levels.NUM_LEVELS,), np.float64)
    i = lambda: np.zeros((levels.NUM_LEVELS,), np.int64)
    return cls(i(), f(), f(), f(), f(), i(), i(), np.zeros((num_measures, levels.NUM_LEVELS), np.float64))

  def merge(self, other: "_Sums") -> "_Sums":
    return _Sums(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


@dataclasses.dataclass
class Measurements:
  """Per-image numbers of one batch of (original, reconstruction) pairs (``ReconstructionEvaluator.measure``):
  (B,) PSNR, SSIM (None on images smaller than its window) and LPIPS (None without ``lpips_fn``), (B, D) float32 Inception features of the originals and of
  the reconstructions (None without ``inception_fn``)."""
  psnr: np.ndarray
  ssim: np.ndarray | None
  lpips: np.ndarray | None = None
  real_features: np.ndarray | None = None
  fake_features: np.ndarray | None = None
  measures: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)  # further measures, (B,) each

  def take(self, rows: Any) -> "Measurements":
    """The numbers of ``rows`` (indices or a boolean mask) only, e.g. a padded batch's real images."""
    return Measurements(**{f.name: _take(getattr(self, f.name), rows) for f in dataclasses.fields(Measurements)})

  @staticmethod
  def pick(per_level: "list[Measurements]", level: np.ndarray) -> "Measurements":
    """Image i's numbers from ``per_level[level[i]]``: the measurements of a setting that chose a level per image."""
    rows = np.arange(len(level))
    fields = {}
    for field in dataclasses.fields(Measurements):
      values = [getattr(m, field.name) for m in per_level]
      if field.name == "measures":
        fields[field.name] = {k: np.stack([v[k] for v in values])[level, rows] for k in values[0]}
      else:
        fields[field.name] = None if values[0] is None else np.stack(values)[level, rows]
    return Measurements(**fields)


def _take(value: Any, rows: Any) -> Any:
  if value is None:
    return None
  if isinstance(value, dict):
    return {k: v[rows] for k, v in value.items()}
  return value[rows]


class ReconstructionEvaluator:
  """Accumulates reconstruction metrics over batches; see the module docstring for the protocol.

  Args:
    inception_fn: images in [-1, 1] NHWC -> (B, D) FID features (``load_inception(path)``); without
      it rFID is omitted.
    lpips_fn: (originals, reconstructions) in [-1, 1] -> (B,) LPIPS distances; without it LPIPS is
      omitted.
    quantize: round images to 8-bit levels before measuring (the published protocol).
    measures: further measures of ``image_quality.MEASURES`` (PSNR and SSIM are always measured).
    extras: names of per-image values the caller adds itself (``add`` finds them in ``Measurements.measures``).

  ``per_image`` keeps every image's PSNR, SSIM (and LPIPS) in the order of ``update`` calls, for confidence
  intervals and breakdowns (``cat_jax.evaluate``).
  """

  def __init__(self, inception_fn: ImagesFn | None = None, lpips_fn: PairFn | None = None, *,
               quantize: bool = True, measures: tuple[str, ...] = (), extras: tuple[str, ...] = ()):
    self.inception_fn = inception_fn
    self.lpips_fn = lpips_fn
    self.quantize = quantize
    self.measures = tuple(m for m in measures if m not in ("psnr", "ssim"))  # those two are always measured
    for m in self.measures:
      if m not in image_quality.MEASURES:
        raise ValueError(f"unknown measure {m!r}; the measures are {', '.join(image_quality.MEASURES)}")
    self.extras = tuple(extras)
    self._summed = self.measures + self.extras  # averaged per level from Measurements.measures
    self.reset()

  def reset(self) -> None:
    self._sums = _Sums.zeros(len(self._summed))
    self.per_image: dict[str, list[float]] = {"psnr": [], "ssim": [], "lpips": [], **{m: [] for m in self._summed}}
    # FID statistics of the originals and of the reconstructions, created on first use: one per level, then one of
    # every image (slot NUM_LEVELS) accumulated batch by batch, not merged from the levels, so that evaluators fed the
    # same originals in the same order hold bit-identical real statistics and can share their square root.
    self._real: list[fid_lib.FidStatistics | None] = [None] * (levels.NUM_LEVELS + 1)
    self._fake: list[fid_lib.FidStatistics | None] = [None] * (levels.NUM_LEVELS + 1)

  def update(self, originals: Any, reconstructions: Any, level: int | Any,
             num_tokens: int | Any | None = None) -> None:
    """Adds a batch.

    Args:
      originals, reconstructions: (B, H, W, C) in [-1, 1], numpy or jax.
      level: the level of every image (int) or of each image ((B,) ints).
      num_tokens: latent tokens spent on each image (int or (B,)), e.g. ``levels.num_tokens``.
    """
    self.add(self.measure(originals, reconstructions), level, num_tokens)

  def measure(self, originals: Any, reconstructions: Any, real_features: np.ndarray | None = None) -> Measurements:
    """Every per-image number of a batch, without adding it (``add`` does): several settings that pick the same
    reconstructions can share one measurement. ``real_features``: the originals' Inception features when already
    measured (they do not depend on the reconstructions)."""
    x = jnp.asarray(originals, jnp.float32)
    y = jnp.asarray(reconstructions, jnp.float32)
    if x.shape != y.shape or x.ndim != 4:
      raise ValueError(f"expected two NHWC batches of one shape, got {x.shape} and {y.shape}")
    batch = x.shape[0]
    if self.quantize:
      x, y = quantize_to_uint8_levels(x), quantize_to_uint8_levels(y)
    else:
      x, y = jnp.clip(x, -1.0, 1.0), jnp.clip(y, -1.0, 1.0)
    psnr, ssim = np.asarray(_psnr(x, y), np.float64), None
    if min(x.shape[1:3]) >= image_quality.MEASURES["ssim"].min_side:  # else left out, as the train loop leaves it out
      ssim = np.asarray(_ssim(x, y), np.float64)
    dist = feats_fake = None
    if self.lpips_fn is not None:
      dist = np.asarray(self.lpips_fn(x, y), np.float64).reshape(-1)
      if dist.shape != (batch,):
        raise ValueError(f"lpips_fn must return ({batch},) distances, got shape {dist.shape}")
    if self.inception_fn is not None:
      if real_features is None:
        real_features = np.asarray(self.inception_fn(x), np.float32)
      feats_fake = np.asarray(self.inception_fn(y), np.float32)
    further = {}
    if self.measures:
      further = {k: np.asarray(v, np.float64) for k, v in _qualities(self.measures, x, y).items()}
    return Measurements(psnr, ssim, dist, real_features if feats_fake is not None else None, feats_fake, further)

  def add(self, measured: Measurements, level: int | Any, num_tokens: int | Any | None = None) -> None:
    """Adds a batch's ``measure``-ments at ``level`` (int or (B,) ints) with ``num_tokens`` (int or (B,))."""
    batch = len(measured.psnr)
    per_image_level = self._per_image(level, batch, "level").astype(np.int64)
    for lv in np.unique(per_image_level):
      levels.check_level(int(lv))
    tokens = None if num_tokens is None else self._per_image(num_tokens, batch, "num_tokens").astype(np.float64)
    s = self._sums
    self.per_image["psnr"] += measured.psnr.tolist()
    np.add.at(s.num_images, per_image_level, 1)
    np.add.at(s.psnr, per_image_level, measured.psnr)
    if measured.ssim is not None:
      self.per_image["ssim"] += measured.ssim.tolist()
      np.add.at(s.ssim, per_image_level, measured.ssim)
      np.add.at(s.images_with_ssim, per_image_level, 1)
    for k, m in enumerate(self._summed):
      self.per_image[m] += measured.measures[m].tolist()
      np.add.at(s.measures[k], per_image_level, measured.measures[m])
    if measured.lpips is not None:
      self.per_image["lpips"] += measured.lpips.tolist()
      np.add.at(s.lpips, per_image_level, measured.lpips)
    if tokens is not None:
      np.add.at(s.tokens, per_image_level, tokens)
      np.add.at(s.images_with_tokens, per_image_level, 1)
    if measured.real_features is not None:
      feats_real = measured.real_features.astype(np.float64)
      feats_fake = measured.fake_features.astype(np.float64)
      slots = [(int(lv), per_image_level == lv) for lv in np.unique(per_image_level)]
      for slot, mask in slots + [(levels.NUM_LEVELS, slice(None))]:
        for stats, feats in ((self._real, feats_real), (self._fake, feats_fake)):
          if stats[slot] is None:
            stats[slot] = fid_lib.FidStatistics.zeros(feats.shape[-1])
          stats[slot].update(feats[mask])

  @staticmethod
  def _per_image(value: Any, batch: int, what: str) -> np.ndarray:
    arr = np.asarray(value)
    if arr.ndim == 0:
      return np.full((batch,), arr)
    if arr.shape != (batch,):
      raise ValueError(f"{what} must be a scalar or have shape ({batch},), got {arr.shape}")
    return arr

  def merge(self, other: "ReconstructionEvaluator") -> "ReconstructionEvaluator":
    """Adds ``other``'s accumulated state to this one (e.g. from another data shard, its images after these in
    ``per_image``); returns self."""
    self._sums = self._sums.merge(other._sums)
    for name, values in other.per_image.items():
      self.per_image[name] = self.per_image.get(name, []) + list(values)
    for mine, theirs in ((self._real, other._real), (self._fake, other._fake)):
      for lv, stats in enumerate(theirs):
        if stats is not None:
          mine[lv] = stats if mine[lv] is None else mine[lv].merge(stats)
    return self

  def __getstate__(self) -> dict:
    """What another process needs to ``merge`` this one (``parallel.allgather_objects``): the functions stay."""
    return {k: v for k, v in self.__dict__.items() if k not in ("inception_fn", "lpips_fn")}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state, inception_fn=None, lpips_fn=None)

  def sync_across_processes(self, allgather: Callable[[Any], list] | None = None) -> None:
    """Replaces the local state by every process's, merged in process order (call on every process): the sums, FID
    statistics and per-image values of all the images. ``allgather`` (object -> a copy of every process's, in
    order) defaults to ``parallel.allgather_objects``; tests pass their own."""
    if allgather is None and jax.process_count() == 1:
      return
    from cat_jax import parallel

    parts = (allgather or parallel.allgather_objects)(self)
    self.reset()
    for part in parts:
      self.merge(part)

  def result(self, fid_roots: dict | None = None) -> dict[str, float]:
    """The metrics so far as ``{'psnr/level0': ..., 'psnr/all': ..., ...}`` (Python floats).

    ``fid_roots``: a dict shared by evaluators of the same originals (``fid.fid_from_statistics``'s cache of the real
    covariance's square root); each rFID then costs one eigendecomposition instead of two.
    """
    s = self._sums
    out: dict[str, float] = {}
    groups = [(f"level{lv}", [lv]) for lv in range(levels.NUM_LEVELS) if s.num_images[lv] > 0]
    if groups:
      groups.append(("all", [lv for _, (lv,) in groups]))
    for name, lvs in groups:
      n = int(s.num_images[lvs].sum())
      out[f"num_images/{name}"] = n
      out[f"psnr/{name}"] = float(s.psnr[lvs].sum() / n)
      if s.images_with_ssim[lvs].sum() == n:
        out[f"ssim/{name}"] = float(s.ssim[lvs].sum() / n)
      for k, m in enumerate(self._summed):
        out[f"{m}/{name}"] = float(s.measures[k][lvs].sum() / n)
      if self.lpips_fn is not None:
        out[f"lpips/{name}"] = float(s.lpips[lvs].sum() / n)
      with_tokens = int(s.images_with_tokens[lvs].sum())
      if with_tokens:
        out[f"tokens_per_image/{name}"] = float(s.tokens[lvs].sum() / with_tokens)
      if self.inception_fn is not None and n >= 2:
        if name == "all" and len(lvs) == 1:  # the same statistics: skip a second eigendecomposition
          out[f"rfid/{name}"] = out[f"rfid/level{lvs[0]}"]
          continue
        slot = levels.NUM_LEVELS if name == "all" else lvs[0]
        out[f"rfid/{name}"] = fid_lib.fid_from_statistics(self._real[slot], self._fake[slot], fid_roots)
    return out

