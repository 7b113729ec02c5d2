"""Scores a random-access source with a bounded thread pool into a resumable manifest, then assigns levels."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import json
import math
import os
from typing import Any, Callable, Sequence

import numpy as np
from etils import epath
from tqdm import tqdm  # the text bar everywhere (tqdm.auto wants ipywidgets in notebooks)

from cat_jax import storage
from cat_jax.complexity import manifest as manifest_lib
from cat_jax.complexity import thresholds as thresholds_lib
from cat_jax.complexity.llm import EndpointError
from cat_jax.complexity.scorers import Scorer


@dataclasses.dataclass
class RunSummary:
  """What one run did, and the thresholds it settled on (None when nothing was scored)."""

  scored: int = 0
  failed: int = 0
  skipped: int = 0
  fallbacks: int = 0  # scored, but with a ``fallback`` note (e.g. caption_llm without perception answers)
  thresholds: tuple[float, float] | None = None
  threshold_mode: str | None = None
  level_counts: list[int] | None = None
  mean_tokens: float | None = None
  tokens_at: str | None = None  # the sizes a budget's tokens were counted at, in words


class TooManyFailures(RuntimeError):
  """Raised when many items in a row fail (server down, wrong model name), so a run does not fail everything."""


def thresholds_path(out: str | os.PathLike) -> epath.Path:
  """Where a manifest's thresholds and level statistics are written: ``<out>.thresholds.json``."""
  return storage.as_path(os.fspath(out) + ".thresholds.json")


def manifest_header(scorer: Scorer, **extra: Any) -> dict[str, Any]:
  """The manifest header of a run: the scorer's setup (what a resumed run must match) and ``extra`` notes."""
  config = scorer.config() if hasattr(scorer, "config") else {"method": scorer.method}
  return {"scorer": config, **extra}


def image_sizes(item: dict[str, Any], sizing) -> dict[str, list[int]]:
  """``original_size`` and ``encoded_size`` (height, width; the size ``sizing``, a ``preprocess.Sizing``, gives it,
  as ``encode`` with the same options encodes it) of an item's image, from its header; {} when it has none."""
  from PIL import ExifTags, Image

  image = item.get("image")
  if image is None:
    return {}
  if isinstance(image, (bytes, bytearray, memoryview)):
    with Image.open(io.BytesIO(bytes(image))) as img:
      w, h = img.size
      if img.getexif().get(ExifTags.Base.Orientation) in (5, 6, 7, 8):  # exif_transpose swaps the sides
        w, h = h, w
  elif isinstance(image, Image.Image):
    w, h = image.size
  else:
    h, w = np.shape(image)[:2]
  return {"original_size": [int(h), int(w)], "encoded_size": [int(v) for v in sizing.sized_hw((h, w))]}


def _score_one(source: Sequence[dict[str, Any]], index: int, scorer: Scorer, skip: set[str],
               thresholds: tuple[float, float] | None, sizing=None) -> dict[str, Any] | None:
  """The manifest record of item ``index``, a failure record, or None if it is to be skipped."""
  try:
    item = source[index]
  except Exception as e:  # noqa: BLE001 - one unreadable item must not end the run
    return {"id": f"index:{index}", "method": scorer.method, "error": f"{type(e).__name__}: {e}"}
  item_id = str(item["id"])
  if item_id in skip:
    return None
  try:
    result = dict(scorer.score(item))
    score = result.pop("score")
    if not isinstance(score, (int, float)) or isinstance(score, bool) or not math.isfinite(score):
      raise ValueError(f"scorer returned a non-finite or non-numeric score {score!r}")
  except EndpointError:
    raise  # no item can be scored: the run stops, and this item is not blamed
  except Exception as e:  # noqa: BLE001 - recorded in the manifest, never defaulted
    return {"id": item_id, "method": scorer.method, "error": f"{type(e).__name__}: {e}"}
  if thresholds is not None:  # given thresholds win over a scorer's own level
    result["level"] = int(thresholds_lib.levels_for_scores([score], thresholds)[0])
  sizes = image_sizes(item, sizing) if sizing is not None else {}
  return {"id": item_id, "score": score, "level": result.pop("level", None), "method": scorer.method, **result,
          **sizes}


