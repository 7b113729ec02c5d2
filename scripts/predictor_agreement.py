"""How well a level predictor reproduces its teacher on a data source: Spearman on scores, exact level (at thresholds
matching the teacher's level mix on the predictor's training data) and the majority-level baseline; one JSON line.

  python scripts/predictor_agreement.py --predictor demo --data heldout --teacher mse:demo          # unseen photos
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
  p.add_argument("--teacher", default="mse:demo")
  p.add_argument("--num-images", type=int, default=400)
  p.add_argument("--workdir", help="where an mse teacher's manifest goes (default: a temporary folder)")
  args = p.parse_args()
  predictor = load_level_predictor(args.predictor)
  info = predictor.info or {}
  if "teacher_mix_thresholds" not in info:
    sys.exit("error: the predictor records no training-time teacher mix (train it with python -m "
             "cat_jax.train_predictor)")
  source = get_source(args.data, args.split)
  source = Subset(source, range(min(args.num_images, len(source))))
  with tempfile.TemporaryDirectory() as tmp:
    teacher = teacher_records(args.teacher, source, args.split, image_size=predictor.image_size,
                              workdir=args.workdir or tmp)
    majority = int(np.argmax(info["teacher"]["level_counts"]))
    result = measure_agreement(predictor, source, teacher[0], info["teacher"]["thresholds"],
                               info["teacher_mix_thresholds"], majority, limit=len(source))
  print(json.dumps({"data": f"{args.data} ({args.split})", "teacher": args.teacher, **result}))


if __name__ == "__main__":
  main()
