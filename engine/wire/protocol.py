"""Every message that crosses a process boundary, defined once, and its wire format.

Wire format (docs/PROTOCOL.md): frame 0 is the message's one-byte kind (the `KINDS` table at the bottom),
frame 1 the msgpack array of its fields in declaration order (a positional tuple, no field names), frames 2..
the raw bytes of its tensors. A tensor field holds `[dtype, shape, buffer index]` (codec.py); a ring (ring.py)
puts those bytes in a shared-memory slot instead of frames and passes them to `decode` as `buffers`. Batch
messages carry parallel lists, one message per stage step. No pickle anywhere.

Two families share the framing: the engine's own (its process <-> the stage workers, kinds 0x00-0x4f) and the
client wire of the daemon's front door (kinds 0x60-0x7f). Names say who sends: `EngineToAsr`, `LlmToEngine`...;
`Server*`/`Session*` for the daemon and its clients. Importing this module does not import torch (codec.py).

User-facing events keep the names of the OpenAI Realtime API where the meaning is the same (text.delta,
audio.delta, response.done, error). Times are `time.perf_counter()` seconds, which on Linux is CLOCK_MONOTONIC
and so comparable across the engine's processes on one host.
"""
from __future__ import annotations

import functools
import re
import typing
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from omni2.engine.wire import codec
from omni2.engine.wire.codec import ProtocolError

if typing.TYPE_CHECKING:
    import torch


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
    """worker -> supervisor, every interval, from a thread of its own: alive, and how loaded.

    step_s = how long the step now running has run (0 when idle): a hung step shows here while the heartbeat
    thread still beats. last_step_ms / last_batch describe the previous step; queued = messages waiting,
    steps = steps taken so far."""

    stage: str
    pid: int
    seq: int
    sessions: int
    busy: bool
    t: float
    step_s: float = 0.0
    last_step_ms: float = 0.0
    last_batch: int = 0
    queued: int = 0
    steps: int = 0
    rings: dict[str, int] = field(default_factory=dict)  # slots in use per output edge (bounded by n_slots)
    max_batch: int = 0  # the most sessions one step has served so far
    blocked: str = ""  # the output edge the worker is waiting on for a free slot (backpressure), "" = none
    active: int = 0  # sessions with work in this stage (queued input, a turn being computed)


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
    turns: list[int] = field(default_factory=list)  # the turn of each session it hit (parallel to session_ids)


@dataclass(slots=True)
class SessionAck:
    """worker -> supervisor: an OpenSession was applied (error "") or refused (error = why, for the user)."""

    stage: str
    session_id: str
    error: str
    t: float


@dataclass(slots=True)
class RingReset:
    """supervisor -> the producer of `edge`: its consumer was restarted, free every slot it held (ring.reclaim)."""

    edge: str


@dataclass(slots=True)
class SessionState:
    """worker -> engine, when a turn of a session ends in that stage: what a replacement worker needs to go on with
    the session exactly as this one would have (RestoreSession). counter: the sampler's step counter after the turn
    (llm, tts); rng: the state of the session's random generator (vocoder); speech and answer: the turn as the
    thinker's conversation holds it (llm). Fields a stage has no use for are empty."""

    stage: str
    session_id: str
    turn: int
    counter: int
    rng: torch.Tensor
    speech: torch.Tensor
    answer: list[int]


@dataclass(slots=True)
class Barrier:
    """engine -> worker, and the same message back: the worker answers once it has applied every control message
    the engine sent it before this one (a replacement's re-opened sessions, before the turns held for it go out)."""

    stage: str
    seq: int


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


# ------------------------------------------------------------------------- session lifecycle (engine -> stages)


@dataclass(slots=True)
class OpenSession:
    """Sampling as config.SamplingParams (temperature 0 = greedy); tts_* for the TTS LM."""

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
    vocoder_schedule: str  # "" = the stage's


@dataclass(slots=True)
class CloseSession:
    session_id: str


@dataclass(slots=True)
class CancelSession:
    """Barge-in: drop turn `turn` of the session in every stage, and whatever of it is still in flight."""

    session_id: str
    turn: int


@dataclass(slots=True)
class RestoreSession:
    """engine -> a restarted worker, right after the session's OpenSession: the session as the worker it replaces
    left it after the last turn of the conversation, from that worker's SessionStates. turns/counters: one per
    turn of the conversation, oldest first (llm; the other stages get the last turn only); speech/answers: the
    llm's, parallel to turns; rng: the vocoder's."""

    session_id: str
    turns: list[int]
    counters: list[int]
    rng: torch.Tensor
    speech: list[torch.Tensor]
    answers: list[list[int]]


# -------------------------------------------------------------- data plane: one message per step, parallel lists


