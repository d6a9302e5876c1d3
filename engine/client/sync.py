"""`Client`: a blocking connection to `omni2-engine serve` over one ZMQ DEALER socket, and its `Session`s.

    with Client("tcp://127.0.0.1:5555") as c:
        s = c.open(seed=0)
        reply = s.reply(samples, 16000, on_text=print)   # reply.text, reply.audio (float32, 24 kHz), reply.units
        s.close()

A connection can hold several sessions; replies to them interleave on the socket, so the client sorts incoming
events into per-session queues. Every wait has a timeout: a daemon that is not running shows up as
`DaemonUnavailable`, an `error` event as `RemoteError` (with the daemon's `code`), a reply that stops mid-way
as `ClientTimeout`. Messages are the dataclasses of wire/protocol.py ("client wire" section).
"""
from __future__ import annotations

import collections
import itertools
import json
import time
import uuid

import numpy as np
import zmq

from omni2.engine.client.core import (
    DEFAULT_ADDRESS,
    ClientError,
    ClientTimeout,
    DaemonUnavailable,
    Gather,
    RemoteError,
    Response,
    audio_chunks,
    check_session_id,
    dealer_socket,
    no_answer,
    request_of,
    route,
    session_open_message,
    settle,
    unsendable,
)
from omni2.engine.wire import protocol as P
from omni2.engine.wire.codec import ProtocolError


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
        self._sock = dealer_socket(self._ctx, address, curve_server_key, curve_secret_file)
        self._sock.setsockopt(zmq.SNDTIMEO, int(connect_timeout * 1000))
        self._queues: dict[str, collections.deque] = {}
        self._owed: dict[str, collections.Counter] = {}  # per session: answers due to waits that timed out
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
        rep = self._request(P.StatusRequest(next(self._nonce), self.token), timeout)
        return json.loads(rep.status_json)

    def open(self, session_id: str | None = None, **options) -> Session:
        """Open a session; options as `session_open_message` (voice, seed, greedy, mode, audio_format, ...)."""
        sid = check_session_id(session_id or uuid.uuid4().hex[:16])
        if sid in self._queues:
            raise ClientError(f"session {sid!r} is already open on this client")
        self._queues[sid], self._owed[sid] = collections.deque(), collections.Counter()
        try:
            self.send(session_open_message(sid, token=self.token, **options))
            ev = self._wait(sid, (P.SessionOpened,), self.timeout, "session.opened")
        except ClientError as e:
            self._forget(sid)
            if isinstance(e, ClientTimeout):  # it may open later: have it closed then, not held for nobody
                try:
                    self.send(P.SessionClose(sid))
                except ClientError:
                    pass
            raise
        return Session(self, sid, ev)

    def _forget(self, sid: str) -> None:
        self._queues.pop(sid, None)
        self._owed.pop(sid, None)

    # -- plumbing (Session uses these) -------------------------------------------------------------------------
    def send(self, msg) -> None:
        # A send blocks while there is no connection to queue on (a CURVE handshake that failed); SNDTIMEO bounds it.
        try:
            self._sock.send_multipart(P.encode(msg), copy=False)
        except zmq.Again:
            raise DaemonUnavailable(unsendable(self.address, self.connect_timeout)) from None

    def _recv(self, timeout: float) -> bool:
        """Receive and route one message; False on timeout."""
        if not self._sock.poll(max(0, int(timeout * 1000))):
            return False
        frames = self._sock.recv_multipart(copy=False)
        try:
            ev = P.decode(frames)
        except ProtocolError as e:
            raise ClientError(f"the daemon sent something that is not a message: {e}") from None
        route(ev, self._queues, self._replies)
        return True

    def _request(self, msg, timeout: float | None):
        timeout = self.connect_timeout if timeout is None else timeout
        self._replies.clear()  # stale: an error that must not fail this request, answers of requests that timed out
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
        """Skip to the session's next event of `types`, the answer to the request just sent; its refusal raises
        RemoteError (core.settle)."""
        deadline = time.monotonic() + timeout
        owed = self._owed[sid]
        while True:
            ev = self.next_event(sid, max(0.0, deadline - time.monotonic()))
            if ev is None:
                owed[request_of(types)] += 1  # its answer may still come: it is not the next request's
                raise ClientTimeout(no_answer(what, self.address, timeout))
            if settle(ev, types, owed) is not None:
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
        g = Gather(self._t_commit)
        for ev in self.events(timeout):
            if isinstance(ev, P.ResponseTextDelta) and on_text is not None:
                on_text(ev.text)
            done = g.add(ev)
        return g.result(done, self.sample_rate)

    def cancel(self) -> None:
        """Barge-in: the reply ends with response.done(finish_reason="cancelled") (events() still yields it)."""
        self.client.send(P.ResponseCancel(self.id))

    def truncate(self, turn: int, tokens: int) -> int:
        """The thinker reads only the first `tokens` text tokens of finished turn `turn`'s answer from the next
        turn on (what the user heard of it); returns the tokens kept."""
        self.client.send(P.ConversationTruncate(self.id, turn, tokens))
        return self.client._wait(self.id, (P.ConversationTruncated,), self.client.timeout,
                                 "conversation.truncated").tokens

    def close(self, timeout: float | None = None) -> None:
        self.client.send(P.SessionClose(self.id))
        try:
            self.client._wait(self.id, (P.SessionClosed,), self.client.timeout if timeout is None
                              else timeout, "session.closed")
        finally:
            self.client._forget(self.id)

