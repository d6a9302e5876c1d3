"""What both clients of `omni2-engine serve` share (client/sync.py `Client`, client/aio.py `AsyncClient`): the
DEALER socket and its options, CURVE keys, how an incoming event finds its reader, how a reply's events fold into
a `Response`, the errors, and the session.open defaults.

Only numpy, pyzmq and the wire (wire/protocol.py) are imported: a program that embeds the client never loads
torch or the model code.
"""
from __future__ import annotations

import collections
import os
import time
from dataclasses import dataclass, field

import numpy as np
import zmq

from omni2.engine.wire import protocol as P

DEFAULT_ADDRESS = "tcp://127.0.0.1:5555"
CHUNK_SAMPLES = 48_000  # audio.append size when a whole utterance is sent: 1 s at 48 kHz, < 200 KB as float32


class ClientError(Exception):
    """Base of everything the client raises."""


class DaemonUnavailable(ClientError):
    """No answer from the daemon in time: it is not running, the address is wrong, or it is overloaded."""


class ClientTimeout(ClientError):
    """A reply stopped arriving part-way."""


class RemoteError(ClientError):
    """The daemon answered with an `error` event."""

    def __init__(self, event: P.ServerError):
        super().__init__(f"{event.code}: {event.message}")
        self.code, self.message, self.event = event.code, event.message, event


@dataclass
class Response:
    """One whole reply, gathered from its events. `audio` is float32 at `sample_rate` (PCM16 scaled by 1/32767)."""

    turn: int
    text: str
    token_ids: list[int]
    units: list[int]
    audio: np.ndarray
    sample_rate: int
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)  # the engine's, seconds after commit
    first_audio_s: float | None = None  # measured here: audio.commit sent -> first audio sample received


def session_open_message(session_id: str, *, token: str = "", voice: str = "default", seed: int = 0,
                         greedy: bool = False, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                         tts_temperature: float = 1.0, tts_top_k: int = 50, tts_top_p: float = 1.0,
                         max_new_tokens: int | None = None, mode: str = "streaming", audio_format: str = "pcm16",
                         stream_params: str = "", vocoder_schedule: str = "") -> P.SessionOpen:
    """session.open with the official defaults: greedy thinker, TTS sampled at temperature 1 / top-k 50
    (`greedy=True`: the TTS greedy too) — the same choices as `omni2-engine generate` (generate.session_options)."""
    if greedy:
        tts_temperature, tts_top_k, tts_top_p = 0.0, 0, 1.0
    return P.SessionOpen(session_id, token, voice, seed, temperature, top_k, top_p, tts_temperature, tts_top_k,
                         tts_top_p, max_new_tokens, mode, audio_format, stream_params, vocoder_schedule)


def audio_chunks(audio: np.ndarray) -> list[np.ndarray]:
    """A mono int16 / float32 utterance as audio.append-sized pieces (the daemon limits one request's size)."""
    a = np.asarray(audio)
    if a.dtype not in (np.int16, np.float32):
        a = a.astype(np.float32)
    if a.ndim != 1:
        raise ValueError(f"audio must be mono (n,), got shape {a.shape}; downmix first")
    return [np.ascontiguousarray(a[i:i + CHUNK_SAMPLES]) for i in range(0, a.size, CHUNK_SAMPLES)]


def to_float(audio: np.ndarray) -> np.ndarray:
    return audio.astype(np.float32) / 32767.0 if audio.dtype == np.int16 else audio


class Gather:
    """Folds one reply's events into a Response."""

    def __init__(self, t_commit: float):
        self.t_commit, self.pcm, self.first_audio = t_commit, [], None

    def add(self, ev) -> P.ResponseDone | None:
        if isinstance(ev, P.ResponseAudioDelta) and ev.audio.size:
            if self.first_audio is None:
                self.first_audio = time.perf_counter() - self.t_commit
            self.pcm.append(to_float(ev.audio))
        return ev if isinstance(ev, P.ResponseDone) else None

    def result(self, done: P.ResponseDone, sample_rate: int) -> Response:
        pcm = np.concatenate(self.pcm) if self.pcm else np.zeros(0, np.float32)
        return Response(done.turn, done.text, done.token_ids, done.units, pcm, sample_rate, done.finish_reason,
                        done.timings, self.first_audio)


