"""The multi-process engine against the single-process reference: same text, units and PCM, for one session,
eight at once and two turns; cancellation; a stalled consumer; malformed input reaching a worker.

One engine serves the whole module (starting four workers costs seconds); `make test` (--dist loadfile) keeps
the module on one test process. It runs its thinker's and TTS LM's one-token steps on fixed shapes (`cuda_graphs`,
eager on a CPU: stages/decode_graph.py) and the reference the dynamic steps, so every equality here also holds
across the two paths; the other engine and daemon tests run the dynamic steps.
"""
import threading
import time
from dataclasses import replace

import numpy as np
import pytest

from omni2.engine.cli.generate import run_turn, session_options
from omni2.engine.config import EngineConfig, Limits
from omni2.engine.reference import ReferencePipeline
from omni2.engine.runtime import Engine, EngineError
from omni2.engine.runtime.engine import graphs_hint
from omni2.engine.wire.protocol import AudioDelta, ErrorEvent, TextDelta, TurnDone, UnitChunk

LIMITS = Limits(max_sessions=8, max_new_tokens=6)


class StallableEngine(Engine):
    """An Engine whose loop can be told to stop reading the vocoder's output ring (the pipeline's tail stalls)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stall_tail = threading.Event()

    def _drain_out(self, consumer):
        if consumer.edge == "voc_out" and self.stall_tail.is_set():
            time.sleep(0.005)  # leave it unread; the doorbell stays ready, so do not spin the loop
            return
        super()._drain_out(consumer)


def speech(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(16000 * (1 + seed % 3)) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def engine(tiny_ckpt, tiny_vocoder):
    # Two slots per ring: every test also runs under constant backpressure. Hang detection is relaxed here (a
    # loaded CI box must not cost a worker); test_runtime_faults.py holds it to the 1 s default.
    eng = StallableEngine(EngineConfig(str(tiny_ckpt), str(tiny_vocoder), limits=LIMITS, ring_slots=2, hang_s=5.0,
                                       threads=1, cuda_graphs=True)).start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def ref(tiny_ckpt, tiny_vocoder):
    return ReferencePipeline(tiny_ckpt, tiny_vocoder, limits=LIMITS)


def wait_until(condition, engine, timeout: float):
    """engine.status() once `condition(status)` holds; fails the test if it does not within `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        status = engine.status()
        if condition(status):
            return status
        assert time.monotonic() < deadline, f"condition not met in {timeout} s: {status}"
        time.sleep(0.02)


def reply(events):
    """(text, token_ids, units, pcm, TurnDone) of one turn's events, checking their order on the way."""
    assert events and isinstance(events[-1], TurnDone), events[-1:]
    assert not any(isinstance(e, (TurnDone, ErrorEvent)) for e in events[:-1])
    done = events[-1]
    audio = [e for e in events if isinstance(e, AudioDelta)]
    assert audio and audio[-1].final and not any(a.final for a in audio[:-1])
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    units = [u for e in events if isinstance(e, UnitChunk) for u in e.units]
    assert text == done.text and units == done.units
    return text, done.token_ids, units, np.concatenate([a.pcm for a in audio]), done


# PCM of sessions the vocoder voiced in one batch vs alone: float32 rounding of batched matmuls, which HiFT's
# phase integration magnifies (tests/stages/test_vocoder.py); measured 8.6e-4 here. Alone, bit for bit.
BATCHED_PCM_ATOL = 1e-2


def assert_same(events, expected, pcm_atol: float = 0.0):
    text, ids, units, pcm, done = reply(events)
    assert ids == expected.token_ids
    assert text == expected.text
    assert units == expected.units
    if pcm_atol == 0:
        assert np.array_equal(pcm, expected.pcm)  # bit-exact: same ops on the same numbers, in another process
    else:
        assert pcm.shape == expected.pcm.shape
        np.testing.assert_allclose(pcm, expected.pcm, rtol=0, atol=pcm_atol)
    assert done.finish_reason == expected.finish_reason


@pytest.mark.parametrize("greedy,seed", [(True, 0), (False, 5)])
def test_one_session_equals_the_reference(engine, ref, greedy, seed):
    opts = session_options(seed=seed, greedy=greedy)
    expected = run_turn(ref, speech(seed), 16000, opts)
    engine.open("one", opts)
    try:
        events = list(engine.turn("one", speech(seed), timeout=60))
    finally:
        engine.close("one")
    assert_same(events, expected)
    # Unit events as the reference gives them: one per TTS write (the final flush's W-unit pieces, which the
    # vocoder takes one by one, make one chunk), the last one final.
    ref.open("u", opts)
    try:
        want = [(e.units, e.final) for e in ref.turn("u", speech(seed), 16000) if isinstance(e, UnitChunk)]
    finally:
        ref.close("u")
    assert [(e.units, e.final) for e in events if isinstance(e, UnitChunk)] == want
    assert greedy or max(len(u) for u, _ in want) > 10  # a final flush longer than a piece
    t = events[-1].timings
    assert 0 < t["t_asr"] <= t["t_llm"] <= t["total"]
    assert t["t_tts"] <= t["first_audio"] <= t["total"]
    if greedy:
        return  # the tiny random TTS LM, greedy, ends its writes early: nothing to voice before the final flush
    # The live schedule voices the first TTS write at once: a first write of W = 10 units makes the first audio,
    # 14 mel frames of which HiFT withholds 8 (2880 samples), long before the reply ends.
    first_write = next(e for e in events if isinstance(e, UnitChunk))
    first_audio = next(e for e in events if isinstance(e, AudioDelta) and e.pcm.size)
    assert len(first_write.units) == 10, first_write  # this reply's first write is a full one
    assert first_audio.pcm.size == (2 * (10 - 3) - 8) * 480 and not first_audio.final


def test_eight_concurrent_sessions_each_equal_the_reference(engine, ref):
    cases = [(f"c{i}", speech(i), session_options(seed=i, greedy=i % 2 == 0)) for i in range(8)]
    expected = {sid: run_turn(ref, audio, 16000, opts) for sid, audio, opts in cases}
    for sid, _, opts in cases:
        engine.open(sid, opts)
    try:
        for sid, audio, _ in cases:  # all eight in flight together, batched in every stage
            engine.submit(sid, audio)
        got = {sid: list(engine.events(sid, timeout=120)) for sid, _, _ in cases}
    finally:
        for sid, _, _ in cases:
            engine.close(sid)
    for sid, _, _ in cases:
        assert_same(got[sid], expected[sid], pcm_atol=BATCHED_PCM_ATOL)
    stages = engine.status()["stages"]
    # Eight turns at once were served together, not one after another: some step of each stage held several.
    assert min(stages[s]["max_batch"] for s in ("llm", "tts", "vocoder")) >= 2, stages


def test_two_turns_keep_the_conversation(engine, ref):
    opts = session_options(seed=3, greedy=True)
    ref.open("r", opts)
    try:
        want = [list(ref.turn("r", speech(s))) for s in (3, 4)]
    finally:
        ref.close("r")
    engine.open("m", opts)
    try:
        got = [list(engine.turn("m", speech(s), timeout=60)) for s in (3, 4)]
    finally:
        engine.close("m")
    for g, w in zip(got, want):
        assert reply(g)[:3] == reply(w)[:3]
        assert np.array_equal(reply(g)[3], reply(w)[3])


def test_a_truncated_answer_is_named_to_the_thinker_with_the_next_turn(engine):
    """Engine.truncate records the cut; the next commit carries it with the history (the runner and LLM stage
    tests take it from there: tests/engine/runtime/test_runners.py, tests/stages/test_llm.py)."""
    engine.open("t", session_options(seed=3, greedy=True))
    try:
        first = list(engine.turn("t", speech(3), timeout=60))
        n = len(reply(first)[1])
        assert engine.truncate("t", 0, 10**6) == n  # past the end keeps the whole answer
        assert engine.truncate("t", 0, 2) == min(2, n)
        with pytest.raises(EngineError) as e:
            engine.truncate("t", 7, 1)
        assert e.value.code == "bad_turn"
        seen, put = [], engine._put_asr
        engine._put_asr = lambda msg: (seen.append(msg), put(msg))[1]
        try:
            reply(list(engine.turn("t", speech(4), timeout=60)))
        finally:
            del engine._put_asr
        assert seen[-1].histories == [[0]] and seen[-1].cuts == [[0, min(2, n)]]
    finally:
        engine.close("t")


def test_session_errors_are_clear(engine):
    engine.open("e", session_options())
    try:
        with pytest.raises(EngineError) as e:
            engine.open("e", session_options())
        assert e.value.code == "session_exists"
        with pytest.raises(EngineError) as e:
            engine.commit("e")
        assert e.value.code == "bad_audio"
        with pytest.raises(EngineError) as e:
            engine.submit("e", np.full(16000, np.nan, np.float32))
        assert e.value.code == "bad_audio"
        with pytest.raises(EngineError) as e:
            engine.append("e", np.zeros(16000 * 31, np.float32), 16000)
        assert e.value.code == "too_long"
    finally:
        engine.close("e")
    with pytest.raises(EngineError) as e:
        engine.open("v", session_options(voice="nobody"))
    assert e.value.code == "unknown_voice"
    assert "(known voices: default); the daemon's operator adds one with `omni2-engine voice add nobody" in \
        e.value.message and str(engine.vocoder_dir.path) not in e.value.message  # no server path to clients
    with pytest.raises(EngineError) as e:
        engine.submit("ghost", speech(0))
    assert e.value.code == "unknown_session"
    sids = [f"full{i}" for i in range(LIMITS.max_sessions)]
    for sid in sids:
        engine.open(sid, session_options())
    try:
        with pytest.raises(EngineError) as e:
            engine.open("one-too-many", session_options())
        assert e.value.code == "too_many_sessions"
    finally:
        for sid in sids:
            engine.close(sid)


