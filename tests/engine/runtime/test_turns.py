"""Turn bookkeeping: which stage holds a turn, and when it is done. A stage holds a turn until both its last
output and its SessionState have arrived, so a worker killed between the two fails the turn (it never enters a
conversation that the worker's replacement could not be given)."""
import numpy as np

from omni2.engine.runtime.turns import STATEFUL, Turn
from omni2.engine.wire.protocol import TurnDone


def all_outputs(t: Turn) -> None:
    t.on_text("u", 7, "hi", None, asr_t=t.t0 + 0.1)
    t.on_text("u", 8, "!", "stop", asr_t=0.0)
    t.on_units("u", [1, 2, 3], final=True)
    t.on_audio("u", np.ones(480, np.float32), final=True, sample_rate=24000, in_t=t.t0 + 0.2)


def test_the_asr_holds_a_turn_until_its_first_token():
    t = Turn(0, 0.0, read=3)
    assert t.held_by("asr") and all(t.held_by(s) for s in STATEFUL)
    t.on_text("u", 7, "hi", None, asr_t=0.1)
    assert not t.held_by("asr") and t.held_by("llm")


def test_every_output_without_the_states_is_not_done():
    t = Turn(0, 0.0, read=3)
    all_outputs(t)
    assert not t.done()
    assert [s for s in STATEFUL if t.held_by(s)] == ["llm", "tts", "vocoder"]  # killed now: the turn fails


def test_a_turn_is_done_once_every_output_and_every_state_arrived_in_any_order():
    t = Turn(0, 0.0, read=3)
    t.on_state("vocoder")  # a state may come before the stage's last output reaches the engine
    t.on_state("llm")
    all_outputs(t)
    assert not t.done() and t.held_by("tts") and not t.held_by("llm") and not t.held_by("vocoder")
    t.on_state("tts")
    assert t.done()
    done = t.finish("u")
    assert isinstance(done, TurnDone) and done.token_ids == [7, 8] and done.units == [1, 2, 3]
    assert done.finish_reason == "stop" and done.text == "hi!"


def test_a_state_alone_does_not_finish_a_stage():
    t = Turn(0, 0.0, read=3)
    for s in STATEFUL:
        t.on_state(s)
    assert not t.done() and all(t.held_by(s) for s in STATEFUL)
    t.on_text("u", 7, "x", "length", asr_t=0.0)
    t.on_units("u", [4], final=False)
    assert not t.held_by("llm") and t.held_by("tts") and t.held_by("vocoder")
