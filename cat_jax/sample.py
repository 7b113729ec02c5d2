r"""Samples a trained DiT (``python -m cat_jax.train_dit``) and decodes through its tokenizer; optional gFID.

  python -m cat_jax.sample --workdir /tmp/dit_demo --classes 0,1,2 --per-class 8 --level auto --out grid.png
  python -m cat_jax.sample --workdir DIR --classes all --per-class 4 --level 16x --cfg-scale 3 --out grid.png
  python -m cat_jax.sample --workdir DIR --fid-samples 50000 --inception-weights ~/.cache/cat_jax/inception_fid.msgpack

The grid has one row per class, ``--per-class`` samples each. ``--level``: ``auto`` draws each sample's level from
its class's level distribution in the training latents; ``0/1/2`` or ``8x/16x/32x`` forces it (e.g. the level that
``python -m cat_jax.score --text "a prompt"`` gives a text prompt). ``--report`` writes ``<out>.json`` with each
sample's class and level.

gFID (``--fid-samples N``): N samples, classes uniform, levels as ``--level``, against reference statistics of the real
images (``data.source`` / ``data.split`` of the run's config, centre crops at its image size; at most
``--fid-reference-images``), both through the same Flax Inception (``cat_jax.metrics.fid``). The reference statistics
are cached in ``<workdir>/fid_reference_<n>.npz``. The paper's protocol is N = 50,000 on ImageNet 256.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable, Sequence

import numpy as np

from cat_jax import cli
from cat_jax import levels as L
from cat_jax import storage


def build_parser() -> argparse.ArgumentParser:
  p = cli.ArgumentParser(prog="python -m cat_jax.sample", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a python -m cat_jax.train_dit workdir")
  p.add_argument("--classes", default="all", help="comma-separated class indices, or 'all' (default)")
  p.add_argument("--per-class", type=int, default=8)
  p.add_argument("--level", default="auto", help="auto (default), 0/1/2 or 8x/16x/32x")
  p.add_argument("--out", help="grid PNG (default <workdir>/samples.png)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--cfg-scale", type=float, help="classifier-free guidance (default: the config's sample.cfg_scale)")
  p.add_argument("--num-steps", type=int, help="ODE steps (default: the config's)")
  p.add_argument("--solver", choices=("euler", "heun"), help="default: the config's")
  p.add_argument("--batch-size", type=int, default=64)
  p.add_argument("--no-ema", action="store_true", help="raw parameters instead of the EMA")
  p.add_argument("--report", action="store_true", help="also write <out>.json: class and level of every sample")
  p.add_argument("--jpeg-report", action="store_true",
                 help="print the JPEG bits per pixel of the samples and of the run's real images, per class")
  g = p.add_argument_group("gFID")
  g.add_argument("--fid-samples", type=int, help="compute gFID over this many samples")
  g.add_argument("--inception-weights", help="converted FID Inception weights (python -m cat_jax.convert inception)")
  g.add_argument("--fid-reference-images", type=int, default=50_000, help="real images for the reference (max)")
  return p


def parse_classes(text: str, num_classes: int) -> list[int]:
  if text.strip().lower() == "all":
    return list(range(num_classes))
  try:
    classes = [int(c) for c in text.split(",") if c.strip()]
  except ValueError:
    raise ValueError(f"--classes must be comma-separated integers or 'all', got {text!r}") from None
  if not classes:
    raise ValueError("--classes is empty")
  return classes


def reference_statistics(inception_fn: Callable, config, *, max_images: int, batch_size: int = 64):
  """FID statistics of the run's real images (``data.source`` / ``data.split``, centre crops)."""
  from cat_jax import data as cat_data
  from cat_jax.metrics.fid import FidStatistics

  source = cat_data.get_source(config.data.source, config.data.split, **config.data.source_kwargs)
  n = min(len(source), max_images)
  stats = None
  preprocess_config = cat_data.PreprocessConfig(image_size=int(config.data.image_size), on_bad_image="raise")
  for start in range(0, n, batch_size):
    images = np.stack([cat_data.preprocess(source[i]["image"], preprocess_config, path=str(i), rng=None)
                       for i in range(start, min(n, start + batch_size))])
    features = np.asarray(inception_fn(images))
    stats = FidStatistics.from_features(features) if stats is None else stats.update(features)
  return stats


def generation_fid(generator, inception_fn: Callable, reference, *, num_samples: int, level="auto", seed: int = 0,
                   batch_size: int = 64) -> dict:
  """gFID of ``num_samples`` samples (classes uniform, seeded) against ``reference`` FidStatistics."""
  from cat_jax.metrics.fid import FidStatistics, fid_from_statistics

  if num_samples < 2:
    raise ValueError(f"gFID needs at least 2 samples, got {num_samples}")
  labels = np.random.default_rng([seed, 0xF1D]).integers(0, generator.num_classes, num_samples)
  levels = generator.choose_levels(labels, level, seed=seed)
  stats = FidStatistics.zeros(reference.dim)
  for start in range(0, num_samples, batch_size):
    sl = slice(start, start + batch_size)
    images, _ = generator.generate(labels[sl], levels[sl], seed=seed * 1_000_003 + start)
    stats.update(np.asarray(inception_fn(images)))
  return {"gfid": fid_from_statistics(stats, reference), "num_samples": num_samples,
          "num_reference": reference.count, "level": str(level),
          "level_counts": np.bincount(levels, minlength=L.NUM_LEVELS).tolist()}


