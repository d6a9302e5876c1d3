"""Session options through the multi-process engine, each against the single-process reference (bit for bit):

* a non-default voice, added with `omni2-engine voice add`, reaches the vocoder workers: the reply equals the
  reference's with that voice, and its PCM differs from the default voice's (text, ids and units do not: the voice
  conditions only the vocoder);
* a sampled thinker (temperature 0.8, top-k 20, top-p 0.9; the TTS greedy, so that only the thinker draws) gives
  the reference's text, ids, units and PCM for the same seed, and other seeds give other token ids (also other
  than greedy);
* `Engine.commit` while the session's reply is in flight raises EngineError("busy"), the reply completes unchanged,
  and the audio appended meanwhile is the next turn.

One engine serves the module. Its cosy2_decoder is a copy of the tiny one (the fixture is read-only, and the engine
looks up voices only in its vocoder dir's voices/): the big files are symlinks, voices/ is real.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from omni2.engine.cli import main as cli
from omni2.engine.cli.generate import run_turn, session_options
from omni2.engine.config import EngineConfig, Limits, SamplingParams, SessionOptions
from omni2.engine.reference import ReferencePipeline
from omni2.engine.runtime import Engine, EngineError
from omni2.engine.wire.protocol import AudioDelta, ErrorEvent, TextDelta, TurnDone, UnitChunk

LIMITS = Limits(max_sessions=2, max_new_tokens=6)
THINKER = SamplingParams(temperature=0.8, top_k=20, top_p=0.9)
GREEDY = SamplingParams()
# On the tiny checkpoint these seeds give short replies (9-18 units; seeds 0 and 4 run the greedy TTS LM to its
# 1024-unit cap, seconds of vocoder work), and seed 2 samples the end of text after one token ("stop").
SEEDS = (1, 2, 5)


def sampled(seed: int) -> SessionOptions:
    return SessionOptions(seed=seed, sampling=THINKER, tts_sampling=GREEDY)


def speech(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(16000) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def vocoder_dir(tiny_vocoder, tmp_path_factory) -> Path:
    """The tiny cosy2_decoder (files symlinked, voices/ copied) plus voice "other", added through the CLI."""
    d = tmp_path_factory.mktemp("voices") / "cosy2_decoder"
    d.mkdir()
    for f in tiny_vocoder.iterdir():
        if f.is_dir():
            (d / f.name).mkdir()
            for g in f.iterdir():
                (d / f.name / g.name).write_bytes(g.read_bytes())
        else:
            (d / f.name).symlink_to(f)
    x = np.random.default_rng(7).standard_normal(192).astype(np.float32)
    np.save(d.parent / "other.npy", x / np.linalg.norm(x))  # unit norm, like the default voice
    assert cli.main(["voice", "add", "other", "--embedding", str(d.parent / "other.npy"), "--vocoder-dir", str(d)]) == 0
    return d


@pytest.fixture(scope="module")
def engine(tiny_ckpt, vocoder_dir):
    eng = Engine(EngineConfig(str(tiny_ckpt), str(vocoder_dir), limits=LIMITS, hang_s=5.0, threads=1)).start()
    yield eng
    eng.stop()


@pytest.fixture(scope="module")
def ref(tiny_ckpt, vocoder_dir):
    return ReferencePipeline(tiny_ckpt, vocoder_dir, limits=LIMITS)


@pytest.fixture(scope="module")
def expected(ref):
    """Reference replies, computed once per (options, question seed)."""
    cache = {}

    def get(options: SessionOptions, q: int = 0):
        if (options, q) not in cache:
            cache[options, q] = run_turn(ref, speech(q), 16000, options)
        return cache[options, q]

    return get


def reply(events):
    """(text, token_ids, units, pcm, finish_reason) of one turn's events, checking their order on the way."""
    assert events and isinstance(events[-1], TurnDone), events[-1:]
    assert not any(isinstance(e, (TurnDone, ErrorEvent)) for e in events[:-1])
    done = events[-1]
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    units = [u for e in events if isinstance(e, UnitChunk) for u in e.units]
    assert text == done.text and units == done.units
    pcm = np.concatenate([e.pcm for e in events if isinstance(e, AudioDelta)] or [np.zeros(0, np.float32)])
    return text, done.token_ids, units, pcm, done.finish_reason


def engine_turn(engine, sid: str, options: SessionOptions, q: int = 0):
    engine.open(sid, options)
    try:
        return reply(list(engine.turn(sid, speech(q), timeout=120)))
    finally:
        engine.close(sid)


def assert_equal(got, want) -> None:
    text, ids, units, pcm, reason = got
    assert ids == want.token_ids
    assert text == want.text
    assert units == want.units
    assert np.array_equal(pcm, want.pcm)  # bit-exact: same ops on the same numbers, in another process
    assert reason == want.finish_reason


def test_a_non_default_voice_equals_the_reference_and_differs_from_the_default(engine, expected):
    assert engine.voices() == ["default", "other"]
    other, default = (session_options(seed=0, greedy=True, voice=v) for v in ("other", "default"))
    got = engine_turn(engine, "voice", other)
    assert_equal(got, expected(other))
    want_default = expected(default)
    # The voice conditions only the vocoder: the same words and units, spoken differently.
    assert (got[1], got[2]) == (want_default.token_ids, want_default.units)
    assert got[3].size == want_default.pcm.size > 0
    assert np.abs(got[3] - want_default.pcm).max() > 1e-3


@pytest.mark.parametrize("seed", SEEDS)
def test_a_sampled_thinker_equals_the_reference(engine, expected, seed):
    options = sampled(seed)
    assert_equal(engine_turn(engine, f"sampled{seed}", options), expected(options))


def test_seeds_change_the_sampled_tokens(expected):
    """The case above is not greedy in disguise: each seed draws other token ids, none of them the greedy ones."""
    greedy = expected(SessionOptions(seed=0, tts_sampling=GREEDY)).token_ids
    ids = {seed: expected(sampled(seed)).token_ids for seed in SEEDS}
    assert len(greedy) == LIMITS.max_new_tokens
    assert len({tuple(v) for v in ids.values()} | {tuple(greedy)}) == len(SEEDS) + 1, (greedy, ids)
    assert expected(sampled(2)).finish_reason == "stop" and len(ids[2]) == 1  # it sampled its end of text


def test_commit_while_a_reply_is_in_flight_is_busy(engine, ref, expected):
    options = session_options(seed=0, greedy=True)
    engine.open("busy", options)
    try:
        assert engine.submit("busy", speech(0)) == 0
        # At once (the ASR alone takes longer): the session still answers turn 0.
        with pytest.raises(EngineError) as e:
            engine.commit("busy")
        assert e.value.code == "busy" and "previous turn" in e.value.message
        engine.append("busy", speech(1), 16000)  # allowed meanwhile: it is the next turn's audio
        with pytest.raises(EngineError) as e:
            engine.commit("busy")
        assert e.value.code == "busy"
        assert_equal(reply(list(engine.events("busy", timeout=120))), expected(options))
        # The refused commits lost nothing: the audio appended during the reply is turn 1.
        assert engine.commit("busy") == 1
        second = reply(list(engine.events("busy", timeout=120)))
    finally:
        engine.close("busy")
    # ... and it is the conversation's second turn, as the reference answers the same two questions.
    ref.open("conv", options)
    try:
        want = [list(ref.turn("conv", speech(q))) for q in (0, 1)][1]
    finally:
        ref.close("conv")
    text, ids, units, pcm, reason = reply(want)
    assert second[:3] == (text, ids, units) and second[4] == reason
    assert np.array_equal(second[3], pcm)
