"""The daemon's ZMQ front door: one ROUTER socket, one thread, many clients (serve/daemon.py runs it).

    client (DEALER) --session.open / audio.append / audio.commit / ...-->  ROUTER  --> Engine (runtime/engine.py)
    client (DEALER) <--response.text.delta / response.audio.delta / ...--  ROUTER  <-- on_event (engine thread)

Every message is a `protocol.CLIENT_KINDS` dataclass (docs/PROTOCOL.md, "Client wire"). The loop is
`poll -> handle requests -> forward engine events -> housekeeping`. The engine calls `on_event` on its own thread
and ZMQ sockets are not thread-safe, so events go through a queue and a self-pipe wakes the poll.

Safety (what a stranger on the network could do): loopback bind unless a token is set; the token is checked on
session.open and status in constant time; a receive is bounded before any decoding (MAXMSGSIZE, 8 frames, a 64 KiB
request body; not the frames of a multipart message that never ends, which libzmq holds: docs/PROTOCOL.md),
every request size-checked after its zero-copy decode (so that the error names it) and value-checked;
a client owns at most `max_sessions_per_client` sessions; a client that vanishes loses its sessions after
`reclaim_s` (ROUTER_MANDATORY turns a send to a gone peer into EHOSTUNREACH; idle clients are probed).
The checks and the per-client state are in serve/sessions.py; the socket's options, CURVE and a receive that keeps
at most MAX_FRAMES frames of a request are at the bottom of this module.
"""
from __future__ import annotations

import json
import logging
import queue
import time
import uuid

import numpy as np
import zmq

from omni2.engine.config import ConfigError, ServerConfig
from omni2.engine.serve.sessions import (
    ClientState,
    RequestError,
    SessionState,
    authorized,
    check_audio,
    session_options,
    to_wire_audio,
)
from omni2.engine.wire import protocol as P
from omni2.engine.wire.codec import ProtocolError
from omni2.engine.wire.protocol import AudioDelta, ErrorEvent, TextDelta, TurnDone, UnitChunk
from omni2.engine.wire.wakeup import Wakeup

log = logging.getLogger("omni2.serve")


