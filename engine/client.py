"""Clients of `omni2-engine serve`: `Client` (blocking) and `AsyncClient` (asyncio), over one ZMQ DEALER socket.

    with Client("tcp://127.0.0.1:5555") as c:
        s = c.open(seed=0)
        reply = s.reply(samples, 16000, on_text=print)   # reply.text, reply.audio (float32, 24 kHz), reply.units
        s.close()

A connection can hold several sessions; replies to them interleave on the socket, so the client sorts incoming
events into per-session queues. Every wait has a timeout: a daemon that is not running shows up as
`DaemonUnavailable`, an `error` event as `RemoteError` (with the daemon's `code`), a reply that stops mid-way
as `ClientTimeout`. Messages are the dataclasses of engine/protocol.py ("client wire" section).
This module holds the errors, the helpers both clients share, and `Client`; `AsyncClient` is in
engine/client_async.py (importable from here too).
"""
from __future__ import annotations

import collections
import itertools
import os
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import zmq

from omni2.engine import protocol as P
from omni2.engine.protocol import ProtocolError

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
                         stream_params: str = "") -> P.SessionOpen:
    """session.open with the official defaults: greedy thinker, TTS sampled at temperature 1 / top-k 50
    (`greedy=True`: the TTS greedy too) — the same choices as `omni2-engine generate` (generate.session_options)."""
    if greedy:
        tts_temperature, tts_top_k, tts_top_p = 0.0, 0, 1.0
    return P.SessionOpen(session_id, token, voice, seed, temperature, top_k, top_p, tts_temperature, tts_top_k,
                         tts_top_p, max_new_tokens, mode, audio_format, stream_params)


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


class _Gather:
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


def _socket(ctx: zmq.Context, address: str, curve_server_key: str | None = None,
            curve_secret_file: str | None = None) -> zmq.Socket:
    sock = ctx.socket(zmq.DEALER)
    if curve_server_key is not None:
        _curve(sock, curve_server_key, curve_secret_file)
    # A fixed routing id: after a network blip the daemon still knows this connection (and its sessions).
    sock.setsockopt(zmq.ROUTING_ID, b"c" + os.urandom(15))
    sock.setsockopt(zmq.LINGER, 0)
    # Queue only on a completed connection: a send that goes through means a daemon is there; one that times out
    # (SNDTIMEO = connect_timeout) means none is (or the CURVE handshake failed).
    sock.setsockopt(zmq.IMMEDIATE, 1)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
    sock.connect(address)
    return sock


def _no_answer(what: str, address: str, timeout: float) -> str:
    return (f"no {what} from {address} within {timeout:g} s: the daemon is connected but busy (or still loading "
            f"its model; see its log)")


def _unsendable(address: str, timeout: float) -> str:
    return (f"cannot send to {address} for {timeout:g} s: no connection (is `omni2-engine serve` running there, "
            f"and do the CURVE keys match?)")


def _curve(sock: zmq.Socket, server_key: str, secret_file: str | None) -> None:
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


def _route(ev, sessions: dict, replies: dict) -> None:
    """Put an incoming event where its reader will look: a session's queue or the reply slot of a nonce."""
    if isinstance(ev, (P.Pong, P.StatusReply)):
        if ev.nonce >= 0:
            replies[ev.nonce] = ev
    elif isinstance(ev, P.ServerError) and not ev.session_id:
        replies["error"] = ev  # not about one session: whoever waits on a reply gets it
    elif getattr(ev, "session_id", None) in sessions:
        sessions[ev.session_id].append(ev)


