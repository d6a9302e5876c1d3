"""bench/daemon_process.py, the daemon every bench script starts: a child that dies while starting is an error that
quotes its log, and one that never answers is stopped at the deadline (no child left behind)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"
_spec = importlib.util.spec_from_file_location("daemon_process", BENCH / "daemon_process.py")
daemon_process = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(daemon_process)


def test_a_daemon_that_dies_while_starting_is_reported_with_its_log(tmp_path):
    address = daemon_process.free_address()
    argv = [sys.executable, "-c", "import sys; print('cannot load the checkpoint: no config.json'); sys.exit(3)"]
    d = daemon_process.DaemonProcess(argv, address, tmp_path / "daemon.log")
    with pytest.raises(RuntimeError, match=r"exited with 3 while starting(.|\n)*cannot load the checkpoint"):
        d.start(timeout=30)


def test_a_daemon_that_never_answers_is_stopped_at_the_deadline(tmp_path):
    address = daemon_process.free_address()
    d = daemon_process.DaemonProcess([sys.executable, "-c", "import time; time.sleep(60)"], address,
                                     tmp_path / "daemon.log")
    with pytest.raises(RuntimeError, match="not ready in 2 s"):
        d.start(timeout=2)
    assert d.proc.poll() is not None  # SIGTERMed, not left running
