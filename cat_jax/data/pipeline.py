"""grain pipelines: level-bucketed training batches and padded evaluation batches.

Training (``make_train_dataset`` / ``make_train_iterator``) defines one *global* data order, the same for any
number of processes:

  for each level with images: a stream of all that level's indices
      -> ``MapDataset.source`` -> ``shuffle(seed)`` -> ``repeat()`` (reshuffled every epoch)
  global batch k (B = global batch size = per-process batch size x process count):
      level d = the seeded level schedule's k-th entry, the j-th batch of that level (j: how many earlier
      batches had level d); its images are stream d's positions j*B ... j*B + B - 1, each read, decoded and
      randomly cropped with a generator seeded by (seed, level, stream position)
  -> an element-level ``MapDataset`` (element e = position e mod B of global batch e // B)
  -> ``grain.experimental.ElasticIterator``: process p of P takes positions p, p + P, p + 2P, ... of every global
     batch (P must divide B) and batches them -> ``mp_prefetch`` (worker processes) -> bad-image report.

So the sequence of global batches (their level, images and crops) depends only on the dataset, its level
assignment, the seed, the level weights and B, never on the process count or the worker count; within a
global batch only the assignment of images to processes changes with P. The iterator's state is one number,
the count of elements consumed globally, identical on every process: a checkpoint written by P processes
restores onto P' processes (``cat_jax.checkpoint`` reads any process's saved state when its own file is
missing), and the resumed run continues the same global sequence (keep B: another global batch size
continues after the same number of images, on a different sequence).

Every batch holds one level. The schedule depends only on the seed and the global per-level counts (or fixed
weights). Levels are drawn in rounds: a round holds each level as many times as its proportion, in a seeded
random order; with 'proportional' weights the proportions are the level's image counts. Within an epoch of a
level's stream every image of that level appears once, whatever process reads it.

A bad image (corrupt, truncated, too small, too large) is replaced by the next image of the same level's
shuffled stream, so batches keep their size; it is counted and logged by the main process
(``on_bad_image='skip'``), or the pipeline raises ``BadImageError`` with its path (``'raise'``); orbax saves
the iterator with ``grain.checkpoint.CheckpointSave`` (or ``cat_jax.checkpoint``'s elastic handler).

Evaluation (``make_eval_iterator``): no shuffle, no repeat, centre crop; batches grouped by
level (level 0 first), in index order within a level. Every batch has a ``'mask'``; with
``pad_last=True`` (the default, and required with several processes) the last batch of
each level is padded to ``batch_size`` with zero images and ``mask=False`` so every
process yields the same number of equally shaped batches; with ``pad_last=False`` the last
batch of a level is smaller. Bad images become masked-out slots.

Batches are dicts: ``'image'`` float32 (B, H, W, 3) in [-1, 1]; ``'level'`` np.int32 scalar,
the same for the whole batch; ``'id'`` str array (B,) ('' for padding); eval adds
``'mask'`` bool (B,). B is the per-process batch size.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from cat_jax.data.level_map import is_level_spelling, resolve_levels
from cat_jax.data.sources import source_ids
from cat_jax.data.preprocess import (DEFAULT_MAX_PIXELS, DEFAULT_MIN_SIZE, BadImageError,
                                     BadImageReport, PreprocessConfig, preprocess)
from cat_jax.levels import NUM_LEVELS, parse_level

logger = logging.getLogger(__name__)

LevelWeights = None | str | Sequence[float]
LEVEL_MODES = ("content", "all")
_SKIPPED = "_skipped"  # Batch key carrying bad-image reasons from workers to the reporter.
_NOTE_SEP = "\x00"  # Joins a training element's bad-image reasons into one string (batched as an array).
_MAX_REPLACEMENT_TRIES = 64


def process_index_and_count(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  """(this process's index, process count): JAX's unless given; checked."""
  import jax  # Lazily: grain workers unpickle this module and never need jax.

  pi = jax.process_index() if process_index is None else int(process_index)
  pc = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= pi < pc:
    raise ValueError(f"process_index must be in [0, process_count), got {pi} of {pc}")
  return pi, pc


def _read(source: Any, index: int) -> tuple[Any, str, str]:
  """(encoded image, id, path for messages) of record ``index``; read errors are bad images."""
  try:
    record = source[int(index)]
  except (OSError, ValueError) as e:
    raise BadImageError(f"{source!r}[{index}]", f"cannot read record ({type(e).__name__}: {e})") from e
  image_id = str(record["id"])
  return record["image"], image_id, str(record.get("path", image_id))


class _TrainElement:
  """map fn: global element e -> the preprocessed image at position e mod B of global batch e // B."""

  def __init__(self, source, config: PreprocessConfig, streams: Sequence[grain.MapDataset],
               levels: Sequence[int], counts: Sequence[int], schedule: LevelSchedule, *, global_batch: int,
               seed: int):
    # streams[d] holds level levels[d]; a bad image is replaced by the next ones of its stream, at most
    # _MAX_REPLACEMENT_TRIES (or the level's image count) tries.
    self._source = source
    self._config = config
    self._streams = streams  # per active level: the shuffled, repeated index stream
    self._levels = levels
    self._schedule = schedule
    self._global_batch = global_batch
    self._seed = seed
    self._tries = [min(n, _MAX_REPLACEMENT_TRIES) for n in counts]
    self._bad: set[int] = set()  # Per worker: indices known bad, not decoded twice.

  def __call__(self, element: int) -> dict[str, Any]:
    k, i = divmod(int(element), self._global_batch)
    d, j = self._schedule[k]
    level, stream = self._levels[d], self._streams[d]
    pos = j * self._global_batch + i  # position in the level's stream
    skipped = []
    for t in range(self._tries[d]):
      idx = int(stream[pos + t])
      if idx in self._bad:
        continue
      rng = np.random.default_rng([self._seed, level, pos, t])
      try:
        data, image_id, path = _read(self._source, idx)
        image = preprocess(data, self._config, path=path, rng=rng)
      except BadImageError as e:
        if self._config.on_bad_image == "raise":
          raise
        self._bad.add(idx)
        skipped.append(str(e))
        continue
      return {"image": image, "id": image_id, "level": np.int32(level), _SKIPPED: _NOTE_SEP.join(skipped)}
    raise BadImageError(
        f"level {level} stream position {pos}",
        f"{self._tries[d]} bad images in a row (last: {skipped[-1:]}); is the dataset readable?")


class _Collate:
  """Main-process map over the elastic iterator's default-stacked batches: one level scalar, no notes."""

  def __init__(self, report: BadImageReport):
    self.report = report

  def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
    levels = np.asarray(batch["level"])
    if levels.min() != levels.max():
      raise RuntimeError(f"a training batch mixes levels {sorted(set(levels.tolist()))}")
    notes = [n for joined in np.asarray(batch[_SKIPPED]).tolist() for n in joined.split(_NOTE_SEP) if n]
    if notes:
      self.report.add(notes)
    return {"image": batch["image"], "level": np.int32(levels[0]), "id": np.asarray(batch["id"])}


class LevelSchedule:
  """Selection map for ``select_from_datasets``: batch k -> (level dataset, batch index).

  Round r (``sum(proportions)`` batches) holds dataset d ``proportions[d]`` times in an
  order drawn from ``(seed, r)``; the batch index within dataset d is
  ``r * proportions[d] + (occurrences of d earlier in the round)``.
  """

  def __init__(self, proportions: Sequence[int], seed: int):
    proportions = [int(p) for p in proportions]
    g = math.gcd(*proportions)
    self._proportions = np.array([p // g for p in proportions], np.int64)
    self._round = int(self._proportions.sum())
    self._seed = seed
    self._cache: tuple[int, np.ndarray, np.ndarray] | None = None

  def __len__(self) -> int:
    return sys.maxsize

  def _plan(self, r: int) -> tuple[np.ndarray, np.ndarray]:
    cached = self._cache
    if cached is not None and cached[0] == r:
      return cached[1], cached[2]
    rng = np.random.default_rng([self._seed, 0x5C4ED, r])
    order = rng.permutation(np.repeat(np.arange(len(self._proportions)), self._proportions))
    rank = np.empty_like(order)
    for d in range(len(self._proportions)):
      where = order == d
      rank[where] = np.arange(int(where.sum()))
    self._cache = (r, order, rank)
    return order, rank

  def __getitem__(self, k: int) -> tuple[int, int]:
    r, pos = divmod(int(k), self._round)
    order, rank = self._plan(r)
    d = int(order[pos])
    return d, r * int(self._proportions[d]) + int(rank[pos])

  def __repr__(self) -> str:
    return f"LevelSchedule(proportions={self._proportions.tolist()}, seed={self._seed})"


class _ReportBadImages:
  """Main-process map: drops the worker's bad-image notes, counts them, warns."""

  def __init__(self, report: BadImageReport):
    self.report = report

  def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
    batch = dict(batch)
    skipped = batch.pop(_SKIPPED, ())
    if len(skipped):
      self.report.add(list(skipped))
    return batch


def _proportions(levels: np.ndarray, level_weights: LevelWeights) -> list[float]:
  counts = np.bincount(levels, minlength=NUM_LEVELS)
  if level_weights is None or (isinstance(level_weights, str) and level_weights == "proportional"):
    return [float(c) for c in counts]
  if isinstance(level_weights, str):  # from the command line: --config.data.level_weights=2,1,1
    try:
      level_weights = [float(w) for w in level_weights.split(",")]
    except ValueError:
      raise ValueError(f"level_weights must be 'proportional' or {NUM_LEVELS} weights (e.g. '2,1,1'), "
                       f"got {level_weights!r}") from None
  weights = [float(w) for w in np.atleast_1d(level_weights)]
  if len(weights) != NUM_LEVELS or any(w < 0 or not math.isfinite(w) for w in weights) or not any(weights):
    raise ValueError(f"level_weights must be {NUM_LEVELS} non-negative weights (levels 0, 1, 2 "
                     f"= 8x, 16x, 32x), not all zero; got {level_weights!r} (one level for every image: levels=)")
  empty = [l for l in range(NUM_LEVELS) if weights[l] > 0 and counts[l] == 0]
  if empty:
    raise ValueError(f"level_weights give weight to level(s) {empty} that have no images "
                     f"(images per level: {counts.tolist()})")
  return weights


def int_proportions(weights: Sequence[float]) -> list[int]:
  """Positive weights -> positive ints in the same ratios (to 1 part in 10^4)."""
  total = sum(weights)
  if all(float(w).is_integer() for w in weights):
    return [int(w) for w in weights]
  return [max(1, round(w / total * 10_000)) for w in weights]


def make_train_dataset(source: Any, *, levels: Mapping[str, int] | int | str | None,
                       batch_size: int, image_size: int, seed: int = 0,
                       process_index: int | None = None, process_count: int | None = None,
                       num_workers: int = 0, level_weights: LevelWeights = None,
                       min_size: int = DEFAULT_MIN_SIZE, max_pixels: int = DEFAULT_MAX_PIXELS,
                       on_bad_image: str = "skip", read_threads: int = 2,
                       prefetch_batches: int = 2, level_mode: str = "content") -> grain.IterDataset:
  """The infinite, level-bucketed training pipeline of this process (see module doc).

  Args:
    source: a source (``cat_jax.data.get_source``).
    levels: {id: level}, a score manifest path, one int level for all, or None for the
      source's built-in levels (embedded dataset). One fixed level trains every image at it whatever
      ``level_mode``; with ``level_mode='all'`` a manifest or mapping is refused (it would be ignored).
    batch_size: per-process batch size (the global batch is ``batch_size * process_count``).
    image_size: output side (random crop after resizing the shorter side).
    seed: fixes shuffling, level order and crops.
    process_index, process_count: this process's part of every global batch (default: jax's).
    num_workers: grain worker processes (0: threads in this process).
    level_weights: None or 'proportional' (levels drawn in proportion to their image
      counts), or three weights for levels 0/1/2 (fixed mix). A fixed-rate baseline is ``levels=<int>``.
    min_size, max_pixels, on_bad_image: see ``PreprocessConfig``.
    read_threads, prefetch_batches: threads and buffered batches per process/worker.
    level_mode: 'content' (the paper's): each image only at its own level; 'all': every level draws from every
      image (a level per batch, independent of content; ``level_weights`` 'proportional' means equal weights).

  Returns:
    A grain ``IterDataset``; ``iter()`` gives a checkpointable ``DatasetIterator`` whose state restores onto
    any process count.
  """
  config = PreprocessConfig(image_size=image_size, min_size=min_size, max_pixels=max_pixels,
                            on_bad_image=on_bad_image)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  pi, pc = process_index_and_count(process_index, process_count)
  if level_mode not in LEVEL_MODES:
    raise ValueError(f"level_mode must be one of {LEVEL_MODES}, got {level_mode!r}")
  if level_mode == "all" and levels is not None:
    if isinstance(levels, str) and is_level_spelling(levels):
      levels = parse_level(levels)
    if not (isinstance(levels, (int, np.integer)) and not isinstance(levels, bool)):
      raise ValueError("level_mode='all' trains every level on every image and would ignore the levels given "
                       f"({levels!r}); set data.level_mode='content' to train each image at its manifest level")
    level_mode = "content"  # one fixed level: every image at it
  if level_mode == "all":  # every image in every level's pool
    level_of = np.zeros(len(source_ids(source)), np.int32)
    weights = _proportions(np.arange(NUM_LEVELS), level_weights)  # one "image" per level: equal by default
  else:
    level_of = resolve_levels(source, levels)
    weights = _proportions(level_of, level_weights)
  active = [l for l in range(NUM_LEVELS) if weights[l] > 0]
  streams, counts = [], []
  for l in active:
    indices = np.arange(len(level_of)) if level_mode == "all" else np.flatnonzero(level_of == l)
    streams.append(grain.MapDataset.source([int(i) for i in indices]).shuffle(seed=seed * 7919 + l).repeat())
    counts.append(len(indices))
  schedule = LevelSchedule(int_proportions([weights[l] for l in active]), seed)
  global_batch = batch_size * pc
  elements = grain.MapDataset.range(sys.maxsize).map(
      _TrainElement(source, config, streams, active, counts, schedule, global_batch=global_batch, seed=seed))
  multiprocessing = None
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    multiprocessing = grain.MultiprocessingOptions(num_workers=num_workers,
                                                   per_worker_buffer_size=max(1, prefetch_batches))
  elastic = grain.experimental.ElasticIterator(
      elements, global_batch, grain.sharding.ShardOptions(shard_index=pi, shard_count=pc),
      read_options=grain.ReadOptions(num_threads=max(1, read_threads),
                                     prefetch_buffer_size=max(1, prefetch_batches)),
      multiprocessing_options=multiprocessing)
  return elastic.map(_Collate(BadImageReport("training images")))


def _ensure_absl_flags_parsed() -> None:
  # grain 0.2.18's mp_prefetch reads an absl flag and fails in scripts that do not parse
  # absl flags (google/grain#1355, fixed upstream by #1362); their defaults are what we want.
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _finish(ds: grain.MapDataset, num_workers: int, read_threads: int, prefetch_batches: int,
            what: str) -> grain.IterDataset:
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(1, read_threads),
                                            prefetch_buffer_size=max(1, prefetch_batches)))
  if num_workers > 0:
    _ensure_absl_flags_parsed()
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers,
                                                     per_worker_buffer_size=max(1, prefetch_batches)))
  return it.map(_ReportBadImages(BadImageReport(what)))


