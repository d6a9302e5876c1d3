#!/usr/bin/env bash
# Everything a GPU machine should measure, in one call and under 9 minutes, into one results folder:
#   1. the CUDA-only tests (skipped on a CPU; each names cuda or gpu)                      at most 100 s
#   2. where a TTS step's and a vocoder write's time goes, each dynamic and replayed as
#      CUDA graphs, at 1 and 8 sessions (bench/profile_step.py)                           at most 80 s
#   3. the latency sweep, 0.5b in bf16, 1/8/32/64 sessions (bench/latency.py), with
#      --cuda-graphs when step 1 passed (its tests replay graphs against eager steps)      at most 100 s
#   4. the kernels' bandwidth against their references (bench/kernels.py)                at most 30 s
#   5. the 0.5b TTS LM and vocoder per chunk as a reply grows, and the vocoder's
#      throughput at 1/16/64 sessions with max_batch 64, 16 and 1 (one by one), replayed
#      as CUDA graphs when step 1 passed (bench/tts_vocoder.py)                          at most 30 + 60 s
#   6. the latency sweep again on the 7b preset                                          what is left
#
#   bash bench/gpu.sh [RESULTS_DIR]        # default bench/results/gpu-<date>
#
# The whole run has a budget, GPU_SH_BUDGET seconds (default 530: 8 min 50 s), that no step can overrun: each step
# runs under the smaller of its own limit and the time left (less the 10 s a killed step may take to go), a step
# with under 15 s left is skipped, and nothing is left running after the budget. So a step that hangs costs only its
# slot and the rest still runs; a latency step stopped by its limit keeps the cells it finished (latency.json,
# wall_s null). The exit status is 1 if any step failed or was skipped (its log in the folder says why). Random
# checkpoints are written once into $OMNI2_BENCH_CKPT (default /tmp/omni2-bench-ckpt); the 7b one (~16 GB, a few
# CPU minutes) is written in the background while steps 1-5 keep the GPU busy.
#
# On a bare GPU machine (its python3 holds torch but neither this package nor pyzmq, soxr, soundfile), the wheels
# that bench/gpu_wheels.sh puts in .whl/ (carried there) and this checkout are installed into a folder of their own
# first on PYTHONPATH; the device call that does it is in bench/README.md, "On a GPU machine".
set -u -o pipefail
cd "$(dirname "$0")/.."
if [[ -z ${PY:-} ]]; then
    PY=.venv/bin/python
    [[ -x $PY ]] || PY=python3
fi
OUT=${1:-bench/results/gpu-$(date +%Y%m%d-%H%M)}
CKPT=${OMNI2_BENCH_CKPT:-/tmp/omni2-bench-ckpt}
mkdir -p "$OUT" "$CKPT"
OUT=$(cd "$OUT" && pwd) CKPT=$(cd "$CKPT" && pwd)
case $PY in /*) ;; */*) PY=$PWD/$PY ;; esac
failed=0
deadline=$((SECONDS + ${GPU_SH_BUDGET:-530}))

# Run from / : the checkout's top-level kernels/ must not shadow PyPI's `kernels`, which transformers may import.
NEEDS="import omni2.engine.cli.main, zmq, soxr, soundfile"
importable() { (cd / && timeout 60 "$PY" -c "$NEEDS") >/dev/null 2>&1; }
if ! importable; then
    site=${OMNI2_GPU_SITE:-/tmp/omni2-site}
    shopt -s nullglob
    wheels=("${OMNI2_GPU_WHEELS:-.whl}"/*.whl)
    if (( ${#wheels[@]} == 0 )); then
        echo "gpu.sh: $PY cannot import this package and its needs, and .whl/ holds no wheels:" \
             "run bash bench/gpu_wheels.sh where pip reaches the registries and carry .whl (bench/README.md)" >&2
        exit 1
    fi
    echo "=== installing ${#wheels[@]} wheels and this checkout into $site"
    # The checkout is built in pip's isolated environment, from the carried setuptools: built beside the image's
    # packages, a setuptools plugin of PyPI's `kernels` (which transformers may pull in) would import the
    # checkout's kernels/ instead of its own and fail.
    runtime=()
    for w in "${wheels[@]}"; do [[ ${w##*/} == setuptools-* ]] || runtime+=("$w"); done
    if ! { timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
               --target "$site" "${runtime[@]}" &&
           timeout 120 "$PY" -m pip install -q --no-index --find-links "${wheels[0]%/*}" --no-deps --no-compile \
               --no-cache-dir --upgrade --target "$site" . ; }; then
        echo "gpu.sh: installing into $site FAILED" >&2
        exit 1
    fi
    export PYTHONPATH=$site${PYTHONPATH:+:$PYTHONPATH}
    if ! importable; then
        echo "gpu.sh: $PY still cannot import what it needs from $site ($NEEDS):" >&2
        (cd / && "$PY" -c "$NEEDS") 2>&1 | tail -3 >&2
        exit 1
    fi
