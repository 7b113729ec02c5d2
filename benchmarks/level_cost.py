"""What choosing a level costs, per image, against one encode of the same images (images/s, same run, CPU or GPU).

Measured on the shipped ``demo`` tokenizer (or ``--tokenizer``) and embedded validation images at its training size:
  encode             ``tok.encode(x, "16x")``: the reference
  jpeg               the JPEG scorer alone (bits per pixel) on the prepared batch, as ``--level auto --scorer jpeg``
  predictor          the tokenizer's level predictor on the whole batch (what knob-free ``levels="auto"`` runs)
  predictor_each     the predictor one image at a time, as ``score --method predictor`` runs it
  auto               ``tok.assign_levels(x, "auto")``: the tokenizer's calibrated default, if it has one
  target_psnr        ``tok.assign_levels(x, LevelAssigner(target_psnr=P))``: the exact search (32x, 16x, 8x for misses)
Each is run ``--repeats`` times after a warm-up; the figure is the median images/s with its range, and
``over_encode`` the ratio of its time per image to the encode's (lower is cheaper).

  python benchmarks/level_cost.py
  python benchmarks/level_cost.py --images 256 --target_psnr 28
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from cat_jax.complexity.assign import LevelAssigner, score_images  # noqa: E402
from cat_jax.complexity.predictor import PredictorScorer  # noqa: E402
from cat_jax.complexity.scorers import JpegScorer  # noqa: E402
from cat_jax.data.preprocess import from_model_range  # noqa: E402
from cat_jax.data import EmbeddedSource, PreprocessConfig, preprocess  # noqa: E402
from cat_jax.tokenizer import load_tokenizer  # noqa: E402


def timed(fn, repeats: int) -> list[float]:
  fn()  # warm-up (compiles)
  seconds = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    seconds.append(time.perf_counter() - start)
  return seconds


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--tokenizer", default="demo")
  p.add_argument("--images", type=int, default=64)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--target_psnr", type=float, default=30.0)
  args = p.parse_args()
  tok = load_tokenizer(args.tokenizer, batch_size=16)
  size = tok.image_size or 64
  source = EmbeddedSource("validation", num_images=args.images, image_size=size)
  prep = PreprocessConfig(image_size=size, min_size=1)
  x = np.stack([preprocess(source[i]["image"], prep) for i in range(len(source))])
  ids = [str(i) for i in range(len(x))]
  x_uint8 = [from_model_range(image) for image in x]
  jpeg = JpegScorer(image_size=size)
  runs = {"encode": lambda: tok.encode(x, "16x"), "jpeg": lambda: score_images(jpeg, ids, x)}
  if tok.level_predictor is not None:
    scorer = PredictorScorer(tok.level_predictor, image_size=None)
    runs["predictor"] = lambda: tok.level_predictor.predict(x)
    runs["predictor_each"] = lambda: [scorer.score({"id": i, "image": u}) for i, u in zip(ids, x_uint8)]
  runs["target_psnr"] = lambda: tok.assign_levels(x, LevelAssigner(target_psnr=args.target_psnr))
  if tok.auto_levels is not None:
    runs["auto"] = lambda: tok.assign_levels(x, "auto")
  reference = None
  for name, fn in runs.items():
    seconds = timed(fn, args.repeats)
    per_image = float(np.median(seconds)) / len(x)
    reference = reference or per_image
    line = {"what": name, "images": len(x), "images_per_s": round(1 / per_image, 1),
            "images_per_s_range": [round(len(x) / max(seconds), 1), round(len(x) / min(seconds), 1)],
            "over_encode": round(per_image / reference, 3)}
    if name == "target_psnr":
      levels = tok.assign_levels(x, LevelAssigner(target_psnr=args.target_psnr))
      line.update(target_psnr=args.target_psnr, level_counts=np.bincount(levels, minlength=3).tolist())
    print(json.dumps(line), flush=True)


if __name__ == "__main__":
  main()
