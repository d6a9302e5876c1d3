"""The engine with `cuda_graphs` (the thinker's and the TTS LM's one-token steps on fixed shapes, stages/
decode_graph.py; on a CPU they run eagerly) gives the replies of the reference pipeline without them: four sessions
at once, each batched beside the others in every step, two turns for one of them. The vocoder voices one session
per call here, so the PCM compares bit for bit."""
from dataclasses import replace

import numpy as np

from omni2.engine.cli.generate import run_turn, session_options
from omni2.engine.config import EngineConfig, Limits, VocoderOptions
from omni2.engine.reference import ReferencePipeline
from omni2.engine.runtime import Engine
from omni2.engine.wire.protocol import AudioDelta, TurnDone

LIMITS = Limits(max_sessions=4, max_new_tokens=8)


def speech(seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(16000 * (1 + seed % 2)) * 0.1).astype(np.float32)


def test_fixed_shape_decode_steps_serve_the_reference_replies(tiny_ckpt, tiny_vocoder):
    vocoder = replace(VocoderOptions(), max_batch=1)
    ref = ReferencePipeline(tiny_ckpt, tiny_vocoder, limits=LIMITS, vocoder_options=vocoder)
    cases = [(f"g{i}", session_options(seed=i, greedy=i == 0)) for i in range(4)]
    expected = {sid: [run_turn(ref, speech(i), 16000, opts)] for i, (sid, opts) in enumerate(cases)}
    ref.open("again", cases[1][1])
    try:  # g1's two turns, as one conversation
        want = [list(ref.turn("again", speech(s))) for s in (1, 7)]
    finally:
        ref.close("again")
    engine = Engine(EngineConfig(str(tiny_ckpt), str(tiny_vocoder), limits=LIMITS, hang_s=5.0, threads=1,
                                 vocoder_options=vocoder, cuda_graphs=True)).start()
    try:
        for sid, opts in cases:
            engine.open(sid, opts)
        for i, (sid, _) in enumerate(cases):
            engine.submit(sid, speech(i))
        got = {sid: list(engine.events(sid, timeout=120)) for sid, _ in cases}
        second = list(engine.turn("g1", speech(7), timeout=120))
        stages = engine.status()["stages"]
    finally:
        engine.stop()
    for sid, _ in cases:
        done, pcm = got[sid][-1], np.concatenate([e.pcm for e in got[sid] if isinstance(e, AudioDelta)])
        assert isinstance(done, TurnDone), done
        assert done.token_ids == expected[sid][0].token_ids and done.units == expected[sid][0].units, sid
        assert np.array_equal(pcm, expected[sid][0].pcm), sid
    assert second[-1].token_ids == want[1][-1].token_ids and second[-1].units == want[1][-1].units
    assert sum(len(got[sid][-1].units) for sid, _ in cases) > 20
    assert min(stages[s]["max_batch"] for s in ("llm", "tts")) >= 2, stages  # the steps held several sessions
