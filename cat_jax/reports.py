"""Reports of an evaluation (``cat_jax.evaluate``): bootstrap intervals, PSNR per kind of image, the markdown tables,
the rate-distortion plot and the reconstruction grids. Pure functions of the results dict and the per-image numbers.
"""

from __future__ import annotations

import io
import os
from typing import Any, Mapping, Sequence

import numpy as np

from cat_jax import levels as L
from cat_jax import storage

FIXED_ROWS = tuple(f"fixed_{f}x" for f in L.FACTORS)
PAIRED_REFERENCE = FIXED_ROWS[1]  # by default each row's PSNR difference is paired against fixed 16x


def bootstrap_interval(values: np.ndarray, resamples: np.ndarray) -> list[float]:
  """95% percentile interval of the mean of ``values`` over ``resamples`` (an (R, N) array of indices)."""
  means = np.asarray(values, np.float64)[resamples].mean(axis=1)
  return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def add_intervals_and_breakdown(results: dict, per_image: Mapping[str, Mapping[str, Sequence[float]]],
                                ids: Sequence[str], source, bootstrap: int, seed: int,
                                reference: str = PAIRED_REFERENCE) -> None:
  """Adds to ``results['rows']`` bootstrap 95% intervals over images of each row's measures (PSNR, SSIM, LPIPS and
  any other in ``per_image``) and of its PSNR difference to the ``reference`` row (``psnr_minus_reference``, paired:
  the same resampled images; the row's name in ``results['paired_reference']``), and the mean PSNR and HaarPSI
  (``PER_KIND``) per kind of image where the source names kinds.
  ``per_image``: {row: {metric: values in the order of ``ids``}}."""
  per_image = {name: {k: np.asarray(v) for k, v in values.items() if len(v)} for name, values in per_image.items()}
  reference_psnr = per_image.get(reference, {}).get("psnr")
  if bootstrap > 0:
    resamples = np.random.default_rng(seed).integers(0, len(ids), size=(bootstrap, len(ids)))
    results["bootstrap_resamples"] = bootstrap
    if reference_psnr is not None:
      results["paired_reference"] = reference
    for name, values in per_image.items():
      row = results["rows"][name]
      for metric, v in values.items():
        row[f"{metric}_ci95"] = bootstrap_interval(v, resamples)
      if reference_psnr is not None and name != reference:
        diff = values["psnr"] - reference_psnr
        row["psnr_minus_reference"] = float(diff.mean())
        row["psnr_minus_reference_ci95"] = bootstrap_interval(diff, resamples)
  kind_of = kinds_of(source, ids)
  if kind_of is not None:
    from cat_jax.data.embedded import KIND_NAMES
    kinds = sorted(set(kind_of), key=KIND_NAMES.index)  # simplest first
    results["kinds"] = {k: int(sum(1 for x in kind_of if x == k)) for k in kinds}
    for name, values in per_image.items():
      for metric in PER_KIND:
        if metric in values:
          results["rows"][name][f"{metric}_per_kind"] = {
              k: float(np.mean([v for v, x in zip(values[metric], kind_of) if x == k])) for k in kinds}


def kinds_of(source, ids: Sequence[str]) -> list[str] | None:
  """The kind of each evaluated image (the embedded dataset's generator kinds, ordered simple to complex)."""
  if not hasattr(source, "kind"):
    return None
  position = {i: k for k, i in enumerate(source.ids())}
  return [source.kind(position[i]).name for i in ids]


def json_default(value):
  """``json.dumps(default=...)`` for numpy scalars."""
  if isinstance(value, np.generic):
    return value.item()
  raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def write_grids(grid: list[list[np.ndarray]], out_dir, per_image: int = 8) -> None:
  """``reconstructions_NNN.png`` in ``out_dir``: ``per_image`` images per file, one grid row per entry of ``grid``."""
  from cat_jax.metric_writers import make_image_grid

  for old in out_dir.glob("reconstructions_*.png"):
    old.unlink()
  for s in range(0, len(grid[0]), per_image):
    rows = [np.stack(r[s:s + per_image]) for r in grid]
    storage.write_png(out_dir / f"reconstructions_{s // per_image:03d}.png", make_image_grid(rows))


