"""engine/client/ against a real daemon: AsyncClient sessions side by side, offline mode, clear errors when the
daemon is down, and the README's client example run as written."""
from __future__ import annotations

import asyncio
import collections
import re
import time
from pathlib import Path

import numpy as np
import pytest

from omni2.engine.cli.generate import run_turn, session_options
from omni2.engine.client import AsyncClient, Client, ClientError, ClientTimeout, DaemonUnavailable, RemoteError
from omni2.engine.config import Limits
from omni2.engine.reference import ReferencePipeline
from omni2.engine.wire import protocol as P
from tests.engine.serve.daemon_harness import Daemon, free_port, speech

MAX_NEW = 6
Q = speech(1.0, seed=7)
README = Path(__file__).parents[3] / "README.md"


@pytest.fixture(scope="module")
def daemon(tiny_ckpt, tiny_vocoder, tmp_path_factory):
    # One session per vocoder call: two sessions voiced in one batched step round differently (within 1e-2, as
    # tests/stages/test_vocoder.py shows), and whether they share a step depends on timing; these tests compare
    # the clients' replies with the reference bit for bit.
    d = Daemon(["--model-dir", str(tiny_ckpt), "--vocoder-dir", str(tiny_vocoder), "--vocoder-batch", "1"],
               tmp_path_factory.mktemp("serve-client") / "serve.log")
    try:
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def refs(tiny_ckpt, tiny_vocoder):
    """Greedy replies to Q for seeds 0 and 1 (the vocoder's randomness differs), as `generate` computes them."""
    pipe = ReferencePipeline(tiny_ckpt, tiny_vocoder, limits=Limits(max_sessions=1))
    return {seed: run_turn(pipe, Q, 16000, session_options(seed, True, max_new_tokens=MAX_NEW)) for seed in (0, 1)}


def test_a_daemon_that_is_down_is_a_clear_error():
    address = f"tcp://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with Client(address, connect_timeout=0.5) as c:
        with pytest.raises(DaemonUnavailable, match="omni2-engine serve"):
            c.ping()
        for _ in range(2):  # a failed open leaves nothing behind: the same name is free to try again
            with pytest.raises(DaemonUnavailable, match="omni2-engine serve"):
                c.open("alice")

    async def main():
        async with AsyncClient(address, connect_timeout=0.5) as ac:
            with pytest.raises(DaemonUnavailable):
                await ac.ping()
            for _ in range(2):
                with pytest.raises(DaemonUnavailable):
                    await ac.open("alice")

    asyncio.run(main())
    assert time.monotonic() - t0 < 10


def test_async_sessions_side_by_side_equal_the_reference(daemon, refs):
    daemon.wait_ready()

    async def main():
        async with AsyncClient(daemon.address) as c:
            sessions = [await c.open(seed=seed, greedy=True, max_new_tokens=MAX_NEW, audio_format="float32")
                        for seed in (0, 1)]
            replies = await asyncio.gather(*(s.reply(Q, 16000) for s in sessions))
            with pytest.raises(RemoteError) as e:
                await sessions[0].commit()  # nothing appended
            assert e.value.code == "bad_audio"
            for s in sessions:
                await s.close()
            return replies, await c.status()

    replies, status = asyncio.run(main())
    for seed, r in zip((0, 1), replies):
        ref = refs[seed]
        assert (r.text, r.token_ids, r.units) == (ref.text, ref.token_ids, ref.units)
        np.testing.assert_array_equal(r.audio, ref.pcm)
    assert status["sessions"] == 0


def test_async_cancel(daemon):
    daemon.wait_ready()

    async def main():
        async with AsyncClient(daemon.address) as c:
            s = await c.open(greedy=True, max_new_tokens=12)  # a long reply (~1000 units)
            await s.send(Q, 16000)
            events = []
            async for ev in s.events():
                events.append(ev)
                if isinstance(ev, P.ResponseAudioDelta):
                    await s.cancel()
            await s.close()
            return events

    events = asyncio.run(main())
    assert isinstance(events[-1], P.ResponseDone) and events[-1].finish_reason == "cancelled"


def test_offline_mode_sends_the_whole_reply_at_once(daemon, refs):
    with daemon.client() as c:
        s = c.open(seed=0, greedy=True, max_new_tokens=MAX_NEW, mode="offline", audio_format="float32")
        s.send(Q, 16000)
        events = list(s.events())
        s.close()
    kinds = [type(e) for e in events]
    assert kinds == [P.ResponseTextDelta, P.ResponseUnitsDelta, P.ResponseAudioDelta, P.ResponseTiming,
                     P.ResponseDone]
    ref = refs[0]
    assert events[0].text == ref.text and events[1].units == ref.units
    np.testing.assert_array_equal(events[2].audio, ref.pcm)


def test_the_readme_client_example_runs_as_written(daemon, tmp_path):
    """The python block of README.md's client section, with the test daemon's address."""
    block = re.search(r"```python\n(.*?)```", README.read_text(), re.S).group(1)
    assert "Client(" in block and "tcp://127.0.0.1:5555" in block
    wav = tmp_path / "question.wav"
    from omni2.engine.audio import write_wav

    write_wav(wav, Q, 16000)
    daemon.wait_ready()
    code = block.replace("tcp://127.0.0.1:5555", daemon.address).replace("question.wav", str(wav))
    code = code.replace("reply.wav", str(tmp_path / "reply.wav"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert (tmp_path / "reply.wav").is_file()


@pytest.mark.parametrize("name", ["bad id", "x" * 65, "naïve"])
def test_a_session_name_the_daemon_would_refuse_fails_at_once(name):
    """The daemon answers a malformed name without naming the session (it is not one): a wait for it would hang."""
    with Client(f"tcp://127.0.0.1:{free_port()}", connect_timeout=0.5) as c:
        with pytest.raises(ClientError, match="session id"):
            c.open(name)


def test_the_late_answer_of_a_wait_that_timed_out_is_not_the_next_ones():
    """A commit whose wait timed out is answered later (audio.committed of turn 0); the next commit is refused
    (busy, the first reply is in flight). The second wait must raise busy, not return turn 0's answer and leave
    the refusal for the wait after it. Errors of requests sent without waiting and replies' events are skipped."""
    with Client(f"tcp://127.0.0.1:{free_port()}", connect_timeout=0.5) as c:
        c._queues["s"], c._owed["s"] = collections.deque(), collections.Counter()
        with pytest.raises(ClientTimeout):
            c._wait("s", (P.AudioCommitted,), 0.05, "audio.committed")
        c._queues["s"].extend([
            P.ServerError("s", "no_response", "no reply in flight", P.ResponseCancel.TYPE, -1),
            P.AudioCommitted("s", 0, 1.0),
            P.ResponseTextDelta("s", 0, "hi", 7, 0.0),
            P.ServerError("s", "busy", "a reply is in flight", P.AudioCommit.TYPE, -1),
            P.AudioCommitted("s", 1, 1.0),
        ])
        with pytest.raises(RemoteError, match="busy"):
            c._wait("s", (P.AudioCommitted,), 1, "audio.committed")
        assert c._wait("s", (P.AudioCommitted,), 1, "audio.committed").turn == 1