@dataclass(slots=True)
class EngineToAsr:
    """User audio, mono float32 at `sample_rate`; ends[i] = the user's turn is complete. histories[i]: the turns
    the conversation holds before this one (the engine decides: a cancelled or failed turn is not among them);
    [] for the whole message = every finished turn."""

    session_ids: list[str]
    turns: list[int]
    audio: list[np.ndarray]  # each (n_i,)
    ends: list[bool]
    sample_rate: int
    t: float
    histories: list[list[int]] = field(default_factory=list)
    # cuts[i]: (turn, answer tokens kept) pairs, flattened: earlier answers the thinker reads only in part
    # (conversation.truncate); [] for the whole message = none.
    cuts: list[list[int]] = field(default_factory=list)


@dataclass(slots=True)
class AsrToLlm:
    """One user turn per session: its projected speech embeddings (stages/llm.LLMTurn)."""

    session_ids: list[str]
    turns: list[int]
    speech: list[torch.Tensor]  # each (n_i, H_thinker)
    max_new_tokens: list[int | None]
    t: float
    histories: list[list[int]] = field(default_factory=list)  # as EngineToAsr.histories
    cuts: list[list[int]] = field(default_factory=list)  # as EngineToAsr.cuts


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
class LlmToEngine:
    """The same step's text for the client (TextDelta) and, where a reply ended, why."""

    session_ids: list[str]
    turns: list[int]
    token_ids: list[int]
    texts: list[str]
    finish_reasons: list[str | None]
    t: float
    asr_t: list[float] = field(default_factory=list)  # per row: when its speech left the ASR (first token), else 0


@dataclass(slots=True)
class TtsToVocoder:
    """Units written this step per session (stages/vocoder.VocoderInput); finals[i] = the reply's last units;
    ends[i] = row i ends a TTS write (a write longer than W arrives as rows of W units; the vocoder schedules
    voice writes, or those rows); stopped[i], on a final row: the reply's text ended with `<|im_end|>` (the
    official live server finalizes only such a reply; VocoderInput.stopped). Empty lists: all True."""

    session_ids: list[str]
    turns: list[int]
    units: list[list[int]]
    finals: list[bool]
    t: float
    ends: list[bool] = field(default_factory=list)
    stopped: list[bool] = field(default_factory=list)


@dataclass(slots=True)
class TtsToEngine:
    """The same units for the client's UnitChunk events."""

    session_ids: list[str]
    turns: list[int]
    units: list[list[int]]
    finals: list[bool]
    t: float


@dataclass(slots=True)
class VocoderToEngine:
    """PCM chunks (stages/vocoder.VocoderOutput), mono float32 at `sample_rate`."""

    session_ids: list[str]
    turns: list[int]
    pcm: list[np.ndarray]  # each (n_i,), may be empty
    finals: list[bool]
    sample_rate: int
    t: float
    in_t: list[float] = field(default_factory=list)  # per row: when the units that completed it left the TTS


# ------------------------------------------------------------------------------ user events (engine -> its user)


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
ENGINE_KINDS: dict[type, int] = {
    WorkerReady: 0x01, Heartbeat: 0x02, Shutdown: 0x03, StageError: 0x04, SlotCredit: 0x05, SessionAck: 0x06,
    RingReset: 0x07, SessionState: 0x08, Barrier: 0x09,
    OpenSession: 0x10, CloseSession: 0x11, CancelSession: 0x12, RestoreSession: 0x13,
    EngineToAsr: 0x20, AsrToLlm: 0x21, LlmToTts: 0x22, LlmToEngine: 0x23, TtsToVocoder: 0x24, TtsToEngine: 0x25,
    VocoderToEngine: 0x26,
    TextDelta: 0x40, UnitChunk: 0x41, AudioDelta: 0x42, TurnDone: 0x43, ErrorEvent: 0x44,
}

# ======================================================================== client wire: daemon front door
# What `omni2-engine serve` (serve/front_door.py) and its clients (client/) exchange over the ROUTER / DEALER
# sockets: the same framing as above ([kind byte, msgpack array, *tensor frames]), kinds 0x60-0x7f
# (0x6_ client -> server, 0x7_ server -> client). Each class's TYPE is its name in docs/PROTOCOL.md and in the
# client API, after the OpenAI Realtime API where the meaning is the same. The codec checks shapes and types;
# serve/sessions.py checks values (lengths, ranges, enums) and answers anything wrong with a ServerError.
SESSION_ID = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # a client's session name: short, printable, log-safe

AUDIO_FORMATS = ("pcm16", "float32")  # response.audio.delta payload: PCM16 (default, OpenAI's) or exact float32
MODES = ("streaming", "offline")  # offline: the whole reply arrives at once, just before response.done


