#!/usr/bin/env bash
# GPU check of the fused second-order attention kernels (correctness + timings).
# Usage: bench/gpu_check.sh [--cpu-small] [extra args for bench/gpu_check.py]
# Results go to ${OUT:-bench/results/local}: gpu_check.csv and gpu_check.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/local}"
mkdir -p "$OUT_DIR"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
PY="${PYTHON:-python3}"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>/dev/null || true
"$PY" bench/gpu_check.py --out "$OUT_DIR" "$@" 2>&1 | tee "$OUT_DIR/gpu_check.log"
exit "${PIPESTATUS[0]}"
