#!/usr/bin/env bash
# GPU check of the fused second-order attention kernels (correctness + timings).
# Usage: bench/gpu_check.sh [--full] [--cpu-small] [extra args for bench/gpu_check.py]
# --full: afterwards run bench/gpu_bench.sh (energyvit bench table, under 8 minutes on one H100).
# Then bench/pretrain_smoke.py: two short `energyvit pretrain` runs on a generated image folder
# (math vs fused attention, bf16 autocast on CUDA) whose losses must agree.
# Results go to ${OUT:-bench/results/local}: gpu_check.csv, gpu_check.log, pretrain_smoke/.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/local}"
mkdir -p "$OUT_DIR"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
PY="${PYTHON:-python3}"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
FULL=0
if [ "${1:-}" = "--full" ]; then FULL=1; shift; fi  # --full: then the whole benchmark table (bench/gpu_bench.sh)
set +e
"$PY" bench/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
rc="${PIPESTATUS[0]}"
SMOKE_ARGS=()
for a in "$@"; do if [ "$a" = "--cpu-small" ]; then SMOKE_ARGS=(--cpu); fi; done
"$PY" bench/pretrain_smoke.py --out "$OUT_DIR" "${SMOKE_ARGS[@]}" 2>&1 | tee "$OUT_DIR/pretrain_smoke.log"
[ "${PIPESTATUS[0]}" = 0 ] || rc=1
set -e
if [ "$FULL" = 1 ]; then OUT="$OUT_DIR" bench/gpu_bench.sh || rc=$?; fi
exit "$rc"
