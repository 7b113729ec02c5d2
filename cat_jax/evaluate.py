r"""Evaluates a CAT checkpoint: fixed 8x / 16x / 32x, adaptive levels, and complexity measures at one token budget.

  python -m cat_jax.evaluate --workdir /tmp/cat_demo                            # the run's own eval data
  python -m cat_jax.evaluate --config configs/cat.py:demo --workdir /tmp/cat_demo --data embedded \
      --manifest scores/embedded-validation-caption_llm.jsonl \
      --inception_weights ~/.cache/cat_jax/inception_fid.msgpack --lpips_weights ~/.cache/cat_jax/lpips_vgg16_v0.1.msgpack
  python -m cat_jax.evaluate --workdir DIR --data folder:/path/to/images --num_images 500
  python -m cat_jax.evaluate --workdir DIR --data tfds:celeb_a --split test

Protocol. Images are read by the evaluation pipeline (shorter side resized to ``image_size``, centre crop, [-1, 1]).
Every image is reconstructed at all three levels from the posterior mean, clipped to [-1, 1]; metrics follow
``cat_jax.metrics.evaluator`` (8-bit quantisation, per-image PSNR/SSIM, LPIPS-VGG, rFID from float64 statistics).
Settings ("rows"):
  fixed_8x / fixed_16x / fixed_32x  every image at one level;
  adaptive                          each image at its level from ``--manifest`` (or the embedded dataset's built-in
                                    levels when no manifest is given);
  budget:<measure>                  levels from a complexity measure's scores with thresholds chosen so the mean
                                    token count matches ``--budget_tokens`` (default: the fixed-16x count), i.e. the
                                    paper's comparison of complexity measures at equal cost. Measures: ``random``,
                                    ``jpeg`` (JPEG bits per pixel), ``mse`` (this checkpoint's 32x reconstruction
                                    MSE), ``grade`` (embedded data only: the generator's 1-9 complexity grade, an
                                    oracle standing in for the caption-LLM score) and any ``--score_manifest
                                    name=PATH`` (e.g. caption_llm scores from ``python -m cat_jax.score``).
A row's reconstruction of an image is the one at that image's level, so every row measures the same images.
Images/s: encode + decode throughput per level measured on this machine (compilation excluded); a mixed row's
figure is derived as ``N / sum_l(n_l / ips_l)``.

Writes to ``--out`` (default ``<workdir>/eval``): ``results.json``, ``results.md``, ``rate_distortion.png``,
``reconstructions_*.png`` (rows: original, 8x, 16x, 32x).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
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
from cat_jax import storage
from cat_jax.data.level_map import is_level_spelling

logger = logging.getLogger("cat_jax.evaluate")

FIXED_ROWS = tuple(f"fixed_{f}x" for f in L.FACTORS)
BUILTIN_MEASURES = ("random", "jpeg", "mse", "grade")
SKIPPED_RFID = ("rFID skipped: no --inception_weights. Convert the pytorch-fid Inception weights once with "
                "`python -m cat_jax.convert inception --out PATH` (needs pt_inception-2015-12-05-6726825d.pth in "
                "the torch hub cache or --torch-weights FILE) and pass --inception_weights PATH.")
SKIPPED_LPIPS = ("LPIPS skipped: no --lpips_weights. Convert the LPIPS-VGG weights once with "
                 "`python -m cat_jax.convert lpips --out PATH` (needs torchvision's vgg16 weights in the torch hub "
                 "cache or --torch-weights FILE) and pass --lpips_weights PATH.")


# -- configs and data -----------------------------------------------------------------------------------------------
def load_config_file(spec: str):
  """``path/to/config.py[:arg]`` or ``cat:arg`` -> the config (``cat_jax.configs.load``)."""
  from cat_jax import configs

  return configs.load(spec)


class _Head:
  """The first ``n`` records of a source (keeps ids, built-in levels and kinds)."""

  def __init__(self, source, n: int):
    self._source, self._n = source, min(int(n), len(source))

  def __len__(self) -> int:
    return self._n

  def __getitem__(self, index: int):
    if not 0 <= int(index) < self._n:
      raise IndexError(index)
    return self._source[index]

  def ids(self) -> list[str]:
    from cat_jax.data import source_ids
    return source_ids(self._source)[:self._n]

  def __getattr__(self, name):  # builtin_levels, kind: forwarded when the source has them
    attr = getattr(self._source, name)
    if name == "builtin_levels":
      return lambda: {i: attr()[i] for i in self.ids()}
    return attr

  def __repr__(self) -> str:
    return f"{self._source!r}[:{self._n}]"


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


# -- cached frozen networks ------------------------------------------------------------------------------------------
def _row_keys(x: np.ndarray) -> list[bytes]:
  return [hashlib.sha1(np.ascontiguousarray(row).tobytes()).digest() for row in x]


class _CachedFn:
  """Per-input cache of ``fn(*arrays) -> (B, ...)`` (Inception features, LPIPS distances of pairs): the originals
  and each level's reconstructions are measured once, however many rows reuse them. Calls are padded to ``batch``."""

  def __init__(self, fn: Callable, batch: int):
    self.fn, self.batch, self.cache = fn, batch, {}

  def __call__(self, *arrays):
    arrays = [np.asarray(a, np.float32) for a in arrays]
    keys = [b"".join(parts) for parts in zip(*(_row_keys(a) for a in arrays))]
    first = {}
    for i, k in enumerate(keys):
      first.setdefault(k, i)
    missing = [k for k in first if k not in self.cache]
    for s in range(0, len(missing), self.batch):
      chunk = missing[s:s + self.batch]
      padded = []
      for a in arrays:
        rows = np.zeros((self.batch,) + a.shape[1:], np.float32)
        rows[:len(chunk)] = a[[first[k] for k in chunk]]
        padded.append(rows)
      out = np.asarray(self.fn(*padded), np.float64)
      for j, k in enumerate(chunk):
        self.cache[k] = out[j]
    return np.stack([self.cache[k] for k in keys])


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
  source: str = "model"  # whose reconstructions: 'model', 'area_bicubic' or a --compare name

  def levels(self, ids: Sequence[str]) -> np.ndarray:
    if isinstance(self.level_of, int):
      return np.full(len(ids), self.level_of, np.int32)
    return np.array([self.level_of[i] for i in ids], np.int32)


