"""`omni2-engine serve` end to end: a real daemon subprocess (the multi-process Engine on the tiny checkpoint) driven
over the wire by engine/client.py, compared with the single-process reference (engine/reference.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import numpy as np
import pytest

from omni2.engine.cli.generate import session_options
from omni2.engine.client import RemoteError, session_open_message
from omni2.engine.config import Limits, ServerConfig
from omni2.engine.reference import ReferencePipeline
from omni2.engine.serve.front_door import FrontDoor
from omni2.engine.serve.sessions import ClientState, SessionState, to_wire_audio
from omni2.engine.wire import protocol as P
from omni2.engine.wire.protocol import AudioDelta, TextDelta, TurnDone
from tests.engine.serve.daemon_harness import EXE, Daemon, alive, env, speech

MAX_NEW = 6  # reply length cap: random weights rarely stop by themselves
# With MAX_NEW, these options give short replies on the tiny checkpoint (the TTS LM writes up to 1024 units after the
# text ends, until EOS: most seeds make that seconds of compute).
CHEAP = [(True, 0), (True, 1), (True, 2), (False, 5)]  # (greedy, seed)
Q1, Q2 = speech(1.0, seed=1), speech(0.7, seed=2)


@pytest.fixture(scope="module")
def daemon(tiny_ckpt, tiny_vocoder, tmp_path_factory):
    d = Daemon(["--model-dir", str(tiny_ckpt), "--vocoder-dir", str(tiny_vocoder), "--max-sessions", "16",
                "--max-sessions-per-client", "4", "--reclaim-after", "1"],
               tmp_path_factory.mktemp("serve") / "serve.log")
    try:
        yield d  # ready at its first client(): the reference loads meanwhile
    finally:
        d.stop()


@pytest.fixture(scope="module")
def pipe(tiny_ckpt, tiny_vocoder):
    return ReferencePipeline(tiny_ckpt, tiny_vocoder, limits=Limits(max_sessions=2))


def reference(pipe, options, audios) -> list[dict]:
    """The reference replies of one session's turns: text, token_ids, units, float32 PCM."""
    pipe.open("ref", options)
    try:
        out = []
        for audio in audios:
            pcm, done = [], None
            for ev in pipe.turn("ref", audio, 16000):
                if isinstance(ev, AudioDelta):
                    pcm.append(ev.pcm)
                elif isinstance(ev, TurnDone):
                    done = ev
                assert not isinstance(ev, TextDelta) or ev.text
            out.append(dict(text=done.text, token_ids=done.token_ids, units=done.units, pcm=np.concatenate(pcm)))
        return out
    finally:
        pipe.close("ref")


def check(reply, ref: dict) -> None:
    assert reply.text == ref["text"]
    assert reply.token_ids == ref["token_ids"]
    assert reply.units == ref["units"]
    assert reply.audio.shape == ref["pcm"].shape


@pytest.mark.parametrize("greedy, seed", [CHEAP[0], CHEAP[3]])
def test_two_turns_over_the_wire_equal_the_reference(daemon, pipe, greedy, seed):
    refs = reference(pipe, session_options(seed, greedy, max_new_tokens=MAX_NEW), [Q1, Q2])
    with daemon.client() as c:
        exact = c.open(seed=seed, greedy=greedy, max_new_tokens=MAX_NEW, audio_format="float32")
        pcm16 = c.open(seed=seed, greedy=greedy, max_new_tokens=MAX_NEW)  # the default wire format
        for q, ref in zip([Q1, Q2], refs):
            r = exact.reply(q, 16000)
            check(r, ref)
            np.testing.assert_array_equal(r.audio, ref["pcm"])  # float32 on the wire: bit-exact
            assert r.finish_reason in ("stop", "length") and (r.first_audio_s is not None) == (r.audio.size > 0)
            assert set(r.timings) >= {"t_asr", "total"}
            # PCM16: the events themselves, then the documented quantization of the reference
            exact_pcm16 = []
            pcm16.send(q, 16000)
            for ev in pcm16.events():
                if isinstance(ev, P.ResponseAudioDelta):
                    assert ev.audio.dtype == np.int16 and ev.sample_rate == 24000
                    exact_pcm16.append(ev.audio)
            np.testing.assert_array_equal(np.concatenate(exact_pcm16), to_wire_audio(ref["pcm"], "pcm16"))
        exact.close()
        pcm16.close()
    assert any(ref["pcm"].size for ref in refs), "the test should hear some audio"


def test_to_wire_audio_rounds_half_to_even_and_clips():
    x = np.array([0.0, 1.0, -1.0, 2.0, -3.0, 0.5 / 32767, 1.5 / 32767], np.float32)
    assert to_wire_audio(x, "pcm16").tolist() == [0, 32767, -32767, 32767, -32767, 0, 2]