def score_source(source: Sequence[dict[str, Any]], scorer: Scorer, out: str | os.PathLike, *, workers: int = 4,
                 limit: int | None = None, retry_failures: bool = False,
                 thresholds: tuple[float, float] | None = None, budget_tokens: float | None = None,
                 image_size: int = 256, sizing=None, progress: bool = True, max_consecutive_failures: int = 20,
                 on_record: Callable[[dict[str, Any]], None] | None = None,
                 header: dict[str, Any] | None = None, shard: tuple[int, int] = (0, 1)) -> RunSummary:
  """Scores ``source[0:limit]`` into the manifest ``out``, skipping ids it already holds, then finalizes levels.

  ``shard=(i, n)``: only items ``i, i + n, i + 2n, ...`` (a deterministic, disjoint part: the n shards' manifests
  together are the whole run, and ``cat`` joins them, as the one reader skips their headers). Shards need thresholds
  known up front (explicit, or the LLM default), so that every shard maps scores to levels alike.

  Items are read and scored on ``workers`` threads, with at most ``2 * workers`` items in flight. Levels are
  written with each record when the thresholds are known up front (explicit ``thresholds``, or the LLM default
  without a budget); otherwise they are null until the end, where the thresholds are chosen over every success
  in the manifest (explicit > ``budget_tokens`` > method default), the manifest is rewritten atomically with
  one record per id, and ``<out>.thresholds.json`` records the choice. ``out`` may be any ``etils.epath`` path.

  ``sizing`` (a ``cat_jax.data.preprocess.Sizing``: the size the images will be encoded at) records each image's
  ``original_size`` and ``encoded_size`` in its record, and a token budget then counts each image's tokens at its
  encoded size. Without it, or when a record lacks sizes (a manifest from an older version), every image counts as
  ``image_size`` x ``image_size`` (``RunSummary.tokens_at`` says which).

  The manifest header records ``manifest_header(scorer, **extra)`` (``header`` gives the extra notes).

  Raises:
    TooManyFailures: after ``max_consecutive_failures`` failures in a row (those already written stay in the
      manifest; rerun with ``retry_failures=True``).
    EndpointError: at the first item whose scorer cannot reach its endpoint; nothing is recorded for it.
    ManifestMismatch: when ``out`` holds scores of another method or scorer setup.
  """
  if workers < 1:
    raise ValueError(f"workers must be >= 1, got {workers}")
  index, count = (int(v) for v in shard)
  if not 0 <= index < count:
    raise ValueError(f"shard must be I/N with 0 <= I < N, got {index}/{count}")
  method = scorer.method
  if count > 1 and thresholds is None and (budget_tokens is not None or method not in thresholds_lib.LLM_METHODS) \
      and not getattr(scorer, "assigns_levels", False):
    raise ValueError(f"a sharded {method} run needs fixed --thresholds LOW,HIGH: thresholds chosen from one shard's "
                     "scores (terciles, a token budget) would differ between shards; score a sample first for them")
  run_header = manifest_header(scorer, **(header or {}), **({"shard": f"{index}/{count}"} if count > 1 else {}))
  manifest_lib.check_header(out, run_header)
  skip = manifest_lib.ids_to_skip(out, method, retry_failures=retry_failures)
  if thresholds is None and budget_tokens is None and getattr(scorer, "assigns_levels", False):
    mode = "per image"  # the scorer's own level of each image (a quality predictor's price): nothing to choose later
  elif thresholds is None and budget_tokens is None and method in thresholds_lib.LLM_METHODS:
    thresholds = thresholds_lib.DEFAULT_LLM_THRESHOLDS
    mode = "default"
  else:
    mode = "given" if thresholds is not None else None
  n = len(source) if limit is None else min(limit, len(source))
  summary = RunSummary()
  todo: Sequence[int] = range(index, n, count)
  if skip and hasattr(source, "ids"):  # resume without reading a single skipped image
    ids = source.ids()
    todo = [i for i in range(index, n, count) if str(ids[i]) not in skip]
    summary.skipped = len(range(index, n, count)) - len(todo)
  consecutive = 0
  bar = tqdm(total=len(todo), disable=not progress, unit="img", desc=f"score:{method}", dynamic_ncols=True)
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="score")
  with manifest_lib.ManifestWriter(out, header=run_header) as writer:
    pending: set[concurrent.futures.Future] = set()
    next_pos = 0
    try:
      while next_pos < len(todo) or pending:
        while next_pos < len(todo) and len(pending) < 2 * workers:
          pending.add(pool.submit(_score_one, source, todo[next_pos], scorer, skip, thresholds, sizing))
          next_pos += 1
        done, pending = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
        for future in done:
          record = future.result()
          bar.update(1)
          if record is None:
            summary.skipped += 1
            continue
          writer.write(record)
          if on_record is not None:
            on_record(record)
          if manifest_lib.is_failure(record):
            summary.failed += 1
            consecutive += 1
            bar.set_postfix(failed=summary.failed)
            if consecutive >= max_consecutive_failures:
              raise TooManyFailures(
                  f"{consecutive} items failed in a row; last error: {record['error']}. Fix the cause and rerun "
                  "with --retry-failures.")
          else:
            summary.scored += 1
            summary.fallbacks += "fallback" in record
            consecutive = 0
    except BaseException:
      # Do not wait for queued items; requests already in flight end on their own timeouts.
      pool.shutdown(wait=False, cancel_futures=True)
      raise
    finally:
      bar.close()
  pool.shutdown()
  _finalize(out, method, summary, thresholds, mode, budget_tokens, image_size, run_header, sized=sizing is not None)
  return summary