@dataclass(slots=True)
class SessionOpen:
    """session.open: start a conversation. session_id is the client's name for it (unique per connection).

    token: the daemon's access token ("" when it has none). Sampling as config.SamplingParams
    (temperature 0 = greedy); tts_* for the TTS LM; max_new_tokens None = the daemon's limit. stream_params
    "" = the model's Read-R-Write-W, otherwise it must equal it ("(3,10)")."""

    TYPE: ClassVar[str] = "session.open"
    session_id: str
    token: str
    voice: str
    seed: int
    temperature: float
    top_k: int
    top_p: float
    tts_temperature: float
    tts_top_k: int
    tts_top_p: float
    max_new_tokens: int | None
    mode: str  # one of MODES
    audio_format: str  # one of AUDIO_FORMATS
    stream_params: str
    vocoder_schedule: str  # "" = the daemon's; else one of config.VOCODER_SCHEDULES


@dataclass(slots=True)
class AudioAppend:
    """audio.append: a chunk of the user's turn, mono int16 PCM or float32 in [-1, 1], at any sample rate."""

    TYPE: ClassVar[str] = "audio.append"
    session_id: str
    audio: np.ndarray  # (n,) int16 or float32
    sample_rate: int


@dataclass(slots=True)
class AudioCommit:
    """audio.commit: the user's turn is complete; the reply starts (answered by audio.committed)."""

    TYPE: ClassVar[str] = "audio.commit"
    session_id: str


@dataclass(slots=True)
class ResponseCancel:
    """response.cancel: barge-in; the reply in flight ends with response.done(finish_reason="cancelled")."""

    TYPE: ClassVar[str] = "response.cancel"
    session_id: str


@dataclass(slots=True)
class ConversationTruncate:
    """conversation.truncate: from the next turn on, the thinker reads only the first `tokens` text tokens of
    finished turn `turn`'s answer (what the user heard before talking over it); answered by
    conversation.truncated. `tokens` at or past the answer's length keeps it whole."""

    TYPE: ClassVar[str] = "conversation.truncate"
    session_id: str
    turn: int
    tokens: int


@dataclass(slots=True)
class SessionClose:
    """session.close: cancel what is in flight and free the session (answered by session.closed)."""

    TYPE: ClassVar[str] = "session.close"
    session_id: str


@dataclass(slots=True)
class Ping:
    """ping: answered by pong with the same nonce; needs no session (a liveness check)."""

    TYPE: ClassVar[str] = "ping"
    nonce: int


@dataclass(slots=True)
class StatusRequest:
    """status: answered by status.reply (sessions, per-stage queues, step times, batch sizes)."""

    TYPE: ClassVar[str] = "status"
    nonce: int
    token: str


@dataclass(slots=True)
class SessionOpened:
    """session.opened: the session exists; what the daemon will send for it."""

    TYPE: ClassVar[str] = "session.opened"
    session_id: str
    sample_rate: int  # of response.audio.delta (24000)
    voice: str
    mode: str
    audio_format: str
    stream_params: str  # the model's Read-R-Write-W, "(R,W)"
    max_turn_seconds: float  # audio per user turn; more is refused (Whisper hears 30 s)


@dataclass(slots=True)
class AudioCommitted:
    """audio.committed: the turn's audio was accepted; every response.* event of the reply carries `turn`."""

    TYPE: ClassVar[str] = "audio.committed"
    session_id: str
    turn: int
    seconds: float  # of user audio in the turn


@dataclass(slots=True)
class ResponseTextDelta:
    """response.text.delta: newly completed reply text, and the thinker token that completed it."""

    TYPE: ClassVar[str] = "response.text.delta"
    session_id: str
    turn: int
    text: str
    token_id: int
    t: float  # daemon clock (perf_counter) when the engine emitted it


@dataclass(slots=True)
class ResponseUnitsDelta:
    """response.units.delta: speech units of one Read-R-Write-W chunk (what the vocoder voices)."""

    TYPE: ClassVar[str] = "response.units.delta"
    session_id: str
    turn: int
    units: list[int]
    final: bool
    t: float


@dataclass(slots=True)
class ResponseAudioDelta:
    """response.audio.delta: mono PCM at sample_rate (24 kHz): int16 for "pcm16" (float clipped to [-1, 1],
    times 32767, rounded half to even), the engine's float32 samples unchanged for "float32"."""

    TYPE: ClassVar[str] = "response.audio.delta"
    session_id: str
    turn: int
    audio: np.ndarray  # (n,) int16 or float32
    sample_rate: int
    final: bool
    t: float


@dataclass(slots=True)
class ResponseTiming:
    """response.timing: the turn's latency terms in seconds after audio.commit (t_asr, t_llm, t_tts,
    first_audio, total), sent just before response.done."""

    TYPE: ClassVar[str] = "response.timing"
    session_id: str
    turn: int
    timings: dict[str, float]