# -- the evaluation -------------------------------------------------------------------------------------------------
def _batches(source, tok, image_size: int):
  from cat_jax.data import make_eval_iterator
  return make_eval_iterator(source, levels=0, batch_size=tok.batch_size, image_size=image_size,
                            process_index=0, process_count=1)


def _score_pass(source, tok, image_size: int, measures: Sequence[str], seed: int) -> tuple[list[str], dict]:
  """Ids of the readable images in order, and {measure: {id: score}} for the built-in measures."""
  from PIL import Image

  from cat_jax.complexity.scorers import jpeg_bpp
  from cat_jax.data.preprocess import from_model_range

  ids, scores = [], {m: {} for m in measures}
  for batch in _batches(source, tok, image_size):
    valid = np.asarray(batch["mask"], bool)
    batch_ids = [str(i) for i in np.asarray(batch["id"])[valid]]
    images = np.asarray(batch["image"])[valid]
    ids += batch_ids
    if "jpeg" in measures:
      for i, x in zip(batch_ids, images):
        scores["jpeg"][i] = jpeg_bpp(Image.fromarray(from_model_range(x)))
    if "mse" in measures:
      recon = np.clip(np.asarray(tok.reconstruct_batch(batch["image"], L.NUM_LEVELS - 1)), -1, 1)[valid]
      for i, x, y in zip(batch_ids, images, recon):
        scores["mse"][i] = float(np.mean(((y - x) / 2.0) ** 2))
  if "random" in measures:
    rng = np.random.default_rng(seed)
    scores["random"] = dict(zip(ids, rng.random(len(ids)).tolist()))
  if "grade" in measures:
    if not hasattr(source, "kind"):
      raise ValueError("measure 'grade' needs the embedded dataset (its generator's complexity grade)")
    grade_of = {i: source.kind(k).grade for k, i in enumerate(source.ids())}
    scores["grade"] = {i: float(grade_of[i]) for i in ids}
  return ids, scores


