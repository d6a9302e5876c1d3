"""Session housekeeping of `omni2-engine serve`: a session nobody uses is closed after --idle-timeout, with a
session.closed event, and the slot goes back to the engine."""
from __future__ import annotations

import time

import pytest

from omni2.engine.wire import protocol as P
from tests.engine.serve.daemon_harness import Daemon, speech

IDLE = 2.0


@pytest.fixture(scope="module")
def daemon(tiny_ckpt, tiny_vocoder, tmp_path_factory):
    d = Daemon(["--model-dir", str(tiny_ckpt), "--vocoder-dir", str(tiny_vocoder), "--max-sessions", "1",
                "--idle-timeout", str(IDLE)], tmp_path_factory.mktemp("serve-idle") / "serve.log")
    try:
        yield d
    finally:
        d.stop()


def test_an_idle_session_is_closed_and_its_slot_freed(daemon):
    with daemon.client() as c:
        t0 = time.monotonic()  # before the request: the daemon's idle clock cannot start earlier than this
        s = c.open(seed=0, greedy=True, max_new_tokens=4)
        ev = c.next_event(s.id, timeout=IDLE + 10)
        assert isinstance(ev, P.SessionClosed) and ev.session_id == s.id and ev.reason == "idle", ev
        # Never early; late by at most the open itself and a housekeeping tick (0.5 s), with room for a busy box.
        assert IDLE <= time.monotonic() - t0 < IDLE + 10
        assert c.status()["server"]["sessions"] == 0
        # The engine's only slot is free again: a new session opens and answers.
        s2 = c.open(seed=0, greedy=True, max_new_tokens=4)
        reply = s2.reply(speech(1.0, seed=1), 16000)
        assert reply.token_ids and reply.audio.size > 0
        s2.close()


def test_a_session_in_use_is_not_idle(daemon):
    with daemon.client() as c:
        s = c.open(seed=0, greedy=True, max_new_tokens=4)
        for _ in range(3):  # keeps talking for longer than the idle timeout
            s.reply(speech(0.5, seed=2), 16000)
            time.sleep(IDLE * 0.6)
        assert c.status()["server"]["sessions"] == 1
        s.close()
