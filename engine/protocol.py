"""Messages that leave a stage: the events of a turn, as the engine's users see them.

Every message that crosses a process boundary is defined here, once. Names follow the OpenAI Realtime API
where the meaning is the same (text.delta, audio.delta, response.done, error). Times are seconds on the
monotonic clock (`time.perf_counter`) of the process that made the event.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(slots=True)
class TextDelta:
    """response.text.delta: newly completed reply text (and the thinker token that completed it)."""

    session_id: str
    text: str
    token_id: int
    t: float


@dataclass(slots=True)
class UnitChunk:
    """Speech units written by the TTS LM for one Read-R-Write-W chunk (EOS and non-unit ids dropped)."""

    session_id: str
    units: list[int]
    final: bool
    t: float


@dataclass(slots=True)
class AudioDelta:
    """response.audio.delta: mono float32 PCM at the vocoder's sample rate (24 kHz)."""

    session_id: str
    pcm: np.ndarray
    sample_rate: int
    final: bool
    t: float


@dataclass(slots=True)
class TurnDone:
    """response.done: the whole turn, with the latency terms of DESIGN.md measured from end of speech.

    timings keys: t_asr, t_llm (first R text tokens), t_tts (first unit chunk the vocoder can use),
    first_audio, total — each in seconds after the turn was submitted.
    """

    session_id: str
    text: str
    token_ids: list[int]
    units: list[int]
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)
    t: float = 0.0


@dataclass(slots=True)
class ErrorEvent:
    """error: something went wrong for one session; `code` is machine-readable, `message` is for people."""

    session_id: str
    code: str
    message: str
    t: float = 0.0


Event = TextDelta | UnitChunk | AudioDelta | TurnDone | ErrorEvent
