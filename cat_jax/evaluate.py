r"""Evaluates a CAT checkpoint: fixed 8x / 16x / 32x, adaptive levels, and level choices at one token budget.

  python -m cat_jax.evaluate --workdir /tmp/cat_demo                            # the run's own eval data
  python -m cat_jax.evaluate --config configs/cat.py:demo --workdir /tmp/cat_demo --data embedded \
      --manifest scores/embedded-validation-caption_llm.jsonl \
      --inception-weights ~/.cache/cat_jax/inception_fid.msgpack --lpips-weights ~/.cache/cat_jax/lpips_vgg16_v0.1.msgpack
  python -m cat_jax.evaluate --workdir DIR --data folder:/path/to/images --num-images 500
  python -m cat_jax.evaluate --workdir DIR --data tfds:celeb_a --split test

Protocol. ``--data folder:PATH``: each image is read as ``python -m cat_jax.encode`` reads it, at its native size by
default (``--image-size N``: shorter side to N, centre crop; ``--max-side N``: longer side at most N), reconstructed
in batches of one padded shape (the tokenizer's shape buckets: each side padded to the next of 32, 64, 96, 128, 192,
256, ...), cropped back and measured on its own pixels (a measure compiles once per image size and power-of-two
batch); its tokens are counted at its own size (the latent grid of the image padded to a multiple of 32); unusable
files are skipped with their reason, as encode skips them. Other data (embedded, TFDS) is read by the evaluation
pipeline (shorter side resized to ``--image-size``, default the config's ``data.image_size``, centre crop). Every
image is reconstructed at all three levels from the posterior mean, as the tokenizer returns it (with a patch code:
per image the learned path or, where that is worse, the code; ``Tokenizer(keep_code=)``), clipped to [-1, 1];
metrics follow ``cat_jax.metrics.evaluator`` (8-bit quantisation, per-image PSNR/SSIM, LPIPS-VGG, rFID from float64
statistics; at native sizes the Inception network resizes each image to 299x299, as pytorch-fid does).
Settings ("rows"):
  fixed_8x / fixed_16x / fixed_32x  every image at one level;
  adaptive                          each image at its level from ``--manifest`` (or the embedded dataset's built-in
                                    levels when no manifest is given);
  budget:<scorer>                   levels from a complexity scorer's scores with thresholds chosen so the mean
                                    token count matches ``--budget-tokens`` (default: the fixed-16x count), i.e. the
                                    paper's comparison of complexity measures at equal cost. Scorers (``--scorers``):
                                    ``random``, ``jpeg`` (JPEG bits per pixel), ``mse`` (this checkpoint's 32x
                                    reconstruction MSE), ``grade`` (embedded data only: the generator's 1-9 complexity
                                    grade, an oracle standing in for the caption-LLM score), ``predictor`` (the
                                    tokenizer's learned level predictor, when it ships one) and any
                                    ``--score-manifest name=PATH`` (e.g. caption_llm scores from
                                    ``python -m cat_jax.score``);
  budget:oracle:<m>                 the exact best mean quality in measure m at the same budget (a knapsack over each
                                    image's measured quality at every level: the ceiling of any level choice);
  budget:rd:<m>                     the same from the quality predictor's predicted qualities (``--allocate-by``);
  auto                              the tokenizer's knob-free ``levels="auto"`` at its own mean tokens.
Every row reports PSNR, SSIM and ``--measures`` (MS-SSIM, HaarPSI, GMSD by default: no weights needed), with
bootstrap intervals and per kind of image. ``results.json``'s ``allocation`` puts every choice between its floor
(fixed 16x) and its ceiling (the oracle) on all images, without flat and gradient images and on photos alone: paired
differences with intervals, the share of the oracle's gain, the share of images at each level, and the mean tokens
each choice needs to reach the fixed-16x mean quality.
A row's reconstruction of an image is the one at that image's level, so every row measures the same images.
Images/s: encode + decode throughput per level measured on this machine (compilation excluded); a mixed row's
figure is derived as ``N / sum_l(n_l / ips_l)``.

Writes to ``--out`` (default ``<workdir>/eval``): ``results.json``, ``results.md``, ``rate_distortion.png``,
``reconstructions_*.png`` (rows: original, 8x, 16x, 32x), ``levels.jsonl`` (each image's size and its level in
every row that chooses per image).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import pathlib
import sys
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from cat_jax import cli
from cat_jax import levels as L
from cat_jax import reports
from cat_jax import storage
from cat_jax.data.level_map import is_level_spelling

logger = logging.getLogger("cat_jax.evaluate")

BUILTIN_SCORERS = ("random", "jpeg", "mse", "grade", "predictor")
QUALITY_MEASURES = ("psnr", "ssim", "ms_ssim", "haarpsi", "gmsd")  # image_quality.MEASURES: every one needs no weights
ALLOCATE_BY = ("psnr", "haarpsi")  # the oracle's measures: the one everyone reports and the one closest to people
SKIPPED_RFID = ("rFID skipped: no --inception-weights. Convert the pytorch-fid Inception weights once with "
                "`python -m cat_jax.convert inception --out PATH` (needs pt_inception-2015-12-05-6726825d.pth in "
                "the torch hub cache or --torch-weights FILE) and pass --inception-weights PATH.")
SKIPPED_LPIPS = ("LPIPS skipped: no --lpips-weights. Convert the LPIPS-VGG weights once with "
                 "`python -m cat_jax.convert lpips --out PATH` (needs torchvision's vgg16 weights in the torch hub "
                 "cache or --torch-weights FILE) and pass --lpips-weights PATH.")


# -- configs and data -----------------------------------------------------------------------------------------------
def load_config_file(spec: str):
  """``path/to/config.py[:arg]`` or ``cat:arg`` -> the config (``cat_jax.configs.load``)."""
  from cat_jax import configs

  return configs.load(spec)


def _first(source, n: int):
  """The first ``n`` records of a source."""
  from cat_jax.data import Subset
  return Subset(source, range(min(int(n), len(source))))


def make_source(data: str | None, split: str | None, config) -> tuple[Any, str, str]:
  """(source, dataset name, split) from ``--data`` (embedded | folder:PATH | chartqa:PATH | tfds:NAME) or config."""
  from cat_jax.data import get_source

  if data is None:
    name, kwargs = config.data.source, dict(config.data.source_kwargs)
    split = split or config.data.eval_split
  elif data in ("embedded", "heldout") or data.startswith("tfds:"):
    name, kwargs = data, {}
  elif data.startswith(("folder:", "chartqa:")):
    name, path = data.split(":", 1)
    kwargs = {"path": path}
  else:
    raise ValueError(f"--data must be 'embedded', 'heldout', 'folder:PATH', 'chartqa:PATH' or 'tfds:NAME', got "
                     f"{data!r}")
  if split is None:
    split = "all" if name == "folder" else "validation"
  source = get_source(name, split, **kwargs)
  label = name if name != "folder" else f"folder:{pathlib.Path(kwargs['path']).name}"
  return source, label, split


# -- frozen networks ------------------------------------------------------------------------------------------------
def _padded(fn: Callable | None, batch: int) -> Callable | None:
  """``fn(*arrays)`` called on ``batch`` rows (zeros after the real ones), so a short last batch compiles nothing new."""
  if fn is None:
    return None

  def call(*arrays):
    n = len(arrays[0])
    padded = [np.concatenate([a, np.zeros((batch - n,) + a.shape[1:], np.float32)]) if n < batch else a
              for a in (np.asarray(a, np.float32) for a in arrays)]
    return np.asarray(fn(*padded))[:n]
  return call


def _with_progress(batches, total: int):
  """The evaluation's batches (ids first), with a progress bar on stderr (images done, rate, time left)."""
  import tqdm

  with tqdm.tqdm(total=total, unit="img", desc="evaluate", file=sys.stderr, dynamic_ncols=True,
                 mininterval=1.0 if sys.stderr.isatty() else 30.0) as bar:
    for batch in batches:
      yield batch
      bar.update(len(batch[0]))


