#!/usr/bin/env bash
# The benchmark suite in one call on a lent GPU (docs/performance.md): carried wheels, a fresh persistent cache,
# every executable compiled side by side first (--prewarm), then the timed parts; the log goes to $OUT/suite.log.
#   bash benchmarks/gpu_suite.sh [suite.py options, e.g. --parts env,train_jax]
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ]; then  # packages the accelerator image lacks (grain, ml_collections, lpips, pytorch-fid, ...)
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
out=${OUT:-/tmp/cat_jax_suite}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used,memory.total --format=csv \
  | tee "$out/nvidia_smi.csv"
python3 benchmarks/suite.py --quick --prewarm --markdown --timeout "${PART_TIMEOUT:-280}" \
  --parts env,train_jax,train_torch,lpips,fid,inference --cache-dir /tmp/cat_jax_jax_cache "$@" 2>&1 \
  | tee "$out/suite.log"