fi
GRACE=10  # what `timeout --kill-after` allows a step past its limit

left() { echo $((deadline - SECONDS - GRACE)); }

step() {  # step NAME SECONDS COMMAND...: run it under a limit, its output to the terminal and NAME.log
    local name=$1 limit=$2
    shift 2
    if (( $(left) < 15 )); then
        echo "=== $name SKIPPED: $(left) s left of the budget" | tee "$OUT/$name.log"
        failed=1
        return 1
    fi
    (( limit > $(left) )) && limit=$(left)
    echo "=== $name (limit ${limit}s): $*"
    local t0=$SECONDS
    if ! timeout --kill-after=$GRACE "$limit" "$@" 2>&1 | tee "$OUT/$name.log"; then
        echo "=== $name FAILED after $((SECONDS - t0)) s" | tee -a "$OUT/$name.log"
        failed=1
        return 1
    fi
    echo "=== $name done in $((SECONDS - t0)) s"
}

{
    echo "date: $(date -Is)"
    timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1
    timeout 30 "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" 2>&1
    git rev-parse HEAD 2>/dev/null
} > "$OUT/machine.txt"

# The 7b checkpoint, written from / like every import check here.
(cd / && exec "$PY" -c "import sys; from pathlib import Path
from omni2.engine.checkpoints.model_writer import write_checkpoint
from omni2.engine.checkpoints.vocoder_writer import write_vocoder_checkpoint
root = Path(sys.argv[1])
if not (root / 'omni2-7b' / 'config.json').is_file(): write_checkpoint(root, '7b', seed=0)
if not (root / 'cosy2_decoder').is_dir(): write_vocoder_checkpoint(root, '7b', seed=0)" "$CKPT/7b") \
    > "$OUT/write-7b.log" 2>&1 &
writer=$!
# Nothing outlives the budget: the writer is stopped (with its children) when the script ends, whatever the reason.
trap 'kill -- -$writer 2>/dev/null || kill $writer 2>/dev/null' EXIT

graphs=""
step cuda-tests 100 "$PY" -m pytest -q -p no:cacheprovider --continue-on-collection-errors -k "cuda or gpu" \
    tests/kernels tests/stages && graphs=--cuda-graphs
# Where a step's time goes (wall vs kernel time, launches, top ops): the first thing to read when a sweep is slow.
step profile 80 "$PY" bench/profile_step.py --preset 0.5b --root "$CKPT" --device cuda --sessions 1 8 --rows 10
# One turn per session and short replies: the sweep is about first audio under load, and a random TTS LM's
# 1,000-unit flushes would spend the time budget on the official cost model's quadratic vocoder instead.
# The reference is skipped (its replies equal the baseline's); the engine's are checked against the baseline.
latency() {  # latency PRESET SECONDS
    step "latency-$1" "$2" "$PY" bench/latency.py --preset "$1" --ckpt-root "$CKPT/$1" --placement cuda \
        --dtype bfloat16 --concurrency 1 8 32 64 --rate 8 --turns 1 --seconds 2 --max-new-tokens 24 --seeds 28 \
        --skip-reference $graphs --out "$OUT/latency-$1"
}
latency 0.5b 100
step kernels 30 "$PY" bench/kernels.py --device cuda --batch 1 8 64
step tts-vocoder-chunks 30 "$PY" bench/tts_vocoder.py --preset 0.5b --root "$CKPT" --device cuda --chunks 30 \
    --json "$OUT/tts-vocoder-chunks.json"
# Whether 64 sessions (serving window k = 1) are each faster than real time, and which max_batch gets them there
# (each value loads and captures once; rows print as they are measured, so a stopped step keeps what it finished).
step vocoder-sessions 60 "$PY" bench/tts_vocoder.py --preset 0.5b --root "$CKPT" --device cuda --sessions 1 16 64 \
    --max-batch 64 16 1 --writes 10 --left-chunks 1 $graphs --json "$OUT/vocoder-sessions.json"
t0=$SECONDS
while kill -0 $writer 2>/dev/null && (( $(left) >= 60 )); do  # a 7b sweep shorter than a minute measures nothing
    sleep 1
done
if kill -0 $writer 2>/dev/null; then
    echo "=== the 7b checkpoint is not written yet with $(left) s left: latency-7b SKIPPED" | tee "$OUT/latency-7b.log"
    failed=1
elif ! wait $writer; then
    echo "=== writing the 7b checkpoint FAILED (write-7b.log)"
    failed=1
else
    echo "=== waited $((SECONDS - t0)) s more for the 7b checkpoint"
    latency 7b 175
fi
echo "results in $OUT (exit $failed)"
exit $failed