def _pipeline_batches(tok, source, image_size: int, seconds: np.ndarray):
  """(ids, originals, reconstructions at each level, (whole batch, real rows)) of the evaluation pipeline's batches
  (every image resized and centre-cropped to ``image_size``); ``seconds[l]`` gains the time level l took."""
  from cat_jax.data import make_eval_iterator

  warm = np.zeros((tok.batch_size, image_size, image_size, 3), np.float32)
  for lvl in range(L.NUM_LEVELS):  # compile outside the timed region
    np.asarray(tok.reconstruct_batch(warm, lvl))
  for batch in make_eval_iterator(source, levels=0, batch_size=tok.batch_size, image_size=image_size,
                                  process_index=0, process_count=1):
    valid = np.asarray(batch["mask"], bool)
    if not valid.any():
      continue
    recons = []
    for lvl in range(L.NUM_LEVELS):
      start = time.perf_counter()
      recon = np.asarray(tok.reconstruct_batch(batch["image"], lvl))
      seconds[lvl] += time.perf_counter() - start
      recons.append(np.clip(recon[valid], -1.0, 1.0))
    yield ([str(i) for i in np.asarray(batch["id"])[valid]], np.asarray(batch["image"])[valid], recons,
           (batch["image"], valid))


# A chunk of a sized source held in memory at a time: at most this many images and pixels (a larger image alone).
CHUNK_IMAGES, CHUNK_PIXELS = 256, 1 << 26


def _sized_batches(source, sizing, batch_size: int, skipped: dict[str, str]):
  """(ids, images) of a source of encoded files, each image read as ``encode`` reads it (``preprocess.load_sized``
  at ``sizing``), in batches of at most ``batch_size`` images of one shape bucket (``tokenizer.bucket_side`` of each
  side: the padded shape the tokenizer computes them at), a chunk of the source at a time. A file that cannot be
  used is left out and recorded in ``skipped`` (id -> reason)."""
  from cat_jax.data import source_ids
  from cat_jax.data.preprocess import BadImageError, load_sized
  from cat_jax.tokenizer import bucket_side

  def flush(chunk):
    groups: dict[tuple[int, int], list] = {}
    for image_id, x in chunk:
      groups.setdefault((bucket_side(x.shape[0]), bucket_side(x.shape[1])), []).append((image_id, x))
    for _, members in sorted(groups.items()):
      for s in range(0, len(members), batch_size):
        yield [i for i, _ in members[s:s + batch_size]], [x for _, x in members[s:s + batch_size]]

  chunk, pixels = [], 0
  for k, image_id in enumerate(source_ids(source)):
    try:
      record = source[k]
      x, _ = load_sized(record["image"], sizing, path=str(record.get("path") or image_id))
    except BadImageError as e:
      skipped[image_id] = e.reason
      continue
    except OSError as e:  # a file that cannot be read
      skipped[image_id] = f"cannot read file ({type(e).__name__}: {e})"
      continue
    if chunk and (len(chunk) >= CHUNK_IMAGES or pixels + x.shape[0] * x.shape[1] > CHUNK_PIXELS):
      yield from flush(chunk)
      chunk, pixels = [], 0
    chunk.append((image_id, x))
    pixels += x.shape[0] * x.shape[1]
  yield from flush(chunk)


def _reconstructed(tok, batches, seconds: np.ndarray):
  """(ids, images, [reconstructions at each level]) of ``batches`` of (ids, images of one shape bucket): the
  tokenizer's, as ``encode`` + ``decode`` give them (each image padded to its bucket, computed, cropped back to its
  own size; clipped). ``seconds[l]`` gains the time level l took, compilation excluded (a call that compiled is timed
  again)."""
  for ids, images in batches:
    recons = []
    for lvl in range(L.NUM_LEVELS):
      before = tok.compiled_count()["reconstruct"]
      start = time.perf_counter()
      recon = tok.reconstruct(images, lvl, value_range=(-1.0, 1.0))
      if tok.compiled_count()["reconstruct"] != before:
        start = time.perf_counter()
        recon = tok.reconstruct(images, lvl, value_range=(-1.0, 1.0))
      seconds[lvl] += time.perf_counter() - start
      recons.append(list(recon))
    yield ids, images, recons


def _split_by_size(batches):
  """(ids, (n, H, W, 3) originals, [(n, H, W, 3) reconstructions at each level], None): the images of each batch
  of ``_reconstructed`` grouped by their own size, so that every measure sees each image's own pixels
  (``_measure_few``)."""
  for ids, images, recons in batches:
    by_size: dict[tuple[int, ...], list[int]] = {}
    for k, x in enumerate(images):
      by_size.setdefault(x.shape, []).append(k)
    for ks in by_size.values():
      yield ([ids[k] for k in ks], np.stack([images[k] for k in ks]),
             [np.stack([per_level[k] for k in ks]) for per_level in recons], None)


def _measure_few(measurer, originals: np.ndarray, reconstructions: np.ndarray, real_features=None):
  """``measurer.measure`` of a batch of one image size, its rows filled to the next power of two (copies of its last
  image, left out of the result): a measure compiles at most four times per image size for batches of up to 8."""
  n = len(originals)
  rows = 1 << (n - 1).bit_length()

  def fill(a):
    return None if a is None else np.concatenate([a, np.repeat(a[-1:], rows - n, axis=0)])

  return measurer.measure(fill(originals), fill(reconstructions), fill(real_features)).take(slice(0, n))


def _at_bucket(rows: int):
  """``fn`` -> ``fn`` applied to (n, H, W, 3) images edge padded to their shape bucket (``tokenizer.bucket_side``)
  and ``rows`` rows, cropped back: a no-learning baseline computed as the tokenizer computes, one compile per
  bucket."""
  from cat_jax.tokenizer import bucket_side

  def wrap(fn):
    def call(images):
      n, h, w = images.shape[:3]
      padded = np.pad(images, ((0, max(rows - n, 0)), (0, bucket_side(h) - h), (0, bucket_side(w) - w), (0, 0)),
                      mode="edge")
      return np.asarray(fn(padded))[:n, :h, :w]
    return call
  return wrap