class Client:
    """A blocking connection to the daemon. Not thread-safe: one Client per thread.

    token: the daemon's --token-file content. curve_server_key / curve_secret_file: for a daemon with CURVE keys
    (its public certificate; ours, if it admits only listed clients). Waits: `connect_timeout` for a connection
    (then DaemonUnavailable) and for ping/status answers; `timeout` for the answers to session requests (a daemon
    still loading its model answers once ready) and between the events of a reply (then ClientTimeout)."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str = "", timeout: float = 60.0,
                 connect_timeout: float = 10.0, curve_server_key: str | None = None,
                 curve_secret_file: str | None = None):
        self.address, self.token, self.timeout, self.connect_timeout = address, token, timeout, connect_timeout
        self._ctx = zmq.Context.instance()
        self._sock = _socket(self._ctx, address, curve_server_key, curve_secret_file)
        self._sock.setsockopt(zmq.SNDTIMEO, int(connect_timeout * 1000))
        self._queues: dict[str, collections.deque] = {}
        self._replies: dict = {}
        self._nonce = itertools.count()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Drop the connection (the daemon reclaims any sessions still open after its reclaim timeout)."""
        if not self._sock.closed:
            self._sock.close(linger=100)

    def ping(self, timeout: float | None = None) -> float:
        """Round-trip seconds; DaemonUnavailable when there is no answer within `timeout`."""
        t0 = time.perf_counter()
        self._request(P.Ping(next(self._nonce)), timeout)
        return time.perf_counter() - t0

    def status(self, timeout: float | None = None) -> dict:
        import json

        rep = self._request(P.StatusRequest(next(self._nonce), self.token), timeout)
        return json.loads(rep.status_json)

    def open(self, session_id: str | None = None, **options) -> Session:
        """Open a session; options as `session_open_message` (voice, seed, greedy, mode, audio_format, ...)."""
        sid = session_id or uuid.uuid4().hex[:16]
        if sid in self._queues:
            raise ClientError(f"session {sid!r} is already open on this client")
        self._queues[sid] = collections.deque()
        self.send(session_open_message(sid, token=self.token, **options))
        try:
            ev = self._wait(sid, (P.SessionOpened,), self.timeout, "session.opened")
        except ClientError:
            self._queues.pop(sid, None)
            raise
        return Session(self, sid, ev)

    # -- plumbing (Session uses these) -------------------------------------------------------------------------
    def send(self, msg) -> None:
        # A send blocks while there is no connection to queue on (a CURVE handshake that failed); SNDTIMEO bounds it.
        try:
            self._sock.send_multipart(P.encode(msg), copy=False)
        except zmq.Again:
            raise DaemonUnavailable(_unsendable(self.address, self.connect_timeout)) from None

    def _recv(self, timeout: float) -> bool:
        """Receive and route one message; False on timeout."""
        if not self._sock.poll(max(0, int(timeout * 1000))):
            return False
        frames = self._sock.recv_multipart(copy=False)
        try:
            ev = P.decode(frames)
        except ProtocolError as e:
            raise ClientError(f"the daemon sent something that is not a message: {e}") from None
        _route(ev, self._queues, self._replies)
        return True

    def _request(self, msg, timeout: float | None):
        timeout = self.connect_timeout if timeout is None else timeout
        self._replies.pop("error", None)  # a stale one must not fail this request
        self.send(msg)
        deadline = time.monotonic() + timeout
        while msg.nonce not in self._replies:
            if "error" in self._replies:
                raise RemoteError(self._replies.pop("error"))
            if not self._recv(deadline - time.monotonic()) and time.monotonic() >= deadline:
                raise DaemonUnavailable(f"no answer from {self.address} within {timeout:g} s: is `omni2-engine "
                                        f"serve` running there?")
        return self._replies.pop(msg.nonce)

    def next_event(self, sid: str, timeout: float):
        """The session's next event, or None after `timeout` s (0 = only what has arrived)."""
        q = self._queues[sid]
        deadline = time.monotonic() + timeout
        while not q:
            if not self._recv(max(0.0, deadline - time.monotonic())) and time.monotonic() >= deadline:
                return None
        return q.popleft()

    def _wait(self, sid: str, types: tuple, timeout: float, what: str):
        """Skip to the session's next event of `types`; an error event raises RemoteError."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.next_event(sid, max(0.0, deadline - time.monotonic()))
            if ev is None:
                raise ClientTimeout(_no_answer(what, self.address, timeout))
            if isinstance(ev, P.ServerError):
                raise RemoteError(ev)
            if isinstance(ev, types):
                return ev


class Session:
    """One conversation (multi-turn) on a Client. `info` is the daemon's session.opened."""

    def __init__(self, client: Client, session_id: str, info: P.SessionOpened):
        self.client, self.id, self.info = client, session_id, info
        self.sample_rate = info.sample_rate
        self._t_commit = 0.0

    def append(self, audio: np.ndarray, sample_rate: int) -> None:
        """Stream a chunk of the user's turn (mono int16 or float32 in [-1, 1], any rate)."""
        for chunk in audio_chunks(audio):
            self.client.send(P.AudioAppend(self.id, chunk, int(sample_rate)))

    def commit(self) -> int:
        """End of the user's turn: the reply starts. Returns its turn number."""
        self.client.send(P.AudioCommit(self.id))
        self._t_commit = time.perf_counter()
        return self.client._wait(self.id, (P.AudioCommitted,), self.client.timeout, "audio.committed").turn

    def send(self, audio: np.ndarray, sample_rate: int) -> int:
        """A whole utterance: append + commit."""
        self.append(audio, sample_rate)
        return self.commit()

    def events(self, timeout: float | None = None):
        """The reply's events, in order, through its response.done. An error event raises RemoteError; no event
        for `timeout` s (default: the client's) raises ClientTimeout."""
        timeout = self.client.timeout if timeout is None else timeout
        while True:
            ev = self.client.next_event(self.id, timeout)
            if ev is None:
                raise ClientTimeout(f"no event of session {self.id} for {timeout:g} s")
            if isinstance(ev, P.ServerError):
                raise RemoteError(ev)
            yield ev
            if isinstance(ev, P.ResponseDone):
                return

    def reply(self, audio: np.ndarray, sample_rate: int, on_text=None, timeout: float | None = None) -> Response:
        """Send a whole utterance and gather the reply; `on_text(str)` sees the text as it streams."""
        self.send(audio, sample_rate)
        return self.collect(on_text, timeout)

    def collect(self, on_text=None, timeout: float | None = None) -> Response:
        g = _Gather(self._t_commit)
        for ev in self.events(timeout):
            if isinstance(ev, P.ResponseTextDelta) and on_text is not None:
                on_text(ev.text)
            done = g.add(ev)
        return g.result(done, self.sample_rate)

    def cancel(self) -> None:
        """Barge-in: the reply ends with response.done(finish_reason="cancelled") (events() still yields it)."""
        self.client.send(P.ResponseCancel(self.id))

    def close(self, timeout: float | None = None) -> None:
        self.client.send(P.SessionClose(self.id))
        try:
            self.client._wait(self.id, (P.SessionClosed,), self.client.timeout if timeout is None
                              else timeout, "session.closed")
        finally:
            self.client._queues.pop(self.id, None)


def __getattr__(name: str):
    # `from omni2.engine.client import AsyncClient` keeps working. Imported on first use, not at the top:
    # client_async imports the shared pieces from this module, so importing it here eagerly would be a cycle.
    if name in ("AsyncClient", "AsyncSession"):
        from omni2.engine import client_async

        return getattr(client_async, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