def test_sixteen_concurrent_sessions_each_correct(daemon, pipe):
    # 16 sessions, 4 distinct replies to check against
    refs = {o: reference(pipe, session_options(o[1], o[0], max_new_tokens=MAX_NEW), [Q1])[0] for o in CHEAP}
    results, errors = {}, []

    def one(i: int) -> None:
        try:
            with daemon.client() as c:
                greedy, seed = CHEAP[i % 4]
                s = c.open(f"s{i}", seed=seed, greedy=greedy, max_new_tokens=MAX_NEW, audio_format="float32")
                results[i] = s.reply(Q1, 16000)
                s.close()
        except Exception as e:  # reported below, with the index
            errors.append((i, e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    for i, r in results.items():
        ref = refs[CHEAP[i % 4]]
        check(r, ref)
        # sessions voiced in one vocoder batch: equal to fp32 rounding, which HiFT's phase integration magnifies
        # (tests/stages/test_vocoder.py; measured 4.4e-4)
        np.testing.assert_allclose(r.audio, ref["pcm"], rtol=0, atol=1e-2)
    assert len(results) == 16


def test_cancel_mid_reply_then_the_session_goes_on(daemon):
    with daemon.client() as c:
        s = c.open(greedy=True, max_new_tokens=12)  # turn 1: ~1000 units of audio; turn 2: none (cheap)
        s.send(Q1, 16000)
        seen = []
        for ev in s.events():
            seen.append(ev)
            if isinstance(ev, P.ResponseAudioDelta):
                s.cancel()
                break
        evs = list(s.events())  # whatever was already on the way, then the final event
        done = evs[-1]
        assert isinstance(done, P.ResponseDone) and done.finish_reason == "cancelled"
        assert 0 < len(done.token_ids) <= 12 and len(done.units) < 1000
        s.cancel()  # nothing to cancel any more
        err = s.client.next_event(s.id, 5)
        assert isinstance(err, P.ServerError) and (err.code, err.in_reply_to, err.turn) == (
            "no_response", "response.cancel", -1), err
        r = s.reply(Q2, 16000)  # the next turn works
        assert r.finish_reason == "length" or r.finish_reason == "stop"
        s.close()
    with daemon.client() as c:
        assert c.status()["sessions"] == 0


def test_client_vanishing_mid_reply_frees_its_session(daemon):
    c = daemon.client()
    s = c.open(greedy=True, max_new_tokens=12)  # ~1000 units: a long reply
    s.send(Q1, 16000)
    for ev in s.events():
        if isinstance(ev, P.ResponseAudioDelta):
            break
    c._sock.close(linger=0)  # gone without session.close
    with daemon.client() as probe:
        deadline = time.monotonic() + 15
        while probe.status()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.2)
        st = probe.status()
    assert st["sessions"] == 0 and st["server"]["reclaimed"] >= 1, st


def test_requests_of_a_client_are_checked(daemon):
    with daemon.client() as c:
        sessions = [c.open(f"k{i}") for i in range(4)]
        with pytest.raises(RemoteError) as e:
            c.open("k4")  # --max-sessions-per-client 4
        assert e.value.code == "too_many_sessions"
        c.send(session_open_message("k0"))  # the Client itself refuses this; the daemon must too
        with pytest.raises(RemoteError) as e:
            c._wait("k0", (P.SessionOpened,), 10, "error")
        assert e.value.code == "session_exists"
        with daemon.client() as c2:
            with pytest.raises(RemoteError) as e:
                c2.open("x", voice="nobody")
            assert e.value.code == "unknown_voice"
            with pytest.raises(RemoteError) as e:
                c2.open("y", stream_params="(1,1)")
            assert e.value.code == "unsupported"
            with pytest.raises(RemoteError) as e:
                c2.open("z", mode="telepathy")
            assert e.value.code == "bad_value"
            with pytest.raises(RemoteError) as e:
                c2.open("z", vocoder_schedule="fastest")
            assert e.value.code == "bad_value" and "vocoder_schedule" in str(e.value)
            c2.open("w", vocoder_schedule="official-live").close()
        s = sessions[0]
        with pytest.raises(RemoteError) as e:
            s.commit()
        assert e.value.code == "bad_audio"
        with pytest.raises(RemoteError) as e:
            s.send(np.zeros((31 * 8000,), np.float32), 8000)  # over the 30 s of one turn
        assert e.value.code == "too_long"
        for s in sessions:
            s.close()


def test_a_refusal_answers_its_own_request_and_no_later_one(daemon):
    """A cancel with nothing in flight, an append past the turn's 30 s and one over the request size limit are
    refused without the client waiting; the commit of a turn that lost an append is refused too (not answered with
    what was left of it), and the session's next turn gets its own answer: no refusal or reply is left behind for
    a later request to take as its own."""
    with daemon.client() as c:
        s = c.open(greedy=True, max_new_tokens=4)
        s.cancel()  # no_response, unread
        with pytest.raises(RemoteError) as e:
            s.send(np.zeros((31 * 8000,), np.float32), 8000)
        assert e.value.code == "too_long" and "the turn is dropped whole" in e.value.message, e.value
        assert e.value.event.in_reply_to == "audio.commit"
        # An append over the 4 MiB request limit is refused before its handler runs: its turn is refused too.
        c.send(P.AudioAppend(s.id, np.zeros(1_200_000, np.float32), 48000))
        with pytest.raises(RemoteError) as e:
            s.send(Q1, 16000)
        assert e.value.code == "audio_lost" and "too_large" in e.value.message, e.value
        r = s.reply(Q1, 16000)
        assert r.turn == 0 and r.finish_reason in ("stop", "length") and r.units
        s.close()


@pytest.mark.parametrize("in_flight", [True, False])
def test_a_cancel_that_meets_a_finished_reply_lets_its_own_done_through(in_flight):
    """The engine finished the turn (its TurnDone queued here, the turn in the conversation) just before the
    client's cancel is handled: the client gets that reply's own response.done, not a `cancelled` one for a turn
    that stays in the conversation. While the turn is in flight, the cancel ends it, and what was queued is stale."""
    class Engine:
        def cancel(self, sid):
            return in_flight

    door = FrontDoor(ServerConfig())
    door.engine, sent = Engine(), []
    door._send = lambda client, msg: sent.append(msg) or True
    client = ClientState(b"c")
    s = client.sessions["s"] = door.sessions["e1"] = SessionState("e1", "s", client, "streaming", "pcm16", turn=0)
    door.on_event("e1", TurnDone("e1", "hello", [7, 8], [1, 2, 3], "stop"))
    door._cancel(client, P.ResponseCancel("s"))
    door._forward_events()
    door._wakeup.close()
    (done,) = [m for m in sent if isinstance(m, P.ResponseDone)]
    assert done.finish_reason == ("cancelled" if in_flight else "stop") and s.turn == -1
    assert done.text == ("" if in_flight else "hello")


def test_a_port_in_use_fails_fast(daemon, tiny_ckpt, tiny_vocoder):
    """A second daemon on the same port says so at once: it binds before it loads the model."""
    daemon.wait_ready()
    t0 = time.monotonic()
    r = subprocess.run([EXE, "serve", "--bind", daemon.address, "--model-dir", str(tiny_ckpt), "--vocoder-dir",
                        str(tiny_vocoder)], capture_output=True, text=True, env=env(), timeout=120)
    assert r.returncode == 2 and "cannot bind" in r.stderr, r.stderr
    assert "starting the engine" not in r.stderr and time.monotonic() - t0 < 60


def test_an_idle_client_that_vanished_is_reclaimed(daemon):
    """No reply in flight, so no send fails by itself: the daemon's probe finds the client gone."""
    c = daemon.client()
    c.open()
    c._sock.close(linger=0)
    with daemon.client() as probe:
        deadline = time.monotonic() + 15  # probe every 2 s, then --reclaim-after 1
        while probe.status()["sessions"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert probe.status()["sessions"] == 0


def test_a_worker_crash_reaches_the_client_as_an_error(daemon):
    """kill -9 the vocoder mid-reply: the reply ends with error `worker_crashed`; the session goes on."""
    with daemon.client() as c:
        pid = c.status()["stages"]["vocoder"]["pid"]
        s = c.open(greedy=True, max_new_tokens=12)
        s.send(Q1, 16000)
        with pytest.raises(RemoteError) as e:
            for ev in s.events():
                if isinstance(ev, P.ResponseAudioDelta) and alive(pid):
                    os.kill(pid, signal.SIGKILL)
        assert e.value.code == "worker_crashed" and e.value.event.turn >= 0
        r = s.reply(Q2, 16000, timeout=120)  # served once the supervisor has restarted the worker
        assert r.finish_reason in ("stop", "length")
        s.close()


def test_sigterm_ends_replies_and_leaves_nothing(daemon):
    pids = daemon.worker_pids()
    c = daemon.client()
    s = c.open(greedy=True, max_new_tokens=12)
    s.send(Q1, 16000)
    daemon.proc.send_signal(15)
    with pytest.raises(RemoteError) as e:
        for _ in s.events(timeout=30):
            pass
    assert e.value.code == "shutdown"
    c.close()
    assert daemon.stop() == 0
    assert "stopped" in daemon.log()
    assert not [p for p in pids if alive(p)]
    assert not daemon.leftovers()