def _grid_cell(image: np.ndarray, side: int = 128) -> np.ndarray:
  """An image of any size as one square cell of the reconstruction grid: centre crop, resized to ``side``."""
  from PIL import Image

  from cat_jax.data.preprocess import from_model_range, resize_and_crop, to_model_range

  return to_model_range(resize_and_crop(Image.fromarray(from_model_range(image)), side))


def _describe_files(root: str, ids: Sequence[str], sizing) -> str:
  """A folder's images and the shapes they are computed at, in words (the first lines), from the files' headers."""
  from PIL import Image

  from cat_jax.data.preprocess import describe_sizes
  from cat_jax.tokenizer import bucket_side

  paths = [os.path.join(root, i) for i in ids]
  buckets = set()
  for path in paths[:2000]:
    try:
      with Image.open(path) as img:
        h, w = sizing.sized_hw((img.height, img.width))
    except Exception:  # noqa: BLE001 (a bad file is reported with its reason when it is read)
      continue
    buckets.add((bucket_side(h), bucket_side(w)))
  return (f"{describe_sizes(paths)}; {sizing.describe()}, computed at up to {len(buckets)} padded shape{'s' if len(buckets) > 1 else ''} (each side "
          "padded to the next of 32, 64, 96, 128, 192, 256, 384, ...)")


def _listed(reasons: Mapping[str, str], limit: int = 5) -> str:
  """'id (reason); ...' of the first ``limit``."""
  text = "; ".join(f"{i} ({r})" for i, r in list(reasons.items())[:limit])
  return text + (f"; and {len(reasons) - limit} more" if len(reasons) > limit else "")


def _describe_evaluated(image_sizes: Sequence[tuple[int, int]], image_size: int | None, sizing) -> str:
  """The sizes the images were evaluated at, in words (results.json's ``sizes``, the reports' titles)."""
  if sizing is None:
    return f"{image_size}x{image_size}"
  from cat_jax.tokenizer import bucket_side

  distinct = sorted(set(image_sizes), key=lambda hw: hw[0] * hw[1])
  buckets = {(bucket_side(h), bucket_side(w)) for h, w in distinct}
  if len(distinct) == 1:
    return f"{sizing.describe()}: one size, {distinct[0][1]}x{distinct[0][0]} (width x height)"
  return (f"{sizing.describe()}: {len(distinct)} sizes from {distinct[0][1]}x{distinct[0][0]} to "
          f"{distinct[-1][1]}x{distinct[-1][0]} (width x height), computed at {len(buckets)} padded shape"
          f"{'s' if len(buckets) > 1 else ''}")


# -- level assignments ----------------------------------------------------------------------------------------------
def _manifest_scores(path: str, known_ids: Sequence[str]) -> dict[str, float]:
  """{id: score} of a finished score manifest (read by ``cat_jax.data.level_map.load_records``, the one reader);
  unknown ids and records without a numeric score are errors."""
  from cat_jax.data.level_map import load_records

  scores = {}
  for image_id, record in load_records(path, known_ids).items():
    score = record.get("score")
    if isinstance(score, bool) or not isinstance(score, (int, float)) or not np.isfinite(score):
      raise ValueError(f"{path}: id {image_id!r} has no finite numeric 'score' (got {score!r})")
    scores[image_id] = float(score)
  if not scores:
    raise ValueError(f"score manifest {path} holds no scores")
  return scores


def _scoring_failures(paths: Sequence[str | None]) -> dict[str, str]:
  """{id: error} of the items these score manifests record as failed (the first manifest's reason wins)."""
  from cat_jax.complexity.manifest import read_manifest

  reasons: dict[str, str] = {}
  for path in paths:
    if path is not None:
      for i, record in read_manifest(path).items():
        if "error" in record and "level" not in record:
          reasons.setdefault(i, str(record["error"]))
  return reasons


def _require_all(mapping: Mapping[str, Any], ids: Sequence[str], what: str) -> None:
  missing = [i for i in ids if i not in mapping]
  if missing:
    raise ValueError(f"{what} has no entry for {len(missing)} of {len(ids)} evaluated images, e.g. {missing[:3]}")


@dataclasses.dataclass
class _Row:
  name: str
  level_of: Mapping[str, int] | int
  note: str = ""
  thresholds: tuple[float, float] | None = None
  source: str = "model"  # whose reconstructions: 'model', 'area_bicubic', 'dct_code' or a --compare name

  def levels(self, ids: Sequence[str]) -> np.ndarray:
    if isinstance(self.level_of, int):
      return np.full(len(ids), self.level_of, np.int32)
    return np.array([self.level_of[i] for i in ids], np.int32)


def _budget_rows(scores: Mapping[str, Mapping[str, float]], ids: Sequence[str], budget: float,
                 image_sizes: Sequence[tuple[int, int]]) -> list[_Row]:
  """One row per complexity measure: thresholds on its scores over ``ids`` such that the mean token count, at each
  image's own size (``image_sizes``, in the order of ``ids``), is ``budget``."""
  from cat_jax.complexity import thresholds as complexity_thresholds

  rows = []
  for name, per_id in scores.items():
    _require_all(per_id, ids, f"measure {name!r}")
    values = [per_id[i] for i in ids]
    thresholds = complexity_thresholds.budget_thresholds(values, budget, image_hw=image_sizes)
    level_of = dict(zip(ids, complexity_thresholds.levels_for_scores(values, thresholds).tolist()))
    rows.append(_Row(f"budget:{name}", level_of, f"thresholds from {name} scores at {budget:g} mean tokens",
                     thresholds=thresholds))
  return rows


def _quality_table(model_batches, measure: str) -> np.ndarray:
  """(N, 3) the model's quality of every evaluated image at each level in ``measure``, higher is better."""
  from cat_jax.metrics.image_quality import oriented

  def values(m):
    return m.psnr if measure == "psnr" else m.ssim if measure == "ssim" else m.measures[measure]
  return np.concatenate([np.stack([oriented(measure, values(m)) for m in per_level], axis=1)
                         for _, per_level in model_batches])


def _allocation_rows(tables, predicted, ids: Sequence[str], budget: float, image_sizes, tok) -> list[_Row]:
  """``budget:oracle:<m>`` (the exact best choice in measure m at the budget: the ceiling), ``budget:rd:<m>`` (the
  same from the quality predictor's predictions) and ``auto`` (the tokenizer's knob-free price rule)."""
  from cat_jax.complexity import allocation

  tokens = allocation.tokens_table(image_sizes)
  rows = [_Row(f"budget:oracle:{m}", dict(zip(ids, allocation.best_within_budget(q, tokens, budget).tolist())),
               f"the exact best mean {m} at {budget:g} mean tokens (a knapsack over measured qualities: the ceiling)")
          for m, q in tables.items()]
  rows += [_Row(f"budget:rd:{m}", dict(zip(ids, allocation.best_within_budget(p, tokens, budget).tolist())),
                f"the best mean {m} at {budget:g} mean tokens by the level predictor's predicted qualities")
           for m, p in predicted.items() if m in tables]
  auto = tok.auto_levels
  if auto is not None and auto.rule == "price" and auto.measure in predicted:  # the predictions made in the pass
    levels = tok.auto_assigner().from_qualities(predicted, image_sizes).levels
    rows.append(_Row("auto", dict(zip(ids, levels.tolist())), f"the tokenizer's levels='auto': predicted "
                     f"{auto.measure} less {auto.price:.3g} per token per 256x256 pixels, per image"))
  return rows


