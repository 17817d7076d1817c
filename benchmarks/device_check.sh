#!/usr/bin/env bash
# The device check: one short run on a GPU machine (the project's: an H200 with a CUDA PyTorch, pytest and
# the scientific stack, no package index). Installs leandiff's missing dependencies from the wheels in
# .wheels/ (benchmarks/fetch_wheels.sh, run beforehand where an index is; carried with the tree) with
# --no-index --no-deps into /tmp/site, leaving the machine's torch alone; runs the gpu-marked tests, then
# benchmarks/bench_device.py. Writes into $OUT (or benchmarks/results/): device-cuda.md, device-cuda.json,
# gpu-tests.log, device-check.log. About 5-7 minutes on an H200 (the benchmark stops starting new parts
# after --budget-s, 420 s by default).
#
#   benchmarks/device_check.sh             on the GPU machine
#   benchmarks/device_check.sh --dry-run   here, without a GPU: CPU, tiny sizes, the installed deps; checks
#                                          the script end to end (the gpu tests are skipped), writes to
#                                          ${OUT:-/tmp/leandiff-device-dry-run}
set -uo pipefail
cd "$(dirname "$0")/.."
DRY=0
[ "${1:-}" = "--dry-run" ] && DRY=1
PY=${PYTHON:-python3}
if [ $DRY = 1 ]; then
  DEST=${OUT:-/tmp/leandiff-device-dry-run}
  NAME=device-dry-run
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  DEST=${OUT:-benchmarks/results}
  NAME=device-cuda
  ls .wheels/*.whl >/dev/null 2>&1 || { echo "device_check: no wheels in .wheels/ (run benchmarks/fetch_wheels.sh and carry .wheels)"; exit 2; }
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .wheels/*.whl \
    || { echo "device_check: installing the wheels failed"; exit 2; }
  export PYTHONPATH=$PWD:/tmp/site
fi
mkdir -p "$DEST"
LOG=$DEST/device-check.log
{
  echo "== $(date -u +%FT%TZ) device check (dry run: $DRY) in $PWD"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, diffusers, torch_pruning, mlxtend; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available(), '| diffusers', diffusers.__version__, '| torch-pruning', torch_pruning.__version__, '| mlxtend', mlxtend.__version__)"
} 2>&1 | tee "$LOG"
[ ${PIPESTATUS[0]} = 0 ] || exit 2
echo "== gpu-marked tests" | tee -a "$LOG"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} timeout 240 "$PY" -m pytest -p no:xdist -p no:cacheprovider -m gpu tests/test_device.py \
  -o addopts="" -rA -W ignore::DeprecationWarning 2>&1 | tee "$DEST/gpu-tests.log" | tail -25 | tee -a "$LOG"
TESTS=${PIPESTATUS[0]}
echo "== benchmark" | tee -a "$LOG"
ARGS=(--out "$DEST/$NAME" --tests-log "$DEST/gpu-tests.log")
[ $DRY = 1 ] && ARGS+=(--dry-run)
PYTHONUNBUFFERED=1 timeout 480 "$PY" benchmarks/bench_device.py "${ARGS[@]}" 2>&1 | tee -a "$LOG"
BENCH=${PIPESTATUS[0]}
echo "== tests exit $TESTS (5: none collected, e.g. no GPU), benchmark exit $BENCH; results in $DEST" | tee -a "$LOG"
[ $BENCH = 0 ] && { [ $TESTS = 0 ] || [ $TESTS = 5 ]; }