_COLUMNS = (("mean_tokens", "mean tokens", "{:.1f}"), ("rfid", "rFID", "{:.3f}"), ("lpips", "LPIPS", "{:.4f}"),
            ("psnr", "PSNR", "{:.2f}"), ("ssim", "SSIM", "{:.4f}"), ("ms_ssim", "MS-SSIM", "{:.4f}"),
            ("haarpsi", "HaarPSI", "{:.4f}"), ("gmsd", "GMSD (lower is better)", "{:.4f}"),
            ("images_per_s", "images/s", "{:.1f}"))
PER_KIND = ("psnr", "haarpsi")  # the measures reported per kind of image (PSNR, and the one closest to people)


def _sizes(results: Mapping[str, Any]) -> str:
  """The sizes an evaluation's images were at (older results: one ``image_size``)."""
  return results.get("sizes") or f"{results['image_size']}x{results['image_size']}"


def _cell(row: Mapping[str, Any], key: str, fmt: str) -> str:
  if key not in row:
    return "-"
  text = fmt.format(row[key])
  if f"{key}_ci95" in row:  # the 95% bootstrap interval over images
    lo, hi = row[f"{key}_ci95"]
    text += f" [{fmt.format(lo)}, {fmt.format(hi)}]"
  return text


def _table(rows: Mapping[str, dict], names: Sequence[str], reference: str | None) -> list[str]:
  cols = [c for c in _COLUMNS if any(c[0] in rows[n] for n in names)]
  paired = any("psnr_minus_reference" in rows[n] for n in names)
  header = [c[1] for c in cols] + ([f"PSNR - {reference}"] if paired else [])
  lines = ["| setting | " + " | ".join(header) + " | images at 8x/16x/32x |",
           "|---|" + "---:|" * len(header) + "---|"]
  for n in names:
    r = rows[n]
    cells = [_cell(r, key, fmt) for key, _, fmt in cols]
    if paired:
      cells.append(_cell(r, "psnr_minus_reference", "{:+.2f}"))
    counts = "/".join(str(r["level_counts"][f"{f}x"]) for f in L.FACTORS)
    lines.append(f"| {n} | " + " | ".join(cells) + f" | {counts} |")
  return lines


def _kinds_table(results: Mapping[str, Any], metric: str, fmt: str) -> list[str]:
  """Mean ``metric`` per kind of image (columns simplest first) for every row: where adaptive wins and loses."""
  kinds = list(results["kinds"])
  lines = ["| setting | " + " | ".join(f"{k} ({results['kinds'][k]})" for k in kinds) + " |",
           "|---|" + "---:|" * len(kinds)]
  for name, row in results["rows"].items():
    lines.append(f"| {name} | " + " | ".join(fmt.format(row[f"{metric}_per_kind"][k]) for k in kinds) + " |")
  return lines


def _allocation_tables(allocation: Mapping[str, Any], budget: float) -> list[str]:
  """Each level choice between fixed 16x and the oracle at the same budget, per subset of images."""
  lines = ["", f"## Level choices between floor and ceiling at {budget:g} mean tokens", "",
           "Paired differences to fixed 16x on the same images, [95% bootstrap interval]; share: of the exact "
           "choice's gain in that measure; 'tokens for fixed-16x quality': the mean tokens each choice needs to reach "
           "fixed 16x's mean (fixed 16x spends the budget)."]
  for subset, entry in allocation.items():
    measures = [k[len("tokens_for_fixed_16x_"):] for k in entry if k.startswith("tokens_for_fixed_16x_")]
    lines += ["", f"### {subset} ({entry['images']} images)", "",
              "| choice | mean tokens | images at 8x/16x/32x | " + " | ".join(
                  f"{m} - fixed 16x | share of {m} gain | tokens for fixed-16x {m}" for m in measures) + " |",
              "|---|---:|---|" + "---:|---:|---:|" * len(measures)]
    for name, row in entry["choices"].items():
      shares = "/".join(f"{v:.0%}" for v in row["level_share"])
      cells = []
      for m in measures:
        lo, hi = row.get(f"{m}_minus_fixed_16x_ci", (np.nan, np.nan))
        share = row.get(f"{m}_share_of_oracle_gain")
        needed = entry[f"tokens_for_fixed_16x_{m}"].get(name)
        cells += [f"{row[f'{m}_minus_fixed_16x']:+.4g} [{lo:+.3g}, {hi:+.3g}]",
                  "-" if share is None else f"{share:.0%}", "-" if needed is None else f"{needed:.1f}"]
      lines.append(f"| {name} | {row['mean_tokens']:.1f} | {shares} | " + " | ".join(cells) + " |")
  return lines