def _allocation_report(tables, predicted, scores, rows, ids: Sequence[str], source, budget: float, image_sizes,
                       bootstrap: int, seed: int) -> dict:
  """Every level choice between its floor (fixed 16x) and its ceiling (the exact choice) at the same budget, on all
  images, without flat and gradient images and on photos alone (kinds of the embedded data): each choice remade on
  the subset (``complexity.allocation.compare``), the share of the oracle's gain it gets, and the mean tokens each
  needs to reach the fixed-16x mean quality (the paper's equal-quality framing)."""
  from cat_jax.complexity import allocation
  from cat_jax.complexity import thresholds as complexity_thresholds

  kinds = reports.kinds_of(source, ids)
  everything = np.ones(len(ids), bool)
  subsets = {"all": everything}
  if kinds is not None:
    kinds = np.asarray(kinds)
    subsets["without flat and gradient"] = ~np.isin(kinds, ["flat", "gradient"])
    subsets["photos"] = kinds == "photo"
  auto = next((r for r in rows if r.name == "auto"), None)
  tokens_all = allocation.tokens_table(image_sizes)
  report = {}
  for subset, sel in subsets.items():
    if not sel.any():
      continue
    tokens, sub_ids = tokens_all[sel], [i for i, keep in zip(ids, sel) if keep]
    sub_sizes = [hw for hw, keep in zip(image_sizes, sel) if keep]
    at_budget = {m: (lambda b, q=q[sel]: allocation.best_within_budget(q, tokens, b)) for m, q in tables.items()}
    by_prediction = {m: (lambda b, p=p[sel]: allocation.best_within_budget(p, tokens, b))
                     for m, p in predicted.items() if m in tables}
    by_score = {name: (lambda b, s=[per_id[i] for i in sub_ids]: complexity_thresholds.levels_for_scores(
        s, complexity_thresholds.budget_thresholds(s, b, image_hw=sub_sizes))) for name, per_id in scores.items()}
    choices = {"fixed_16x": np.ones(int(sel.sum()), np.int32)}
    choices |= {f"oracle:{m}": f(budget) for m, f in at_budget.items()}
    choices |= {f"rd:{m}": f(budget) for m, f in by_prediction.items()}
    choices |= {name: f(budget) for name, f in by_score.items()}
    if auto is not None:
      choices["auto (own tokens)"] = auto.levels(sub_ids)
    entry = {"images": int(sel.sum()), "choices": allocation.compare({m: q[sel] for m, q in tables.items()}, tokens,
                                                                     choices, bootstrap=bootstrap, seed=seed)}
    for m, q in tables.items():
      oracle_gain = entry["choices"][f"oracle:{m}"][f"{m}_minus_fixed_16x"]
      for name, row in entry["choices"].items():
        row[f"{m}_share_of_oracle_gain"] = row[f"{m}_minus_fixed_16x"] / oracle_gain if oracle_gain > 0 else None
      target = float(q[sel][:, 1].mean())
      makers = {f"oracle:{m}": at_budget[m]} | {f"rd:{k}": f for k, f in by_prediction.items()} | by_score
      entry[f"tokens_for_fixed_16x_{m}"] = {
          name: allocation.tokens_to_match(f, q[sel], tokens, target) for name, f in makers.items()}
      entry[f"tokens_for_fixed_16x_{m}"][f"oracle:{m}"] = allocation.mean_of(
          tokens, allocation.fewest_tokens_for(q[sel], tokens, target))
    report[subset] = entry
  return report


# -- several processes -----------------------------------------------------------------------------------------------
def _process_block(source):
  """This process's images: with several JAX processes each reconstructs and measures the k-th contiguous block on
  its own devices (the tokenizer's mesh is local), so that the blocks gathered in process order are the images in
  order."""
  import jax

  if jax.process_count() == 1:
    return source
  from cat_jax.data import Subset
  return Subset(source, np.array_split(np.arange(len(source)), jax.process_count())[jax.process_index()])


def _gather_pass(kept: dict[str, Any]) -> dict[str, Any]:
  """What every process's pass kept, as one pass over all the images (``parallel.allgather_objects``, in process
  order): ids, sizes, scores, the model's measurements and predictions, the slowest process's seconds per level and
  every skipped file."""
  from cat_jax import parallel

  parts = parallel.allgather_objects(kept)
  out = {"seen_ids": [], "size_of": {}, "scores": {m: {} for m in kept["scores"]}, "model_batches": [],
         "predicted": {m: [] for m in kept["predicted"]}, "skipped": {},
         "seconds": np.max([part["seconds"] for part in parts], axis=0)}
  for part in parts:
    out["seen_ids"] += part["seen_ids"]
    out["model_batches"] += part["model_batches"]
    for key in ("size_of", "skipped"):
      out[key].update(part[key])
    for m, per_id in part["scores"].items():
      out["scores"][m].update(per_id)
    for m, tables in part["predicted"].items():
      out["predicted"][m] += tables
  return out


