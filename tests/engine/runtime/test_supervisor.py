"""Supervisor.check: what counts as lost besides death and hangs (a replacement that never comes up), and how an
exit is told (exit_status)."""
from __future__ import annotations

import signal
import subprocess
import time
from types import SimpleNamespace

import pytest

from omni2.engine.runtime.supervisor import Supervisor, exit_status


class Child:
    """A real process behind the multiprocessing.Process calls the supervisor makes."""

    def __init__(self):
        self.popen = subprocess.Popen(["sleep", "60"])
        self.pid = self.popen.pid

    def is_alive(self) -> bool:
        return self.popen.poll() is None

    def join(self, timeout: float | None = None) -> None:
        try:
            self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pass

    @property
    def exitcode(self) -> int | None:
        return self.popen.poll()


@pytest.fixture
def supervisor(tmp_path):
    spec = SimpleNamespace(stage="tts", heartbeat_s=0.2, prefix="o2suptest-", ipc_dir=str(tmp_path))
    sup = Supervisor({"tts": spec}, hang_s=1.0, ready_timeout_s=5.0)
    yield sup
    w = sup.workers["tts"]
    if w.process is not None and w.process.is_alive():
        w.process.popen.kill()


def test_a_replacement_that_never_comes_up_is_lost(supervisor):
    w = supervisor.workers["tts"]
    w.process, w.restarts, w.started = Child(), 1, time.monotonic() - 4.0
    child = w.process
    assert supervisor.check() == []  # loading, within the deadline
    w.started -= 2.0
    assert supervisor.check() == [("tts", "its replacement was not ready 5 s after it started")]
    assert not child.is_alive() and w.process is None


def test_a_first_start_is_left_to_the_engines_deadline(supervisor):
    w = supervisor.workers["tts"]
    w.process, w.restarts, w.started = Child(), 0, time.monotonic() - 60.0
    assert supervisor.check() == [] and w.process.is_alive()


def test_only_the_current_worker_can_say_it_is_ready(supervisor):
    """A worker that said it was ready and was lost before the engine read it must not mark its replacement,
    still loading, ready (the replacement would be re-opened too early, and killed as slow to start)."""
    w = supervisor.workers["tts"]
    w.process, w.restarts, w.started = Child(), 1, time.monotonic()
    assert not supervisor.ready("tts", w.pid + 1) and not w.ready
    assert not supervisor.ready("nope", w.pid)
    assert supervisor.ready("tts", w.pid) and w.ready


@pytest.mark.parametrize("code, words", [(0, "0"), (1, "1"), (-signal.SIGKILL, "signal SIGKILL"),
                                         (-40, "signal 40")])
def test_exit_status(code, words):
    assert exit_status(code) == words
