"""Images/s of the level-bucketed training pipeline at 256x256, with N grain workers.

Ours: ``make_train_iterator`` (read, decode, resize, random crop, scale, batch, bucket)
with 0, 2, 4, ... worker processes. Reference: the same read + preprocess in a plain
single-process Python loop (no grain), so the ratio shows what the pipeline adds on top
of raw decoding. Compare the figures with the train step's images/s to know the input
pipeline outruns training.

  python benchmarks/data_bench.py                      # synthetic ImageNet-like JPEG folder
  python benchmarks/data_bench.py --source embedded    # the embedded dataset (generated)
  python benchmarks/data_bench.py --folder /data/imgs --workers 0,4,8 --train_images_per_s 900
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from cat_jax.data import get_source, make_train_iterator  # noqa: E402
from cat_jax.data.embedded import generate  # noqa: E402
from cat_jax.data.preprocess import PreprocessConfig, preprocess  # noqa: E402


def write_jpeg_folder(path: str, n: int) -> None:
  """ImageNet-like files: 500x375 JPEGs (quality 90) of the embedded images' content."""
  for i in range(n):
    arr, _, _ = generate(i, image_size=500)
    img = Image.fromarray(arr).resize((500, 375), Image.BICUBIC)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    with open(os.path.join(path, f"{i:05d}.jpg"), "wb") as f:
      f.write(buf.getvalue())


def reference_images_per_s(source, image_size: int, n: int) -> float:
  config = PreprocessConfig(image_size=image_size)
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for i in range(n):
    record = source[i % len(source)]
    preprocess(record["image"], config, path=record["id"], rng=rng)
  return n / (time.perf_counter() - start)


def pipeline_images_per_s(source, *, workers: int, batch_size: int, image_size: int,
                          steps: int, warmup: int) -> float:
  it = make_train_iterator(source, levels=None if hasattr(source, "builtin_levels") else 0,
                           batch_size=batch_size, image_size=image_size, seed=0,
                           process_index=0, process_count=1, num_workers=workers,
                           read_threads=2, prefetch_batches=4)
  for _ in range(warmup):  # Worker start-up and first batches.
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
  elapsed = time.perf_counter() - start
  assert batch["image"].shape == (batch_size, image_size, image_size, 3)
  if hasattr(it, "close"):
    it.close()
  return steps * batch_size / elapsed


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--source", choices=("jpeg", "embedded"), default="jpeg")
  parser.add_argument("--folder", default=None, help="an existing image folder to read instead")
  parser.add_argument("--num_images", type=int, default=512)
  parser.add_argument("--workers", default="0,2,4", help="comma-separated worker counts")
  parser.add_argument("--batch_size", type=int, default=32)
  parser.add_argument("--image_size", type=int, default=256)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  parser.add_argument("--train_images_per_s", type=float, default=None,
                      help="images/s of the train step, to compare against")
  args = parser.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    if args.folder:
      source, what = get_source("folder", "all", path=args.folder), f"folder {args.folder}"
    elif args.source == "jpeg":
      write_jpeg_folder(tmp, args.num_images)
      source, what = get_source("folder", "all", path=tmp), "synthetic 500x375 JPEG folder"
    else:
      source = get_source("embedded", "train", num_images=args.num_images)
      what = "embedded dataset (generated on the fly, 256x256 PNG)"
    print(f"source: {what}, {len(source)} images; output {args.image_size}x{args.image_size}, "
          f"batch {args.batch_size}; {os.cpu_count()} CPUs")
    ref = reference_images_per_s(source, args.image_size, min(len(source), 200))
    print(f"reference (plain loop, 1 process, no grain): {ref:8.1f} images/s")
    for workers in [int(w) for w in args.workers.split(",")]:
      ours = pipeline_images_per_s(source, workers=workers, batch_size=args.batch_size,
                                   image_size=args.image_size, steps=args.steps,
                                   warmup=args.warmup)
      line = f"pipeline, {workers} workers: {ours:8.1f} images/s  ratio vs reference {ours / ref:5.2f}x"
      if args.train_images_per_s:
        line += f"  vs training {ours / args.train_images_per_s:5.2f}x"
      print(line)


if __name__ == "__main__":
  main()
