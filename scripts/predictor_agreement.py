"""How well a level predictor reproduces its teacher on a data source; one JSON line. A quality predictor (the
shipped demo's), in each measure it predicts: its levels at its price against the levels the tokenizer's measured
qualities earn at that price (first measure), Spearman of what each level step buys, the share of the exact
choice's gain over fixed 16x it gets at 16x's tokens, the tokens it needs for fixed 16x's quality
(``complexity.predictor.quality_agreement``), and its paired difference to fixed 16x at 16x's tokens with a 95%
bootstrap interval. A score predictor: Spearman on scores, exact level (at thresholds matching the teacher's level
mix on its training data) and the majority-level baseline.

  python scripts/predictor_agreement.py --predictor demo --data heldout                             # unseen photos
  python scripts/predictor_agreement.py --predictor demo --data heldout --whole    # the same pictures, whole
  python scripts/predictor_agreement.py --predictor /tmp/pred --data heldout --teacher mse:demo
  python scripts/predictor_agreement.py --predictor demo --data embedded --split validation --teacher mse:demo
  python scripts/predictor_agreement.py --predictor /tmp/pred --data embedded --teacher grade --num-images 400

``--predictor``: a tokenizer that ships one ('demo', a folder) or a train_predictor workdir. ``--teacher``: as
configs/predictor.py's (``mse:<tokenizer>``, ``grade``, a score manifest); an mse teacher is scored into ``--workdir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from cat_jax.data import Subset, get_source  # noqa: E402
from cat_jax.score import load_level_predictor  # noqa: E402
from cat_jax.train_predictor import measure_agreement, teacher_records  # noqa: E402


def fail(message: str) -> None:
  """Bad input: one ``error:`` line and exit status 2."""
  print(f"error: {message}", file=sys.stderr)
  sys.exit(2)


def load_predictor(spec: str):
  try:
    return load_level_predictor(spec)
  except (FileNotFoundError, ValueError) as e:
    fail(str(e))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--predictor", default="demo")
  p.add_argument("--data", default="heldout", help="a source name: embedded, heldout, ... (cat_jax.data.get_source)")
  p.add_argument("--split", default="validation")
  p.add_argument("--teacher", help="default: the predictor's own (e.g. quality:demo)")
  p.add_argument("--num-images", type=int, default=400)
  p.add_argument("--workdir", help="where an mse teacher's manifest goes (default: a temporary folder)")
  p.add_argument("--image-size", "--image_size", type=int,
                 help="the size images are viewed at (default: the predictor's image_size)")
  p.add_argument("--whole", action="store_true",
                 help="a quality predictor on the held-out pictures whole at their own sizes (and three skimage "
                      "textures: gravel, brick, grass), not crops: levels at its price against the exact ones")
  args = p.parse_args()
  if args.whole:
    whole_pictures(args)
    return
  predictor = load_predictor(args.predictor)
  teacher_spec = args.teacher or predictor.teacher
  source = get_source(args.data, args.split)
  source = Subset(source, range(min(args.num_images, len(source))))
  if predictor.qualities is not None:
    if not teacher_spec.startswith("quality:"):
      fail(f"a quality predictor is compared with a 'quality:<tokenizer>' teacher, got {teacher_spec!r}")
    from cat_jax.complexity import allocation
    from cat_jax.complexity.predictor import quality_agreement
    from cat_jax.tokenizer import load_tokenizer
    from cat_jax.train_predictor import source_images

    size = args.image_size or predictor.image_size
    _, images = source_images(source, len(source), size)
    measured = load_tokenizer(teacher_spec[len("quality:"):]).quality_table(images, predictor.measures)
    predicted = predictor.predict_quality(images)
    tokens = allocation.tokens_table([(size, size)] * len(images))
    budget = float(tokens[:, 1].mean())
    result = {}
    for k, m in enumerate(predictor.measures):
      result[m] = quality_agreement(predicted[m], measured[m], price=predictor.price if k == 0 else None,
                                    budget_tokens=budget, image_hw=(size, size))
      choices = {"fixed_16x": np.ones(len(images), int),
                 "predicted": allocation.best_within_budget(predicted[m], tokens, budget)}
      row = allocation.compare({m: measured[m]}, tokens, choices)["predicted"]
      result[m]["predicted_minus_fixed_16x"] = round(row[f"{m}_minus_fixed_16x"], 4)
      result[m]["predicted_minus_fixed_16x_ci"] = [round(v, 4) for v in row[f"{m}_minus_fixed_16x_ci"]]
    print(json.dumps({"data": f"{args.data} ({args.split}) at {size}x{size}", "teacher": teacher_spec, **result}))
    return
  info = predictor.info or {}
  if "teacher_mix_thresholds" not in info:
    fail("the predictor records no training-time teacher mix (train it with python -m cat_jax.train_predictor)")
  with tempfile.TemporaryDirectory() as tmp:
    teacher = teacher_records(teacher_spec, source, args.split, image_size=predictor.image_size,
                              workdir=args.workdir or tmp)
    majority = int(np.argmax(info["teacher"]["level_counts"]))
    result = measure_agreement(predictor, source, teacher[0], info["teacher"]["thresholds"],
                               info["teacher_mix_thresholds"], majority, limit=len(source))
  print(json.dumps({"data": f"{args.data} ({args.split})", "teacher": teacher_spec, **result}))


def whole_pictures(args) -> None:
  """``--whole``: the held-out pictures and three skimage textures at their own sizes."""
  import skimage.data

  from cat_jax.complexity import allocation
  from cat_jax.data.heldout import PICTURES, _picture
  from cat_jax.tokenizer import load_tokenizer

  predictor = load_predictor(args.predictor)
  if predictor.qualities is None or predictor.price is None:
    fail("--whole needs a quality predictor with a price (python -m cat_jax.train_predictor "
         "--config.teacher=quality:TOKENIZER)")
  names = [name.split(".")[0] for name, _, _ in PICTURES] + ["gravel", "brick", "grass"]
  pictures = [_picture(name, where) for name, where, _ in PICTURES]
  for texture in names[len(PICTURES):]:
    pixels = np.asarray(getattr(skimage.data, texture)())
    pictures.append(np.repeat(pixels[..., None], 3, axis=-1) if pixels.ndim == 2 else pixels)
  measure = predictor.measures[0]
  tok = load_tokenizer((args.teacher or predictor.teacher)[len("quality:"):])
  measured = np.concatenate([tok.quality_table([x], (measure,))[measure] for x in pictures])
  rate = allocation.rate_table(len(pictures))
  exact = allocation.at_price(measured, rate, predictor.price)
  mine = allocation.at_price(predictor.predict_quality(pictures)[measure], rate, predictor.price)
  print(json.dumps({"data": "held-out pictures and textures at their own sizes", "measure": measure,
                    "images": len(pictures), "level_at_price": round(float(np.mean(mine == exact)), 4),
                    "two_levels_apart": int(np.sum(np.abs(mine - exact) == 2)),
                    "levels": {n: {"size": list(x.shape[:2]), "predicted": int(a), "exact": int(b)}
                               for n, x, a, b in zip(names, pictures, mine, exact)}}))


if __name__ == "__main__":
  main()