# -- the evaluation -------------------------------------------------------------------------------------------------
def run_evaluation(tok, source, *, out_dir: str | os.PathLike, dataset: str, image_size: int | None = None,
                   sizing=None, manifest: str | None = None, score_manifests: Mapping[str, str] | None = None,
                   scorers: Sequence[str] = ("random", "jpeg", "mse"), budget_tokens: float | None = None,
                   measures: Sequence[str] = QUALITY_MEASURES, allocate_by: Sequence[str] = ALLOCATE_BY,
                   inception_fn: Callable | None = None, lpips_fn: Callable | None = None,
                   num_grid_images: int = 8, seed: int = 0, extra: Mapping[str, Any] | None = None,
                   compare: Mapping[str, tuple[Any, int]] | None = None, baselines: bool = True,
                   bootstrap: int = 1000, strict: bool = False, paired_against: str = "fixed_16x") -> dict:
  """Evaluates ``tok`` on ``source`` in one pass over the data and writes every output file; returns the results.

  Sizes: ``image_size`` reads every image by the evaluation pipeline (shorter side resized to it, centre crop: the
  training and paper protocol, one shape); ``sizing`` (a ``cat_jax.data.preprocess.Sizing``, for sources of encoded
  files such as folders) reads each image as ``encode`` does, at its native size by default (``_sized_batches``):
  images are reconstructed in batches of one padded shape (the tokenizer's shape buckets) and measured on their own
  pixels, each image's tokens counted at its own size.

  ``compare``: {row name: (another Tokenizer, level)}, e.g. separately trained fixed-rate models or a converted SD
  VAE, each evaluated on the same images at one level. ``baselines``: add the no-learning rows (area+bicubic, and
  the DCT patch code with the model's latent channels: ``cat_jax.metrics.baselines``).
  ``bootstrap``: resamples for the 95% intervals over images (0: none). Images a manifest lacks (failed scores) are
  left out of every row and listed in the notes; ``strict`` raises instead. ``paired_against``: the row every other
  row's PSNR difference is paired against (default the model's fixed 16x; e.g. a separately trained fixed 16x model).

  Each batch is reconstructed at every level and each (reconstruction source, level) is measured once; a row picks,
  per image, the measurement at its level. Budget rows need every image's score first (their thresholds come from
  the whole distribution), so the model's per-level measurements are kept and those rows are added after the pass:
  with Inception weights that is 4 x 2048 float32 per image (~32 KiB; 1.6 GiB for 50,000 images).

  Several JAX processes (``jax.distributed``; ``python -m cat_jax.evaluate`` starts it as the trainer does): each reads,
  reconstructs and measures its own block of the images on its own devices; what the pass kept is gathered, so every
  process makes the same rows and returns the same results, and process 0 writes the files.
  """
  import jax

  from cat_jax.complexity import allocation
  from cat_jax.complexity.scorers import JpegScorer, reconstruction_mse
  from cat_jax.data import load_levels, source_ids
  from cat_jax.data.preprocess import from_model_range
  from cat_jax.metrics.baselines import area_bicubic, dct_code
  from cat_jax.metrics.evaluator import Measurements, ReconstructionEvaluator

  out_dir = storage.as_path(out_dir)  # local or an object store (gs://...)
  out_dir.mkdir(parents=True, exist_ok=True)
  from cat_jax.metrics.image_quality import MEASURES

  unknown = set(scorers) - set(BUILTIN_SCORERS)
  if unknown:
    raise ValueError(f"unknown scorers {sorted(unknown)}; built-in scorers are {BUILTIN_SCORERS} (others come "
                     "from --score-manifest name=PATH)")
  unknown = [m for m in list(measures) + list(allocate_by) if m not in MEASURES]
  if unknown:
    raise ValueError(f"unknown quality measures {unknown}; the measures are {', '.join(MEASURES)} (complexity "
                     "scorers such as jpeg or grade go to --scorers)")
  measures = tuple(dict.fromkeys(["psnr", "ssim", *measures, *allocate_by]))  # PSNR and SSIM are always measured
  if "grade" in scorers and not hasattr(source, "kind"):
    raise ValueError("scorer 'grade' needs the embedded dataset (its generator's complexity grade)")
  if "predictor" in scorers and getattr(tok, "level_predictor", None) is None:
    raise ValueError("scorer 'predictor' needs a tokenizer with a level predictor (Tokenizer.set_level_predictor, "
                     "python -m cat_jax.train_predictor)")
  predictor = getattr(tok, "level_predictor", None)
  predicts = tuple(predictor.measures) if predictor is not None else ()  # tables for rd rows and auto
  all_ids = source_ids(source)
  if (image_size is None) == (sizing is None):
    raise ValueError("give image_size (the evaluation pipeline's square) or sizing (each image as encode reads it)")
  compare = dict(compare or {})
  for other, _ in compare.values():
    if other.batch_size != tok.batch_size:
      raise ValueError(f"compared tokenizers need the same batch_size as the evaluated one ({tok.batch_size})")
  external = {name: _manifest_scores(path, all_ids) for name, path in dict(score_manifests or {}).items()}
  level_of = None if manifest is None else load_levels(manifest, known_ids=all_ids)
  notes = []
  missing = {f"manifest {manifest}": level_of} if level_of is not None else {}
  missing.update({f"score manifest {name}": per_id for name, per_id in external.items()})
  for what, mapping in missing.items():
    if strict:
      _require_all(mapping, all_ids, what)
  left_out = {i for mapping in missing.values() for i in all_ids if i not in mapping}
  if left_out:  # a few failed scores leave images out of the evaluation, listed; --strict refuses instead
    keep = [k for k, i in enumerate(all_ids) if i not in left_out]
    if not keep:
      raise ValueError(f"no evaluated image is in every manifest given ({', '.join(missing)})")
    from cat_jax.data import Subset
    source = Subset(source, keep)
    reasons = _scoring_failures([manifest, *dict(score_manifests or {}).values()])
    examples = [f"{i} ({reasons[i]})" if i in reasons else f"{i} (not listed)" for i in sorted(left_out)[:5]]
    notes.append(f"{len(left_out)} of {len(all_ids)} images left out: not in every manifest given (failed or missing "
                 f"scores), e.g. {'; '.join(examples)}; --strict refuses such a run instead")
    all_ids = source_ids(source)

  # Rows whose levels are known before the pass: fixed levels, the no-learning baselines, compared tokenizers, adaptive.
  rows = [_Row(name, lvl, f"every image at {L.FACTORS[lvl]}x") for lvl, name in enumerate(reports.FIXED_ROWS)]
  if baselines:
    rows += [_Row(f"area_bicubic_{f}x", lvl, f"no learning: average-pool to the {f}x grid, bicubic upsampling "
                  "(3 numbers per latent position)", source="area_bicubic") for lvl, f in enumerate(L.FACTORS)]
    rows += [_Row(f"dct_code_{f}x", lvl, f"no learning: the {tok.model.z_channels} lowest-frequency DCT coefficients "
                  f"of each {f}x{f} patch in YCbCr (as many numbers per latent position as the model)",
                  source="dct_code") for lvl, f in enumerate(L.FACTORS)]
  for name, (_, lvl) in compare.items():
    rows.append(_Row(name, L.parse_level(lvl), f"{name} at {L.level_name(L.parse_level(lvl))}", source=name))
  if level_of is not None:
    rows.append(_Row("adaptive", level_of, f"levels from {manifest}"))
  elif hasattr(source, "builtin_levels"):
    rows.append(_Row("adaptive", source.builtin_levels(), "the embedded dataset's built-in levels (its "
                     "generator's complexity grade; no --manifest given)"))
  else:
    notes.append("no adaptive row: pass --manifest (a score manifest with levels, from python -m cat_jax.score)")
  if paired_against not in {r.name for r in rows}:
    raise ValueError(f"--paired-against {paired_against!r} is not a row of this evaluation; use one of "
                     f"{[r.name for r in rows]}")
  new_evaluator = lambda: ReconstructionEvaluator(inception_fn, lpips_fn, measures=measures)
  measurer = ReconstructionEvaluator(_padded(inception_fn, tok.batch_size), _padded(lpips_fn, tok.batch_size),
                                     measures=measures)
  evaluators = {r.name: new_evaluator() for r in rows}
  seconds = np.zeros(L.NUM_LEVELS)
  skipped: dict[str, str] = {}  # unreadable or unusable files of a sized source, with the reason
  mine = _process_block(source)
  if not len(mine):
    batches = iter(())
  elif sizing is None:
    batches = _pipeline_batches(tok, mine, image_size, seconds)
  else:
    batches = _split_by_size(_reconstructed(tok, _sized_batches(mine, sizing, tok.batch_size, skipped), seconds))
  grid: list[list[np.ndarray]] = [[] for _ in range(L.NUM_LEVELS + 1)]
  seen_ids: list[str] = []
  size_of: dict[str, tuple[int, int]] = {}  # each image's (height, width), which its tokens are counted at
  scores: dict[str, dict[str, float]] = {m: {} for m in scorers if m in ("jpeg", "mse", "predictor")}
  model_batches: list[tuple[list[str], list[Measurements]]] = []  # for the budget rows, added after the pass
  predicted: dict[str, list[np.ndarray]] = {m: [] for m in predicts}  # the quality predictor's tables, per batch
  for batch_ids, originals, recons, padded in _with_progress(batches, len(mine)):
    # One batch: images of one size, (n, H, W, 3) originals and their reconstructions at each level; ``padded``:
    # the pipeline's whole batch and which of its rows are real, or None for a sized source.
    seen_ids += batch_ids
    size_of.update((i, tuple(originals.shape[1:3])) for i in batch_ids)
    tokens = allocation.image_tokens(originals.shape[1:3])  # (3,) at each level
    at_bucket = _at_bucket(tok.batch_size) if padded is None else (lambda fn: fn)
    by_source = {"model": recons}
    if baselines:
      by_source["area_bicubic"] = [np.asarray(at_bucket(lambda x, lvl=lvl: area_bicubic(x, lvl))(originals))
                                   for lvl in range(L.NUM_LEVELS)]
      by_source["dct_code"] = [np.asarray(at_bucket(lambda x, lvl=lvl: dct_code(x, lvl, tok.model.z_channels))(
          originals)) for lvl in range(L.NUM_LEVELS)]
    for name, (other, lvl) in compare.items():
      if padded is None:
        recon = np.stack(list(other.reconstruct(list(originals), L.parse_level(lvl), value_range=(-1.0, 1.0))))
      else:
        recon = np.asarray(other.reconstruct_batch(padded[0], L.parse_level(lvl)))[padded[1]]
      by_source[name] = [np.clip(recon, -1.0, 1.0)] * L.NUM_LEVELS  # one level: the same at each

    measured: dict[tuple[str, int], Measurements] = {}
    real_features = None

    def measurements(src: str, lvl: int) -> Measurements:
      nonlocal real_features
      if (src, lvl) not in measured:  # the originals' features are measured once per batch
        measure = measurer.measure if padded is not None else functools.partial(_measure_few, measurer)
        measured[src, lvl] = measure(originals, by_source[src][lvl], real_features)
        real_features = measured[src, lvl].real_features
      return measured[src, lvl]

    for row in rows:
      lv = row.levels(batch_ids)
      per_level = [measurements(row.source, lvl) if np.any(lv == lvl) else None for lvl in range(L.NUM_LEVELS)]
      filler = next(m for m in per_level if m is not None)
      evaluators[row.name].add(Measurements.pick([m or filler for m in per_level], lv), lv, tokens[lv])
    model_batches.append((batch_ids, [measurements("model", lvl) for lvl in range(L.NUM_LEVELS)]))
    if predicts:
      table = predictor.predict_quality(originals)
      for m in predicts:
        predicted[m].append(table[m])
    if "jpeg" in scores:
      scores["jpeg"].update(zip(batch_ids, JpegScorer(image_size=None).scores(from_model_range(originals))))
    if "mse" in scores:  # the 32x reconstruction's error (MseScorer.of_tokenizer): made above already
      scores["mse"].update(zip(batch_ids, reconstruction_mse(originals, recons[L.NUM_LEVELS - 1]).tolist()))
    if "predictor" in scores:
      scores["predictor"].update(zip(batch_ids, tok.level_predictor.predict(originals).tolist()))
    take = num_grid_images - len(grid[0])
    if take > 0:
      cell = (lambda x: x) if sizing is None else _grid_cell  # images of many sizes: one square cell each
      grid[0] += [cell(x) for x in originals[:take]]
      for lvl in range(L.NUM_LEVELS):
        grid[lvl + 1] += [cell(x) for x in recons[lvl][:take]]
  if jax.process_count() > 1:  # one pass over all the images, as the train loop's eval reduces its evaluators
    for evaluator in evaluators.values():  # the same rows in the same order on every process
      evaluator.sync_across_processes()
    kept = _gather_pass(dict(seen_ids=seen_ids, size_of=size_of, scores=scores, model_batches=model_batches,
                             predicted=predicted, seconds=seconds, skipped=skipped))
    seen_ids, size_of, scores, model_batches = kept["seen_ids"], kept["size_of"], kept["scores"], kept["model_batches"]
    predicted, seconds, skipped = kept["predicted"], kept["seconds"], kept["skipped"]
  if not seen_ids:
    raise ValueError(f"no readable images in {source!r}" + (f": {_listed(skipped)}" if skipped else ""))
  if skipped:
    notes.append(f"{len(skipped)} of {len(all_ids)} files skipped (unreadable or unusable, as encode skips them): "
                 f"{_listed(skipped)}")
  image_sizes = [size_of[i] for i in seen_ids]
  token_table = allocation.tokens_table(image_sizes)
  budget = float(token_table[:, 1].mean() if budget_tokens is None else budget_tokens)  # default: the fixed-16x mean

  # Rows whose levels need every image first: complexity scores at the budget, the exact (oracle) and predicted
  # rate-distortion choices at the budget, and the tokenizer's knob-free auto levels.
  if "random" in scorers:
    scores["random"] = dict(zip(seen_ids, np.random.default_rng(seed).random(len(seen_ids)).tolist()))
  if "grade" in scorers:
    grade_of = {i: source.kind(k).grade for k, i in enumerate(source.ids())}
    scores["grade"] = {i: float(grade_of[i]) for i in seen_ids}
  scores = {m: scores[m] for m in scorers} | external
  tables = {m: _quality_table(model_batches, m) for m in allocate_by}
  predicted_tables = {m: np.concatenate(v) for m, v in predicted.items()}
  late_rows = _budget_rows(scores, seen_ids, budget, image_sizes)
  late_rows += _allocation_rows(tables, predicted_tables, seen_ids, budget, image_sizes, tok)
  for row in late_rows:
    rows.append(row)
    evaluators[row.name] = new_evaluator()
    for batch_ids, per_level in model_batches:
      lv = row.levels(batch_ids)
      evaluators[row.name].add(Measurements.pick(per_level, lv), lv,
                               allocation.image_tokens(size_of[batch_ids[0]])[lv])  # a batch has one size

  n_total = len(seen_ids)
  ips_level = [n_total / max(s, 1e-12) for s in seconds]
  results = {"dataset": dataset, "num_images": n_total, "image_size": image_size,
             "sizes": _describe_evaluated(image_sizes, image_size, sizing),
             "checkpoint_step": tok.step, "budget_tokens": budget, "processes": jax.process_count(),
             "tokens_per_level": {f"{f}x": float(t) if sizing is not None else int(t)
                                  for f, t in zip(L.FACTORS, token_table.mean(axis=0))},
             "images_per_s_per_level": {f"{f}x": float(v) for f, v in zip(L.FACTORS, ips_level)},
             "rows": {}, "skipped": {}, "notes": notes, **dict(extra or {})}
  if inception_fn is None:
    results["skipped"]["rfid"] = SKIPPED_RFID
  if lpips_fn is None:
    results["skipped"]["lpips"] = SKIPPED_LPIPS
  fid_roots: dict = {}  # every row measures the same originals: one square root of their covariance
  for row in rows:
    metrics = evaluators[row.name].result(fid_roots)
    counts = np.bincount(row.levels(seen_ids), minlength=L.NUM_LEVELS)
    entry = {"mean_tokens": metrics["tokens_per_image/all"], "psnr": metrics["psnr/all"],
             "ssim": metrics["ssim/all"], "num_images": metrics["num_images/all"],
             "level_counts": {f"{f}x": int(c) for f, c in zip(L.FACTORS, counts)},
             "images_per_s": float(n_total / sum(c / ips_level[lvl] for lvl, c in enumerate(counts) if c)),
             "note": row.note, "per_level": {k: v for k, v in metrics.items() if not k.endswith("/all")}}
    entry.update({m: metrics[f"{m}/all"] for m in measures if m not in ("psnr", "ssim")})
    if "lpips/all" in metrics:
      entry["lpips"] = metrics["lpips/all"]
    if "rfid/all" in metrics:
      entry["rfid"] = metrics["rfid/all"]
    if row.thresholds is not None:
      entry["thresholds"] = list(row.thresholds)
    results["rows"][row.name] = entry
  results["measures"] = list(measures)
  reports.add_intervals_and_breakdown(results, {n: ev.per_image for n, ev in evaluators.items()}, seen_ids, source,
                                      bootstrap, seed, reference=paired_against)
  results["allocation"] = _allocation_report(tables, predicted_tables, scores, rows, seen_ids, source, budget,
                                             image_sizes, bootstrap, seed)
  if jax.process_index() != 0:  # every process holds the same results; one writes them
    return results
  reports.write_reports(results, grid, out_dir)
  per_image = [r for r in rows if not isinstance(r.level_of, int)]
  chosen = {r.name: r.levels(seen_ids) for r in per_image}
  storage.write_text(out_dir / "levels.jsonl", "".join(
      json.dumps({"id": i, "size": list(size_of[i]), "levels": {name: int(v[k]) for name, v in chosen.items()}}) + "\n"
      for k, i in enumerate(seen_ids)))
  return results


