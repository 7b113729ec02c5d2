#!/usr/bin/env bash
# Trains the small tokenizer that ships with the package (Tokenizer.from_pretrained("demo")), exports its EMA
# weights to cat_jax/pretrained/demo/ and evaluates it against the no-learning baselines on the embedded
# validation split and on held-out photos. See cat_jax/pretrained/README.md for what came out.
#
#   bash scripts/train_pretrained.sh [WORKDIR] [STEP]     # STEP: the checkpoint to export (default: the latest)
#   STEPS=N bash scripts/train_pretrained.sh ...          # train N steps (default 14,400: 3x the demo's)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-/tmp/cat_pretrained}"
STEP="${2:-}"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"

"$PYTHON" -m cat_jax.train --config configs/cat.py:demo --workdir "$WORKDIR" --config.num_steps="${STEPS:-14400}" \
    --config.eval_every=2400 --config.checkpoint_every=600 --config.ema_decay=0.999
"$PYTHON" - "$WORKDIR" "$STEP" <<'PY'
import pathlib
import sys
import cat_jax
from cat_jax.complexity.predictor import LevelPredictor
workdir, step = sys.argv[1], (int(sys.argv[2]) if sys.argv[2] else None)
out = pathlib.Path("cat_jax/pretrained/demo")
tok = cat_jax.Tokenizer.from_checkpoint(workdir, step=step)
if (out / "predictor.json").is_file():  # the shipped level predictor (python -m cat_jax.train_predictor) stays
  tok.set_level_predictor(LevelPredictor.load(out))
tok.save_pretrained(out)
print("exported", workdir, "step", step or "latest", "to", out)
PY
for data in embedded heldout; do
  "$PYTHON" -m cat_jax.evaluate --workdir demo --data "$data" --split validation --num-images 400 --scorers none \
      --out "$WORKDIR/eval_demo_$data"
done
