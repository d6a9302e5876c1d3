"""Admission against a vocoder memory budget: a session is opened only while the flow state of the longest replies
the limits allow still fits; refused opens are `engine_full`, nothing else changes."""
import pytest

from omni2.engine.checkpoints.model_dir import ModelDir
from omni2.engine.checkpoints.vocoder_dir import VocoderDir
from omni2.engine.cli.generate import session_options
from omni2.engine.config import EngineConfig, Limits, VocoderOptions
from omni2.engine.runtime import Engine, EngineError
from omni2.engine.runtime.engine import session_flow_bytes
from omni2.stages.flow import kv_bytes_per_second, state_bytes_bound


def test_the_bound_follows_the_memory_mode(tiny_vocoder):
    flow = VocoderDir(tiny_vocoder).config.flow
    per_s = kv_bytes_per_second(flow)
    assert state_bytes_bound(flow, 500, None, False) == int(1.5 * per_s * 20)  # 500 units = 20 s, exact
    assert state_bytes_bound(flow, 5000, None, False) == int(1.5 * per_s * 200)  # grows with the reply
    window = state_bytes_bound(flow, 500, 2, False, call_units=10)
    # 2 chunks of 2 s, the open chunk, and a call's 10 units + 3 lookahead units (25 units/s); no growth slack
    assert window == state_bytes_bound(flow, 5000, 2, False, call_units=10) == int(per_s * (3 * 2.0 + 13 / 25))
    assert state_bytes_bound(flow, 25, 2, False, call_units=10) == int(1.5 * per_s * 1.0)  # a short reply: its own
    assert state_bytes_bound(flow, 5000, 2, False, call_units=1024) > window  # one call of a long final flush
    assert state_bytes_bound(flow, 5000, None, True) == 0  # recompute keeps nothing between calls
    assert state_bytes_bound(flow, 500, None, False, bytes_per_value=2) * 2 == state_bytes_bound(flow, 500, None, False)


def test_sessions_past_the_budget_are_refused(tiny_ckpt, tiny_vocoder):
    cfg = EngineConfig(str(tiny_ckpt), str(tiny_vocoder), limits=Limits(max_sessions=4, max_new_tokens=6), threads=1)
    per_session = session_flow_bytes(cfg, ModelDir(tiny_ckpt).config, VocoderDir(tiny_vocoder).config)
    # (6 tokens / R=3) writes of 10 units + the 1024-unit final flush, exact: 1044 units = 41.8 s of audio.
    assert per_session == state_bytes_bound(VocoderDir(tiny_vocoder).config.flow, 1044, None, False)
    budget = int(2.5 * per_session)
    with Engine(EngineConfig(cfg.model_dir, cfg.vocoder_dir, limits=cfg.limits, threads=1,
                             vocoder_memory_bytes=budget)) as eng:
        eng.open("a", session_options())
        eng.open("b", session_options())
        with pytest.raises(EngineError) as e:
            eng.open("c", session_options())
        assert e.value.code == "engine_full" and "budget" in e.value.message
        assert eng.status()["sessions"] == 2
        eng.close("a")
        eng.open("c", session_options())  # room again
        assert eng.status()["sessions"] == 2
    bounded = EngineConfig(cfg.model_dir, cfg.vocoder_dir, limits=cfg.limits, vocoder_options=VocoderOptions(
        left_chunks=1))
    model, vocoder = ModelDir(tiny_ckpt).config, VocoderDir(tiny_vocoder).config
    live = session_flow_bytes(bounded, model, vocoder)
    assert live < per_session / 5  # a window admits many more sessions on the same budget
    # ...but a session that voices the final flush in one call (official-live) needs room for that call.
    assert live < session_flow_bytes(bounded, model, vocoder, "official-live") <= per_session