def jpeg_bpp_by_class(images, labels) -> dict[int, float]:
  """Mean JPEG bits per pixel (the complexity scorer's quality) of images in [-1, 1], per class."""
  from PIL import Image

  from cat_jax.complexity.scorers import jpeg_bpp
  from cat_jax.metric_writers import to_uint8

  bpp = np.array([jpeg_bpp(Image.fromarray(x)) for x in to_uint8(np.asarray(images))])
  labels = np.asarray(labels)
  return {int(y): float(bpp[labels == y].mean()) for y in np.unique(labels)}


def class_rank_correlation(a: dict[int, float], b: dict[int, float]) -> float:
  """Spearman rank correlation of two per-class measures over their common classes (1.0 for a single class)."""
  classes = sorted(set(a) & set(b))
  if len(classes) < 2:
    return 1.0
  rank = lambda d: np.argsort(np.argsort([d[y] for y in classes]))
  return float(np.corrcoef(rank(a), rank(b))[0, 1])


def real_images_by_class(config, classes: Sequence[int], *, per_class: int) -> tuple[np.ndarray, np.ndarray]:
  """The run's first ``per_class`` real images of each class (centre crops at its image size, in [-1, 1]) and their
  labels."""
  from cat_jax import data as cat_data

  source = cat_data.get_source(config.data.source, config.data.split, **config.data.source_kwargs)
  labels = cat_data.source_labels(source, len(source))
  preprocess_config = cat_data.PreprocessConfig(image_size=int(config.data.image_size), on_bad_image="raise")
  picked = [i for y in classes for i in np.flatnonzero(labels == y)[:per_class]]
  images = [cat_data.preprocess(source[int(i)]["image"], preprocess_config, path=str(i), rng=None) for i in picked]
  return np.stack(images), labels[picked]


def real_jpeg_bpp_by_class(config, classes: Sequence[int], *, per_class: int) -> dict[int, float]:
  """The same measure on the run's real images (``real_images_by_class``)."""
  return jpeg_bpp_by_class(*real_images_by_class(config, classes, per_class=per_class))


def _cached_reference(args, inception_fn, config):
  from cat_jax.metrics.fid import FidStatistics

  path = storage.as_path(args.workdir) / f"fid_reference_{args.fid_reference_images}.npz"
  if path.exists():
    with path.open("rb") as f:
      z = np.load(f)
      return FidStatistics(int(z["count"]), z["total"], z["outer"])
  stats = reference_statistics(inception_fn, config, max_images=args.fid_reference_images)
  import io
  buf = io.BytesIO()
  np.savez(buf, count=stats.count, total=stats.total, outer=stats.outer)
  storage.write_bytes(path, buf.getvalue())
  return stats


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    from cat_jax.generation.sampling import Generator
    from cat_jax.metric_writers import make_image_grid

    if args.per_class < 1:
      raise ValueError(f"--per-class must be >= 1, got {args.per_class}")
    if args.fid_samples is not None and not args.inception_weights:
      raise ValueError("--fid-samples needs --inception-weights (python -m cat_jax.convert inception --out PATH)")
    gen = Generator.from_workdir(args.workdir, use_ema=not args.no_ema, cfg_scale=args.cfg_scale,
                                 num_steps=args.num_steps, solver=args.solver, batch_size=args.batch_size)
    classes = parse_classes(args.classes, gen.num_classes)
    labels = np.repeat(np.asarray(classes, np.int32), args.per_class)
    levels = gen.choose_levels(labels, args.level, seed=args.seed)
    images, _ = gen.generate(labels, levels, seed=args.seed)
    rows = [images[i * args.per_class:(i + 1) * args.per_class] for i in range(len(classes))]
    out = args.out or os.fspath(storage.as_path(args.workdir) / "samples.png")
    storage.write_png(out, make_image_grid(rows))
    print(f"wrote {out}: {len(classes)} classes x {args.per_class} samples, levels "
          f"{'/'.join(L.level_name(l) for l in range(L.NUM_LEVELS))} = "
          f"{'/'.join(str(int(c)) for c in np.bincount(levels, minlength=L.NUM_LEVELS))} "
          f"({gen.num_steps} {gen.solver} steps, cfg {gen.cfg_scale})")
    if args.report:
      storage.write_text(os.path.splitext(out)[0] + ".json", json.dumps(
          {"classes": labels.tolist(), "levels": levels.tolist(), "seed": args.seed}) + "\n")
    if args.jpeg_report:
      from cat_jax import checkpoint as ckpt

      generated = jpeg_bpp_by_class(images, labels)
      real = real_jpeg_bpp_by_class(ckpt.load_config(args.workdir), classes, per_class=max(args.per_class, 32))
      print("class | JPEG bpp generated | JPEG bpp real | levels 8x/16x/32x of the samples")
      for y in classes:
        mix = np.bincount(levels[labels == y], minlength=L.NUM_LEVELS)
        print(f"{y} | {generated[y]:.3f} | {real[y]:.3f} | {'/'.join(str(int(c)) for c in mix)}")
      print(f"Spearman rank correlation, generated vs real: {class_rank_correlation(generated, real):.3f}")
    if args.fid_samples is not None:
      from cat_jax import checkpoint as ckpt
      from cat_jax.models.inception import load_inception

      inception_fn = load_inception(args.inception_weights)
      reference = _cached_reference(args, inception_fn, ckpt.load_config(args.workdir))
      result = generation_fid(gen, inception_fn, reference, num_samples=args.fid_samples, level=args.level,
                              seed=args.seed, batch_size=args.batch_size)
      print(f"gFID {result['gfid']:.2f} ({result['num_samples']} samples vs {result['num_reference']} real images; "
            f"levels {result['level_counts']})")
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
