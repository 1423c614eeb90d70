#!/usr/bin/env bash
# The GPU runs of issue 5, split into parts that each fit one 10-minute device call.
#
#   bash bench/h100.sh kernels     # scan kernel check + tuning sweep, GPU-marked unit tests (~4 min)
#   bash bench/h100.sh baseline    # plain GPT at the issue's shapes + trainer dense at the same (~8 min)
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
# A failing bench is logged and the next one still runs; whatever was written is packed at exit.
run() {
  python3 "$@" --device cuda --device-label "$LABEL" --out-dir "$RESULTS_DIR" 2>&1 | tee -a "$LOG_DIR/log-$PART.txt" \
    || echo "FAILED: $*" | tee -a "$LOG_DIR/log-$PART.txt"
}
pack() { if [ -n "${OUT:-}" ]; then tar czf "$OUT/results-$PART.tar.gz" -C "$RESULTS_DIR" .; fi; }
PART="${1:?part: kernels | baseline | dense | mamba | hybrid | moe | extras}"
trap pack EXIT
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee "$LOG_DIR/log-$PART.txt"
SWEEP=(--sizes small,medium,large --seq-lens 1024,4096 --steps 10 --warmup 3)
case "$PART" in
  kernels)
    run bench/scan_kernel.py --sweep
    python3 -m pytest -q -m gpu tests/unit 2>&1 | tee -a "$LOG_DIR/log-$PART.txt" || echo "FAILED: pytest -m gpu"
    ;;
  baseline)
    run bench/baseline_gpt.py
    run bench/baseline_gpt.py --eager --shapes 2 --tag eager
    run bench/train_throughput.py --issue-shapes --tag issue-shapes
    ;;
  dense | mamba | hybrid | moe)
    run bench/train_throughput.py --architectures "$PART" "${SWEEP[@]}" --tag "$PART"
    ;;
  extras)
    run bench/attention_window_sweep.py
    run bench/moe_vs_dense.py --sizes small,medium --seq-lens 1024 --steps 10
    run bench/train_throughput.py --architectures dense --sizes medium --seq-lens 1024 --tag no-ddp
    run bench/train_throughput.py --architectures dense --sizes medium --seq-lens 1024 --ddp --tag ddp
    ;;
  *)
    echo "unknown part $PART" >&2
    exit 2
    ;;
esac
