#!/usr/bin/env bash
# The reproduction at our scale (docs/reproduction.md): train CAT's nested VAE on the embedded dataset on CPU, then
# compare fixed 8x/16x/32x, adaptive levels, and complexity measures at the fixed-16x token budget.
#
#   bash scripts/reproduce.sh [WORKDIR] [RESULTS_DIR]
#
# Evaluation uses the run's own data source (the embedded dataset drawn at 64x64), validation split.
# Defaults: WORKDIR=/tmp/cat_reproduce, RESULTS_DIR=docs/results. Re-running resumes training from WORKDIR.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR="${1:-/tmp/cat_reproduce}"
RESULTS="${2:-docs/results}"
PYTHON="${PYTHON:-python}"
export PYTHONPATH="${PWD}${PYTHONPATH:+:${PYTHONPATH}}"

start=$(date +%s)
"$PYTHON" -m cat_jax.train --config configs/reproduce.py --workdir "$WORKDIR"
echo "training took $(( $(date +%s) - start )) s"

"$PYTHON" -m cat_jax.evaluate --workdir "$WORKDIR" --split validation --num_images 400 \
    --measures random,jpeg,mse,grade --num_grid_images 8 --out "$WORKDIR/eval"

mkdir -p "$RESULTS"
cp "$WORKDIR/eval/results.json" "$WORKDIR/eval/results.md" "$WORKDIR/eval/rate_distortion.png" "$RESULTS/"
cp "$WORKDIR/eval/reconstructions_000.png" "$RESULTS/reconstructions.png"
echo "results in $RESULTS"
