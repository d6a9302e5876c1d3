"""Every message that crosses a process boundary, defined once, and its wire format.

Wire format (docs/PROTOCOL.md): frame 0 is the message's one-byte kind (the `KINDS` table at the bottom),
frame 1 the msgpack array of its fields in declaration order (a positional tuple, no field names), frames 2..
the raw bytes of its tensors. A tensor field holds `[dtype, shape, buffer index]` (engine/serial.py); a ring
(engine/ring.py) puts those bytes in a shared-memory slot instead of frames and passes them to `decode` as
`buffers`. Batch messages carry parallel lists, one message per stage step. No pickle anywhere.

User-facing events keep the names of the OpenAI Realtime API where the meaning is the same (text.delta,
audio.delta, response.done, error). Times are `time.perf_counter()` seconds, which on Linux is CLOCK_MONOTONIC
and so comparable across the engine's processes on one host.
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field

import numpy as np
import torch

from omni2.engine import serial
from omni2.engine.serial import ProtocolError

__all__ = ["ProtocolError", "encode", "decode", "KINDS", "Event"]

# ---------------------------------------------------------------------------------------------------- control


@dataclass(slots=True)
class WorkerReady:
    """worker -> supervisor: the stage is loaded and its sockets are up."""

    stage: str
    pid: int
    device: str
    t: float


@dataclass(slots=True)
class Heartbeat:
    """worker -> supervisor, every interval: alive, and how loaded."""

    stage: str
    pid: int
    seq: int
    sessions: int
    busy: bool
    t: float


@dataclass(slots=True)
class Shutdown:
    """supervisor -> worker: finish the current step, release everything, exit 0."""

    reason: str


@dataclass(slots=True)
class StageError:
    """worker -> supervisor/server: a failure; `session_ids` empty = the whole stage; fatal = the worker exits."""

    stage: str
    session_ids: list[str]
    code: str
    message: str
    fatal: bool
    t: float


@dataclass(slots=True)
class SlotCredit:
    """ring consumer -> producer: slot `slot` of segment generation `gen` is free again."""

    gen: int
    slot: int


@dataclass(slots=True)
class SlotRef:
    """Ring envelope (frame 2 of a ring message, no kind byte): where the message's tensor bytes are.

    segment "" = no shared memory: the bytes are frames 3.. (a credit-only ring, e.g. over tcp between hosts).
    slot -1 = no slot taken (an in-band control message). spans = one [offset, nbytes] per buffer."""

    segment: str
    gen: int
    slot: int
    spans: list[list[int]]


# ------------------------------------------------------------------------- session lifecycle (server -> stages)


@dataclass(slots=True)
class OpenSession:
    """Sampling as stages/sampling.SamplingParams (temperature 0 = greedy); tts_* for the TTS LM."""

    session_id: str
    voice: str
    seed: int
    temperature: float
    top_k: int
    top_p: float
    tts_temperature: float
    tts_top_k: int
    tts_top_p: float
    max_new_tokens: int | None


@dataclass(slots=True)
class CloseSession:
    session_id: str


@dataclass(slots=True)
class CancelSession:
    """Barge-in: drop turn `turn` of the session in every stage, and whatever of it is still in flight."""

    session_id: str
    turn: int


# -------------------------------------------------------------- data plane: one message per step, parallel lists


@dataclass(slots=True)
class ServerToAsr:
    """User audio, mono float32 at `sample_rate`; ends[i] = the user's turn is complete."""

    session_ids: list[str]
    turns: list[int]
    audio: list[np.ndarray]  # each (n_i,)
    ends: list[bool]
    sample_rate: int
    t: float


@dataclass(slots=True)
class AsrToLlm:
    """One user turn per session: its projected speech embeddings (stages/llm.LLMTurn)."""

    session_ids: list[str]
    turns: list[int]
    speech: list[torch.Tensor]  # each (n_i, H_thinker)
    max_new_tokens: list[int | None]
    t: float


@dataclass(slots=True)
class LlmToTts:
    """One thinker token per session (stages/llm.LLMToken): ids with the hidden states that predicted them."""

    session_ids: list[str]
    turns: list[int]
    token_ids: list[int]
    hidden: torch.Tensor  # (B, H_thinker), row b for session_ids[b]
    finished: list[bool]
    t: float