def run_evaluation(tok, source, *, out_dir: str | os.PathLike, dataset: str, image_size: int,
                   manifest: str | None = None, score_manifests: Mapping[str, str] | None = None,
                   measures: Sequence[str] = ("random", "jpeg", "mse"), budget_tokens: float | None = None,
                   inception_fn: Callable | None = None, lpips_fn: Callable | None = None,
                   num_grid_images: int = 8, seed: int = 0, extra: Mapping[str, Any] | None = None,
                   compare: Mapping[str, tuple[Any, int]] | None = None, baselines: bool = True,
                   bootstrap: int = 1000) -> dict:
  """Evaluates ``tok`` on ``source`` and writes every output file; returns the results dict.

  ``compare``: {row name: (another Tokenizer, level)}, e.g. separately trained fixed-rate models or a converted SD
  VAE, each evaluated on the same images at one level. ``baselines``: add the no-learning rows (area+bicubic, and
  the DCT patch code with the model's latent channels: ``cat_jax.metrics.baselines``).
  ``bootstrap``: resamples for the 95% intervals over images (0: none).
  """
  from cat_jax.complexity import thresholds as complexity_thresholds
  from cat_jax.data import load_levels, source_ids
  from cat_jax.metrics.baselines import area_bicubic, dct_code
  from cat_jax.metrics.evaluator import ReconstructionEvaluator

  out_dir = storage.as_path(out_dir)  # local or an object store (gs://...)
  out_dir.mkdir(parents=True, exist_ok=True)
  score_manifests = dict(score_manifests or {})
  unknown = set(measures) - set(BUILTIN_MEASURES)
  if unknown:
    raise ValueError(f"unknown measures {sorted(unknown)}; built-in measures are {BUILTIN_MEASURES} (others come "
                     "from --score_manifest name=PATH)")
  all_ids = source_ids(source)
  image_hw = (image_size, image_size)
  tokens = np.array([L.num_tokens(image_hw, lvl) for lvl in range(L.NUM_LEVELS)], np.int64)
  budget = float(tokens[1] if budget_tokens is None else budget_tokens)

  # Rows: fixed levels, adaptive, and one per complexity measure at the budget.
  rows = [_Row(name, lvl, f"every image at {L.FACTORS[lvl]}x") for lvl, name in enumerate(FIXED_ROWS)]
  if baselines:
    rows += [_Row(f"area_bicubic_{f}x", lvl, f"no learning: average-pool to the {f}x grid, bicubic upsampling "
                  "(3 numbers per latent position)", source="area_bicubic") for lvl, f in enumerate(L.FACTORS)]
    rows += [_Row(f"dct_code_{f}x", lvl, f"no learning: the {tok.model.z_channels} lowest-frequency DCT coefficients "
                  f"of each {f}x{f} patch in YCbCr (as many numbers per latent position as the model)",
                  source="dct_code") for lvl, f in enumerate(L.FACTORS)]
  compare = dict(compare or {})
  for name, (_, lvl) in compare.items():
    rows.append(_Row(name, L.parse_level(lvl), f"{name} at {L.level_name(L.parse_level(lvl))}", source=name))
  notes = []
  if manifest is not None:
    level_of = load_levels(manifest, known_ids=all_ids)
    _require_all(level_of, all_ids, f"manifest {manifest}")
    rows.append(_Row("adaptive", level_of, f"levels from {manifest}"))
  elif hasattr(source, "builtin_levels"):
    rows.append(_Row("adaptive", source.builtin_levels(), "the embedded dataset's built-in levels (its "
                     "generator's complexity grade; no --manifest given)"))
  else:
    notes.append("no adaptive row: pass --manifest (a score manifest with levels, from python -m cat_jax.score)")

  external = {name: _manifest_scores(path, all_ids) for name, path in score_manifests.items()}
  ids = None
  scores: dict[str, dict[str, float]] = {}
  if measures or external:
    ids, scores = _score_pass(source, tok, image_size, list(measures), seed)
    scores.update(external)
    for name, per_id in scores.items():
      _require_all(per_id, ids, f"measure {name!r}")
      values = [per_id[i] for i in ids]
      thresholds = complexity_thresholds.budget_thresholds(values, budget, image_hw=image_hw)
      level_of = dict(zip(ids, complexity_thresholds.levels_for_scores(values, thresholds).tolist()))
      rows.append(_Row(f"budget:{name}", level_of, f"thresholds from {name} scores at {budget:g} mean tokens",
                       thresholds=thresholds))

  # Cached frozen networks: each image and each level's reconstruction goes through them once.
  cached_inception = _CachedFn(inception_fn, tok.batch_size) if inception_fn is not None else None
  cached_lpips = _CachedFn(lpips_fn, tok.batch_size) if lpips_fn is not None else None
  evaluators = {r.name: ReconstructionEvaluator(cached_inception, cached_lpips) for r in rows}
  seconds = np.zeros(L.NUM_LEVELS)
  warm = np.zeros((tok.batch_size, image_size, image_size, 3), np.float32)
  for lvl in range(L.NUM_LEVELS):  # compile outside the timed region
    np.asarray(tok.reconstruct_batch(warm, lvl))
  for other, lvl in compare.values():
    if other.batch_size != tok.batch_size:
      raise ValueError(f"compared tokenizers need the same batch_size as the evaluated one ({tok.batch_size})")
  grid: list[list[np.ndarray]] = [[] for _ in range(L.NUM_LEVELS + 1)]
  seen_ids: list[str] = []
  for batch in _batches(source, tok, image_size):
    valid = np.asarray(batch["mask"], bool)
    batch_ids = [str(i) for i in np.asarray(batch["id"])[valid]]
    if not batch_ids:
      continue
    seen_ids += batch_ids
    originals = np.asarray(batch["image"])[valid]
    recons = []
    for lvl in range(L.NUM_LEVELS):
      start = time.perf_counter()
      recon = np.asarray(tok.reconstruct_batch(batch["image"], lvl))
      seconds[lvl] += time.perf_counter() - start
      recons.append(np.clip(recon[valid], -1.0, 1.0))
    recons = np.stack(recons)  # (levels, n, H, W, 3)
    by_source = {"model": recons}
    if baselines:
      by_source["area_bicubic"] = np.stack([np.asarray(area_bicubic(originals, lvl)) for lvl in range(L.NUM_LEVELS)])
      by_source["dct_code"] = np.stack([np.asarray(dct_code(originals, lvl, tok.model.z_channels))
                                        for lvl in range(L.NUM_LEVELS)])
    for name, (other, lvl) in compare.items():
      recon = np.clip(np.asarray(other.reconstruct_batch(batch["image"], L.parse_level(lvl)))[valid], -1.0, 1.0)
      by_source[name] = np.broadcast_to(recon, (L.NUM_LEVELS,) + recon.shape)  # one level: the same at each
    for row in rows:
      lv = row.levels(batch_ids)
      chosen = by_source[row.source][lv, np.arange(len(batch_ids))]
      evaluators[row.name].update(originals, chosen, lv, num_tokens=tokens[lv])
    take = num_grid_images - len(grid[0])
    if take > 0:
      grid[0] += list(originals[:take])
      for lvl in range(L.NUM_LEVELS):
        grid[lvl + 1] += list(recons[lvl, :take])
    for cache in (cached_inception, cached_lpips):
      if cache is not None:
        cache.cache.clear()
  if not seen_ids:
    raise ValueError(f"no readable images in {source!r}")

  n_total = len(seen_ids)
  ips_level = [n_total / max(s, 1e-12) for s in seconds]
  results = {"dataset": dataset, "num_images": n_total, "image_size": image_size,
             "checkpoint_step": tok.step, "budget_tokens": budget,
             "tokens_per_level": {f"{f}x": int(t) for f, t in zip(L.FACTORS, tokens)},
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
    if "lpips/all" in metrics:
      entry["lpips"] = metrics["lpips/all"]
    if "rfid/all" in metrics:
      entry["rfid"] = metrics["rfid/all"]
    if row.thresholds is not None:
      entry["thresholds"] = list(row.thresholds)
    results["rows"][row.name] = entry
  _add_intervals_and_breakdown(results, evaluators, seen_ids, source, bootstrap, seed)

  storage.write_text(out_dir / "results.json", json.dumps(results, indent=2, sort_keys=False,
                                                         default=_json_default))
  storage.write_text(out_dir / "results.md", markdown_table(results))
  plot_rate_distortion(results, out_dir / "rate_distortion.png")
  _write_grids(grid, out_dir)
  return results


def bootstrap_interval(values: np.ndarray, resamples: np.ndarray) -> list[float]:
  """95% percentile interval of the mean of ``values`` over ``resamples`` (an (R, N) array of indices)."""
  means = np.asarray(values, np.float64)[resamples].mean(axis=1)
  return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def _add_intervals_and_breakdown(results: dict, evaluators: Mapping[str, Any], ids: Sequence[str], source,
                                 bootstrap: int, seed: int) -> None:
  """Bootstrap 95% intervals over images for each row's PSNR/SSIM and for its PSNR difference to fixed 16x
  (paired: the same resampled images), and the mean PSNR per kind of image where the source names kinds."""
  per_image = {name: {k: np.asarray(v) for k, v in ev.per_image.items() if len(v)} for name, ev in evaluators.items()}
  reference = per_image.get(FIXED_ROWS[1], {}).get("psnr")
  if bootstrap > 0:
    resamples = np.random.default_rng(seed).integers(0, len(ids), size=(bootstrap, len(ids)))
    results["bootstrap_resamples"] = bootstrap
    for name, values in per_image.items():
      row = results["rows"][name]
      for metric in ("psnr", "ssim", "lpips"):
        if metric in values:
          row[f"{metric}_ci95"] = bootstrap_interval(values[metric], resamples)
      if reference is not None and name != FIXED_ROWS[1]:
        diff = values["psnr"] - reference
        row["psnr_minus_fixed_16x"] = float(diff.mean())
        row["psnr_minus_fixed_16x_ci95"] = bootstrap_interval(diff, resamples)
  kind_of = _kinds(source, ids)
  if kind_of is not None:
    from cat_jax.data.embedded import KIND_NAMES
    kinds = sorted(set(kind_of), key=KIND_NAMES.index)  # simplest first
    results["kinds"] = {k: int(sum(1 for x in kind_of if x == k)) for k in kinds}
    for name, values in per_image.items():
      results["rows"][name]["psnr_per_kind"] = {
          k: float(np.mean([v for v, x in zip(values["psnr"], kind_of) if x == k])) for k in kinds}


def _kinds(source, ids: Sequence[str]) -> list[str] | None:
  """The kind of each evaluated image (the embedded dataset's generator kinds, ordered simple to complex)."""
  if not hasattr(source, "kind"):
    return None
  position = {i: k for k, i in enumerate(source.ids())}
  return [source.kind(position[i]).name for i in ids]


def _json_default(value):
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _write_grids(grid: list[list[np.ndarray]], out_dir, per_image: int = 8) -> None:
  from cat_jax.metric_writers import make_image_grid

  for old in out_dir.glob("reconstructions_*.png"):
    old.unlink()
  for s in range(0, len(grid[0]), per_image):
    rows = [np.stack(r[s:s + per_image]) for r in grid]
    storage.write_png(out_dir / f"reconstructions_{s // per_image:03d}.png", make_image_grid(rows))


# -- reports --------------------------------------------------------------------------------------------------------
_COLUMNS = (("mean_tokens", "mean tokens", "{:.1f}"), ("rfid", "rFID", "{:.3f}"), ("lpips", "LPIPS", "{:.4f}"),
            ("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("images_per_s", "images/s", "{:.1f}"))


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
  if key not in row:
    return "-"
  text = fmt.format(row[key])
  if f"{key}_ci95" in row:  # the 95% bootstrap interval over images
    lo, hi = row[f"{key}_ci95"]
    text += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
  return text


def _table(rows: Mapping[str, dict], names: Sequence[str]) -> list[str]:
  cols = [c for c in _COLUMNS if any(c[0] in rows[n] for n in names)]
  paired = any("psnr_minus_fixed_16x" in rows[n] for n in names)
  header = [c[1] for c in cols] + (["PSNR - fixed 16x"] if paired else [])
  lines = ["| setting | " + " | ".join(header) + " | images at 8x/16x/32x |",
           "|---|" + "---:|" * len(header) + "---|"]
  for n in names:
    r = rows[n]
    cells = [_cell(r, key, fmt) for key, _, fmt in cols]
    if paired:
      cells.append(_cell(r, "psnr_minus_fixed_16x", "{:+.2f}"))
    counts = "/".join(str(r["level_counts"][f"{f}x"]) for f in L.FACTORS)
    lines.append(f"| {n} | " + " | ".join(cells) + f" | {counts} |")
  return lines


def _kinds_table(results: Mapping[str, Any]) -> list[str]:
  """Mean PSNR per kind of image (columns simplest first) for every row: where adaptive wins and loses."""
  kinds = list(results["kinds"])
  lines = ["| setting | " + " | ".join(f"{k} ({results['kinds'][k]})" for k in kinds) + " |",
           "|---|" + "---:|" * len(kinds)]
  for name, row in results["rows"].items():
    lines.append(f"| {name} | " + " | ".join(f"{row['psnr_per_kind'][k]:.2f}" for k in kinds) + " |")
  return lines


def markdown_table(results: Mapping[str, Any]) -> str:
  rows = results["rows"]
  main = [n for n in rows if not n.startswith("budget:")]
  budget = [n for n in rows if n.startswith("budget:")]
  lines = [f"# Reconstruction: {results['dataset']} ({results['num_images']} images, "
           f"{results['image_size']}x{results['image_size']}, checkpoint step {results['checkpoint_step']})", ""]
  if results.get("training"):
    lines += ["Trained with " + ", ".join(f"{k}={v}" for k, v in results["training"].items()) + ".", ""]
  if results.get("bootstrap_resamples"):
    lines += [f"PSNR: mean of per-image PSNR capped at 50 dB; [brackets]: 95% bootstrap interval over images "
              f"({results['bootstrap_resamples']} resamples; the difference to fixed 16x is paired).", ""]
  lines += _table(rows, main)
  if budget:
    lines += ["", f"## Complexity measures at {results['budget_tokens']:g} mean tokens per image (budget mode)", ""]
    lines += _table(rows, budget)
  if results.get("kinds"):
    lines += ["", "## PSNR per kind of image", ""] + _kinds_table(results)
  for key, text in results.get("skipped", {}).items():
    lines += ["", f"Note: {text}"]
  for text in results.get("notes", []):
    lines += ["", f"Note: {text}"]
  return "\n".join(lines) + "\n"


def plot_rate_distortion(results: Mapping[str, Any], path: str | os.PathLike) -> None:
  """Quality vs mean tokens per image: fixed levels as a curve, adaptive and budget rows as points."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = results["rows"]
  metrics = [(k, label) for k, label, _ in _COLUMNS[1:5] if any(k in r for r in rows.values())]
  fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6), squeeze=False)
  fixed = [n for n in FIXED_ROWS if n in rows]
  markers = iter(["*", "D", "s", "^", "v", "P", "X", "o", "<", ">"])
  points = [n for n in rows if n not in fixed]
  marker_of = {n: next(markers, "o") for n in points}
  for ax, (key, label) in zip(axes[0], metrics):
    xs = [rows[n]["mean_tokens"] for n in fixed]
    ax.plot(xs, [rows[n][key] for n in fixed], "-o", color="tab:blue", label="fixed (32x, 16x, 8x)")
    for n in fixed:
      ax.annotate(n.split("_")[1], (rows[n]["mean_tokens"], rows[n][key]), textcoords="offset points",
                  xytext=(4, 4), fontsize=8)
    for n in points:
      ax.plot([rows[n]["mean_tokens"]], [rows[n][key]], marker_of[n], markersize=9 if n == "adaptive" else 6,
              linestyle="none", label=n)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("mean tokens per image")
    ax.set_ylabel(label + (" (lower is better)" if key in ("rfid", "lpips") else " (higher is better)"))
    ax.grid(alpha=0.3)
  axes[0][0].legend(fontsize=7)
  fig.suptitle(f"{results['dataset']}: rate-distortion ({results['num_images']} images, "
               f"{results['image_size']}px)")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  storage.write_bytes(path, buf.getvalue())


# -- command line ---------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cat_jax.evaluate", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="training workdir (checkpoints/ and config.json), a "
                 "Tokenizer.save_pretrained directory, or 'demo' (the shipped tokenizer)")
  p.add_argument("--config", help="configs/cat.py[:variant]; checked against the checkpoint's config.json "
                 "(default: the checkpoint's own config)")
  p.add_argument("--data", help="embedded | heldout | folder:PATH | chartqa:PATH | tfds:NAME (default: the config's "
                 "source)")
  p.add_argument("--split", help="split (default: the config's eval_split; 'all' for folders)")
  p.add_argument("--manifest", help="score manifest whose levels make the adaptive row")
  p.add_argument("--score_manifest", action="append", default=[], metavar="NAME=PATH",
                 help="extra complexity measure from a score manifest, e.g. caption_llm=scores.jsonl (repeatable)")
  p.add_argument("--measures", default=None,
                 help=f"comma-separated built-in measures of {BUILTIN_MEASURES} (default random,jpeg,mse, plus "
                 "grade on the embedded dataset); 'none' for no comparison")
  p.add_argument("--budget_tokens", type=float, help="mean tokens per image for the measure comparison "
                 "(default: the fixed-16x count)")
  p.add_argument("--num_images", type=int, help="evaluate the first N images only")
  p.add_argument("--image_size", type=int, help="default: the config's data.image_size")
  p.add_argument("--batch_size", type=int, default=8)
  p.add_argument("--step", type=int, help="checkpoint step (default: latest)")
  p.add_argument("--no_ema", action="store_true", help="use the raw parameters instead of the EMA")
  p.add_argument("--inception_weights", help="converted FID Inception weights (python -m cat_jax.convert inception)")
  p.add_argument("--lpips_weights", help="converted LPIPS weights (python -m cat_jax.convert lpips)")
  p.add_argument("--compare", action="append", default=[], metavar="NAME=PATH@LEVEL",
                 help="another tokenizer on the same images at one level, e.g. fixed16=/runs/fixed16@16x or "
                 "sd_vae=/weights/sdxl_vae@8x: a training workdir or a Tokenizer.save_pretrained / converted "
                 "directory (repeatable)")
  p.add_argument("--no_baselines", action="store_true", help="leave out the no-learning rows (area+bicubic, DCT patch code)")
  p.add_argument("--bootstrap", type=int, default=1000, help="resamples for 95%% intervals over images (0: none)")
  p.add_argument("--num_grid_images", type=int, default=8)
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
      raise ValueError(f"--score_manifest expects NAME=PATH, got {item!r}")
    out[name] = path
  return out


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  logging.basicConfig(level=logging.INFO, format="%(message)s")
  logging.getLogger("absl").setLevel(logging.ERROR)
  try:
    from cat_jax.tokenizer import PRETRAINED, load_tokenizer

    config = load_config_file(args.config) if args.config else None
    tok = load_tokenizer(args.workdir, batch_size=args.batch_size, step=args.step, use_ema=not args.no_ema,
                         config=config)
    config = config if config is not None else tok.config
    source, dataset, split = make_source(args.data, args.split, config)
    if args.num_images is not None:
      if args.num_images < 1:
        raise ValueError("--num_images must be >= 1")
      source = _Head(source, args.num_images)
    if args.measures is None:
      measures = ["random", "jpeg", "mse"] + (["grade"] if hasattr(source, "kind") else [])
    elif args.measures == "none":
      measures = []
    else:
      measures = [m.strip() for m in args.measures.split(",") if m.strip()]
    inception_fn = lpips_fn = None
    if args.inception_weights:
      from cat_jax.models.inception import load_inception
      inception_fn = load_inception(args.inception_weights)
    if args.lpips_weights:
      from cat_jax.models.lpips import load_lpips
      lpips_fn = load_lpips(args.lpips_weights)
    image_size = args.image_size or int(config.data.image_size)
    out = args.out or (f"eval_{args.workdir}" if args.workdir in PRETRAINED else
                       os.fspath(storage.as_path(args.workdir) / "eval"))
    results = run_evaluation(
        tok, source, out_dir=out, dataset=f"{dataset} ({split})", image_size=image_size, manifest=args.manifest,
        score_manifests=_parse_named(args.score_manifest), measures=measures, budget_tokens=args.budget_tokens,
        inception_fn=inception_fn, lpips_fn=lpips_fn, num_grid_images=args.num_grid_images, seed=args.seed,
        compare=_parse_compare(args.compare, tok.batch_size), baselines=not args.no_baselines,
        bootstrap=args.bootstrap,
        extra={"workdir": os.path.abspath(args.workdir) if storage.is_local(args.workdir) else args.workdir,
               "training": training_summary(config, tok.step),
               "command": "python -m cat_jax.evaluate " + " ".join(sys.argv[1:] if argv is None else argv)})
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(markdown_table(results))
  for text in results["skipped"].values():
    print(f"WARNING: {text}")
  print(f"wrote {out}/results.json, results.md, rate_distortion.png, reconstructions_*.png")
  return 0


if __name__ == "__main__":
  sys.exit(main())
