"""What a front door keeps per client and per session, and the checks a request must pass before it reaches the
engine. No sockets and no engine here: plain state and pure checks, each refusal a `RequestError` that the front
door turns into an `error` reply.
"""
from __future__ import annotations

import hmac
import math
import time
from dataclasses import dataclass, field

import numpy as np

from omni2.engine.config import (
    VOCODER_SCHEDULES,
    ConfigError,
    SamplingParams,
    ServerConfig,
    SessionOptions,
    StreamParams,
)
from omni2.engine.wire import protocol as P

MAX_TOKEN_CHARS = 4096
MAX_SEED = 2**62  # the engine derives seed + 1 and seed + 2; SamplingParams wants < 2**63
SAMPLE_RATES = (1000, 384000)  # accepted input rates, Hz (audio.MAX_SAMPLE_RATE is the upper bound)


def to_wire_audio(pcm: np.ndarray, audio_format: str) -> np.ndarray:
    """Engine float32 PCM -> what response.audio.delta carries. pcm16: clip to [-1, 1], scale by 32767, round
    half to even (np.rint), so +-1.0 map to +-32767 and the result is symmetric."""
    pcm = np.asarray(pcm, dtype=np.float32)
    if audio_format == "float32":
        return np.ascontiguousarray(pcm)
    return np.rint(np.clip(pcm, -1.0, 1.0) * 32767.0).astype(np.int16)


class RequestError(Exception):
    """A request the server refuses: becomes an `error` reply with this code."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(eq=False)
class SessionState:
    sid: str  # the engine's id: unique for the daemon's life, never the client's name
    name: str  # the client's session_id
    client: ClientState
    mode: str
    audio_format: str
    turn: int = -1  # the reply in flight, or -1
    epoch: int = 0  # bumped on cancel: events queued before it are stale
    pending_seconds: float = 0.0  # user audio buffered for the next commit
    refused: tuple[str, str] | None = None  # (code, message) of a refused append of that turn: its commit fails
    text: list[str] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    units: list[int] = field(default_factory=list)
    pcm: list[np.ndarray] = field(default_factory=list)  # offline mode only
    last_active: float = field(default_factory=time.monotonic)
    lost_turn: int = -1  # a reply cancelled because the client was unreachable: reported when it returns

    def refuse(self, code: str, why: str) -> None:
        """The turn being appended lost a piece: its commit will be refused with the first reason."""
        self.refused = self.refused or (code, why)

    def reset_reply(self, turn: int) -> None:
        self.turn, self.text, self.token_ids, self.units, self.pcm = turn, [], [], [], []


@dataclass(eq=False)
class ClientState:
    identity: bytes
    sessions: dict[str, SessionState] = field(default_factory=dict)  # by the client's name
    last_seen: float = field(default_factory=time.monotonic)  # last request received
    last_sent: float = field(default_factory=time.monotonic)  # last successful send (or probe)
    unreachable_since: float | None = None
    last_probe: float = 0.0  # when its socket was last asked whether it takes messages again (while unreachable)
    not_reading: bool = False  # unreachable because its queue was full (it sends, but does not read)


def authorized(expected: str | None, token: str) -> bool:
    """`token` (from session.open / status) against the daemon's token; no token set admits everyone."""
    if expected is None:
        return True
    given = token.encode()
    # constant time in the token's content (compare_digest); only a wrong length shows, as it must
    return len(given) <= MAX_TOKEN_CHARS * 4 and hmac.compare_digest(given, expected.encode())


def session_options(m: P.SessionOpen, cfg: ServerConfig) -> SessionOptions:
    """session.open's values checked against the protocol and the daemon's limits."""
    if m.mode not in P.MODES:
        raise RequestError("bad_value", f"mode must be one of {list(P.MODES)}, got {m.mode[:32]!r}")
    if m.audio_format not in P.AUDIO_FORMATS:
        raise RequestError("bad_value", f"audio_format must be one of {list(P.AUDIO_FORMATS)}")
    if m.stream_params:
        try:
            ok = StreamParams.parse(m.stream_params[:32]).to_str() == cfg.stream_params
        except ConfigError:
            ok = False
        if not ok:
            raise RequestError("unsupported", f"stream_params is fixed by the model: {cfg.stream_params} "
                                              f"(send \"\" for it)")
    if not 0 < len(m.voice) <= 64:
        raise RequestError("bad_value", "voice must be a name of 1-64 characters")
    if not 0 <= m.seed < MAX_SEED:
        raise RequestError("bad_value", f"seed must be in [0, 2**62), got {m.seed}")
    if m.max_new_tokens is not None and not 1 <= m.max_new_tokens <= cfg.max_new_tokens:
        raise RequestError("bad_value", f"max_new_tokens must be in [1, {cfg.max_new_tokens}] or null")
    try:
        sampling = [SamplingParams(_finite(t), k, _finite(p)) for t, k, p in
                    ((m.temperature, m.top_k, m.top_p), (m.tts_temperature, m.tts_top_k, m.tts_top_p))]
        if any(sp.temperature > 100 or sp.top_k > 1_000_000 for sp in sampling):
            raise ValueError("temperature must be <= 100 and top_k <= 1000000")
    except ValueError as e:
        raise RequestError("bad_value", f"sampling: {e}") from None
    if m.vocoder_schedule and m.vocoder_schedule not in VOCODER_SCHEDULES:
        raise RequestError("bad_value", f"vocoder_schedule must be one of {list(VOCODER_SCHEDULES)} or \"\" (the "
                                        f"daemon's), got {m.vocoder_schedule[:32]!r}")
    return SessionOptions(voice=m.voice, seed=m.seed, sampling=sampling[0], tts_sampling=sampling[1],
                          max_new_tokens=m.max_new_tokens, vocoder_schedule=m.vocoder_schedule or None)


def check_audio(m: P.AudioAppend) -> float:
    """audio.append's shape, dtype and rate; returns its length in seconds. (The engine checks the samples.)"""
    a = m.audio
    if a.ndim != 1 or a.dtype not in (np.int16, np.float32) or a.size == 0:
        raise RequestError("bad_audio", f"audio must be a non-empty 1-D int16 or float32 array, got "
                                        f"{a.dtype}{list(a.shape)}")
    if not SAMPLE_RATES[0] <= m.sample_rate <= SAMPLE_RATES[1]:
        raise RequestError("bad_audio", f"sample_rate must be in {list(SAMPLE_RATES)} Hz, got {m.sample_rate}")
    return a.size / m.sample_rate


def _finite(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError(f"{x} is not a finite number")
    return x
