"""serve/vad.py's server_vad rules on a scripted speech probability per 32 ms frame (a stand-in for Silero):
exact event positions for non-default threshold, padding and silence, a detector that starts mid-stream, and the
settings' JSON both ways."""
from __future__ import annotations

import numpy as np
import pytest

from omni2.engine.serve.vad import FRAME, TurnDetector, VADEvent, VADSettings


class Script:
    """Returns the next scripted probability for each frame it is given."""

    def __init__(self, probs: list[float]):
        self.probs = list(probs)

    def __call__(self, frame: np.ndarray) -> float:
        assert frame.shape == (FRAME,)
        return self.probs.pop(0)


def run(probs: list[float], settings: VADSettings, origin_ms: int = 0, piece: int = 700) -> list[VADEvent]:
    """The detector fed len(probs) frames of audio in pieces of `piece` samples (not whole frames)."""
    d = TurnDetector(settings, Script(probs), origin_ms)
    audio = np.zeros(len(probs) * FRAME, np.float32)
    events = []
    for i in range(0, audio.size, piece):
        events += d.feed(audio[i:i + piece])
    return events


def test_events_at_exact_positions_with_non_default_settings():
    # Frames are 32 ms. Speech (>= 0.7) in frames 20..29, a dip below it in 30..32 (96 ms, under the silence
    # setting), speech again in 33..39, then silence; 0.6 is speech only at the default threshold.
    probs = [0.1] * 20 + [0.9] * 10 + [0.6] * 3 + [0.8] * 7 + [0.1] * 20
    s = VADSettings(threshold=0.7, prefix_padding_ms=100, silence_duration_ms=200)
    assert run(probs, s) == [VADEvent("speech_started", 20 * 32 - 100),  # 540: padded back 100 ms
                             VADEvent("speech_stopped", 40 * 32)]  # 1280: the end of the last speech frame
    # 200 ms of silence = 7 frames (224 ms >= 200): stopped only once the 7th silent frame is scored.
    assert run(probs[:46], s) == [VADEvent("speech_started", 540)]
    assert len(run(probs[:47], s)) == 2
    # A longer pause than the dip ends the turn inside it: silence 64 ms cuts at the dip.
    cut = VADSettings(threshold=0.7, prefix_padding_ms=0, silence_duration_ms=64)
    assert run(probs, cut) == [VADEvent("speech_started", 640), VADEvent("speech_stopped", 960),
                               VADEvent("speech_started", 33 * 32), VADEvent("speech_stopped", 1280)]
    # At the default threshold the dip (0.6) is speech: one turn.
    assert run(probs, VADSettings(prefix_padding_ms=0)) == [VADEvent("speech_started", 640),
                                                              VADEvent("speech_stopped", 1280)]


def test_a_detector_started_mid_stream_counts_from_its_origin_and_pads_no_further_back():
    probs = [0.9] * 5 + [0.0] * 20
    s = VADSettings(prefix_padding_ms=300, silence_duration_ms=500)
    assert run(probs, s, origin_ms=4000) == [VADEvent("speech_started", 4000), VADEvent("speech_stopped", 4160)]
    assert run([0.0] * 12 + probs, s, origin_ms=4000) == [VADEvent("speech_started", 4000 + 384 - 300),
                                                          VADEvent("speech_stopped", 4000 + 17 * 32)]


def test_settings_json_both_ways_and_refusals():
    d = {"type": "server_vad", "threshold": 0.3, "prefix_padding_ms": 120, "silence_duration_ms": 800,
         "create_response": False, "interrupt_response": False}
    s = VADSettings.from_json(d)
    assert (s.threshold, s.prefix_padding_ms, s.silence_duration_ms) == (0.3, 120, 800)
    assert not s.create_response and not s.interrupt_response and s.to_json() == d
    assert VADSettings.from_json({"type": "server_vad"}) == VADSettings()
    for bad, match in (({"threshold": 1.5}, "threshold"), ({"silence_duration_ms": 2.5}, "silence_duration_ms"),
                       ({"prefix_padding_ms": -1}, "prefix_padding_ms"), ({"create_response": "yes"}, "create_resp")):
        with pytest.raises(ValueError, match=match):
            VADSettings.from_json(bad)
