"""The demo model cache: two daemons starting at once both end up with one whole checkpoint, written once."""
from __future__ import annotations

import subprocess
import sys

from omni2.engine.checkpoints.demo import question
from omni2.engine.checkpoints.model_dir import ModelDir


def test_two_writers_at_once_share_one_whole_checkpoint(tmp_path):
    cmd = [sys.executable, "-m", "omni2.engine.cli", "demo", "--checkpoint"]
    env = {"OMNI2_CACHE": str(tmp_path), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    # cwd: `-m` puts the working directory first on sys.path, and the checkout's kernels/ must not shadow PyPI's
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
             for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    assert outs[0][0] == outs[1][0]  # the same directories
    assert sorted(q.name for q in tmp_path.iterdir()) == ["demo-tiny"]  # no temp dir left behind
    model_dir = tmp_path / "demo-tiny" / "omni2-tiny"
    assert (tmp_path / "demo-tiny" / "COMPLETE").is_file() and ModelDir(model_dir).config is not None
    # a third start reuses it without writing
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0 and "writing" not in r.stderr


def test_question_is_speech_sized():
    q = question()
    assert q.dtype.name == "float32" and q.shape == (32000,) and 0.1 < abs(q).max() <= 0.5