def _finalize(out: str | os.PathLike, method: str, summary: RunSummary, thresholds: tuple[float, float] | None,
              mode: str | None, budget_tokens: float | None, image_size: int, header: dict[str, Any], *,
              sized: bool = False) -> None:
  """Chooses thresholds over every success in the manifest, then rewrites it with levels."""
  header = manifest_lib.read_header(out) or header
  latest = manifest_lib.read_manifest(out)
  successes = [r for r in latest.values() if not manifest_lib.is_failure(r)]
  scores = [r["score"] for r in successes]
  image_hw, summary.tokens_at = _token_sizes(successes, image_size, sized)
  if scores and mode == "per image":
    counts = np.bincount([r["level"] for r in successes], minlength=3).tolist()
    summary.threshold_mode, summary.level_counts = mode, counts
    thresholds_path(out).write_text(json.dumps({"method": method, "mode": mode, "level_counts": counts,
                                                "num_images": len(scores),
                                                "num_failures": len(latest) - len(successes)}, indent=2) + "\n")
  elif scores:
    if thresholds is None and budget_tokens is not None:
      thresholds, mode = thresholds_lib.budget_thresholds(scores, budget_tokens, image_hw=image_hw), "budget"
    elif thresholds is None:
      thresholds = thresholds_lib.default_thresholds(method, scores)
      mode = "default" if method in thresholds_lib.LLM_METHODS else "quantile"
    for r, level in zip(successes, thresholds_lib.levels_for_scores([r["score"] for r in successes], thresholds)):
      r["level"] = int(level)
    stats = thresholds_lib.summarize(scores, thresholds, image_hw)
    summary.thresholds, summary.threshold_mode = tuple(thresholds), mode
    summary.level_counts, summary.mean_tokens = stats["level_counts"], stats["mean_tokens"]
    info = {"method": method, "mode": mode, "budget_tokens": budget_tokens, **stats, "tokens_at": summary.tokens_at,
            "num_failures": len(latest) - len(successes)}
    thresholds_path(out).write_text(json.dumps(info, indent=2) + "\n")
  manifest_lib.rewrite(out, latest.values(), header)


def _token_sizes(records: Sequence[dict[str, Any]], image_size: int, sized: bool):
  """(image_hw for ``thresholds_lib``, in words): each record's ``encoded_size`` when every one has it, else
  ``image_size`` square for all (``sized``: the run recorded sizes, so records without are from an older version)."""
  missing = sum("encoded_size" not in r for r in records)
  if records and not missing:
    return [tuple(r["encoded_size"]) for r in records], "each image's own (encoded) size"
  note = f"{image_size}x{image_size} for every image"
  if sized and missing:
    note += (f" ({missing} of {len(records)} records lack their size: a manifest from an older version; score into a "
             "new --out for tokens at each image's own size)")
  return (image_size, image_size), note