@dataclass(slots=True)
class LlmToServer:
    """The same step's text for the client (TextDelta) and, where a reply ended, why."""

    session_ids: list[str]
    turns: list[int]
    token_ids: list[int]
    texts: list[str]
    finish_reasons: list[str | None]
    t: float


@dataclass(slots=True)
class TtsToVocoder:
    """Units written this step per session (stages/vocoder.VocoderInput); finals[i] = the reply's last units."""

    session_ids: list[str]
    turns: list[int]
    units: list[list[int]]
    finals: list[bool]
    t: float


@dataclass(slots=True)
class TtsToServer:
    """The same units for the client's UnitChunk events."""

    session_ids: list[str]
    turns: list[int]
    units: list[list[int]]
    finals: list[bool]
    t: float


@dataclass(slots=True)
class VocoderToServer:
    """PCM chunks (stages/vocoder.VocoderOutput), mono float32 at `sample_rate`."""

    session_ids: list[str]
    turns: list[int]
    pcm: list[np.ndarray]  # each (n_i,), may be empty
    finals: list[bool]
    sample_rate: int
    t: float


# ------------------------------------------------------------------------------- user events (server -> client)


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

# One byte each, never reused: 0x0_ control, 0x1_ session lifecycle, 0x2_ data plane, 0x4_ user events.
KINDS: dict[type, int] = {
    WorkerReady: 0x01, Heartbeat: 0x02, Shutdown: 0x03, StageError: 0x04, SlotCredit: 0x05,
    OpenSession: 0x10, CloseSession: 0x11, CancelSession: 0x12,
    ServerToAsr: 0x20, AsrToLlm: 0x21, LlmToTts: 0x22, LlmToServer: 0x23, TtsToVocoder: 0x24, TtsToServer: 0x25,
    VocoderToServer: 0x26,
    TextDelta: 0x40, UnitChunk: 0x41, AudioDelta: 0x42, TurnDone: 0x43, ErrorEvent: 0x44,
}

# ------------------------------------------------------------------------------------------------- encoding


def encode(msg: object) -> list[bytes | memoryview]:
    """`msg` as frames: [kind byte, msgpack body, *tensor bytes]. The tensor frames alias the message's tensors."""
    kind = KINDS.get(type(msg))
    if kind is None:
        raise ProtocolError(f"{type(msg).__name__} is not a wire message (not in protocol.KINDS)")
    buffers: list[memoryview] = []
    return [bytes((kind,)), pack_body(msg, buffers), *buffers]


def decode(frames: typing.Sequence, buffers: typing.Sequence | None = None) -> object:
    """Frames (bytes, memoryviews or zmq.Frame) -> the message. Tensor bytes are frames[2:] unless `buffers`
    (views into a ring slot) is given. Tensors are views of those bytes, not copies. Anything that is not a
    well-formed message raises ProtocolError."""
    if len(frames) < 2:
        raise ProtocolError(f"a message needs at least 2 frames (kind, body), got {len(frames)}")
    k = serial.as_view(frames[0])
    if k.nbytes != 1:
        raise ProtocolError(f"frame 0 must be the 1-byte kind, got {k.nbytes} bytes")
    cls = _BY_KIND.get(k[0])
    if cls is None:
        raise ProtocolError(f"unknown message kind 0x{k[0]:02x}")
    bufs = [serial.as_view(b) for b in (frames[2:] if buffers is None else buffers)]
    return unpack_body(cls, frames[1], bufs)


def pack_body(msg: object, buffers: list[memoryview]) -> bytes:
    """The msgpack body of `msg`, appending its tensors' bytes to `buffers` (ring.py uses this for SlotRef)."""
    return serial.pack_fields(msg, _SPECS[type(msg)], buffers)


def unpack_body(cls: type, body: object, buffers: list[memoryview]) -> object:
    """Validate and build a `cls` from its body; every buffer must be used by exactly one tensor."""
    return serial.unpack_fields(cls, _SPECS[cls], body, buffers)


_SPECS = {cls: serial.field_specs(cls) for cls in [*KINDS, SlotRef]}
_BY_KIND = {k: c for c, k in KINDS.items()}
assert len(_BY_KIND) == len(KINDS), "two messages share a kind byte"