@dataclass(slots=True)
class ResponseDone:
    """response.done: the last event of a reply. finish_reason: stop, length, context, or cancelled."""

    TYPE: ClassVar[str] = "response.done"
    session_id: str
    turn: int
    text: str
    token_ids: list[int]
    units: list[int]
    finish_reason: str
    timings: dict[str, float]


@dataclass(slots=True)
class ServerError:
    """error: `code` is machine-readable, `message` is for people. session_id "" = not about one session;
    in_reply_to = TYPE of the request that failed ("" when the frames were not a message at all). An error
    with a turn in flight (turn >= 0) ends that reply."""

    TYPE: ClassVar[str] = "error"
    session_id: str
    code: str
    message: str
    in_reply_to: str
    turn: int  # -1 = no reply ended


@dataclass(slots=True)
class ConversationTruncated:
    """conversation.truncated: the cut is recorded; `tokens` is what the thinker will read of that answer."""

    TYPE: ClassVar[str] = "conversation.truncated"
    session_id: str
    turn: int
    tokens: int


@dataclass(slots=True)
class SessionClosed:
    """session.closed: the session is gone (asked for, reclaimed after the client vanished, or shutdown)."""

    TYPE: ClassVar[str] = "session.closed"
    session_id: str
    reason: str


@dataclass(slots=True)
class Pong:
    """pong: the answer to ping; nonce -1 is the daemon's own probe of an idle client (ignore it)."""

    TYPE: ClassVar[str] = "pong"
    nonce: int
    t: float


@dataclass(slots=True)
class StatusReply:
    """status.reply: the engine's status (runtime.Engine.status) plus the daemon's, as JSON text
    (a nested, open-ended dict: the codec's typed fields do not fit it)."""

    TYPE: ClassVar[str] = "status.reply"
    nonce: int
    status_json: str


CLIENT_KINDS: dict[type, int] = {
    SessionOpen: 0x60, AudioAppend: 0x61, AudioCommit: 0x62, ResponseCancel: 0x63, SessionClose: 0x64,
    Ping: 0x65, StatusRequest: 0x66, ConversationTruncate: 0x67,
    SessionOpened: 0x70, AudioCommitted: 0x71, ResponseTextDelta: 0x72, ResponseUnitsDelta: 0x73,
    ResponseAudioDelta: 0x74, ResponseTiming: 0x75, ResponseDone: 0x76, ServerError: 0x77, SessionClosed: 0x78,
    Pong: 0x79, StatusReply: 0x7A, ConversationTruncated: 0x7B,
}
assert all(0x60 <= k <= 0x7F for k in CLIENT_KINDS.values())

CLIENT_REQUESTS = (SessionOpen, AudioAppend, AudioCommit, ResponseCancel, SessionClose, Ping, StatusRequest,
                   ConversationTruncate)
# A request's fields are a few short strings and numbers (its audio travels as a tensor frame): a body larger than
# this is refused before it is unpacked, which is where an untrusted client could make the daemon spend memory.
MAX_REQUEST_BODY = 64 << 10
ServerEvent = (SessionOpened | AudioCommitted | ResponseTextDelta | ResponseUnitsDelta | ResponseAudioDelta
               | ResponseTiming | ResponseDone | ServerError | SessionClosed | Pong | StatusReply
               | ConversationTruncated)

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
    k = codec.as_view(frames[0])
    if k.nbytes != 1:
        raise ProtocolError(f"frame 0 must be the 1-byte kind, got {k.nbytes} bytes")
    cls = _BY_KIND.get(k[0])
    if cls is None:
        raise ProtocolError(f"unknown message kind 0x{k[0]:02x}")
    bufs = [codec.as_view(b) for b in (frames[2:] if buffers is None else buffers)]
    if cls in CLIENT_REQUESTS:
        return codec.unpack_fields(cls, _specs(cls), frames[1], bufs, MAX_REQUEST_BODY)
    return unpack_body(cls, frames[1], bufs)


def pack_body(msg: object, buffers: list[memoryview]) -> bytes:
    """The msgpack body of `msg`, appending its tensors' bytes to `buffers` (ring.py uses this for SlotRef)."""
    return codec.pack_fields(msg, _specs(type(msg)), buffers)


def unpack_body(cls: type, body: object, buffers: list[memoryview]) -> object:
    """Validate and build a `cls` from its body; every buffer must be used by exactly one tensor."""
    return codec.unpack_fields(cls, _specs(cls), body, buffers)


KINDS: dict[type, int] = {**ENGINE_KINDS, **CLIENT_KINDS}
_BY_KIND = {k: c for c, k in KINDS.items()}
assert len(_BY_KIND) == len(KINDS), "two messages share a kind byte"


@functools.cache
def _specs(cls: type) -> list:
    # Built on first use, not at import: a client that never sees an engine message never pays for its layout.
    return codec.field_specs(cls)
