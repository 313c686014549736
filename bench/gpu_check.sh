#!/usr/bin/env bash
# The GPU check: fused attention kernels, training steps per mode with kernel counts, CUDA graphs,
# pretrain smoke; at most TOTAL_S (470 s) on one H200, then a short summary table, printed last.
#
# Usage: bench/gpu_check.sh [--cpu-small]
#   --cpu-small: every part on the CPU at tiny sizes (fused kernels through the Triton interpreter,
#                CUDA-only checks skipped or falling back), to check the script without a GPU. Its
#                numbers are CPU numbers.
# Results in ${OUT:-bench/results/local}: parts.csv (each part's status, seconds, limit), PART.log,
# gpu_check.csv, bench-*.csv/json, test_cuda_graphs.xml, pretrain_smoke/, summary.txt.
#
# Parts, each its own process under a hard timeout (limit in s on GPU; a part gets no more than
# what is left of TOTAL_S after the summary's 10 s, and is skipped below 5 s):
#   env          15  versions, packages, GPU; energyvit importable with energyvit.kernels
#   attention   110  bench/gpu_check.py --ops: fwd, fwd+bwd, bwd-of-bwd at N = 197 and 1024 (B=64, H=12,
#                    d=64): correctness vs float64 (fp32, bf16), timings fused vs eager math vs SDPA flash
#                    (bf16), each op alone with the autotuner's configs
#   graphs-test  70  pytest tests/test_cuda_graphs.py: replayed step and AdamW vs eager (fp32), compiled too
#   bench       200  energyvit bench --preset gpu: AdamW step eager vs graphed; steps of ViT-Ti/S/B at 224 px,
#                    batch 64, bf16 autocast, with their kernels per step: eager, fused, cuda-graphs and
#                    fused+cuda-graphs at K = 1, MAE, ViT-Ti's compiled modes at K = 1, the same at K = 2,
#                    then the other compiled rows while BENCH_BUDGET_S = 150 s lasts (the rest: skipped rows)
#   smoke        75  bench/pretrain_smoke.py: pretrain math vs fused vs fused --cuda_graphs, bf16
#
# Runs from a plain clone on the GPU image's packages (torch, triton, numpy, pillow, pytest;
# nvidia-ml-py optional; no internet): without an installed energyvit, a symlink overlay in a
# temporary folder makes kernels/ import as energyvit.kernels. Give ENERGYVIT_GIT_COMMIT where
# the copy has no .git.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
CPU_SMALL=0
if [ "${1:-}" = "--cpu-small" ]; then CPU_SMALL=1; shift; fi
[ $# -eq 0 ] || { echo "usage: bench/gpu_check.sh [--cpu-small]" >&2; exit 2; }
mkdir -p "${OUT:-$ROOT/bench/results/local}"
OUT_DIR="$(cd "${OUT:-$ROOT/bench/results/local}" && pwd)"
rm -f "$OUT_DIR/parts.csv" "$OUT_DIR"/bench-*.csv "$OUT_DIR"/bench-*.json "$OUT_DIR/test_cuda_graphs.xml"
if [ -f "$ROOT/.venv/bin/activate" ]; then . "$ROOT/.venv/bin/activate"; fi
PY="${PYTHON:-python3}"
if [ -z "${ENERGYVIT_GIT_COMMIT:-}" ]; then
  ENERGYVIT_GIT_COMMIT="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)"
fi
export ENERGYVIT_GIT_COMMIT

if [ "$CPU_SMALL" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  TOTAL_S="${TOTAL_S:-2400}"
  LIMITS=(env=60 attention=300 graphs-test=300 bench=1200 smoke=600)
  BENCH_ARGS=(--preset smoke --device cpu)
  SMOKE_ARGS=(--cpu)
  GPU_CHECK_ARGS=(--cpu-small --ops)
else
  TOTAL_S="${TOTAL_S:-470}"
  LIMITS=(env=15 attention=110 graphs-test=70 bench=200 smoke=75)
  BENCH_ARGS=(--preset gpu --device cuda --budget_s "${BENCH_BUDGET_S:-150}")
  SMOKE_ARGS=()
  GPU_CHECK_ARGS=(--ns 197,1024 --timing-dtypes bf16 --ops)
fi
START=$(date +%s)
DEADLINE=$((START + TOTAL_S))
SUMMARY_S=10

# A plain clone: kernels/ installs as energyvit.kernels, so without an installed package import
# energyvit through an overlay whose kernels entry points at kernels/.
if ! (cd / && "$PY" -c "import energyvit.kernels") >/dev/null 2>&1; then
  OVERLAY="$(mktemp -d)"
  mkdir "$OVERLAY/energyvit"
  for f in "$ROOT"/energyvit/*; do ln -s "$f" "$OVERLAY/energyvit/"; done
  ln -s "$ROOT/kernels" "$OVERLAY/energyvit/kernels"
  export PYTHONPATH="$OVERLAY${PYTHONPATH:+:$PYTHONPATH}"
  echo "energyvit is not installed: importing it from $ROOT through the overlay $OVERLAY"
fi

limit_of() { local kv; for kv in "${LIMITS[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

echo "part,status,seconds,limit_s" > "$OUT_DIR/parts.csv"
FAILED=0
# run_part NAME CMD...: CMD in OUT_DIR (no source folder there can shadow the package) under the
# part's time limit; its output to the terminal and OUT_DIR/NAME.log; a line in parts.csv.
run_part() {
  local name="$1"; shift
  local limit left t0 rc status
  limit="$(limit_of "$name")"
  left=$((DEADLINE - $(date +%s) - SUMMARY_S))
  [ "$left" -lt "$limit" ] && limit="$left"
  if [ "$limit" -lt 5 ]; then
    echo "=== $name: skipped, the total time (TOTAL_S=$TOTAL_S) is used up"
    echo "$name,skipped (total time used up),0,$limit" >> "$OUT_DIR/parts.csv"
    FAILED=1
    return
  fi
  echo "=== $name (limit ${limit} s) ==="
  t0=$(date +%s)
  # SIGINT first: pytest still writes its report, the benchmarks have saved every finished row
  (cd "$OUT_DIR" && timeout -s INT -k 10 "$limit" "$@") 2>&1 | tee "$OUT_DIR/$name.log"
  rc="${PIPESTATUS[0]}"
  case "$rc" in
    0) status=ok ;;
    124|137) status="timed out (partial results kept)"; FAILED=1 ;;
    *) status="failed (exit $rc)"; FAILED=1 ;;
  esac
  echo "$name,$status,$(($(date +%s) - t0)),$limit" >> "$OUT_DIR/parts.csv"
}

run_part env "$PY" "$ROOT/bench/gpu_env.py"
run_part attention "$PY" "$ROOT/bench/gpu_check.py" --out "$OUT_DIR" "${GPU_CHECK_ARGS[@]}"
run_part graphs-test "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/test_cuda_graphs.py" \
  --junitxml="$OUT_DIR/test_cuda_graphs.xml"
run_part bench "$PY" -m energyvit.cli bench --out "$OUT_DIR" --suites matmul,step,launches,optimizer "${BENCH_ARGS[@]}"
run_part smoke "$PY" "$ROOT/bench/pretrain_smoke.py" --out "$OUT_DIR" "${SMOKE_ARGS[@]}"

"$PY" "$ROOT/bench/gpu_summary.py" "$OUT_DIR" | tee "$OUT_DIR/summary.txt"
echo "gpu_check.sh: $(($(date +%s) - START)) s in all (limit $TOTAL_S s); results in $OUT_DIR"
exit "$FAILED"
