#!/usr/bin/env bash
# The GPU check: fused attention kernels, training steps per mode with kernel counts, CUDA graphs,
# pretrain smoke; at most TOTAL_S (470 s) on one H200, then a short summary table, printed last.
#
# Usage: bench/gpu_check.sh [--cpu-small]
#   --cpu-small: every part on the CPU at tiny sizes (fused kernels through the Triton interpreter,
#                CUDA-only checks skipped or falling back), to check the script without a GPU. Its
#                numbers are CPU numbers.
# Results in ${OUT:-bench/results/local}: parts.csv (each part's status, seconds, limit), PART.log,
# gpu_check.csv, bench-*.csv/json, test_cuda_graphs.xml, pretrain_smoke/, precompile/, summary.txt.
#
# Parts, each its own process under a hard timeout (limit in s on GPU; a part gets no more than
# what is left of TOTAL_S after the summary's 10 s, and is skipped below 5 s):
#   env          15  versions, packages, GPU; energyvit importable with energyvit.kernels
#   attention   110  bench/gpu_check.py --ops: fwd, fwd+bwd, bwd-of-bwd at N = 197 and 1024 (B=64, H=12,
#                    d=64): correctness vs float64 (fp32, bf16), timings fused vs eager math vs SDPA's flash
#                    (FlashAttention-2) and cuDNN kernels (bf16), through autograd and kernels alone
#                    (device ms), each op alone with the autotuner's configs, host vs device time of a chain
#   graphs-test  70  pytest tests/test_cuda_graphs.py: replayed step and AdamW vs eager (fp32), compiled too
#   bench       240  energyvit bench --preset gpu: AdamW step eager vs graphed; steps of ViT-Ti/S/B at 224 px,
#                    batch 64, bf16 autocast, with their kernels per step, MFU against the datasheet peak and
#                    a matmul timed before each row, at least 25 repeats each (median and quartiles): energy
#                    (the model pretrain builds, energy head included) eager, fused and fused+cuda-graphs at
#                    K = 1; MAE with SDPA eager and CUDA-graphed, and with math attention (the old reference);
#                    per model fused+compiled, fused+compiled+cuda-graphs, mae+compiled and
#                    mae+compiled+cuda-graphs; then K = 2 the same way, while BENCH_BUDGET_S = 185 s lasts
#                    (rows after it: skipped)
#   smoke        75  bench/pretrain_smoke.py: pretrain math vs fused vs fused --cuda_graphs, bf16
# (issue 21 cut the combo part, Inductor's combo kernels, for the bench's MAE rows and repeats; the
# math-attention energy modes compiled, cuda-graphs and compiled+cuda-graphs are not in the bench part:
# the fused ones are each one's faster twin; `energyvit bench` still runs them by default)
# and, from the start, in the background until the last part has ended: precompile, one process per
# compiled step graph of the bench part (energyvit bench --suites compile: compiled, not run, so
# nothing of it touches the GPU's timings), which fills Inductor's caches on disk: the bench's
# compiled rows then load their graphs in seconds instead of compiling for a minute or more each
# (a row whose graph is not compiled yet when it starts compiles it itself; the summary shows the
# cache hits). With 4 or more cores, the background runs on all cores but the first two.
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
rm -rf "$OUT_DIR/precompile"
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
  BENCH_PRESET=smoke BENCH_DEVICE=cpu BENCH_BUDGET=()
  SMOKE_ARGS=(--cpu)
  GPU_CHECK_ARGS=(--cpu-small --ops)
  PRECOMPILE_MODELS=(vit_pico_patch2) PRECOMPILE_KS=(1)
else
  TOTAL_S="${TOTAL_S:-470}"
  LIMITS=(env=15 attention=110 graphs-test=70 bench=240 smoke=75)
  BENCH_PRESET=gpu BENCH_DEVICE=cuda
  BENCH_BUDGET=(--budget_s "${BENCH_BUDGET_S:-185}")
  SMOKE_ARGS=()
  GPU_CHECK_ARGS=(--ns 197,1024 --timing-dtypes bf16 --ops)
  PRECOMPILE_MODELS=(vit_tiny_patch16 vit_small_patch16 vit_base_patch16) PRECOMPILE_KS=(1 2)
fi
BENCH_ARGS=(--preset "$BENCH_PRESET" --device "$BENCH_DEVICE")
# the energy modes with fused attention (their math-attention twins are slower) and every MAE mode
BENCH_MODES=eager,fused,fused+cuda-graphs,fused+compiled,fused+compiled+cuda-graphs
BENCH_MODES+=,mae,mae+cuda-graphs,mae+compiled,mae+compiled+cuda-graphs,mae-math
PRECOMPILE_MODES=(fused+compiled)  # per K; and mae+compiled once per model (MAE has no K)
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

