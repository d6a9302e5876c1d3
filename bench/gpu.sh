#!/usr/bin/env bash
# Everything a GPU machine should measure, in one call and under 8 minutes, into one results folder:
#   1. the CUDA-only tests (skipped on a CPU; each names cuda or gpu)                 at most 90 s
#   2. the kernels' bandwidth against their references (bench/kernels.py)             at most 75 s
#   3. the latency sweep, 0.5b then 7b in bf16, 1/8/32/64 sessions (bench/latency.py) at most 120 + 190 s
#
#   bash bench/gpu.sh [RESULTS_DIR]        # default bench/results/gpu-<date>
#
# Each step has its own time limit, so a step that hangs costs only its slot and the rest still runs; the exit
# status is 1 if any step failed (its log in the folder says why). Random checkpoints are written once into
# $OMNI2_BENCH_CKPT (default /tmp/omni2-bench-ckpt): the 7b one is ~16 GB and takes a minute to write.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-bench/results/gpu-$(date +%Y%m%d-%H%M)}
CKPT=${OMNI2_BENCH_CKPT:-/tmp/omni2-bench-ckpt}
mkdir -p "$OUT" "$CKPT"
failed=0

step() {  # step NAME SECONDS COMMAND...: run it under a limit, its output to the terminal and NAME.log
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    if ! timeout --kill-after=10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "=== $name FAILED after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
        failed=1
    else
        echo "=== $name done in $((SECONDS - t0)) s"
    fi
}

{
    echo "date: $(date -Is)"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
    git rev-parse HEAD 2>/dev/null
} > "$OUT/machine.txt"

step cuda-tests 90 "$PY" -m pytest -q -p no:cacheprovider -k "cuda or gpu" tests/kernels tests/stages
step kernels 75 "$PY" bench/kernels.py --device cuda --batch 1 8 64
# One turn per session and short replies: the sweep is about first audio under load, and a random TTS LM's
# 1,000-unit flushes would spend the time budget on the official cost model's quadratic vocoder instead.
# The reference is skipped (its replies equal the baseline's); the engine's are checked against the baseline.
for preset in 0.5b 7b; do
    limit=$([ "$preset" = 7b ] && echo 190 || echo 120)
    step "latency-$preset" "$limit" "$PY" bench/latency.py --preset "$preset" --ckpt-root "$CKPT/$preset" \
        --placement cuda --dtype bfloat16 --concurrency 1 8 32 64 --rate 8 --turns 1 --seconds 2 \
        --max-new-tokens 24 --seeds 28 26 --skip-reference --out "$OUT/latency-$preset"
done
echo "results in $OUT (exit $failed)"
exit $failed