def make_train_iterator(source: Any, **kwargs: Any) -> grain.DatasetIterator:
  """``iter(make_train_dataset(source, **kwargs))``: an endless checkpointable iterator."""
  return iter(make_train_dataset(source, **kwargs))


class _EvalLoad:
  """map fn: (level, indices with -1 for padding) -> padded, masked batch."""

  def __init__(self, source, config: PreprocessConfig):
    self._source = source
    self._config = config

  def __call__(self, plan: tuple[int, tuple[int, ...]]) -> dict[str, Any]:
    level, indices = plan
    size = self._config.image_size
    images = np.zeros((len(indices), size, size, 3), np.float32)
    mask = np.zeros(len(indices), bool)
    ids, skipped = [], []
    for slot, idx in enumerate(indices):
      image_id = ""
      if idx >= 0:
        try:
          data, image_id, path = _read(self._source, idx)
          images[slot] = preprocess(data, self._config, path=path, rng=None)
          mask[slot] = True
        except BadImageError as e:
          if self._config.on_bad_image == "raise":
            raise
          skipped.append(str(e))
      ids.append(image_id)
    return {"image": images, "level": np.int32(level), "id": np.array(ids), "mask": mask,
            _SKIPPED: skipped}


def make_eval_dataset(source: Any, *, levels: Mapping[str, int] | int | str | None,
                      batch_size: int, image_size: int, process_index: int | None = None,
                      process_count: int | None = None, num_workers: int = 0,
                      pad_last: bool = True, min_size: int = DEFAULT_MIN_SIZE,
                      max_pixels: int = DEFAULT_MAX_PIXELS, on_bad_image: str = "skip",
                      read_threads: int = 2, prefetch_batches: int = 2) -> grain.IterDataset:
  """One pass over ``source`` in single-level, centre-cropped, masked batches (see module doc)."""
  config = PreprocessConfig(image_size=image_size, min_size=min_size, max_pixels=max_pixels,
                            on_bad_image=on_bad_image)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  pi, pc = process_index_and_count(process_index, process_count)
  if pc > 1 and not pad_last:
    raise ValueError("pad_last=False gives processes different batch shapes; use pad_last=True "
                     "with several processes")
  level_of = resolve_levels(source, levels)
  plans = []
  for level in range(NUM_LEVELS):
    indices = np.flatnonzero(level_of == level)
    if len(indices) == 0:
      continue
    shard = [int(i) for i in indices[pi::pc]]
    shard += [-1] * (-(-len(indices) // pc) - len(shard))  # Same length on every process.
    if pad_last:
      shard += [-1] * (-len(shard) % batch_size)
    plans += [(level, tuple(shard[s:s + batch_size])) for s in range(0, len(shard), batch_size)]
  ds = grain.MapDataset.source(plans).map(_EvalLoad(source, config))
  return _finish(ds, num_workers, read_threads, prefetch_batches, "evaluation images")


def make_eval_iterator(source: Any, **kwargs: Any) -> grain.DatasetIterator:
  """``iter(make_eval_dataset(source, **kwargs))``: one pass, then StopIteration."""
  return iter(make_eval_dataset(source, **kwargs))


def make_global_batch(batch: Mapping[str, Any], sharding: Any) -> dict[str, Any]:
  """Per-process batch -> global arrays via ``jax.make_array_from_process_local_data``.

  Numeric arrays with a batch axis ('image', 'mask') become global ``jax.Array``s sharded
  by ``sharding`` along the batch axis (a ``NamedSharding`` whose spec is longer than an
  array's rank is cut to the array's leading axes). 'level' becomes a Python int (a static
  argument of the train step); string arrays ('id') stay host-local numpy.

  Args:
    batch: a batch from the train or eval iterator.
    sharding: a ``jax.sharding.Sharding`` of the global batch (e.g. NamedSharding(mesh,
      P('data'))).
  """
  import jax

  out: dict[str, Any] = {}
  for key, value in batch.items():
    if key == "level":
      out[key] = int(value)
    elif isinstance(value, np.ndarray) and value.ndim >= 1 and value.dtype.kind in "biuf":
      s = sharding
      if isinstance(s, jax.sharding.NamedSharding) and len(s.spec) > value.ndim:
        s = jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec(*s.spec[:value.ndim]))
      out[key] = jax.make_array_from_process_local_data(s, value)
    else:
      out[key] = value
  return out
