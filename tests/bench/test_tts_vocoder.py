"""bench/tts_vocoder.py --sessions: the vocoder's throughput per session count and max_batch, each stage loaded once
(on a GPU its buckets are captured then) and reused for every session count."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"


def test_throughput_for_every_session_count_and_max_batch(tmp_path: Path, tiny_root: Path, tiny_vocoder: Path):
    (tmp_path / "tiny").symlink_to(tiny_root)  # the script reads ROOT/PRESET/{omni2-tiny, cosy2_decoder}
    out = tmp_path / "throughput.json"
    # Sessions 1 then 3 on one stage: the second count reopens s0, which the first must have closed.
    proc = subprocess.run([sys.executable, str(BENCH / "tts_vocoder.py"), "--preset", "tiny", "--root", str(tmp_path),
                           "--sessions", "1", "3", "--max-batch", "2", "1", "--writes", "2", "--cuda-graphs",
                           "--json", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    doc = json.loads(out.read_text())
    assert doc["cuda_graphs"] is True and doc["writes"] == 2
    assert {n: sorted(row) for n, row in doc["throughput"].items()} == {"1": ["1", "2"], "3": ["1", "2"]}
    assert all(x > 0 for row in doc["throughput"].values() for x in row.values())
    assert proc.stdout.count("real time per session") == 4


def test_a_single_write_is_refused(tmp_path: Path):
    proc = subprocess.run([sys.executable, str(BENCH / "tts_vocoder.py"), "--root", str(tmp_path), "--sessions", "1",
                           "--writes", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--writes must be at least 2" in proc.stderr
    assert not any(tmp_path.iterdir())  # refused before any checkpoint is written