# -- text legibility -----------------------------------------------------------------------------------------------
LEGIBILITY_ROWS = ("model", "dct_code", "area_bicubic")


def reconstruction_sources(tok, rows: Sequence[str] = LEGIBILITY_ROWS) -> dict[str, Callable]:
  """``{row: fn(images, level) -> reconstructions}``: the tokenizer's (posterior mean, as it returns it) and the
  no-learning baselines with its numbers per latent position."""
  import jax.numpy as jnp

  from cat_jax.metrics.baselines import area_bicubic, dct_code

  fns = {"model": lambda x, level: tok.reconstruct(x, level),
         "dct_code": lambda x, level: np.asarray(dct_code(jnp.asarray(x), level, tok.model.z_channels)),
         "area_bicubic": lambda x, level: np.asarray(area_bicubic(jnp.asarray(x), level))}
  return {row: fns[row] for row in rows}


def run_legibility(tok, *, out_dir, num_images: int, image_size: int, seed: int = 0,
                   recognise: Callable | None = None) -> dict:
  """TokBench-style text legibility (``cat_jax.metrics.legibility``) of the text set (``cat_jax.data.text_set``):
  word accuracy and 1 - NED per level and text size group for the originals, the model and the baselines; writes
  ``legibility.json`` and ``legibility.md`` to ``out_dir``."""
  from cat_jax.data import text_set
  from cat_jax.metrics import legibility

  texts = text_set.text_set(num_images, seed=seed, image_size=image_size)
  images = text_set.model_images(texts)
  results = {"original": {"-": legibility.by_group(legibility.legibility(images, texts, recognise=recognise))}}
  for row, fn in reconstruction_sources(tok).items():
    results[row] = legibility.legibility_rows(fn, images, texts, original=False, recognise=recognise)
    logger.info("legibility: %s done", row)
  report = {"data": "text", "num_images": num_images, "image_size": image_size, "seed": seed,
            "checkpoint_step": tok.step, "rows": results}
  out_dir = storage.as_path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  storage.write_text(out_dir / "legibility.json", json.dumps(report, indent=2) + "\n")
  storage.write_text(out_dir / "legibility.md", reports.legibility_table(report))
  return report


