"""`AsyncClient`: the asyncio twin of `Client` (client/sync.py), over the same DEALER socket setup, routing and
errors (client/core.py). One reader task sorts incoming events into per-session asyncio queues, so any number of
coroutines can drive the sessions of one connection.
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import time
import uuid

import numpy as np
import zmq
import zmq.asyncio

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


class AsyncClient:
    """The asyncio twin of Client: `await c.open()`, `await s.reply(...)`, `async for ev in s.events()`.

    A reader task routes incoming messages; any number of coroutines may use the sessions of one AsyncClient."""

    def __init__(self, address: str = DEFAULT_ADDRESS, *, token: str = "", timeout: float = 60.0,
                 connect_timeout: float = 10.0, curve_server_key: str | None = None,
                 curve_secret_file: str | None = None):
        self.address, self.token, self.timeout, self.connect_timeout = address, token, timeout, connect_timeout
        self._ctx = zmq.asyncio.Context.instance()
        self._sock = dealer_socket(self._ctx, address, curve_server_key, curve_secret_file)
        self._queues: dict[str, _AQueue] = {}
        self._owed: dict[str, collections.Counter] = {}  # per session: answers due to waits that timed out
        self._replies = _AReplies()
        self._nonce = itertools.count()
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            try:
                await self._reader
            except (asyncio.CancelledError, Exception):
                pass
        if not self._sock.closed:
            self._sock.close(linger=100)

    async def send(self, msg) -> None:
        if self._reader is None:
            self._reader = asyncio.get_running_loop().create_task(self._read())
        try:
            await asyncio.wait_for(self._sock.send_multipart(P.encode(msg), copy=False), self.connect_timeout)
        except (asyncio.TimeoutError, zmq.Again):
            raise DaemonUnavailable(unsendable(self.address, self.connect_timeout)) from None

    async def _read(self) -> None:
        while True:
            frames = await self._sock.recv_multipart(copy=False)
            try:
                ev = P.decode(frames)
            except ProtocolError:
                continue  # not from a daemon of ours; nothing sensible to do with it
            route(ev, self._queues, self._replies)

    async def ping(self, timeout: float | None = None) -> float:
        t0 = time.perf_counter()
        await self._request(P.Ping(next(self._nonce)), timeout)
        return time.perf_counter() - t0

    async def status(self, timeout: float | None = None) -> dict:
        return json.loads((await self._request(P.StatusRequest(next(self._nonce), self.token), timeout)).status_json)

    async def _request(self, msg, timeout: float | None):
        timeout = self.connect_timeout if timeout is None else timeout
        reply = self._replies.expect(msg.nonce)  # before sending: the reader may get the answer during the send
        try:
            await self.send(msg)
            return await asyncio.wait_for(reply, timeout)
        except asyncio.TimeoutError:
            raise DaemonUnavailable(f"no answer from {self.address} within {timeout:g} s: is `omni2-engine serve` "
                                    f"running there?") from None
        finally:
            self._replies.forget(msg.nonce)

    async def open(self, session_id: str | None = None, **options) -> AsyncSession:
        sid = check_session_id(session_id or uuid.uuid4().hex[:16])
        if sid in self._queues:
            raise ClientError(f"session {sid!r} is already open on this client")
        self._queues[sid], self._owed[sid] = _AQueue(), collections.Counter()
        try:
            await self.send(session_open_message(sid, token=self.token, **options))
            ev = await self._wait(sid, (P.SessionOpened,), self.timeout, "session.opened")
        except ClientError as e:
            self._forget(sid)
            if isinstance(e, ClientTimeout):  # it may open later: have it closed then, not held for nobody
                try:
                    await self.send(P.SessionClose(sid))
                except ClientError:
                    pass
            raise
        return AsyncSession(self, sid, ev)

    def _forget(self, sid: str) -> None:
        self._queues.pop(sid, None)
        self._owed.pop(sid, None)

    async def next_event(self, sid: str, timeout: float):
        try:
            return await asyncio.wait_for(self._queues[sid].get(), timeout)
        except asyncio.TimeoutError:
            return None

    async def _wait(self, sid: str, types: tuple, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        owed = self._owed[sid]
        while True:
            ev = await self.next_event(sid, max(0.0, deadline - time.monotonic()))
            if ev is None:
                owed[request_of(types)] += 1  # its answer may still come: it is not the next request's
                raise ClientTimeout(no_answer(what, self.address, timeout))
            if settle(ev, types, owed) is not None:  # the answer, or its refusal raised; the rest is left behind
                return ev


class AsyncSession:
    def __init__(self, client: AsyncClient, session_id: str, info: P.SessionOpened):
        self.client, self.id, self.info = client, session_id, info
        self.sample_rate = info.sample_rate
        self._t_commit = 0.0

    async def append(self, audio: np.ndarray, sample_rate: int) -> None:
        for chunk in audio_chunks(audio):
            await self.client.send(P.AudioAppend(self.id, chunk, int(sample_rate)))

    async def commit(self) -> int:
        await self.client.send(P.AudioCommit(self.id))
        self._t_commit = time.perf_counter()
        ev = await self.client._wait(self.id, (P.AudioCommitted,), self.client.timeout, "audio.committed")
        return ev.turn

    async def send(self, audio: np.ndarray, sample_rate: int) -> int:
        await self.append(audio, sample_rate)
        return await self.commit()

    async def events(self, timeout: float | None = None):
        timeout = self.client.timeout if timeout is None else timeout
        while True:
            ev = await self.client.next_event(self.id, timeout)
            if ev is None:
                raise ClientTimeout(f"no event of session {self.id} for {timeout:g} s")
            if isinstance(ev, P.ServerError):
                raise RemoteError(ev)
            yield ev
            if isinstance(ev, P.ResponseDone):
                return

    async def reply(self, audio: np.ndarray, sample_rate: int, on_text=None,
                    timeout: float | None = None) -> Response:
        await self.send(audio, sample_rate)
        g = Gather(self._t_commit)
        async for ev in self.events(timeout):
            if isinstance(ev, P.ResponseTextDelta) and on_text is not None:
                on_text(ev.text)
            done = g.add(ev)
        return g.result(done, self.sample_rate)

    async def cancel(self) -> None:
        await self.client.send(P.ResponseCancel(self.id))

    async def truncate(self, turn: int, tokens: int) -> int:
        """The thinker reads only the first `tokens` text tokens of finished turn `turn`'s answer from the next
        turn on (what the user heard of it); returns the tokens kept."""
        await self.client.send(P.ConversationTruncate(self.id, turn, tokens))
        ev = await self.client._wait(self.id, (P.ConversationTruncated,), self.client.timeout,
                                     "conversation.truncated")
        return ev.tokens

    async def close(self, timeout: float | None = None) -> None:
        await self.client.send(P.SessionClose(self.id))
        try:
            await self.client._wait(self.id, (P.SessionClosed,), self.client.timeout if timeout is None
                                    else timeout, "session.closed")
        finally:
            self.client._forget(self.id)


class _AQueue(asyncio.Queue):
    """An asyncio.Queue that `_route` can append to like a deque."""

    def append(self, ev) -> None:
        self.put_nowait(ev)


class _AReplies(dict):
    """Nonce -> reply, with an awaitable get; a session-less error event fails every waiter."""

    def __init__(self):
        super().__init__()
        self._waiters: dict = {}

    def __setitem__(self, key, ev) -> None:
        if key == "error":
            for fut in self._waiters.values():
                if not fut.done():
                    fut.set_exception(RemoteError(ev))
            return
        fut = self._waiters.get(key)
        if fut is not None and not fut.done():
            fut.set_result(ev)

    def expect(self, nonce: int) -> asyncio.Future:
        """The future reply to `nonce`: made before the request is sent, dropped with forget()."""
        fut = self._waiters[nonce] = asyncio.get_running_loop().create_future()
        return fut

    def forget(self, nonce: int) -> None:
        self._waiters.pop(nonce, None)