# the background precompile off the first two of the cores this process may use (when it may use
# 4 or more), which stay free for the parts' timing loops; the parts may use every core
CORES="$("$PY" -c 'import os; print(",".join(map(str, sorted(os.sched_getaffinity(0)))))' 2>/dev/null || echo 0)"
NCPU=$(echo "$CORES" | tr ',' '\n' | wc -l)
BG=() SETSID=()
command -v setsid >/dev/null && SETSID=(setsid)
if [ "$NCPU" -ge 4 ] && command -v taskset >/dev/null; then
  BG=(taskset -c "$(echo "$CORES" | cut -d, -f3-)")
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

# precompile: one `energyvit bench --suites compile` per graph, as many at once as there are
# background cores (each with its share of Inductor's compile workers), in a session of its own
# so that stop_precompile ends all of it
start_precompile() {
  local jobs=1 m k mode
  [ ${#BG[@]} -gt 0 ] && jobs=$((NCPU - 2))
  mkdir -p "$OUT_DIR/precompile"
  { for k in "${PRECOMPILE_KS[@]}"; do for m in "${PRECOMPILE_MODELS[@]}"; do for mode in "${PRECOMPILE_MODES[@]}"; do
      echo "$m $k $mode"
    done; done; done
    for m in "${PRECOMPILE_MODELS[@]}"; do echo "$m ${PRECOMPILE_KS[0]} mae+compiled"; done
  } > "$OUT_DIR/precompile/graphs.txt"
  local graphs; graphs=$(wc -l < "$OUT_DIR/precompile/graphs.txt")
  [ "$jobs" -gt "$graphs" ] && jobs=$graphs
  PRECOMPILE_T0=$(date +%s)
  # shellcheck disable=SC2016  # $1.. expand in the job's shell: model, K, mode
  PRECOMPILE_DIR="$OUT_DIR" PRECOMPILE_PY="$PY" PRECOMPILE_PRESET="$BENCH_PRESET" PRECOMPILE_DEVICE="$BENCH_DEVICE" \
  TORCHINDUCTOR_COMPILE_THREADS=$(( (NCPU - 2) / jobs > 1 ? (NCPU - 2) / jobs : 1 )) \
    ${SETSID[@]+"${SETSID[@]}"} ${BG[@]+"${BG[@]}"} xargs -P "$jobs" -L 1 -a "$OUT_DIR/precompile/graphs.txt" sh -c \
    'cd "$PRECOMPILE_DIR" && "$PRECOMPILE_PY" -m energyvit.cli bench --preset "$PRECOMPILE_PRESET" --device "$PRECOMPILE_DEVICE" \
       --suites compile --models "$1" --ks "$2" --step_modes "$3" --out precompile \
       --tag "$1-k$2-$3" > "precompile/$1-k$2-$3.log" 2>&1' precompile &
  PRECOMPILE_PID=$!
  echo "=== precompile: $graphs graphs, $jobs at a time, in the background (logs in $OUT_DIR/precompile) ==="
}

# stop_precompile: wait for it no longer; a graph still compiling is stopped (the bench has
# compiled it itself by then, or skipped its rows)
stop_precompile() {
  [ -n "${PRECOMPILE_PID:-}" ] || return 0
  local status=ok target="$PRECOMPILE_PID"
  [ ${#SETSID[@]} -gt 0 ] && target="-$PRECOMPILE_PID"
  if kill -0 "$PRECOMPILE_PID" 2>/dev/null; then
    status="stopped while compiling"
    kill -INT -- "$target" 2>/dev/null
    sleep 2
    kill -KILL -- "$target" 2>/dev/null
  fi
  wait "$PRECOMPILE_PID" 2>/dev/null
  echo "precompile,$status,$(($(date +%s) - PRECOMPILE_T0)),-" >> "$OUT_DIR/parts.csv"
  PRECOMPILE_PID=""
}
trap stop_precompile EXIT

start_precompile
run_part env "$PY" "$ROOT/bench/gpu_env.py"
run_part attention "$PY" "$ROOT/bench/gpu_check.py" --out "$OUT_DIR" "${GPU_CHECK_ARGS[@]}"
run_part graphs-test "$PY" -m pytest -q -p no:cacheprovider "$ROOT/tests/test_cuda_graphs.py" \
  --junitxml="$OUT_DIR/test_cuda_graphs.xml"
run_part bench "$PY" -m energyvit.cli bench --out "$OUT_DIR" --suites matmul,step,launches,optimizer "${BENCH_ARGS[@]}" \
  --step_modes "$BENCH_MODES" ${BENCH_BUDGET[@]+"${BENCH_BUDGET[@]}"}
run_part smoke "$PY" "$ROOT/bench/pretrain_smoke.py" --out "$OUT_DIR" "${SMOKE_ARGS[@]}"
stop_precompile

"$PY" "$ROOT/bench/gpu_summary.py" "$OUT_DIR" | tee "$OUT_DIR/summary.txt"
echo "gpu_check.sh: $(($(date +%s) - START)) s in all (limit $TOTAL_S s); results in $OUT_DIR"
exit "$FAILED"
