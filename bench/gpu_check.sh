#!/usr/bin/env bash
# The GPU check: fused attention kernels, training steps per mode with kernel counts, CUDA graphs,
# pretrain smoke; at most TOTAL_S (470 s) on one H200, then a short summary table, printed last.
#
# Usage: bench/gpu_check.sh [--cpu-small]
#   --cpu-small: every part on the CPU at tiny sizes (fused kernels through the Triton interpreter,
#                CUDA-only checks skipped or falling back), to check the script without a GPU. Its
#                numbers are CPU numbers.
# Results in ${OUT:-bench/results/local}: parts.csv (each part's status, seconds, limit), PART.log,
# gpu_check.csv, bench-*.csv/json, test_cuda_graphs.xml, pretrain_smoke/, combo/, precompile/, summary.txt.
#
# Parts, each its own process under a hard timeout (limit in s on GPU; a part gets no more than
# what is left of TOTAL_S after the summary's 10 s, and is skipped below 5 s):
#   env          15  versions, packages, GPU; energyvit importable with energyvit.kernels
#   attention   110  bench/gpu_check.py --ops: fwd, fwd+bwd, bwd-of-bwd at N = 197 and 1024 (B=64, H=12,
#                    d=64): correctness vs float64 (fp32, bf16), timings fused vs eager math vs SDPA flash
#                    (bf16), each op alone with the autotuner's configs, host vs device time of a fwd+bwd chain
#   graphs-test  70  pytest tests/test_cuda_graphs.py: replayed step and AdamW vs eager (fp32), compiled too
#   bench       200  energyvit bench --preset gpu: AdamW step eager vs graphed; steps of ViT-Ti/S/B at 224 px,
#                    batch 64, bf16 autocast, with their kernels per step: eager, fused, cuda-graphs and
#                    fused+cuda-graphs at K = 1, MAE, the compiled modes at K = 1, then K = 2 the same way,
#                    while BENCH_BUDGET_S = 150 s lasts (rows after it: skipped)
#   smoke        75  bench/pretrain_smoke.py: pretrain math vs fused vs fused --cuda_graphs, bf16
#   combo        45  energyvit bench --inductor combo_kernels=True: eager and fused+compiled at K = 1 for
#                    ViT-Ti and ViT-B, with their kernels per step (Inductor's combo kernels, which the
#                    GPU-codegen proxy says bring fused+compiled to 1/5 of eager's launches; in the time left)
# and, from the start, in the background until the last part has ended: precompile, one process per
# compiled step graph of the bench and combo parts (energyvit bench --suites compile: compiled, not run, so
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
rm -rf "$OUT_DIR/precompile" "$OUT_DIR/combo"
if [ -f "$ROOT/.venv/bin/activate" ]; then . "$ROOT/.venv/bin/activate"; fi
PY="${PYTHON:-python3}"
if [ -z "${ENERGYVIT_GIT_COMMIT:-}" ]; then
  ENERGYVIT_GIT_COMMIT="$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || true)"
fi
export ENERGYVIT_GIT_COMMIT

