#!/usr/bin/env bash
# Everything a GPU machine should measure, in one call and under 9.5 minutes, into one results folder:
#   1. the CUDA-only tests (skipped on a CPU; each names cuda or gpu)                      at most 60 s
#   2. where a TTS step's and a vocoder write's time goes (bench/profile_step.py)          at most 60 s
#   3. the latency sweep, 0.5b in bf16, 1/8/32/64 sessions (bench/latency.py)             at most 110 s
#   4. the kernels' bandwidth against their references (bench/kernels.py)                at most 45 s
#   5. the 0.5b TTS LM and vocoder per chunk as a reply grows, and the vocoder's
#      throughput batched vs one by one at 1/16/64 sessions (bench/tts_vocoder.py)       at most 35 + 45 s
#   6. the latency sweep again on the 7b preset                                          at most 190 s
#
#   bash bench/gpu.sh [RESULTS_DIR]        # default bench/results/gpu-<date>
#
# Each step has its own time limit, so a step that hangs costs only its slot and the rest still runs; a latency
# step stopped by its limit keeps the cells it finished (latency.json, wall_s null). The exit status is 1 if any
# step failed (its log in the folder says why). Random checkpoints are written once into $OMNI2_BENCH_CKPT
# (default /tmp/omni2-bench-ckpt); the 7b one (~16 GB, a few CPU minutes) is written in the background while
# steps 1-5 keep the GPU busy.
set -u -o pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${1:-bench/results/gpu-$(date +%Y%m%d-%H%M)}
CKPT=${OMNI2_BENCH_CKPT:-/tmp/omni2-bench-ckpt}
mkdir -p "$OUT" "$CKPT"
OUT=$(cd "$OUT" && pwd) CKPT=$(cd "$CKPT" && pwd)
case $PY in /*) ;; */*) PY=$PWD/$PY ;; esac
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

# Run from / : the checkout's top-level kernels/ must not shadow PyPI's `kernels`, which transformers may import.
(cd / && exec "$PY" -c "import sys; from pathlib import Path
from omni2.engine.checkpoints.model_writer import write_checkpoint
from omni2.engine.checkpoints.vocoder_writer import write_vocoder_checkpoint
root = Path(sys.argv[1])
if not (root / 'omni2-7b' / 'config.json').is_file(): write_checkpoint(root, '7b', seed=0)
if not (root / 'cosy2_decoder').is_dir(): write_vocoder_checkpoint(root, '7b', seed=0)" "$CKPT/7b") \
    > "$OUT/write-7b.log" 2>&1 &
writer=$!

step cuda-tests 60 "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -k "cuda or gpu" \
    tests/kernels tests/stages
# Where a step's time goes (wall vs kernel time, launches, top ops): the first thing to read when a sweep is slow.
step profile 60 "$PY" bench/profile_step.py --preset 0.5b --root "$CKPT" --device cuda --sessions 1 16 --rows 10
# One turn per session and short replies: the sweep is about first audio under load, and a random TTS LM's
# 1,000-unit flushes would spend the time budget on the official cost model's quadratic vocoder instead.
# The reference is skipped (its replies equal the baseline's); the engine's are checked against the baseline.
latency() {  # latency PRESET SECONDS
    step "latency-$1" "$2" "$PY" bench/latency.py --preset "$1" --ckpt-root "$CKPT/$1" --placement cuda \
        --dtype bfloat16 --concurrency 1 8 32 64 --rate 8 --turns 1 --seconds 2 --max-new-tokens 24 --seeds 28 \
        --skip-reference --out "$OUT/latency-$1"
}
latency 0.5b 110
step kernels 45 "$PY" bench/kernels.py --device cuda --batch 1 8 64
step tts-vocoder-chunks 35 "$PY" bench/tts_vocoder.py --preset 0.5b --root "$CKPT" --device cuda --chunks 30 \
    --json "$OUT/tts-vocoder-chunks.json"
step vocoder-sessions 45 "$PY" bench/tts_vocoder.py --preset 0.5b --root "$CKPT" --device cuda --sessions 1 16 64 \
    --chunks 12 --json "$OUT/vocoder-sessions.json"
t0=$SECONDS
wait $writer || { echo "=== writing the 7b checkpoint FAILED (write-7b.log)"; failed=1; }
echo "=== waited $((SECONDS - t0)) s more for the 7b checkpoint"
latency 7b 190
echo "results in $OUT (exit $failed)"
exit $failed