class FrontDoor:
    """Create it, hand `on_event` to the Engine, start the engine, then `run(engine)` until `stop()`."""

    def __init__(self, cfg: ServerConfig):
        self.cfg = cfg
        self.engine = None
        self.sample_rate = 24000
        self.clients: dict[bytes, ClientState] = {}
        self.sessions: dict[str, SessionState] = {}  # by engine id
        self.events: queue.SimpleQueue = queue.SimpleQueue()  # (engine id, epoch, event) from the engine thread
        self._wakeup = Wakeup()
        self._stopping = False
        self._started = time.monotonic()
        self._counts = {"requests": 0, "errors": 0, "reclaimed": 0, "unauthorized": 0, "dropped": 0}
        self._handlers = {P.SessionOpen: self._open, P.AudioAppend: self._append, P.AudioCommit: self._commit,
                          P.ResponseCancel: self._cancel, P.SessionClose: self._close_req, P.Ping: self._ping,
                          P.StatusRequest: self._status, P.ConversationTruncate: self._truncate}
        self.endpoint = cfg.bind

    # -- called from other threads --------------------------------------------------------------------------
    def on_event(self, sid: str, ev: object) -> None:
        """Engine thread: tag the event with the session's epoch and wake the loop. Never blocks."""
        s = self.sessions.get(sid)
        self.events.put((sid, s.epoch if s is not None else -1, ev))
        self._wake()

    def stop(self) -> None:
        """From a signal handler or another thread: finish the loop at its next wake-up."""
        self._stopping = True
        self._wake()

    def _wake(self) -> None:
        self._wakeup.wake()

    # -- the loop --------------------------------------------------------------------------------------------
    def bind(self) -> str:
        """Bind the front door; returns the endpoint (with the real port when the bind asked for port 0)."""
        self.ctx = zmq.Context()
        sock = self.sock = router_socket(self.ctx, self.cfg)
        self._auth = None
        if self.cfg.curve_secret_file is not None:
            self._auth = curve_server(self.ctx, sock, self.cfg)
        self.endpoint = bind_router(sock, self.cfg.bind)
        return self.endpoint

    def run(self, engine) -> None:
        """Serve until stop(); then end every reply in flight, stop the engine and close the socket."""
        self.engine, self.sample_rate = engine, int(engine.sample_rate)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._wakeup.fd, zmq.POLLIN)
        next_tick = time.monotonic()
        while not self._stopping:
            ready = dict(poller.poll(timeout=250))
            # 1. requests: a bounded batch, so a flood cannot starve the engine's events
            if self.sock in ready:
                for _ in range(256):
                    frames = recv_request(self.sock)
                    if frames is None:
                        break
                    self._request(frames)
            # 2. engine events
            if self._wakeup.fd in ready:
                self._wakeup.drain()
            self._forward_events()
            # 3. housekeeping: reclaim vanished clients, probe idle ones, close idle sessions
            now = time.monotonic()
            if now >= next_tick:
                self._housekeeping(now)
                next_tick = now + 0.5
        self._shutdown()

    def _shutdown(self) -> None:
        log.info("shutting down: %d sessions, %d replies in flight", len(self.sessions),
                 sum(s.turn >= 0 for s in self.sessions.values()))
        if self.engine is not None:
            self.engine.stop()  # replies in flight get ErrorEvent(code="shutdown") through on_event
        self._forward_events()
        for s in list(self.sessions.values()):
            if s.turn >= 0:  # the engine ended it without an event: still give the client a final one
                self._send(s.client, P.ServerError(s.name, "shutdown", "the daemon is shutting down", "", s.turn))
            self._send(s.client, P.SessionClosed(s.name, "shutdown"))
        if self.sessions:
            # Seen on a loaded machine: final events sent just before the close never reached the client. Give the
            # peers' I/O a moment to take them before the connection goes.
            time.sleep(0.3)
        self.sessions.clear()
        self.close()

    def close(self) -> None:
        """Close the socket (final events get up to 5 s to leave: on a loaded machine the I/O thread may wait for
        the CPU that long), the authenticator and the wake-up pipe."""
        if getattr(self, "sock", None) is not None and not self.sock.closed:
            self.sock.close(linger=5000)
        if getattr(self, "_auth", None) is not None:
            self._auth.stop()
            self._auth = None
        if getattr(self, "ctx", None) is not None:
            self.ctx.term()
            self.ctx = None
        self._wakeup.close()

    # -- requests ----------------------------------------------------------------------------------------------
    def _request(self, frames: list) -> None:
        identity, body = frames[0].bytes, frames[1:]
        client = self.clients.get(identity)
        if client is None:
            client = self.clients[identity] = ClientState(identity)
        client.last_seen = time.monotonic()
        if client.unreachable_since is not None:
            # A request proves that the client sends, not that it reads: one whose queue was full stays
            # unreachable (its requests dropped unanswered, its sessions reclaimed on time) until its queue
            # takes a message again.
            if client.not_reading and not self._writable(client):
                self._counts["dropped"] += 1
                try:
                    self._lose_audio(client, P.decode(body), "an audio.append sent while this client did not read "
                                                             "was dropped")
                except ProtocolError:
                    pass
                except Exception:  # a bug here must cost this request, never the daemon
                    log.exception("dropping a request of an unreachable client failed")
                return
            self._came_back(client)
        self._counts["requests"] += 1
        msg, in_reply_to, sid = None, "", ""
        try:
            try:
                msg, bad = P.decode(body), None  # zero-copy: cheap even for a large request
            except ProtocolError as e:
                bad = str(e)
            in_reply_to = getattr(msg, "TYPE", "")
            sid = getattr(msg, "session_id", "")
            if not isinstance(sid, str) or not P.SESSION_ID.fullmatch(sid):
                sid = ""  # the error reply names the session only when it is one a client could have opened
            size = sum(len(f) for f in body)
            if size > self.cfg.max_frame_bytes:
                self._lose_audio(client, msg, f"an audio.append of {size} bytes was refused (too_large)")
                raise RequestError("too_large", f"request of {size} bytes exceeds the {self.cfg.max_frame_bytes}-"
                                                f"byte limit; send audio in smaller audio.append chunks")
            if bad is not None:
                raise RequestError("bad_message", bad)
            handler = self._handlers.get(type(msg))
            if handler is None:
                raise RequestError("bad_message", f"{in_reply_to or type(msg).__name__} is not a request")
            handler(client, msg)
        except RequestError as e:
            self._error(client, sid, e.code, e.message, in_reply_to)
        except Exception as e:  # an engine refusal (EngineError) or a bug: an error reply, never a dead daemon
            code = getattr(e, "code", None)
            if not isinstance(code, str):
                log.exception("request %s failed", in_reply_to or "?")
                code = "internal"
            self._error(client, sid, code, str(e) or type(e).__name__, in_reply_to)
        if not client.sessions and client.identity in self.clients and client.unreachable_since is None:
            del self.clients[client.identity]  # no state worth keeping (pings, status, refused opens)

    def _error(self, client: ClientState, sid: str, code: str, message: str, in_reply_to: str, turn: int = -1) -> bool:
        self._counts["errors"] += 1
        return self._send(client, P.ServerError(sid, code, message[:2000], in_reply_to, turn))

    def _came_back(self, client: ClientState) -> None:
        """An unreachable client reconnected (or read its backlog) in time: tell it what it missed."""
        client.unreachable_since, client.not_reading = None, False
        for s in client.sessions.values():
            if s.lost_turn >= 0:
                self._error(client, s.name, "reply_lost", "the reply was cancelled while this client was "
                            "unreachable", "", s.lost_turn)
                s.lost_turn = -1

    def _lose_audio(self, client: ClientState, msg: object, why: str) -> None:
        """An audio.append that never reaches its turn: that turn's commit is refused (audio_lost), as for an
        append the checks refuse, rather than answering the turn without it."""
        s = client.sessions.get(msg.session_id) if isinstance(msg, P.AudioAppend) else None
        if s is not None:
            s.refuse("audio_lost", why)

    def _session(self, client: ClientState, name: str) -> SessionState:
        s = client.sessions.get(name)
        if s is None:
            raise RequestError("unknown_session", f"no open session {name[:64]!r} on this connection")
        s.last_active = time.monotonic()
        return s

    def _open(self, client: ClientState, m: P.SessionOpen) -> None:
        if not authorized(self.cfg.token, m.token):
            self._counts["unauthorized"] += 1
            if self._counts["unauthorized"] in (1, 10, 100) or self._counts["unauthorized"] % 1000 == 0:
                log.warning("session.open with a wrong token from client %s (%d refused so far)",
                            client.identity.hex()[:8], self._counts["unauthorized"])
            raise RequestError("unauthorized", "wrong or missing token (see the daemon's --token-file)")
        if not P.SESSION_ID.fullmatch(m.session_id):
            raise RequestError("bad_value", "session_id must be 1-64 characters of A-Z a-z 0-9 _ . : -")
        if m.session_id in client.sessions:
            raise RequestError("session_exists", f"session {m.session_id!r} is already open on this connection")
        if len(client.sessions) >= self.cfg.max_sessions_per_client:
            raise RequestError("too_many_sessions", f"a connection may hold {self.cfg.max_sessions_per_client} "
                                                    f"sessions; close one first")
        options = session_options(m, self.cfg)
        sid = uuid.uuid4().hex
        s = SessionState(sid, m.session_id, client, m.mode, m.audio_format)
        self.engine.open(sid, options)  # EngineError: too_many_sessions, unknown_voice, ...
        s.last_active = time.monotonic()  # idle from when it exists, not from before the workers acknowledged it
        self.sessions[sid] = s
        client.sessions[m.session_id] = s
        log.info("session %s opened (client %s, %s, %s)", m.session_id, client.identity.hex()[:8], m.mode, m.voice)
        self._send(client, P.SessionOpened(m.session_id, self.sample_rate, m.voice, m.mode, m.audio_format,
                                           self.cfg.stream_params, self.cfg.max_turn_seconds))

    def _append(self, client: ClientState, m: P.AudioAppend) -> None:
        s = self._session(client, m.session_id)
        try:
            seconds = check_audio(m)
            if s.pending_seconds + seconds > self.cfg.max_turn_seconds:
                raise RequestError("too_long", f"the turn would hold {s.pending_seconds + seconds:.1f} s of audio, "
                                               f"more than {self.cfg.max_turn_seconds:g} s: commit before that")
            self.engine.append(s.sid, m.audio, m.sample_rate)  # EngineError bad_audio (NaN, unscaled floats, ...)
        except Exception as e:  # RequestError, or the engine's refusal (EngineError, with a code too)
            # The turn now misses a piece: its commit is refused too, rather than answering what is left of it.
            s.refuse(getattr(e, "code", "internal"), str(e))
            raise
        s.pending_seconds += seconds

    def _commit(self, client: ClientState, m: P.AudioCommit) -> None:
        s = self._session(client, m.session_id)
        if s.turn >= 0:
            raise RequestError("busy", "a reply is in flight: response.cancel it or wait for response.done")
        if s.refused:
            (code, why), s.refused, s.pending_seconds = s.refused, None, 0.0
            self.engine.discard_input(s.sid)
            raise RequestError(code, f"the turn is dropped whole: one of its audio.append was refused ({why}); "
                                     f"append it again and commit")
        if s.pending_seconds <= 0:
            raise RequestError("bad_audio", "nothing to commit: send audio.append first")
        seconds, s.pending_seconds = s.pending_seconds, 0.0  # the engine empties its buffer, even when refusing
        turn = self.engine.commit(s.sid)
        s.reset_reply(turn)
        self._send(client, P.AudioCommitted(s.name, turn, seconds))

    def _cancel(self, client: ClientState, m: P.ResponseCancel) -> None:
        s = self._session(client, m.session_id)
        if s.turn < 0:
            raise RequestError("no_response", "no reply in flight to cancel")
        self._end_reply(s, "cancelled", finished_stands=True)

    def _truncate(self, client: ClientState, m: P.ConversationTruncate) -> None:
        s = self._session(client, m.session_id)
        kept = self.engine.truncate(s.sid, m.turn, m.tokens)
        self._send(client, P.ConversationTruncated(s.name, m.turn, kept))

    def _close_req(self, client: ClientState, m: P.SessionClose) -> None:
        self._close(self._session(client, m.session_id), "closed")

    def _ping(self, client: ClientState, m: P.Ping) -> None:
        self._send(client, P.Pong(m.nonce, time.time()))

    def _status(self, client: ClientState, m: P.StatusRequest) -> None:
        if not authorized(self.cfg.token, m.token):
            raise RequestError("unauthorized", "wrong or missing token (see the daemon's --token-file)")
        st = dict(self.engine.status())
        st["server"] = {"endpoint": self.endpoint, "clients": len(self.clients), "sessions": len(self.sessions),
                        "replies_in_flight": sum(s.turn >= 0 for s in self.sessions.values()),
                        "uptime_s": round(time.monotonic() - self._started, 1), **self._counts}
        self._send(client, P.StatusReply(m.nonce, json.dumps(st, default=str)))

    # -- engine events -> clients ------------------------------------------------------------------------------
    def _forward_events(self) -> None:
        while True:
            try:
                sid, epoch, ev = self.events.get_nowait()
            except queue.Empty:
                return
            s = self.sessions.get(sid)
            if s is None or epoch != s.epoch or s.turn < 0:
                continue  # the session is gone or the reply was cancelled: the event is stale
            self._forward(s, ev)

    def _forward(self, s: SessionState, ev: object) -> None:
        streaming = s.mode == "streaming"
        if isinstance(ev, TextDelta):
            s.text.append(ev.text)
            s.token_ids.append(ev.token_id)
            if streaming:
                self._send(s.client, P.ResponseTextDelta(s.name, s.turn, ev.text, ev.token_id, ev.t))
        elif isinstance(ev, UnitChunk):
            s.units.extend(ev.units)
            if streaming:
                self._send(s.client, P.ResponseUnitsDelta(s.name, s.turn, list(ev.units), ev.final, ev.t))
        elif isinstance(ev, AudioDelta):
            if streaming:
                self._send(s.client, P.ResponseAudioDelta(s.name, s.turn, to_wire_audio(ev.pcm, s.audio_format),
                                                          ev.sample_rate, ev.final, ev.t))
            else:
                s.pcm.append(np.asarray(ev.pcm, np.float32))
        elif isinstance(ev, TurnDone):
            if not streaming:  # offline: the whole reply at once, then done
                t = ev.t
                self._send(s.client, P.ResponseTextDelta(s.name, s.turn, ev.text, -1, t))
                self._send(s.client, P.ResponseUnitsDelta(s.name, s.turn, list(ev.units), True, t))
                pcm = np.concatenate(s.pcm) if s.pcm else np.zeros(0, np.float32)
                self._send(s.client, P.ResponseAudioDelta(s.name, s.turn, to_wire_audio(pcm, s.audio_format),
                                                          self.sample_rate, True, t))
            timings = {k: float(v) for k, v in ev.timings.items()}
            self._send(s.client, P.ResponseTiming(s.name, s.turn, timings))
            self._send(s.client, P.ResponseDone(s.name, s.turn, ev.text, list(ev.token_ids), list(ev.units),
                                                ev.finish_reason, timings))
            s.turn = -1
            s.last_active = time.monotonic()
        elif isinstance(ev, ErrorEvent):
            turn, s.turn = s.turn, -1
            s.last_active, s.pcm = time.monotonic(), []
            if not self._error(s.client, s.name, ev.code, ev.message, "audio.commit", turn):
                s.lost_turn = turn  # the client missed how its reply ended: told if it comes back (reply_lost)

    def _end_reply(self, s: SessionState, reason: str, finished_stands: bool = False) -> None:
        """Cancel the reply in flight and give the client its final event (what it got so far). With
        `finished_stands` (a client's cancel), a reply the engine has just finished — its TurnDone queued here, the
        turn in the conversation — is not called cancelled: its own response.done, on its way, ends it."""
        in_flight = self.engine.cancel(s.sid)  # also drops audio appended since the commit (a barge-in starts afresh)
        s.pending_seconds, s.refused = 0.0, None
        if not in_flight and finished_stands:
            return
        s.pcm = []
        s.epoch += 1  # after cancel returns no event of that reply is produced; queued ones are now stale
        turn, s.turn = s.turn, -1
        if not self._send(s.client, P.ResponseDone(s.name, turn, "".join(s.text), s.token_ids, s.units, reason, {})):
            s.lost_turn = turn

    def _close(self, s: SessionState, reason: str, notify: bool = True) -> None:
        if s.turn >= 0:
            if notify:
                self._end_reply(s, "cancelled")
            else:
                self.engine.cancel(s.sid)
        s.epoch += 1
        self.engine.close(s.sid)
        self.sessions.pop(s.sid, None)
        s.client.sessions.pop(s.name, None)
        log.info("session %s closed (%s)", s.name, reason)
        if notify:
            self._send(s.client, P.SessionClosed(s.name, reason))

    # -- sending and housekeeping --------------------------------------------------------------------------
    def _send(self, client: ClientState, msg: object) -> bool:
        if client.unreachable_since is not None:
            return False
        try:
            self.sock.send_multipart([client.identity, *P.encode(msg)], zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            # Gone (EHOSTUNREACH) or not reading (EAGAIN: its queue is full). Its replies cannot be delivered:
            # stop computing them now; the sessions themselves wait `reclaim_s` for a reconnect.
            why = "disconnected" if e.errno == zmq.EHOSTUNREACH else "not reading"
            log.warning("client %s %s: cancelling its replies, sessions reclaimed in %g s",
                        client.identity.hex()[:8], why, self.cfg.reclaim_s)
            client.unreachable_since, client.not_reading = time.monotonic(), e.errno == zmq.EAGAIN
            for s in client.sessions.values():
                if s.turn >= 0:
                    self.engine.cancel(s.sid)  # which drops the audio appended for the next turn too
                    s.epoch += 1
                    s.lost_turn, s.turn, s.pcm = s.turn, -1, []
                    if s.pending_seconds > 0:
                        s.refuse("audio_lost", "audio appended during the reply was dropped with it while this "
                                               "client was unreachable")
            if not client.sessions:
                self.clients.pop(client.identity, None)
            return False
        client.last_sent = time.monotonic()
        return True

    def _writable(self, client: ClientState) -> bool:
        """Whether a message to `client` would be queued now (a probe it ignores: pong with nonce -1)."""
        try:
            self.sock.send_multipart([client.identity, *P.encode(P.Pong(-1, time.time()))], zmq.NOBLOCK,
                                     copy=False)
        except zmq.ZMQError as e:
            if e.errno not in (zmq.EHOSTUNREACH, zmq.EAGAIN):
                raise
            return False
        client.last_sent = time.monotonic()
        return True

    def _housekeeping(self, now: float) -> None:
        for client in list(self.clients.values()):
            if client.unreachable_since is not None and now - client.last_probe >= PROBE_UNREACHABLE_S:
                # One that reconnected only to listen (a reply it was reading) sends nothing that would show it:
                # ask its socket.
                client.last_probe = now
                if self._writable(client):
                    self._came_back(client)
            if client.unreachable_since is not None:
                if now - client.unreachable_since >= self.cfg.reclaim_s:
                    for s in list(client.sessions.values()):
                        self._close(s, "reclaimed: the client vanished", notify=False)
                        self._counts["reclaimed"] += 1
                    self.clients.pop(client.identity, None)
            elif client.sessions and now - max(client.last_seen, client.last_sent) >= self.cfg.probe_s:
                self._send(client, P.Pong(-1, time.time()))  # fails with EHOSTUNREACH if it has gone
        for s in list(self.sessions.values()):
            if s.turn < 0 and now - max(s.last_active, s.client.last_seen) >= self.cfg.idle_timeout_s:
                self._close(s, "idle")
                if not s.client.sessions and s.client.unreachable_since is None:
                    self.clients.pop(s.client.identity, None)


# -- the socket ---------------------------------------------------------------------------------------------------
PROBE_UNREACHABLE_S = 0.5  # how often an unreachable client's socket is asked whether it takes messages again
MAX_FRAMES = 8  # identity + kind + body + tensors: no request has more than 4


def router_socket(ctx: zmq.Context, cfg: ServerConfig) -> zmq.Socket:
    """A ROUTER with the options the server relies on (not yet bound)."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer raises EHOSTUNREACH, not a drop
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client reconnecting under its routing id takes it over
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * cfg.max_frame_bytes)  # far bigger frames: drop the peer unread
    sock.setsockopt(zmq.SNDHWM, cfg.send_hwm)
    # A fixed kernel send buffer per connection (autotuning grows it to 4 MB): what a client that stops reading
    # can make us hold is send_hwm events plus this, and it fills soon enough for the client to be found out.
    # 256 KB is 5 s of PCM16 audio, ample for any link our streams need.
    sock.setsockopt(zmq.SNDBUF, 256 << 10)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)  # ZMTP pings: a peer that went silent (cable, crash) is dropped
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
    sock.setsockopt(zmq.LINGER, 1000)
    return sock


def curve_server(ctx: zmq.Context, sock: zmq.Socket, cfg: ServerConfig):
    """Make `sock` a CURVE server with --curve-secret-file; with --curve-clients also start the ZAP
    authenticator and return it (the caller stops it), else None."""
    import zmq.auth
    import zmq.auth.thread

    try:
        public, secret = zmq.auth.load_certificate(cfg.curve_secret_file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read --curve-secret-file {cfg.curve_secret_file}: {e}") from e
    if not secret:
        raise ConfigError(f"{cfg.curve_secret_file} holds no secret key (pass the .key_secret file)")
    auth = None
    if cfg.curve_clients is not None:
        # ZAP: the handshake of a client whose public key is not in the directory fails; it never reaches us
        auth = zmq.auth.thread.ThreadAuthenticator(ctx)
        try:
            auth.start()
            auth.configure_curve(domain="*", location=cfg.curve_clients)
        except BaseException:
            auth.stop()  # the caller never sees it: stop it here, or the context could not terminate
            raise
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    return auth


def bind_router(sock: zmq.Socket, endpoint: str) -> str:
    """Bind; returns the endpoint (with the real port when the bind asked for port 0)."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        endpoint = endpoint[:-2] + ":*"  # port 0 = any free port, as with sockets
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def recv_request(sock: zmq.Socket) -> list | None:
    """One request's frames, or None when none is waiting. Like recv_multipart, but a request of more than
    MAX_FRAMES frames keeps only its first ones (enough to be answered with an error): a message of a million
    empty frames must not become a million Python objects."""
    try:
        frames = [sock.recv(zmq.NOBLOCK, copy=False)]
    except zmq.Again:
        return None
    while sock.getsockopt(zmq.RCVMORE):
        f = sock.recv(copy=False)  # the rest of a message has arrived with its first frame
        if len(frames) <= MAX_FRAMES:
            frames.append(f)
    return frames