def test_cancel_mid_reply_stops_every_stage_and_frees_the_session(engine, ref):
    engine.open("long", session_options(seed=2))  # seed 2 samples a ~1000-unit reply
    engine.submit("long", speech(2))
    seen = []
    for ev in engine.events("long", timeout=60):
        seen.append(ev)
        if isinstance(ev, AudioDelta) and ev.pcm.size:
            engine.cancel("long")
    assert not any(isinstance(e, TurnDone) for e in seen)
    # No stage works on it any more and nothing of it is in flight: every stage idle, every ring empty ...
    st = wait_until(lambda st: all(w["active"] == 0 for w in st["stages"].values())
                    and all(r["in_use"] == 0 for r in st["rings"].values()), engine, timeout=30)
    steps = {s: st["stages"][s]["steps"] for s in ("tts", "vocoder")}
    # ... so nothing of the cancelled turn can still arrive, and none did.
    assert engine._sessions["long"].events.empty()
    assert {s: engine.status()["stages"][s]["steps"] for s in ("tts", "vocoder")} == steps
    engine.close("long")
    # Its slots are free: a full house of new sessions opens, and a turn on one of them is right.
    sids = [f"after{i}" for i in range(LIMITS.max_sessions)]
    for sid in sids:
        engine.open(sid, session_options(seed=1, greedy=True))
    try:
        expected = run_turn(ref, speech(1), 16000, session_options(seed=1, greedy=True))
        assert_same(list(engine.turn(sids[-1], speech(1), timeout=60)), expected)
    finally:
        for sid in sids:
            engine.close(sid)


