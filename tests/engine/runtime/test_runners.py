"""Stage runners without processes or models: what they hand the stage objects, given the wire messages."""
import numpy as np
import torch

from omni2.engine.config import Limits, SessionOptions, VocoderOptions
from omni2.engine.runtime.runners import AsrRunner, LlmRunner, TtsRunner, VocoderRunner, to_wire
from omni2.engine.wire.protocol import AsrToLlm, EngineToAsr, LlmToTts, TtsToVocoder
from omni2.stages.tts import TTSError


class Recorder:
    """A stage object that records its calls."""

    def __init__(self, **attrs):
        self.calls = []
        self.__dict__.update(attrs)

    def __getattr__(self, name):
        return lambda *a, **k: self.calls.append((name, a, k))


def test_the_history_the_engine_names_reaches_the_thinker():
    asr = AsrRunner(Recorder(step=lambda batch: [(sid, torch.zeros(3, 4)) for sid, _ in batch]), Limits())
    asr.open(to_wire("s", SessionOptions()))
    asr.feed(EngineToAsr(["s"], [2], [np.zeros(1600, np.float32)], [True], 16000, 0.0, [[0, 1]], [[1, 6]]))
    (_, out), = asr.step()
    assert out.turns == [2] and out.histories == [[0, 1]] and out.cuts == [[1, 6]]
    llm = LlmRunner(Recorder(sessions={}))
    llm.open(to_wire("s", SessionOptions()))
    llm.feed(AsrToLlm(["s"], [2], out.speech, [None], 0.0, out.histories, out.cuts))
    (name, (turn,), _), = [c for c in llm.llm.calls if c[0] == "admit"]
    assert (turn.uid, turn.history, turn.cuts) == (2, [0, 1], {1: 6})  # turn 1's answer: its first 6 tokens
    llm.feed(AsrToLlm(["s"], [3], out.speech, [None], 0.0))  # no histories: every finished turn, nothing cut
    assert [(c[1][0].history, c[1][0].cuts) for c in llm.llm.calls if c[0] == "admit"] == [([0, 1], {1: 6}),
                                                                                            (None, None)]


def test_the_vocoder_runner_calls_by_its_schedule():
    """live: one call per row; official-live: rows joined up to the one that ends the write; hop: merged."""
    rows = TtsToVocoder(["s"] * 3, [0] * 3, [[1] * 10, [2] * 10, [3] * 4], [False, False, True], 0.0,
                        [False, False, True])  # one 24-unit write, cut in W = 10 pieces
    got = {}
    for schedule in ("live", "official-live", "hop"):
        calls = []
        stage = Recorder(opts=VocoderOptions(schedule=schedule), hop=50, sample_rate=24000,
                         schedule=lambda sid, schedule=schedule: schedule,
                         step=lambda inputs, calls=calls: calls.append([(x.units, x.final) for x in inputs]) or [])
        r = VocoderRunner(stage)
        r.open(to_wire("s", SessionOptions()))
        r.feed(rows)
        while r.ready():
            r.step()
        got[schedule] = calls
    assert got["live"] == [[([1] * 10, False)], [([2] * 10, False)], [([3] * 4, True)]]
    partial = TtsToVocoder(["s"], [0], [[1] * 10], [False], 0.0, [False])
    for schedule, ready in (("live", True), ("official-live", False)):  # official-live waits for the whole write
        r = VocoderRunner(Recorder(opts=VocoderOptions(schedule=schedule), hop=50,
                                   schedule=lambda sid, schedule=schedule: schedule))
        r.open(to_wire("s", SessionOptions()))
        r.feed(partial)
        assert r.ready() is ready
    assert got["official-live"] == got["hop"] == [[([1] * 10 + [2] * 10 + [3] * 4, True)]]


def test_a_session_past_the_tts_context_fails_alone():
    """The TTS step refuses one session (its speech would pass the context): that turn fails, and the step runs
    again for its batch-mates, without feeding the inputs twice."""
    steps = []

    def step(inputs):
        steps.append([x.session_id for x in inputs])
        if len(steps) == 1:
            raise TTSError("the reply's speech would pass the TTS context of 40 positions", ["long"])
        return []

    r = TtsRunner(Recorder(step=step, ready=lambda: False, sessions={}), im_end_id=7)
    for sid in ("long", "short"):
        r.open(to_wire(sid, SessionOptions()))
    r.feed(LlmToTts(["long", "short"], [0, 0], [5, 6], torch.zeros(2, 4), [False, False], 0.0))
    assert r.step() == []
    assert steps == [["long", "short"], []]
    assert [(f.session_id, f.code) for f in r.failures] == [("long", "tts_context")]
    assert ("cancel", ("long",), {}) in r.tts.calls and ("cancel", ("short",), {}) not in r.tts.calls
