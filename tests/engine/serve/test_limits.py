"""The daemon's limits over the wire, against a real `omni2-engine serve` (tiny checkpoint):

* the engine-wide `--max-sessions` (here 2, below `--max-sessions-per-client` 4, so the refusal can only be the
  engine's): a third session.open, from any connection, is refused with `too_many_sessions`; the refusal leaks
  nothing, and once a session closes a new one opens;
* audio.commit while the session's reply is still in flight is refused with `busy`, and that reply still ends
  normally and equals the same reply on an undisturbed session; the audio appended meanwhile is kept for the next
  turn.
"""
from __future__ import annotations

import numpy as np
import pytest

from omni2.engine.client import RemoteError
from omni2.engine.wire import protocol as P
from tests.engine.serve.daemon_harness import Daemon, speech

MAX_NEW = 6
# Options that give a short reply on the tiny checkpoint (tests/engine/serve/test_front_door.py, CHEAP).
OPTS = dict(seed=0, greedy=True, max_new_tokens=MAX_NEW, audio_format="float32")
Q1, Q2 = speech(1.0, seed=1), speech(0.7, seed=2)


@pytest.fixture(scope="module")
def daemon(tiny_ckpt, tiny_vocoder, tmp_path_factory):
    d = Daemon(["--model-dir", str(tiny_ckpt), "--vocoder-dir", str(tiny_vocoder), "--max-sessions", "2",
                "--max-sessions-per-client", "4"], tmp_path_factory.mktemp("limits") / "serve.log")
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def test_the_engine_wide_session_limit_is_reached_over_the_wire(daemon):
    with daemon.client() as a, daemon.client() as b, daemon.client() as c:
        sa = a.open("one")
        sb = b.open("two")
        # A third connection: its own per-connection count is 0 of 4, so only the engine's 2 can refuse it.
        with pytest.raises(RemoteError) as e:
            c.open("three")
        assert e.value.code == "too_many_sessions"
        assert "all 2 sessions are in use" in e.value.message
        assert e.value.event.in_reply_to == "session.open" and e.value.event.session_id == "three"
        # One connection holding both is refused the same way (2 of its 4 allowed).
        with pytest.raises(RemoteError) as e:
            a.open("one-more")
        assert e.value.code == "too_many_sessions"
        st = c.status()
        assert st["sessions"] == 2 and st["max_sessions"] == 2 and st["server"]["sessions"] == 2, st
        # After a close, the refused connection gets its session, under the name it asked for before.
        sb.close()
        s3 = c.open("three", **OPTS)
        assert s3.info.session_id == "three" and s3.sample_rate == 24000
        with pytest.raises(RemoteError) as e:  # full again
            b.open("two")
        assert e.value.code == "too_many_sessions"
        # The session admitted last works: a whole reply comes back.
        r = s3.reply(Q1, 16000)
        assert r.finish_reason in ("stop", "length") and 0 < len(r.token_ids) <= MAX_NEW
        s3.close()
        sa.close()
        assert c.status()["sessions"] == 0


def test_commit_while_a_reply_streams_is_busy_and_the_reply_completes(daemon):
    with daemon.client() as c:
        clean = c.open("clean", **OPTS).reply(Q1, 16000)  # the same reply, undisturbed
        c.send(P.SessionClose("clean"))
        c._wait("clean", (P.SessionClosed,), 30, "session.closed")

        s = c.open("busy", **OPTS)
        turn = s.send(Q1, 16000)  # audio.committed: the reply is in flight from here until response.done
        # Straight away (ASR alone takes longer than this round trip): more audio, and a second commit.
        s.append(Q2, 16000)
        c.send(P.AudioCommit(s.id))
        events = []
        while not events or not isinstance(events[-1], P.ResponseDone):
            ev = c.next_event(s.id, 60)
            assert ev is not None, f"the reply stopped after {events[-1:]}"
            events.append(ev)
        errors = [e for e in events if isinstance(e, P.ServerError)]
        assert [(e.code, e.in_reply_to, e.turn) for e in errors] == [("busy", "audio.commit", -1)]
        # The refusal came while the reply was streaming (before its response.done), and ended nothing.
        done = events[-1]
        assert events.index(errors[0]) < len(events) - 1
        assert done.turn == turn and done.finish_reason == clean.finish_reason
        assert (done.text, done.token_ids, done.units) == (clean.text, clean.token_ids, clean.units)
        pcm = [e.audio for e in events if isinstance(e, P.ResponseAudioDelta)]
        np.testing.assert_array_equal(np.concatenate(pcm), clean.audio)  # float32 on the wire: bit-exact
        assert clean.audio.size > 0

        # The audio appended during the reply was kept: committing now starts the next turn with exactly it.
        c.send(P.AudioCommit(s.id))
        committed = c._wait(s.id, (P.AudioCommitted,), 30, "audio.committed")
        assert committed.turn == turn + 1 and committed.seconds == pytest.approx(Q2.size / 16000)
        r = s.collect()
        assert r.turn == turn + 1 and r.finish_reason in ("stop", "length")
        s.close()