# -- command line ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cat_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="training workdir (checkpoints/ and config.json), a "
                 "Tokenizer.save_pretrained directory, or 'demo' (the shipped tokenizer)")
  p.add_argument("--config", help="configs/cat.py[:variant]; checked against the checkpoint's config.json "
                 "(default: the checkpoint's own config)")
  p.add_argument("--data", help="embedded | heldout | folder:PATH | chartqa:PATH | tfds:NAME (default: the config's "
                 "source), or text: the text legibility set (word accuracy and 1 - NED by OCR per level and text "
                 "size; --num-images default 40, --image-size default 256; needs the ocr extra)")
  p.add_argument("--split", help="split (default: the config's eval_split; 'all' for folders)")
  p.add_argument("--manifest", help="score manifest whose levels make the adaptive row")
  p.add_argument("--score-manifest", action="append", default=[], metavar="NAME=PATH",
                 help="extra complexity measure from a score manifest, e.g. caption_llm=scores.jsonl (repeatable)")
  p.add_argument("--scorers", default=None,
                 help=f"comma-separated complexity scorers of {BUILTIN_SCORERS} compared at one token budget "
                 "(budget:<scorer> rows; default random,jpeg,mse, plus grade on the embedded dataset and predictor "
                 "when the tokenizer has one); 'none' for no comparison")
  p.add_argument("--measures", default=",".join(QUALITY_MEASURES),
                 help="comma-separated quality measures every row reports (cat_jax.metrics.image_quality.MEASURES; "
                 f"default {','.join(QUALITY_MEASURES)}; PSNR and SSIM always)")
  p.add_argument("--allocate-by", default=",".join(ALLOCATE_BY),
                 help="measures the exact (budget:oracle:<m>) and predicted (budget:rd:<m>) level choices maximise "
                 f"at the budget (default {','.join(ALLOCATE_BY)})")
  p.add_argument("--budget-tokens", type=float, help="mean tokens per image for the measure comparison "
                 "(default: the fixed-16x count)")
  p.add_argument("--num-images", type=int, help="evaluate the first N images only")
  cli.add_sizing_arguments(p)  # folders: native sizes by default, as encode and score; other data: see the docstring
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
  p.add_argument("--no-ema", action="store_true", help="use the raw parameters instead of the EMA")
  p.add_argument("--inception-weights", help="converted FID Inception weights (python -m cat_jax.convert inception)")
  p.add_argument("--lpips-weights", help="converted LPIPS weights (python -m cat_jax.convert lpips)")
  p.add_argument("--compare", action="append", default=[], metavar="NAME=PATH@LEVEL",
                 help="another tokenizer on the same images at one level, e.g. fixed16=/runs/fixed16@16x or "
                 "sd_vae=/weights/sdxl_vae@8x: a training workdir or a Tokenizer.save_pretrained / converted "
                 "directory (repeatable)")
  p.add_argument("--no-baselines", action="store_true", help="leave out the no-learning rows (area+bicubic, DCT patch code)")
  p.add_argument("--strict", action="store_true", help="refuse the run when a manifest lacks an image (default: "
                 "leave such images out of every row and list them)")
  p.add_argument("--paired-against", default="fixed_16x", metavar="ROW",
                 help="the row each PSNR difference is paired against (default fixed_16x, the model's own; e.g. a "
                      "--compare name such as a separately trained fixed 16x model)")
  p.add_argument("--bootstrap", type=int, default=1000, help="resamples for 95%% intervals over images (0: none)")
  p.add_argument("--num-grid-images", type=int, default=8)
  p.add_argument("--seed", type=int, default=0, help="seed of the random measure")
  p.add_argument("--out", help="output folder (default <workdir>/eval)")
  return p


