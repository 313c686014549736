#!/usr/bin/env bash
# The whole GPU benchmark table: `energyvit bench` (preset gpu: attention backends at ViT shapes,
# pretraining steps of ViT-Ti/S/B at 224 with K in 1, 2, a bf16 matmul for MFU, NVML telemetry).
# Sized for under 8 minutes on one H100: rows that would start after BENCH_BUDGET_S (default 380 s)
# are recorded as skipped, and BENCH_TIMEOUT_S (default 460 s) is a hard stop; the CSV and JSON
# are rewritten after every row, so a stopped run still leaves every finished row.
# Without CUDA it runs the CPU smoke path (energyvit bench --quick), so the script can be checked anywhere.
# Usage: bench/gpu_bench.sh [extra energyvit bench args]; results in ${OUT:-bench/results/local}.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT_DIR="${OUT:-bench/results/local}"
mkdir -p "$OUT_DIR"
if [ -f .venv/bin/activate ]; then . .venv/bin/activate; fi
PY="${PYTHON:-python3}"
BUDGET="${BENCH_BUDGET_S:-380}"
HARD="${BENCH_TIMEOUT_S:-460}"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'gpu', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv 2>/dev/null || true
"$PY" -c "import pynvml" 2>/dev/null || echo "note: nvidia-ml-py not installed: telemetry columns will read n/a"
"$PY" -c "import xformers" 2>/dev/null || echo "note: xformers not installed: its rows will read unavailable"
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  ARGS=(--budget_s "$BUDGET")
else
  echo "no CUDA device: running the CPU smoke path (energyvit bench --quick) instead"
  ARGS=(--quick)
fi
set +e
timeout -k 15 "$HARD" "$PY" -m energyvit.cli bench --out "$OUT_DIR" "${ARGS[@]}" "$@" 2>&1 | tee "$OUT_DIR/gpu_bench.log"
rc="${PIPESTATUS[0]}"
[ "$rc" = 124 ] && echo "gpu_bench.sh: hard timeout after ${HARD}s; finished rows are in $OUT_DIR"
exit "$rc"