def test_a_stalled_consumer_blocks_its_producers_with_bounded_memory(engine, ref):
    cases = [("stall-a", 6, session_options(seed=6)), ("stall-b", 7, session_options(seed=7))]
    expected = {sid: run_turn(ref, speech(s), 16000, o) for sid, s, o in cases}
    for sid, _, o in cases:
        engine.open(sid, o)
    engine.stall_tail.set()  # the engine stops reading the vocoder's output ring
    try:
        for sid, s, _ in cases:
            engine.submit(sid, speech(s))
        n = engine.status()["rings"]["voc_out"]["n_slots"]
        # The vocoder fills the ring, then its sender waits for a credit that does not come: it says so.
        status = wait_until(lambda st: st["rings"]["voc_out"]["in_use"] == n
                            and st["stages"]["vocoder"]["blocked"] == "voc_out", engine, timeout=60)
        assert status["rings"]["voc_out"]["in_use"] == n
        assert status["stages"]["vocoder"]["alive"] and status["stages"]["vocoder"]["restarts"] == 0
        for edge, r in status["rings"].items():
            assert r["in_use"] <= r["n_slots"], edge
    finally:
        engine.stall_tail.clear()
    try:
        for sid, _, _ in cases:
            assert_same(list(engine.events(sid, timeout=120)), expected[sid], BATCHED_PCM_ATOL)  # nothing lost
    finally:
        for sid, _, _ in cases:
            engine.close(sid)