def training_summary(config, step) -> dict[str, Any]:
  """How the evaluated checkpoint was trained, as the report states it (level mode, steps, data)."""
  data = config.get("data", {}) if hasattr(config, "get") else {}
  mode = data.get("level_mode", "content") if hasattr(data, "get") else "content"
  explain = {"content": "content (the paper's: each image at its complexity level)",
             "all": "all (every level on every image, a level drawn per batch)"}
  levels = data.get("levels") if data else None
  if isinstance(levels, (str, int)) and is_level_spelling(str(levels)):
    text = f"fixed {L.level_name(L.parse_level(levels))} (every image at one level)"
  else:
    text = explain.get(mode, mode) + (f", levels from {levels}" if levels and mode == "content" else "")
  return {"level_mode": text, "steps": step, "source": data.get("source") if data else None}


def _parse_compare(items: Sequence[str], batch_size: int) -> dict[str, tuple[Any, int]]:
  from cat_jax.tokenizer import load_tokenizer

  out = {}
  for item in items:
    name, sep, rest = item.partition("=")
    path, at, level = rest.rpartition("@")
    if not sep or not name or not at or not path:
      raise ValueError(f"--compare expects NAME=PATH@LEVEL (e.g. fixed16=/runs/fixed16@16x), got {item!r}")
    out[name] = (load_tokenizer(path, batch_size=batch_size), L.parse_level(level))
  return out


def _parse_named(items: Sequence[str]) -> dict[str, str]:
  out = {}
  for item in items:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
      raise ValueError(f"--score-manifest expects NAME=PATH, got {item!r}")
    out[name] = path
  return out


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)
  from cat_jax.distributed import maybe_initialize_distributed

  maybe_initialize_distributed()  # several processes (a pod, SLURM, JAX_* variables): each evaluates its share
  import jax

  try:
    from cat_jax.tokenizer import PRETRAINED, load_tokenizer

    config = load_config_file(args.config) if args.config else None
    tok = load_tokenizer(args.workdir, batch_size=args.batch_size, step=args.step, use_ema=not args.no_ema,
                         config=config)
    config = config if config is not None else tok.config
    if args.data == "text":
      if jax.process_count() > 1:
        raise ValueError("--data text (legibility) runs in one process: start it without the multi-process variables")
      out = args.out or (f"eval_{args.workdir}" if args.workdir in PRETRAINED else
                         os.fspath(storage.as_path(args.workdir) / "eval"))
      size = args.image_size or 256
      print(f"evaluate: text legibility of {args.num_images or 40} images at {size}x{size} (the text set, four size "
            f"groups), levels 8x/16x/32x, rows {', '.join(LEGIBILITY_ROWS)} and the originals", file=sys.stderr)
      report = run_legibility(tok, out_dir=out, num_images=args.num_images or 40, image_size=size, seed=args.seed)
      print(reports.legibility_table(report))
      print(f"wrote {out}/legibility.json, legibility.md")
      return 0
    source, dataset, split = make_source(args.data, args.split, config)
    folder = getattr(source, "root", None)  # a folder of encoded files: each image as encode reads it
    if args.num_images is not None:
      if args.num_images < 1:
        raise ValueError("--num-images must be >= 1")
      source = _first(source, args.num_images)
    if args.scorers is None:
      scorers = (["random", "jpeg", "mse"] + (["grade"] if hasattr(source, "kind") else []) +
                 (["predictor"] if tok.level_predictor is not None else []))
    elif args.scorers == "none":
      scorers = []
    else:
      scorers = [m.strip() for m in args.scorers.split(",") if m.strip()]
    measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    allocate_by = [m.strip() for m in args.allocate_by.split(",") if m.strip()]
    inception_fn = lpips_fn = None
    if args.inception_weights:
      from cat_jax.models.inception import load_inception
      inception_fn = load_inception(args.inception_weights)
    if args.lpips_weights:
      from cat_jax.models.lpips import load_lpips
      lpips_fn = load_lpips(args.lpips_weights)
    if folder is not None:  # native sizes by default
      image_size, sizing = None, cli.sizing(args)
      sizes = (f"{_describe_files(folder, source.ids(), sizing)}; each image reconstructed at its shape bucket and "
               "measured on its own pixels")
    elif args.max_side:
      raise ValueError(f"--max-side applies to --data folder:PATH (images of many sizes); {dataset} is read at one "
                       "size: pass --image-size N")
    else:
      image_size, sizing = args.image_size or int(config.data.image_size), None
      sizes = (f"{len(source)} images, each resized (shorter side) and centre-cropped to {image_size}x{image_size}")
    at_sizes = " (each image resized to 299x299 by the Inception network, as pytorch-fid)" if sizing else ""
    print(f"evaluate: step {tok.step} on {dataset} ({split}), {sizes}; every image at 8x, 16x and 32x; measures "
          f"{', '.join(dict.fromkeys(['psnr', 'ssim', *measures]))}, "
          f"{'with' if inception_fn else 'no'} rFID{at_sizes if inception_fn else ''}, "
          f"{'with' if lpips_fn else 'no'} LPIPS; level scorers "
          f"{', '.join(scorers) or 'none'}", file=sys.stderr, flush=True)
    out = args.out or (f"eval_{args.workdir}" if args.workdir in PRETRAINED else
                       os.fspath(storage.as_path(args.workdir) / "eval"))
    results = run_evaluation(
        tok, source, out_dir=out, dataset=f"{dataset} ({split})", image_size=image_size, sizing=sizing,
        manifest=args.manifest,
        score_manifests=_parse_named(args.score_manifest), scorers=scorers, budget_tokens=args.budget_tokens,
        measures=measures, allocate_by=allocate_by,
        inception_fn=inception_fn, lpips_fn=lpips_fn, num_grid_images=args.num_grid_images, seed=args.seed,
        compare=_parse_compare(args.compare, tok.batch_size), baselines=not args.no_baselines,
        bootstrap=args.bootstrap, strict=args.strict, paired_against=args.paired_against,
        extra={"workdir": os.path.abspath(args.workdir) if storage.is_local(args.workdir) else args.workdir,
               "training": training_summary(config, tok.step),
               "command": "python -m cat_jax.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)})
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  if jax.process_index() != 0:  # every process holds the same results; process 0 prints them
    return 0
  print(reports.markdown_table(results))
  for text in results["skipped"].values():
    print(f"WARNING: {text}")
  print(f"wrote {out}/results.json, results.md, rate_distortion.png, reconstructions_*.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
