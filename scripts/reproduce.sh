#!/usr/bin/env bash
# The reproduction at our scale (docs/reproduction.md): train CAT's nested VAE (paper mode) and separately trained
# fixed 8x/16x/32x tokenizers of the same widths and training steps on the embedded dataset on CPU, train the nested
# model's quality predictor, then compare them, the adaptive assignment, every complexity measure and the exact and
# predicted level choices at the fixed-16x token budget, with 95% bootstrap intervals and the no-learning baselines.
#
#   bash scripts/reproduce.sh [WORKDIR] [RESULTS_DIR]
#
# Defaults: WORKDIR=/tmp/cat_reproduce, RESULTS_DIR=docs/results. Re-running resumes (or skips) each training.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-/tmp/cat_reproduce}"
RESULTS="${2:-docs/results}"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"

start=$(date +%s)
for variant in nested fixed8x fixed16x fixed32x; do
  "$PYTHON" -m cat_jax.train --config "configs/reproduce.py:${variant}" --workdir "$WORKDIR/$variant"
  echo "trained ${variant}: $(( $(date +%s) - start )) s since start"
done

# The nested model's quality predictor (its budget:rd rows and knob-free auto), attached to a tokenizer folder.
"$PYTHON" -m cat_jax.train_predictor --config configs/predictor.py:demo \
    --config.teacher="quality:$WORKDIR/nested" --workdir "$WORKDIR/predictor"
"$PYTHON" - "$WORKDIR" <<'PY'
import sys
from cat_jax import Tokenizer
workdir = sys.argv[1]
tok = Tokenizer.from_checkpoint(f"{workdir}/nested")
tok.set_level_predictor(f"{workdir}/predictor/predictor")
tok.save_pretrained(f"{workdir}/nested_tokenizer")
PY
"$PYTHON" -m cat_jax.evaluate --workdir "$WORKDIR/nested_tokenizer" --split validation --num-images 400 \
    --scorers random,jpeg,mse,grade,predictor --num-grid-images 8 --out "$WORKDIR/eval" \
    --compare "trained_fixed_8x=$WORKDIR/fixed8x@8x" --compare "trained_fixed_16x=$WORKDIR/fixed16x@16x" \
    --compare "trained_fixed_32x=$WORKDIR/fixed32x@32x" --paired-against trained_fixed_16x
echo "total: $(( $(date +%s) - start )) s"

mkdir -p "$RESULTS"
cp "$WORKDIR/eval/results.json" "$WORKDIR/eval/results.md" "$WORKDIR/eval/rate_distortion.png" "$RESULTS/"
cp "$WORKDIR/eval/reconstructions_000.png" "$RESULTS/reconstructions.png"
echo "results in $RESULTS"
