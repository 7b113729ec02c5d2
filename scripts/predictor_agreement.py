"""How well a level predictor reproduces its teacher on a data source; one JSON line. A quality predictor (the
shipped demo's): its levels at its price against the levels the tokenizer's measured qualities earn at that price,
Spearman of what each level step buys, and the share of the exact choice's gain over fixed 16x it gets at 16x's
tokens (``complexity.predictor.quality_agreement``). A score predictor: Spearman on scores, exact level (at
thresholds matching the teacher's level mix on its training data) and the majority-level baseline.

  python scripts/predictor_agreement.py --predictor demo --data heldout                             # unseen photos
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


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--predictor", default="demo")
  p.add_argument("--data", default="heldout", help="a source name: embedded, heldout, ... (cat_jax.data.get_source)")
  p.add_argument("--split", default="validation")
  p.add_argument("--teacher", help="default: the predictor's own (e.g. quality:demo)")
  p.add_argument("--num-images", type=int, default=400)
  p.add_argument("--workdir", help="where an mse teacher's manifest goes (default: a temporary folder)")
  args = p.parse_args()
  predictor = load_level_predictor(args.predictor)
  teacher_spec = args.teacher or predictor.teacher
  source = get_source(args.data, args.split)
  source = Subset(source, range(min(args.num_images, len(source))))
  if predictor.qualities is not None:
    if not teacher_spec.startswith("quality:"):
      sys.exit(f"error: a quality predictor is compared with a 'quality:<tokenizer>' teacher, got {teacher_spec!r}")
    from cat_jax.complexity.predictor import quality_agreement
    from cat_jax.tokenizer import load_tokenizer
    from cat_jax.train_predictor import source_images

    size, measure = predictor.image_size, predictor.measures[0]
    _, images = source_images(source, len(source), size)
    measured = load_tokenizer(teacher_spec[len("quality:"):]).quality_table(images, (measure,))[measure]
    result = quality_agreement(predictor.predict_quality(images)[measure], measured, price=predictor.price,
                               budget_tokens=predictor.budget_tokens, image_hw=(size, size))
    print(json.dumps({"data": f"{args.data} ({args.split})", "teacher": teacher_spec, "measure": measure, **result}))
    return
  info = predictor.info or {}
  if "teacher_mix_thresholds" not in info:
    sys.exit("error: the predictor records no training-time teacher mix (train it with python -m "
             "cat_jax.train_predictor)")
  with tempfile.TemporaryDirectory() as tmp:
    teacher = teacher_records(teacher_spec, source, args.split, image_size=predictor.image_size,
                              workdir=args.workdir or tmp)
    majority = int(np.argmax(info["teacher"]["level_counts"]))
    result = measure_agreement(predictor, source, teacher[0], info["teacher"]["thresholds"],
                               info["teacher_mix_thresholds"], majority, limit=len(source))
  print(json.dumps({"data": f"{args.data} ({args.split})", "teacher": teacher_spec, **result}))


if __name__ == "__main__":
  main()
