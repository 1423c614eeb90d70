#!/usr/bin/env bash
# The GPU runs of issue 5, split into parts that each fit one 10-minute device call.
#
#   bash bench/h100.sh baseline kernels   # several parts in one call; BENCH_DEADLINE bounds them
#   bash bench/h100.sh kernels     # scan kernel check + tuning sweep, GPU-marked unit tests (~4 min)
#   bash bench/h100.sh baseline    # trainer dense beside the plain GPT at the issue's shapes (~6 min)
#   bash bench/h100.sh dense       # train_throughput dense × small/medium/large × 1k/4k (~5 min)
#   bash bench/h100.sh mamba       # the same for mamba (then hybrid, moe)
#   bash bench/h100.sh extras      # attention window sweep, MoE vs dense, DDP overhead (~8 min)
#
# Results go to $OUT (the device tool brings that folder back) or bench/results; logs beside them.
set -euo pipefail
cd "$(dirname "$0")/.."
# $OUT brings back at most 8 files: results are written to a work folder and packed into one
# archive per part (plus the log); without $OUT they go straight to bench/results.
RESULTS_DIR="${OUT:+/tmp/kubearch-results}"
RESULTS_DIR="${RESULTS_DIR:-bench/results}"
LOG_DIR="${OUT:-bench/results}"
mkdir -p "$RESULTS_DIR" "$LOG_DIR"
export PYTHONUNBUFFERED=1
# The device image has torch, triton, matplotlib, pytest but not pydantic: carry its wheels in .whl/
# (see bench/README.md) and put the repository's packages on the path instead of installing them.
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD/trainer_image:$PWD/operator:${PYTHONPATH:-}"
python3 -c "import pydantic, kubearch_trainer" || { echo "pydantic or kubearch_trainer missing" >&2; exit 3; }
LABEL="${LABEL:-$(python3 -c 'import torch; print(torch.cuda.get_device_name())')}"
# BENCH_DEADLINE (seconds since the epoch) ends the whole lease in time: each bench gets only the
# seconds left (SIGINT, then KILL), and one that cannot start with 45 s left is skipped. A bench
# that writes after every configuration (trainer_vs_baseline.py) keeps what it measured.
DEADLINE="${BENCH_DEADLINE:-0}"
left() { echo $((DEADLINE - $(date +%s))); }
limit() {
  if [ "$DEADLINE" -gt 0 ]; then
    local s
    s=$(left)
    if [ "$s" -lt 45 ]; then return 1; fi
    echo "timeout --signal=INT --kill-after=15 $s"
  fi
}
log() { tee -a "$LOG_DIR/log-$PART.txt"; }
# A failing bench is logged and the next one still runs; results are packed after each bench.
run() {
  local lim
  lim=$(limit) || { echo "SKIPPED (deadline): $*" | log; return 0; }
  echo "== $(date -u +%H:%M:%S) $*" | log
  $lim python3 "$@" --device cuda --device-label "$LABEL" --out-dir "$RESULTS_DIR" 2>&1 | log \
    || echo "FAILED: $*" | log
  pack
}
pack() { if [ -n "${OUT:-}" ]; then tar czf "$OUT/results-$PART.tar.gz" -C "$RESULTS_DIR" .; fi; }
[ $# -ge 1 ] || { echo "parts: kernels | baseline | dense | mamba | hybrid | moe | extras" >&2; exit 2; }
# The unit tests with GPU-marked cases (only these files: the others import the operator's packages).
GPU_TESTS=(tests/unit/test_scan.py tests/unit/test_scan_triton.py tests/unit/test_memory.py
  tests/unit/test_flex_window.py tests/unit/test_models_sequence.py)
SWEEP=(--sizes small,medium,large --seq-lens 1024,4096 --steps 10 --warmup 3)
for PART in "$@"; do
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | log
  case "$PART" in
    kernels)
      run bench/scan_kernel.py
      if lim=$(limit); then
        echo "== $(date -u +%H:%M:%S) pytest -m gpu" | log
        $lim python3 -m pytest -q -m gpu -p no:cacheprovider "${GPU_TESTS[@]}" 2>&1 | log || echo "FAILED: pytest -m gpu" | log
      fi
      run bench/scan_kernel.py --sweep --tag sweep
      ;;
    baseline)
      # The trainer beside the plain GPT, shape by shape (both compiled), then the eager plain GPT.
      run bench/trainer_vs_baseline.py
      run bench/baseline_gpt.py --eager --shapes 2 --tag eager
      ;;
    dense | mamba | hybrid | moe)
      run bench/train_throughput.py --architectures "$PART" "${SWEEP[@]}" --tag "$PART"
      ;;
    extras)
      run bench/attention_window_sweep.py
      run bench/moe_vs_dense.py --sizes small,medium --seq-lens 1024 --steps 10
      run bench/train_throughput.py --architectures dense --sizes medium --seq-lens 1024 --tag no-ddp
      run bench/train_throughput.py --architectures dense --sizes medium --seq-lens 1024 --ddp --tag ddp
      run bench/trainer_vs_baseline.py --ddp --shapes 0,3 --tag ddp
      ;;
    *)
      echo "unknown part $PART" >&2
      exit 2
      ;;
  esac
done
