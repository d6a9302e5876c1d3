"""bench/gpu.sh keeps to its budget whatever its steps do: here every step hangs (a stand-in python that sleeps),
and the script still ends within the budget, says which steps it stopped and which it skipped, exits 1, and leaves
no process behind (the background checkpoint writer included)."""
from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

GPU_SH = Path(__file__).parents[2] / "bench" / "gpu.sh"
BUDGET = 30

HANGING_PY = """#!/bin/sh
case "$*" in *"import torch; print"*) echo "torch stand-in"; exit 0 ;; esac
echo $$ >> "{pids}"
exec sleep 600
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0)
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_hanging_steps_cannot_overrun_the_budget(tmp_path):
    pids = tmp_path / "pids"
    py = tmp_path / "python"
    py.write_text(HANGING_PY.format(pids=pids))
    py.chmod(0o755)
    out = tmp_path / "results"
    t0 = time.monotonic()
    proc = subprocess.run(["bash", str(GPU_SH), str(out)], capture_output=True, text=True, timeout=BUDGET + 60,
                          env=dict(os.environ, PY=str(py), GPU_SH_BUDGET=str(BUDGET),
                                   OMNI2_BENCH_CKPT=str(tmp_path / "ckpt")))
    wall = time.monotonic() - t0
    assert wall < BUDGET, (wall, proc.stdout[-2000:])
    assert proc.returncode == 1, proc.stdout[-2000:]
    # The first step gets what is left of the budget less the kill grace, is stopped, and nothing after it has time
    # to run.
    first = re.search(r"=== cuda-tests \(limit (\d+)s\)", proc.stdout)
    assert first and 10 <= int(first[1]) <= BUDGET - 10, proc.stdout  # what was left after the machine probes
    assert "FAILED after" in (out / "cuda-tests.log").read_text()
    for name in ("profile", "latency-0.5b", "kernels", "tts-vocoder-chunks", "vocoder-sessions"):
        assert "SKIPPED" in (out / f"{name}.log").read_text(), name
    assert "latency-7b SKIPPED" in (out / "latency-7b.log").read_text()
    assert "torch stand-in" in (out / "machine.txt").read_text()
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2, started  # the 7b writer and the first step
    deadline = time.monotonic() + 5
    while any(alive(p) for p in started):
        assert time.monotonic() < deadline, [p for p in started if alive(p)]
        time.sleep(0.1)
