#!/usr/bin/env bash
# The reproduction at our scale (docs/reproduction.md): train CAT's nested VAE (paper mode) and separately trained
# fixed 8x/16x/32x tokenizers of the same widths and training steps on the embedded dataset on CPU, then compare them,
# the adaptive assignment and every complexity measure at the fixed-16x token budget, with 95% bootstrap intervals
# and the no-learning baselines.
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

"$PYTHON" -m cat_jax.evaluate --workdir "$WORKDIR/nested" --split validation --num-images 400 \
    --scorers random,jpeg,mse,grade --num-grid-images 8 --out "$WORKDIR/eval" \
    --compare "trained_fixed_8x=$WORKDIR/fixed8x@8x" --compare "trained_fixed_16x=$WORKDIR/fixed16x@16x" \
    --compare "trained_fixed_32x=$WORKDIR/fixed32x@32x" --paired-against trained_fixed_16x
echo "total: $(( $(date +%s) - start )) s"

mkdir -p "$RESULTS"
cp "$WORKDIR/eval/results.json" "$WORKDIR/eval/results.md" "$WORKDIR/eval/rate_distortion.png" "$RESULTS/"
cp "$WORKDIR/eval/reconstructions_000.png" "$RESULTS/reconstructions.png"
echo "results in $RESULTS"