def markdown_table(results: Mapping[str, Any]) -> str:
  """``results.md``: the settings, the budget comparison of complexity measures, PSNR per kind of image, notes."""
  rows = results["rows"]
  main = [n for n in rows if not n.startswith("budget:")]
  budget = [n for n in rows if n.startswith("budget:")]
  lines = [f"# Reconstruction: {results['dataset']} ({results['num_images']} images, {_sizes(results)}, "
           f"checkpoint step {results['checkpoint_step']})", ""]
  if results.get("training"):
    lines += ["Trained with " + ", ".join(f"{k}={v}" for k, v in results["training"].items()) + ".", ""]
  if results.get("bootstrap_resamples"):
    lines += [f"PSNR: mean of per-image PSNR capped at 50 dB; [brackets]: 95% bootstrap interval over images "
              f"({results['bootstrap_resamples']} resamples; the difference to "
              f"{results.get('paired_reference', 'the reference')} is paired).", ""]
  reference = results.get("paired_reference")
  lines += _table(rows, main, reference)
  if budget:
    lines += ["", f"## Level choices at {results['budget_tokens']:g} mean tokens per image (budget mode)", ""]
    lines += _table(rows, budget, reference)
  if results.get("allocation"):
    lines += _allocation_tables(results["allocation"], results["budget_tokens"])
  if results.get("kinds"):
    for metric, fmt in (("psnr", "{:.2f}"), ("haarpsi", "{:.3f}")):
      if all(f"{metric}_per_kind" in row for row in results["rows"].values()):
        lines += ["", f"## {metric.upper() if metric == 'psnr' else 'HaarPSI'} per kind of image", ""]
        lines += _kinds_table(results, metric, fmt)
  for key, text in results.get("skipped", {}).items():
    lines += ["", f"Note: {text}"]
  for text in results.get("notes", []):
    lines += ["", f"Note: {text}"]
  return "\n".join(lines) + "\n"


def legibility_table(report: Mapping[str, Any]) -> str:
  """``legibility.md``: word accuracy and 1 - NED per row, level and text size group (``evaluate --data text``)."""
  rows = report["rows"]
  present = next(iter(rows["original"].values()))
  groups = [g for g in present if g != "all"] + ["all"]
  lines = [f"# Text legibility: {report['num_images']} images of the text set at {report['image_size']}x"
           f"{report['image_size']}, checkpoint step {report['checkpoint_step']}", "",
           "Each cell: words read exactly / 1 - normalised edit distance (PP-OCR on the true word boxes).", "",
           "| row | level | " + " | ".join(groups) + " |", "|---|---|" + "---:|" * len(groups)]
  for row, levels in rows.items():
    for level, by_group in levels.items():
      cells = [f"{by_group[g]['word_accuracy']:.0%} / {by_group[g]['one_minus_ned']:.3f}" if g in by_group else "-"
               for g in groups]
      lines.append(f"| {row} | {level} | " + " | ".join(cells) + " |")
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
  fig.suptitle(f"{results['dataset']}: rate-distortion ({results['num_images']} images, {_sizes(results)})")
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110)
  plt.close(fig)
  storage.write_bytes(path, buf.getvalue())


def write_reports(results: Mapping[str, Any], grid: list[list[np.ndarray]], out_dir) -> None:
  """Every output file of an evaluation in ``out_dir`` (local or an object store): results.json, results.md,
  rate_distortion.png, reconstructions_*.png."""
  import json

  storage.write_text(out_dir / "results.json", json.dumps(results, indent=2, default=json_default))
  storage.write_text(out_dir / "results.md", markdown_table(results))
  plot_rate_distortion(results, out_dir / "rate_distortion.png")
  write_grids(grid, out_dir)