def dealer_socket(ctx: zmq.Context, address: str, curve_server_key: str | None = None,
                  curve_secret_file: str | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    # A fixed routing id: after a network blip the daemon still knows this connection (and its sessions).
    sock.setsockopt(zmq.ROUTING_ID, b"c" + os.urandom(15))
    sock.setsockopt(zmq.LINGER, 0)
    # Queue only on a completed connection: a send that goes through means a daemon is there; one that times out
    # (SNDTIMEO = connect_timeout) means none is (or the CURVE handshake failed).
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
    try:
        if curve_server_key is not None:
            try:
                curve_client(sock, curve_server_key, curve_secret_file)
            except (zmq.ZMQError, ValueError) as e:  # a 40-character key that is no Z85 key; a file without one
                raise OSError(f"{curve_server_key}: {e}") from None
        sock.connect(address)
    except zmq.ZMQError as e:
        sock.close()
        raise ClientError(f"cannot connect to {address!r}: {e} (an address is tcp://HOST:PORT or ipc://PATH)") from None
    except OSError as e:  # zmq.auth: a certificate file that is not there or not one
        sock.close()
        raise ClientError(f"cannot read a CURVE key: {e}") from None
    except BaseException:
        sock.close()
        raise
    return sock


def no_answer(what: str, address: str, timeout: float) -> str:
    return (f"no {what} from {address} within {timeout:g} s: the daemon is connected but busy (or still loading "
            f"its model; see its log)")


def unsendable(address: str, timeout: float) -> str:
    return (f"cannot send to {address} for {timeout:g} s: no connection (is `omni2-engine serve` running there, "
            f"and do the CURVE keys match?)")


def curve_client(sock: zmq.Socket, server_key: str, secret_file: str | None) -> None:
    """CURVE: `server_key` is the daemon's public certificate file (or its Z85 key); our key pair comes from
    `secret_file` (a daemon with --curve-clients admits only listed public keys) or is made up for this socket."""
    import zmq.auth

    if len(server_key) == 40 and not os.path.exists(server_key):
        sock.curve_serverkey = server_key.encode()
    else:
        sock.curve_serverkey = zmq.auth.load_certificate(server_key)[0]
    if secret_file is not None:
        public, secret = zmq.auth.load_certificate(secret_file)
        if not secret:
            raise ClientError(f"{secret_file} holds no secret key (pass the .key_secret file)")
    else:
        public, secret = zmq.curve_keypair()
    sock.curve_publickey, sock.curve_secretkey = public, secret


# The request each awaited answer answers: an error refuses that request only if it names it.
_REQUEST_OF = {P.SessionOpened: P.SessionOpen.TYPE, P.AudioCommitted: P.AudioCommit.TYPE,
               P.ConversationTruncated: P.ConversationTruncate.TYPE, P.SessionClosed: P.SessionClose.TYPE}


def request_of(types: tuple) -> str | None:
    """The request whose answer is one of `types` (None: a wait for something that answers no request)."""
    return _REQUEST_OF.get(types[0])


def check_session_id(sid: str) -> str:
    """A session name the daemon takes (it answers a malformed one anonymously, so a wait for it would hang)."""
    if not isinstance(sid, str) or not P.SESSION_ID.fullmatch(sid):
        raise ClientError(f"session id {sid!r}: 1-64 characters of A-Z a-z 0-9 _ . : -")
    return sid


def settle(ev, types: tuple, owed: collections.Counter):
    """While a client waits for one of `types`, the answer to the request it just sent: `ev` when it is that
    answer; RemoteError when it refuses that request; None for anything else, which is left behind: events and
    errors of earlier replies (an error with a turn), and refusals of requests sent without waiting (an append,
    whose refusal the daemon repeats for the commit that follows it, or a cancel that found no reply in flight).
    `owed` counts answers still due to earlier waits of this session that timed out: the late answer of one of
    those is skipped, not taken for the current request's (every later wait would then be one answer behind)."""
    request = request_of(types)
    if isinstance(ev, P.ServerError):
        if ev.turn >= 0 or ev.in_reply_to and ev.in_reply_to != request:
            return None
    elif not isinstance(ev, types):
        return None
    if owed[request]:
        owed[request] -= 1
        return None
    if isinstance(ev, P.ServerError):
        raise RemoteError(ev)
    return ev


def route(ev, sessions: dict, replies: dict) -> None:
    """Put an incoming event where its reader will look: a session's queue or the reply slot of a nonce."""
    if isinstance(ev, (P.Pong, P.StatusReply)):
        if ev.nonce >= 0:
            replies[ev.nonce] = ev
    elif isinstance(ev, P.ServerError) and not ev.session_id:
        replies["error"] = ev  # not about one session: whoever waits on a reply gets it
    elif getattr(ev, "session_id", None) in sessions:
        sessions[ev.session_id].append(ev)
