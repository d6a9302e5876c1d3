"""One user turn as the engine sees it come back: rows of LlmToEngine, TtsToEngine and VocoderToEngine in,
user events out, and a TurnDone once all three stages have said their last word and every stateful stage has
reported the session state a successor would need (SessionState): a worker killed between its last output and
that report still holds the turn, so the turn fails with it rather than enter a conversation no replacement could
be given.

Latency terms (DESIGN.md), seconds after the turn was committed, as engine/reference.py marks them:
t_asr when the speech embeddings left the ASR worker; t_llm when the R-th text token (or the last, if the reply
is shorter) reached the engine; t_tts when the TTS worker sent the units that completed the first audio chunk;
first_audio when that chunk reached the engine; total when the turn is done.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from omni2.engine.wire.protocol import AudioDelta, Event, TextDelta, TurnDone, UnitChunk

STATEFUL = ("llm", "tts", "vocoder")  # the stages that send a SessionState as a turn ends in them


@dataclass
class Turn:
    number: int
    t0: float  # perf_counter at commit
    read: int  # R of Read-R-Write-W
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    tts_done: bool = False
    voc_done: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    states: set[str] = field(default_factory=set)  # stages whose SessionState for this turn has arrived

    # Where the turn is: a stage still "holds" it until its last output for it, and its SessionState, have arrived.
    def held_by(self, stage: str) -> bool:
        if stage == "asr":
            return self.finish_reason is None and not self.token_ids
        output = {"llm": self.finish_reason is not None, "tts": self.tts_done, "vocoder": self.voc_done}[stage]
        return not (output and stage in self.states)

    def done(self) -> bool:
        return not any(self.held_by(stage) for stage in STATEFUL)

    def on_state(self, stage: str) -> None:
        self.states.add(stage)

    def _mark(self, key: str, at: float) -> None:
        self.timings.setdefault(key, at - self.t0)

    def on_text(self, sid: str, token_id: int, text: str, reason: str | None, asr_t: float) -> list[Event]:
        now = time.perf_counter()
        if asr_t:
            self._mark("t_asr", asr_t)
        self.token_ids.append(token_id)
        self.text.append(text)
        if len(self.token_ids) == self.read or reason is not None:
            self._mark("t_llm", now)
        if reason is not None:
            self.finish_reason = reason
        return [TextDelta(sid, text, token_id, now)] if text else []

    def on_units(self, sid: str, units: list[int], final: bool) -> list[Event]:
        self.units.extend(units)
        self.tts_done = self.tts_done or final
        return [UnitChunk(sid, list(units), final, time.perf_counter())]

    def on_audio(self, sid: str, pcm: np.ndarray, final: bool, sample_rate: int, in_t: float) -> list[Event]:
        now = time.perf_counter()
        if pcm.size:
            if in_t:
                self._mark("t_tts", in_t)
            self._mark("first_audio", now)
        self.voc_done = self.voc_done or final
        return [AudioDelta(sid, pcm, sample_rate, final, now)]

    def finish(self, sid: str) -> TurnDone:
        now = time.perf_counter()
        self._mark("total", now)
        return TurnDone(sid, "".join(self.text), list(self.token_ids), list(self.units), self.finish_reason or "",
                        dict(self.timings), now)