def test_malformed_messages_get_errors_and_never_crash_a_worker(engine, ref):
    pids = {s: w["pid"] for s, w in engine.status()["stages"].items()}
    errors = engine.status()["errors"]
    bad = [[b"\x99", b"x"], [b"\x10"], [b"\x20", b"\xc1"], [b"\x40", b"\x94\x01\x02\x03\x04"], [b"", b""]]
    for stage in pids:
        for frames in bad:
            engine.send_raw(stage, frames)
    with engine._asr_lock:  # straight onto the ASR's input ring, past the engine's own checks
        for frames in bad:
            engine._asr_in._data.send_multipart(frames)
    deadline = time.monotonic() + 10
    while engine.status()["errors"] < errors + len(bad) * (len(pids) + 1):
        assert time.monotonic() < deadline, engine.status()["errors"] - errors
        time.sleep(0.05)
    assert {s: w["pid"] for s, w in engine.status()["stages"].items()} == pids
    opts = session_options(seed=0, greedy=True)
    engine.open("after-fuzz", opts)
    try:
        assert_same(list(engine.turn("after-fuzz", speech(0), timeout=60)), run_turn(ref, speech(0), 16000, opts))
    finally:
        engine.close("after-fuzz")


def test_streamed_chunks_at_another_rate_equal_one_whole_turn(engine, ref):
    opts = session_options(seed=1, greedy=True)
    pcm16 = (speech(1) * 20000).astype(np.int16)
    audio48 = np.repeat(pcm16, 3)  # PCM16 at 48 kHz, resampled by the engine exactly as by the reference
    expected = run_turn(ref, audio48, 48000, opts)
    engine.open("chunks", opts)
    try:
        for part in np.array_split(audio48, 5):
            engine.append("chunks", part, 48000)
        engine.commit("chunks")
        assert_same(list(engine.events("chunks", timeout=60)), expected)
    finally:
        engine.close("chunks")


def test_a_conversation_past_the_context_limit_is_refused_clearly(engine):
    engine.open("chatty", session_options(seed=0, greedy=True))
    try:
        turns = 0
        while turns < LIMITS.max_context // 300 + 2:  # each turn adds 300 speech rows and its answer
            last = list(engine.turn("chatty", speech(0), timeout=60))[-1]
            turns += 1
            if isinstance(last, ErrorEvent):
                break
            assert isinstance(last, TurnDone) and last.finish_reason in ("length", "stop", "context")
        assert isinstance(last, ErrorEvent) and last.code == "llm_refused", last
        assert "context limit" in last.message and turns >= 10
        # The refusal changed nothing: the session is still open and the engine serves others.
        with pytest.raises(EngineError) as e:
            engine.open("chatty", session_options())
        assert e.value.code == "session_exists"
    finally:
        engine.close("chatty")


def reference_conversation(ref, opts, questions):
    """The reference's events for each turn of a conversation of `questions` (each a speech seed)."""
    ref.open("conv", opts)
    try:
        return [list(ref.turn("conv", speech(q))) for q in questions]
    finally:
        ref.close("conv")