if [ "$CPU_SMALL" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  TOTAL_S="${TOTAL_S:-2400}"
  LIMITS=(env=60 attention=300 graphs-test=300 bench=1200 smoke=600 combo=300)
  BENCH_PRESET=smoke BENCH_DEVICE=cpu BENCH_BUDGET=()
  SMOKE_ARGS=(--cpu)
  GPU_CHECK_ARGS=(--cpu-small --ops)
  PRECOMPILE_MODELS=(vit_pico_patch2) PRECOMPILE_KS=(1) COMBO_MODELS=vit_pico_patch2
else
  TOTAL_S="${TOTAL_S:-470}"
  LIMITS=(env=15 attention=110 graphs-test=70 bench=200 smoke=75 combo=45)
  BENCH_PRESET=gpu BENCH_DEVICE=cuda
  BENCH_BUDGET=(--budget_s "${BENCH_BUDGET_S:-150}")
  SMOKE_ARGS=()
  GPU_CHECK_ARGS=(--ns 197,1024 --timing-dtypes bf16 --ops)
  PRECOMPILE_MODELS=(vit_tiny_patch16 vit_small_patch16 vit_base_patch16) PRECOMPILE_KS=(1 2)
  COMBO_MODELS=vit_tiny_patch16,vit_base_patch16
fi
BENCH_ARGS=(--preset "$BENCH_PRESET" --device "$BENCH_DEVICE")
PRECOMPILE_MODES=(compiled fused+compiled)
COMBO=combo_kernels=True  # the combo part: Inductor's combo kernels, untimed so far (docs/benchmarks.md)
OPTIONAL_PART=combo  # runs in the time the others leave: skipped or stopped by the limit, it fails nothing
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
    [ "$name" = "$OPTIONAL_PART" ] || FAILED=1
    return
  fi
  echo "=== $name (limit ${limit} s) ==="
  t0=$(date +%s)
  # SIGINT first: pytest still writes its report, the benchmarks have saved every finished row
  (cd "$OUT_DIR" && timeout -s INT -k 10 "$limit" "$@") 2>&1 | tee "$OUT_DIR/$name.log"
  rc="${PIPESTATUS[0]}"
  case "$rc" in
    0) status=ok ;;
    124|137) status="timed out (partial results kept)"; [ "$name" = "$OPTIONAL_PART" ] || FAILED=1 ;;
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
    for m in ${COMBO_MODELS//,/ }; do echo "$m 1 fused+compiled $COMBO"; done
  } > "$OUT_DIR/precompile/graphs.txt"
  local graphs; graphs=$(wc -l < "$OUT_DIR/precompile/graphs.txt")
  [ "$jobs" -gt "$graphs" ] && jobs=$graphs
  PRECOMPILE_T0=$(date +%s)
  # shellcheck disable=SC2016  # $1.. expand in the job's shell: model, K, mode and (the combo graphs) $COMBO
  PRECOMPILE_DIR="$OUT_DIR" PRECOMPILE_PY="$PY" PRECOMPILE_PRESET="$BENCH_PRESET" PRECOMPILE_DEVICE="$BENCH_DEVICE" \
  TORCHINDUCTOR_COMPILE_THREADS=$(( (NCPU - 2) / jobs > 1 ? (NCPU - 2) / jobs : 1 )) \
    ${SETSID[@]+"${SETSID[@]}"} ${BG[@]+"${BG[@]}"} xargs -P "$jobs" -L 1 -a "$OUT_DIR/precompile/graphs.txt" sh -c \
    'cd "$PRECOMPILE_DIR" && "$PRECOMPILE_PY" -m energyvit.cli bench --preset "$PRECOMPILE_PRESET" --device "$PRECOMPILE_DEVICE" \
       --suites compile --models "$1" --ks "$2" --step_modes "$3" ${4:+--inductor "$4"} --out precompile \
       --tag "$1-k$2-$3${4:+-combo}" > "precompile/$1-k$2-$3${4:+-combo}.log" 2>&1' precompile &
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
  ${BENCH_BUDGET[@]+"${BENCH_BUDGET[@]}"}
run_part smoke "$PY" "$ROOT/bench/pretrain_smoke.py" --out "$OUT_DIR" "${SMOKE_ARGS[@]}"
mkdir -p "$OUT_DIR/combo"
run_part combo "$PY" -m energyvit.cli bench --out "$OUT_DIR/combo" --suites step,launches "${BENCH_ARGS[@]}" \
  --models "$COMBO_MODELS" --ks 1 --step_modes eager,fused+compiled --inductor "$COMBO" --tag combo
stop_precompile

"$PY" "$ROOT/bench/gpu_summary.py" "$OUT_DIR" | tee "$OUT_DIR/summary.txt"
echo "gpu_check.sh: $(($(date +%s) - START)) s in all (limit $TOTAL_S s); results in $OUT_DIR"
exit "$FAILED"
