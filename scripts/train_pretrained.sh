#!/usr/bin/env bash
# Trains the small tokenizer that ships with the package (Tokenizer.from_pretrained("demo")), exports its EMA
# weights to cat_jax/pretrained/demo/ and evaluates it against the no-learning baselines on the embedded
# validation split and on held-out photos. See cat_jax/pretrained/README.md for what came out.
#
#   bash scripts/train_pretrained.sh [WORKDIR] [STEP]     # STEP: the checkpoint to export (default: the latest)
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-/tmp/cat_pretrained}"
STEP="${2:-}"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"

"$PYTHON" -m cat_jax.train --config configs/cat.py:demo --workdir "$WORKDIR" --config.num_steps=4000 \
    --config.loss.disc_start=1000000 --config.eval_every=1000 --config.checkpoint_every=250 --config.ema_decay=0.999
"$PYTHON" - "$WORKDIR" "$STEP" <<'PY'
import sys
import cat_jax
workdir, step = sys.argv[1], (int(sys.argv[2]) if sys.argv[2] else None)
cat_jax.Tokenizer.from_checkpoint(workdir, step=step).save_pretrained("cat_jax/pretrained/demo")
print("exported", workdir, "step", step or "latest", "to cat_jax/pretrained/demo")
PY
for data in embedded heldout; do
  "$PYTHON" -m cat_jax.evaluate --workdir demo --data "$data" --split validation --num-images 400 --measures none \
      --out "$WORKDIR/eval_demo_$data"
done