@pytest.mark.parametrize("when", ["at_once", "mid_reply", "after_the_thinker_finished"])
def test_a_cancelled_turn_leaves_the_conversation_as_it_was(engine, ref, when):
    """The rule: a turn that is cancelled (or fails) never enters the conversation, whether the thinker had
    already finished its answer or not: the next turn answers as if it had not been asked. (The tiny thinker's
    greedy reply barely depends on its history, so the discriminating proof that a left-out turn is not read is
    tests/stages/test_llm.py; here: the engine names the right history at every timing, and the reply equals a
    conversation without the turn.)"""
    opts = session_options(seed=4, greedy=True)
    want = reference_conversation(ref, opts, [3, 5])[-1]
    sid = f"history-{when}"
    engine.open(sid, opts)
    try:
        assert isinstance(list(engine.turn(sid, speech(3), timeout=60))[-1], TurnDone)
        if when == "after_the_thinker_finished":
            engine.stall_tail.set()  # the reply cannot finish: its audio is not read
        engine.submit(sid, speech(4))
        if when == "mid_reply":
            next(e for e in engine.events(sid, timeout=60) if isinstance(e, TextDelta))
        elif when == "after_the_thinker_finished":
            deadline = time.monotonic() + 60
            while engine._sessions[sid].turn.finish_reason is None:  # the thinker's last token has arrived
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert engine._sessions[sid].turn is not None  # ... and the turn is not done
        engine.cancel(sid)
        assert engine._sessions[sid].history == [0]  # what the next turn's thinker will read (test_runners.py)
        engine.stall_tail.clear()
        got = list(engine.turn(sid, speech(5), timeout=60))
    finally:
        engine.stall_tail.clear()
        engine.close(sid)
    text, ids, units, pcm, _ = reply(got)
    w_text, w_ids, w_units, w_pcm, _ = reply(want)
    assert (ids, text, units) == (w_ids, w_text, w_units)
    assert np.array_equal(pcm, w_pcm)


def test_each_session_voices_by_its_own_schedule(engine, ref):
    """The engine's schedule is `live`; sessions that ask for `official-live` or `hop` get exactly what the
    reference gives with that schedule, while sharing the vocoder's steps with each other."""
    cases = [(f"sch-{s}", 20 + i, session_options(seed=20 + i), s) for i, s in enumerate(("official-live", "hop"))]
    cases = [(sid, seed, replace(o, vocoder_schedule=s)) for sid, seed, o, s in cases]
    expected = {sid: run_turn(ref, speech(seed), 16000, o) for sid, seed, o in cases}
    for sid, _, o in cases:
        engine.open(sid, o)
    try:
        for sid, seed, _ in cases:
            engine.submit(sid, speech(seed))
        got = {sid: list(engine.events(sid, timeout=120)) for sid, _, _ in cases}
    finally:
        for sid, _, _ in cases:
            engine.close(sid)
    for sid, _, _ in cases:
        assert_same(got[sid], expected[sid], BATCHED_PCM_ATOL)
    # Cut at max_new_tokens: the official server never finalizes such a reply (its tail is not voiced), and
    # official-live does the same in the engine's workers as in the reference.
    assert expected["sch-official-live"].finish_reason == "length"
    hop = [e for e in got["sch-hop"] if isinstance(e, AudioDelta) and e.pcm.size]
    # hop 50: no audio before 53 units, then 50 units (48000 samples, less the withheld overlap) per call
    assert hop[0].pcm.size >= (2 * 50 - 6 - 8) * 480 or hop[0].final


def test_start_up_names_cuda_graphs_only_for_stages_on_a_gpu_without_them():
    assert graphs_hint(["cpu", "cpu"], cuda_graphs=False) is None
    assert graphs_hint(["cpu", "cuda:1"], cuda_graphs=True) is None
    hint = graphs_hint(["cpu", "cuda:1"], cuda_graphs=False)
    assert "--cuda-graphs" in hint and "kernel launches" in hint
