"""`serve --realtime HOST:PORT`: an OpenAI Realtime-compatible WebSocket endpoint beside the ZMQ front door.

One WebSocket connection is one engine session. The endpoint is a client of the daemon's own front door (an
AsyncClient on the ZMQ address, with the daemon's token), so sessions opened here obey the same limits, share the
same engine and fail with the same error codes as those of `chat` or the Python client. It runs in a thread of
the daemon with its own asyncio loop; `websockets` does the HTTP upgrade and the framing.

Wire format: JSON events, audio as base64 PCM16 little-endian; input at `audio.input.format.rate` (24 kHz by
default, as the API; 16 kHz and other rates are resampled by the engine), output at 24 kHz. The subset of the API
we implement, and what we add, is in docs/REALTIME.md. Turn detection: `server_vad` (serve/vad.py) commits a turn
after `silence_duration_ms` of silence and answers it; speech that starts while a reply plays cancels the reply
in every stage (barge-in).
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass
from http import HTTPStatus
from importlib import resources

import numpy as np
import soxr
from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from omni2.engine.client import AsyncClient, ClientError, RemoteError
from omni2.engine.config import RealtimeConfig, StreamParams
from omni2.engine.serve.sessions import authorized
from omni2.engine.serve.vad import VAD_RATE, SileroVAD, TurnDetector, VADSettings
from omni2.engine.wire import protocol as P

log = logging.getLogger("omni2.realtime")

PATH = "/v1/realtime"
BROWSER_KEY_PREFIX = "openai-insecure-api-key."  # how browsers pass a key: as a WebSocket subprotocol
# A client that says `OpenAI-Beta: realtime=v1` (the SDKs' beta namespace) gets the beta names of these events;
# the client events had the same names in both.
BETA_NAMES = {
    "response.output_audio.delta": "response.audio.delta", "response.output_audio.done": "response.audio.done",
    "response.output_audio_transcript.delta": "response.audio_transcript.delta",
    "response.output_audio_transcript.done": "response.audio_transcript.done",
    "response.output_text.delta": "response.text.delta", "response.output_text.done": "response.text.done",
}
MIN_RATE, MAX_RATE = 8000, 48000
MAX_PENDING_TURNS = 8  # committed user turns waiting for an answer (each up to 30 s of audio)


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:20]}"


class RealtimeServer:
    """The endpoint's lifetime: start() binds (the port is known when it returns) and serves in a thread;
    stop() closes every connection (their engine sessions close too) and the listening socket."""

    def __init__(self, cfg: RealtimeConfig, front_door: str, token: str | None, max_turn_seconds: float):
        self.cfg, self.front_door, self.token, self.max_turn_seconds = cfg, front_door, token, max_turn_seconds
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.server = None
        self.url = ""
        self.connections: set[Connection] = set()

    def start(self) -> str:
        logging.getLogger("websockets").setLevel(logging.WARNING)  # not a line per connection and handshake
        try:  # server VAD must work before anyone connects: a missing package fails `serve`, not each connection
            SileroVAD()
        except ImportError as e:
            raise RuntimeError(f"server VAD needs onnxruntime (pip install 'omni2-engine[realtime]'): {e}") from None
        ready: dict = {}
        started = threading.Event()

        def main() -> None:
            self.loop = asyncio.new_event_loop()
            try:
                self.loop.run_until_complete(self._bind(ready))
            except BaseException as e:  # a taken port: reported to start()
                ready["error"] = e
                started.set()
                return
            started.set()
            self.loop.run_forever()
            self.loop.run_until_complete(self._close())
            self.loop.close()

        self.thread = threading.Thread(target=main, name="realtime", daemon=True)
        self.thread.start()
        started.wait()
        if "error" in ready:
            raise ready["error"]
        return self.url

    async def _bind(self, ready: dict) -> None:
        self.server = await serve(self._handle, self.cfg.host, self.cfg.port, process_request=self._http,
                                  select_subprotocol=select_subprotocol, max_size=self.cfg.max_message_bytes,
                                  max_queue=4, compression=None, ping_interval=20, ping_timeout=20)
        host, port = self.server.sockets[0].getsockname()[:2]
        self.url = f"ws://{self.cfg.host}:{port}{PATH}"

    async def _close(self) -> None:
        for c in list(self.connections):
            await c.ws.close(1001, "the daemon is shutting down")
        self.server.close()
        await self.server.wait_closed()

    def stop(self) -> None:
        if self.loop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self.loop.stop)
        if self.thread is not None:
            self.thread.join(timeout=10)

    # -- HTTP: the upgrade's auth, and the demo page -------------------------------------------------------------
    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.split("?", 1)[0]
        if path == PATH:
            if not authorized(self.token, presented_token(request.headers) or ""):  # constant time, as the ZMQ door
                log.warning("realtime: refused a connection from %s: missing or wrong token",
                            connection.remote_address)
                return connection.respond(HTTPStatus.UNAUTHORIZED, "missing or wrong token: send "
                                          "'Authorization: Bearer TOKEN'\n")
            return None
        if self.cfg.demo and path in ("/", "/index.html", "/worklet.js"):
            name = "worklet.js" if path == "/worklet.js" else "index.html"
            body = (resources.files("omni2.engine.serve") / "demo" / name).read_bytes()
            kind = "text/javascript" if name.endswith(".js") else "text/html; charset=utf-8"
            return Response(200, "OK", Headers([("Content-Type", kind), ("Content-Length", str(len(body))),
                                                ("Cache-Control", "no-store")]), body)
        return connection.respond(HTTPStatus.NOT_FOUND, f"not found; the Realtime endpoint is {PATH}\n")

    async def _handle(self, ws: ServerConnection) -> None:
        c = Connection(self, ws)
        self.connections.add(c)
        try:
            await c.run()
        finally:
            self.connections.discard(c)


def presented_token(headers: Headers) -> str | None:
    auth = headers.get("Authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    for proto in ",".join(headers.get_all("Sec-WebSocket-Protocol")).split(","):
        proto = proto.strip()
        if proto.startswith(BROWSER_KEY_PREFIX):
            return proto[len(BROWSER_KEY_PREFIX):]
    return None


def select_subprotocol(connection: ServerConnection, subprotocols) -> str | None:
    # A browser that offers subprotocols (the key among them) fails the connection unless one is picked.
    return "realtime" if "realtime" in subprotocols else None


@dataclass
class Heard:
    """A finished reply, as conversation.item.truncate needs it: its engine turn, text tokens, units and audio."""

    turn: int
    tokens: int
    units: int
    audio_ms: int


class SessionLost(Exception):
    """The connection has no engine session any more: it is closed (code 1011)."""


class EventError(Exception):
    """A client event we refuse: becomes an `error` event; the connection goes on."""

    def __init__(self, code: str, message: str, param: str | None = None):
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


class Connection:
    """One WebSocket client and its engine session."""

    def __init__(self, server: RealtimeServer, ws: ServerConnection):
        self.server, self.ws, self.cfg = server, ws, server.cfg
        self.session_id = new_id("sess")
        self.beta = "realtime=v1" in (ws.request.headers.get("OpenAI-Beta") or "")
        self.voice = "default"
        self.vad: VADSettings | None = VADSettings()
        self.text_only = False
        self.input_rate = self.cfg.input_rate
        self.client: AsyncClient | None = None
        self.session = None  # the engine session (AsyncSession)
        self.out_rate = self.cfg.output_rate
        # The input buffer: PCM16 at input_rate since the last commit, and where it starts in the input stream.
        self.buffer: list[np.ndarray] = []
        self.buffer_start = 0  # input samples before the buffer
        self.buffered = 0
        self.detector: TurnDetector | None = None
        self.to_vad = None  # input_rate -> 16 kHz, streaming
        self.speech_start_ms: int | None = None
        self.pending_item = ""  # the item id speech_started announced
        self.committed: list[tuple[str, np.ndarray, int]] = []  # (item id, PCM16, rate) not yet answered
        self.last_item: str | None = None
        self.response: Reply | None = None
        self.answered: dict[str, Heard] = {}  # assistant items of finished replies: what a truncate may cut
        self.replies: asyncio.Task | None = None
        self.send_lock = asyncio.Lock()

    # -- lifetime ------------------------------------------------------------------------------------------------
    async def run(self) -> None:
        try:
            await self._open_engine_session()
        except Exception as e:  # an engine refusal, or anything after the session opened: close what was opened
            if not isinstance(e, ClientError):
                log.exception("realtime: %s could not start", self.session_id)
            code = e.code if isinstance(e, RemoteError) else ("engine_unavailable" if isinstance(e, ClientError)
                                                                else "server_error")
            await self.error(code, str(e) or type(e).__name__, kind="server_error")
            await self._close_engine_session()  # the engine session, if it opened; the client's socket and reader
            await self.ws.close(1011, "no engine session")
            return
        log.info("realtime: %s connected (%s)", self.session_id, self.ws.remote_address)
        await self.emit({"type": "session.created", "session": self.describe()})
        try:
            async for message in self.ws:
                await self.on_message(message)
        except ConnectionClosed:
            pass
        finally:
            await self._close_engine_session()
            log.info("realtime: %s disconnected", self.session_id)

    async def _open_engine_session(self) -> None:
        self.client = AsyncClient(self.server.front_door, token=self.server.token or "", timeout=120.0)
        self.session = await self.client.open(self.session_id, voice=self.voice)
        self.stream = StreamParams.parse(self.session.info.stream_params)
        if self.session.sample_rate != self.out_rate:
            log.info("realtime: the vocoder speaks at %d Hz; output resampled to %d Hz", self.session.sample_rate,
                     self.out_rate)
        self.restart_detection()

    async def _close_engine_session(self) -> None:
        if self.response is not None and self.replies is not None:
            self.replies.cancel()
        if self.client is not None:
            try:
                if self.session is not None:
                    await self.session.close(timeout=5.0)
            except ClientError:
                pass
            await self.client.close()

    # -- sending -------------------------------------------------------------------------------------------------
    async def emit(self, event: dict) -> None:
        event = {"event_id": new_id("event"), **event}
        if self.beta and event["type"] in BETA_NAMES:
            event["type"] = BETA_NAMES[event["type"]]
        async with self.send_lock:
            try:
                await self.ws.send(json.dumps(event))
            except ConnectionClosed:
                pass

    async def error(self, code: str, message: str, *, kind: str = "invalid_request_error", param=None,
                    event_id: str | None = None) -> None:
        await self.emit({"type": "error", "error": {"type": kind, "code": code, "message": message, "param": param,
                                                    "event_id": event_id}})

    def describe(self) -> dict:
        """The session as the GA API describes it (what session.created / session.updated carry)."""
        detection = self.vad.to_json() if self.vad is not None else None
        modalities = ["text"] if self.text_only else ["audio"]
        session = {"type": "realtime", "object": "realtime.session", "id": self.session_id, "model": "omni2",
                   "output_modalities": modalities,
                   "audio": {"input": {"format": {"type": "audio/pcm", "rate": self.input_rate},
                                       "turn_detection": detection},
                             "output": {"format": {"type": "audio/pcm", "rate": self.out_rate},
                                        "voice": self.voice}},
                   "instructions": "", "tools": [], "tool_choice": "none"}
        if self.beta:  # the beta session's flat fields
            session.update(modalities=["text"] if self.text_only else ["audio", "text"], voice=self.voice,
                           turn_detection=detection, input_audio_format="pcm16", output_audio_format="pcm16")
        return session

    # -- receiving -----------------------------------------------------------------------------------------------
    async def on_message(self, message) -> None:
        event_id = None
        try:
            if isinstance(message, bytes):
                raise EventError("invalid_event", "binary messages are not events: send JSON text")
            try:
                event = json.loads(message)
            except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than the parser goes
                raise EventError("invalid_json", f"the message is not JSON: {e}") from None
            if not isinstance(event, dict) or not isinstance(event.get("type"), str):
                raise EventError("invalid_event", "an event is a JSON object with a string 'type'", "type")
            event_id = event.get("event_id") if isinstance(event.get("event_id"), str) else None
            handler = HANDLERS.get(event["type"])
            if handler is None:
                raise EventError("unknown_event_type", f"unknown or unsupported event type {event['type']!r} "
                                 f"(supported: {', '.join(sorted(HANDLERS))})", "type")
            await handler(self, event)
        except EventError as e:
            await self.error(e.code, e.message, param=e.param, event_id=event_id)
        except RemoteError as e:
            await self.error(e.code, e.message, kind="server_error", event_id=event_id)
        except ClientError as e:
            await self.error("engine_unavailable", str(e), kind="server_error", event_id=event_id)
        except SessionLost as e:
            self.session = None
            await self.error("engine_unavailable", str(e), kind="server_error", event_id=event_id)
            await self.ws.close(1011, "no engine session")

    async def session_update(self, event: dict) -> None:
        s = event.get("session")
        if not isinstance(s, dict):
            raise EventError("invalid_value", "session.update needs a 'session' object", "session")
        audio = s.get("audio") if isinstance(s.get("audio"), dict) else {}
        a_in = audio.get("input") if isinstance(audio.get("input"), dict) else {}
        a_out = audio.get("output") if isinstance(audio.get("output"), dict) else {}
        # Validate everything before changing anything: a refused update changes nothing.
        rate = self.input_rate
        fmt = a_in.get("format", s.get("input_audio_format"))
        if fmt is not None:
            rate = input_rate(fmt)
        out_fmt = a_out.get("format", s.get("output_audio_format"))
        if out_fmt is not None and output_rate(out_fmt) != self.out_rate:
            raise EventError("invalid_value", f"output audio is PCM16 at {self.out_rate} Hz only", "audio.output")
        detection = self.vad
        if "turn_detection" in a_in or "turn_detection" in s:
            td = a_in["turn_detection"] if "turn_detection" in a_in else s["turn_detection"]
            if td is None or (isinstance(td, dict) and td.get("type") == "none"):
                detection = None
            elif isinstance(td, dict) and td.get("type", "server_vad") == "server_vad":
                try:
                    detection = VADSettings.from_json(td)
                except ValueError as e:
                    raise EventError("invalid_value", str(e), "turn_detection") from None
            else:
                raise EventError("invalid_value", "turn_detection.type must be server_vad (or null for none)",
                                 "turn_detection")
        modalities = s.get("output_modalities", s.get("modalities"))
        text_only = self.text_only
        if modalities is not None:
            if (not isinstance(modalities, list) or not modalities or not all(isinstance(m, str) for m in modalities)
                    or not set(modalities) <= {"audio", "text"}):
                raise EventError("invalid_value", "output_modalities must be ['audio'] or ['text']",
                                 "output_modalities")
            text_only = "audio" not in modalities
        voice = a_out.get("voice", s.get("voice", self.voice))
        if not isinstance(voice, str):
            raise EventError("invalid_value", "voice must be a string", "voice")
        if voice != self.voice and (self.response is not None or self.last_item is not None):
            raise EventError("invalid_value", "the voice can change only before the first turn", "voice")
        if rate != self.input_rate and self.buffered:
            raise EventError("invalid_value", "the input rate can change only while the input buffer is empty",
                             "audio.input.format")
        if voice != self.voice:  # the engine is the one to know the voice: an unknown one leaves the old in place
            await self.reopen(voice)
        if s.get("instructions"):
            log.warning("realtime: %s: instructions are ignored (LLaMA-Omni2 has no system prompt)",
                        self.session_id)
        restart = detection != self.vad or rate != self.input_rate  # the same settings again: a turn goes on
        # The buffer is empty here if the rate changes: only where the stream stands moves to the new rate.
        self.buffer_start = self.buffer_start * rate // self.input_rate
        self.input_rate, self.text_only, self.vad = rate, text_only, detection
        if restart:
            self.restart_detection()
        await self.emit({"type": "session.updated", "session": self.describe()})

    async def append(self, event: dict) -> None:
        audio = event.get("audio")
        if not isinstance(audio, str):
            raise EventError("invalid_value", "input_audio_buffer.append needs 'audio': base64 PCM16", "audio")
        if len(audio) > self.cfg.max_append_bytes:
            raise EventError("input_audio_buffer_append_too_large", f"one append holds at most "
                             f"{self.cfg.max_append_bytes} bytes of base64 audio, got {len(audio)}: split it",
                             "audio")
        try:
            raw = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise EventError("invalid_value", "'audio' is not valid base64", "audio") from None
        if not raw:
            raise EventError("invalid_value", "'audio' is empty", "audio")
        if len(raw) % 2:
            raise EventError("invalid_value", "PCM16 audio has an even number of bytes", "audio")
        pcm = np.frombuffer(raw, "<i2").astype(np.int16)
        limit = int(self.server.max_turn_seconds * self.input_rate)
        if self.detector is None and self.buffered + pcm.size > limit:
            raise EventError("input_audio_buffer_full", f"the input buffer holds at most "
                             f"{self.server.max_turn_seconds:g} s of audio (one turn); commit or clear it first",
                             "audio")
        if self.detector is None:
            self.buffer.append(pcm)
            self.buffered += pcm.size
            return
        # Half a second at a time: a turn that reaches the engine's 30 s is committed at its cap and the speech
        # after it starts the next turn, also inside one long append; and other connections run in between.
        step = self.input_rate // 2
        for i in range(0, pcm.size, step):
            piece = pcm[i:i + step]
            self.buffer.append(piece)
            self.buffered += piece.size
            await self.detect(piece)
            if i + step < pcm.size:
                await asyncio.sleep(0)

    async def reopen(self, voice: str) -> None:
        """The engine session again, with another voice; an unknown voice reopens the old one and raises. A
        connection left without an engine session is of no use: it is closed (SessionLost)."""
        try:
            await self.session.close(timeout=10.0)
        except ClientError as e:
            raise SessionLost(f"the engine session could not be closed to change its voice: {e}") from None
        try:
            self.session = await self.client.open(self.session_id, voice=voice)
        except RemoteError as refused:
            try:
                self.session = await self.client.open(self.session_id, voice=self.voice)
            except ClientError as e:
                raise SessionLost(f"voice {voice!r} was refused ({refused}) and the engine session could not be "
                                  f"reopened: {e}") from None
            raise
        except ClientError as e:
            raise SessionLost(f"the engine session could not be reopened: {e}") from None
        self.voice = voice

    def restart_detection(self) -> None:
        """A fresh turn detector (and resampler) from where the input stream stands, so that the positions it
        reports stay those of the stream, as commit_span reads them."""
        origin_ms = (self.buffer_start + self.buffered) * 1000 // self.input_rate
        self.detector = TurnDetector(self.vad, origin_ms=origin_ms) if self.vad is not None else None
        self.to_vad, self.speech_start_ms = None, None

    async def detect(self, pcm: np.ndarray) -> None:
        if self.to_vad is None:
            self.to_vad = soxr.ResampleStream(self.input_rate, VAD_RATE, 1, dtype="float32")
        for ev in self.detector.feed(self.to_vad.resample_chunk(pcm.astype(np.float32) / 32768.0)):
            if ev.kind == "speech_started":
                self.speech_start_ms = ev.ms
                item = new_id("item")
                self.pending_item = item
                await self.emit({"type": "input_audio_buffer.speech_started", "audio_start_ms": ev.ms,
                                 "item_id": item})
                if self.response is not None and self.vad.interrupt_response:  # barge-in: talk over the reply
                    await self.response.cancel("turn_detected")
            else:
                await self.speech_stopped(ev.ms)
        # Not speaking: keep only the prefix padding a coming turn may need, so silence never fills the buffer.
        if self.speech_start_ms is None:
            keep = int((self.vad.prefix_padding_ms + 100) * self.input_rate / 1000)
            self.drop_before(self.buffer_start + self.buffered - keep)
        elif self.buffered > int(self.server.max_turn_seconds * self.input_rate) - self.input_rate // 10:
            # A turn as long as the engine takes: commit it now rather than lose any of it.
            end_ms = (self.buffer_start + self.buffered) * 1000 // self.input_rate
            self.detector.speaking = False
            await self.speech_stopped(end_ms)

    async def speech_stopped(self, end_ms: int) -> None:
        """The turn that speech_started opened ends at end_ms: announce it, commit its span, answer it."""
        start_ms = self.speech_start_ms
        await self.emit({"type": "input_audio_buffer.speech_stopped", "audio_end_ms": end_ms,
                         "item_id": self.pending_item})
        self.speech_start_ms = None
        await self.commit_span(start_ms, end_ms, self.pending_item)
        if self.vad.create_response:
            await self.answer()

    def drop_before(self, sample: int) -> None:
        """Forget buffered audio before input-stream position `sample`."""
        if sample <= self.buffer_start:
            return
        pcm = np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.int16)
        cut = min(sample - self.buffer_start, pcm.size)
        self.buffer = [pcm[cut:]] if cut < pcm.size else []
        self.buffer_start += cut
        self.buffered = pcm.size - cut

    async def commit_span(self, start_ms: int, end_ms: int, item: str) -> None:
        """Commit input-stream audio [start_ms, end_ms) as a user turn; what follows stays in the buffer."""
        if len(self.committed) >= MAX_PENDING_TURNS:
            self.drop_before(self.buffer_start + self.buffered)
            raise EventError("too_many_pending_turns", f"{len(self.committed)} committed turns wait for an answer: "
                             f"response.create before committing more (this turn's audio is dropped)")
        pcm = np.concatenate(self.buffer) if self.buffer else np.zeros(0, np.int16)
        a = max(0, start_ms * self.input_rate // 1000 - self.buffer_start)
        b = min(pcm.size, end_ms * self.input_rate // 1000 - self.buffer_start)
        b = min(b, a + int(self.server.max_turn_seconds * self.input_rate))  # what follows stays for the next turn
        self.committed.append((item, pcm[a:b].copy(), self.input_rate))
        self.drop_before(self.buffer_start + b)
        await self.emit({"type": "input_audio_buffer.committed", "previous_item_id": self.last_item,
                         "item_id": item})
        await self.item_added({"id": item, "type": "message", "object": "realtime.item", "role": "user",
                               "status": "completed", "content": [{"type": "input_audio", "transcript": None}]},
                              self.last_item, done=True)
        self.last_item = item

    async def item_added(self, item: dict, previous: str | None, done: bool) -> None:
        """A conversation item exists: `conversation.item.created` (beta), or `conversation.item.added` and, once
        it is complete, `conversation.item.done` (GA). Clients keep their conversation by these: the reference
        JS client refuses a response's deltas for an item it was never told of."""
        if self.beta:
            await self.emit({"type": "conversation.item.created", "previous_item_id": previous, "item": item})
            return
        await self.emit({"type": "conversation.item.added", "previous_item_id": previous, "item": item})
        if done:
            await self.item_done(item, previous)

    async def item_done(self, item: dict, previous: str | None) -> None:
        if not self.beta:
            await self.emit({"type": "conversation.item.done", "previous_item_id": previous, "item": item})

    async def commit(self, event: dict) -> None:
        if not self.buffered:
            raise EventError("input_audio_buffer_commit_empty", "the input audio buffer is empty")
        # Mid-speech under server VAD the turn already has its item (speech_started named it): commit that one.
        item = self.pending_item if self.speech_start_ms is not None else new_id("item")
        start_ms = self.buffer_start * 1000 // self.input_rate
        end_ms = (self.buffer_start + self.buffered) * 1000 // self.input_rate + 1
        await self.commit_span(start_ms, end_ms, item)
        if self.detector is not None:  # the client decided this turn's end itself
            self.restart_detection()
            if self.vad.create_response:
                await self.answer()

    async def clear(self, event: dict) -> None:
        self.drop_before(self.buffer_start + self.buffered)
        if self.detector is not None:
            self.restart_detection()
        await self.emit({"type": "input_audio_buffer.cleared"})

    async def response_create(self, event: dict) -> None:
        if self.response is not None:
            raise EventError("conversation_already_has_active_response", "a response is in progress; cancel it "
                             "first (response.cancel)")
        if not self.committed:
            raise EventError("no_input", "nothing to answer: commit user audio first (LLaMA-Omni2 answers speech)")
        await self.answer()

    async def response_cancel(self, event: dict) -> None:
        if self.response is None:
            raise EventError("response_cancel_not_active", "no response is in progress")
        await self.response.cancel("client_cancelled")

    async def truncate(self, event: dict) -> None:
        if self.replies is not None and not self.replies.done():
            # Its answer would be read from the queue the reply reads (and the engine builds the prompt of a turn
            # in flight already): what the user heard is settled between responses.
            raise EventError("conversation_already_has_active_response", "truncate after response.done (or "
                             "response.cancel): a response is in progress")
        item = event.get("item_id")
        heard = self.answered.get(item) if isinstance(item, str) else None
        if heard is None:
            raise EventError("item_truncate_invalid_item_id", f"no assistant item {item!r} in the conversation "
                             "(a cancelled reply is left out of it whole)", "item_id")
        if event.get("content_index", 0) != 0:
            raise EventError("invalid_value", "content_index must be 0 (an item has one audio part)",
                             "content_index")
        end_ms = event.get("audio_end_ms")
        if not isinstance(end_ms, int) or isinstance(end_ms, bool) or not 0 <= end_ms <= heard.audio_ms:
            raise EventError("invalid_value", f"audio_end_ms must be an integer in [0, {heard.audio_ms}] (the "
                             f"item's audio)", "audio_end_ms")
        units = -(-end_ms * heard.units // heard.audio_ms) if heard.audio_ms else 0
        tokens = self.stream.tokens_read(units, heard.tokens)
        await self.session.truncate(heard.turn, tokens)
        await self.emit({"type": "conversation.item.truncated", "item_id": item, "content_index": 0,
                         "audio_end_ms": end_ms})

    # -- replies -------------------------------------------------------------------------------------------------
    async def answer(self) -> None:
        """Answer the committed turns, one after another, in a task of their own (input keeps flowing)."""
        if self.replies is None or self.replies.done():
            self.replies = asyncio.get_running_loop().create_task(self._answer_all())

    async def _answer_all(self) -> None:
        while self.committed:
            item, pcm, rate = self.committed.pop(0)
            self.response = Reply(self, item)
            try:
                await self.response.run(pcm, rate)
            except ClientError as e:
                code = e.code if isinstance(e, RemoteError) else "engine_unavailable"
                await self.response.fail(code, str(e))
            except Exception as e:  # a bug: this response fails, the connection goes on
                log.exception("realtime: %s: response failed", self.session_id)
                await self.response.fail("internal", f"{type(e).__name__}: {e}")
            finally:
                self.response = None


HANDLERS = {
    "session.update": Connection.session_update,
    "input_audio_buffer.append": Connection.append,
    "input_audio_buffer.commit": Connection.commit,
    "input_audio_buffer.clear": Connection.clear,
    "response.create": Connection.response_create,
    "response.cancel": Connection.response_cancel,
    "conversation.item.truncate": Connection.truncate,
}


def input_rate(fmt) -> int:
    """A GA format object ({"type": "audio/pcm", "rate": N}) or the beta string "pcm16" (24 kHz)."""
    if fmt == "pcm16":
        return 24000
    if isinstance(fmt, dict) and fmt.get("type") == "audio/pcm":
        rate = fmt.get("rate", 24000)
        if isinstance(rate, int) and MIN_RATE <= rate <= MAX_RATE:
            return rate
        raise EventError("invalid_value", f"audio/pcm rate must be an integer in [{MIN_RATE}, {MAX_RATE}] Hz",
                         "audio.input.format.rate")
    raise EventError("invalid_value", "input audio format must be {'type': 'audio/pcm', 'rate': N} or 'pcm16' "
                     "(G.711 is not supported)", "audio.input.format")


def output_rate(fmt) -> int:
    if fmt == "pcm16":
        return 24000
    if isinstance(fmt, dict) and fmt.get("type") == "audio/pcm":
        return fmt.get("rate", 24000)
    raise EventError("invalid_value", "output audio format must be {'type': 'audio/pcm', 'rate': 24000}",
                     "audio.output.format")


class Reply:
    """One response: the engine turn of a committed user item, streamed as Realtime events."""

    def __init__(self, conn: Connection, user_item: str):
        self.conn, self.user_item = conn, user_item
        self.id, self.item = new_id("resp"), new_id("item")
        self.text_only = conn.text_only  # a session.update while it streams applies from the next response
        self.text: list[str] = []
        self.samples = 0
        self.cancel_reason: str | None = None
        self.cancel_sent = False
        self.turn = -1
        self.resample = None
        self.announced = False  # output_item.added and content_part.added were sent: they will be closed

    def base(self) -> dict:
        return {"response_id": self.id, "item_id": self.item, "output_index": 0, "content_index": 0}

    def content(self, text: str) -> list[dict]:
        """The assistant item's content (a part in an item is output_text / output_audio; in the content_part
        events it is text / audio)."""
        return [{"type": "output_text", "text": text} if self.text_only else
                {"type": "output_audio", "transcript": text}]

    def describe(self, status: str, details=None, usage=None, metadata=None) -> dict:
        content = self.content("".join(self.text))
        return {"object": "realtime.response", "id": self.id, "status": status, "status_details": details,
                "output": [{"id": self.item, "type": "message", "object": "realtime.item", "role": "assistant",
                            "status": "completed" if status == "completed" else "incomplete",
                            "content": content}] if status != "in_progress" and self.announced else [],
                "conversation_id": self.conn.session_id,
                "output_modalities": ["text"] if self.text_only else ["audio"],
                "audio": {"output": {"format": {"type": "audio/pcm", "rate": self.conn.out_rate},
                                     "voice": self.conn.voice}},
                "usage": usage, "metadata": metadata}

    async def run(self, pcm: np.ndarray, rate: int) -> None:
        c = self.conn
        await c.emit({"type": "response.created", "response": self.describe("in_progress")})
        await c.session.append(pcm, rate)
        self.turn = await c.session.commit()
        t_commit = time.perf_counter()
        item = {"id": self.item, "type": "message", "object": "realtime.item", "role": "assistant",
                "status": "in_progress", "content": []}
        await c.emit({"type": "response.output_item.added", "response_id": self.id, "output_index": 0, "item": item})
        await c.item_added(item, self.user_item, done=False)
        c.last_item = self.item  # the conversation's newest item: the next user item follows it
        part = {"type": "text", "text": ""} if self.text_only else {"type": "audio", "transcript": ""}
        await c.emit({"type": "response.content_part.added", **self.base(), "part": part})
        self.announced = True
        if self.cancel_reason is not None:  # cancelled while the audio was being sent
            await self.send_cancel()
        first_audio = None
        while True:
            ev = await c.client.next_event(c.session.id, 300.0)
            if ev is None:
                raise ClientError("the engine sent nothing for 300 s")
            if getattr(ev, "turn", self.turn) != self.turn:
                continue  # a late event of an earlier, cancelled turn
            if isinstance(ev, P.ServerError):
                raise RemoteError(ev)
            if isinstance(ev, P.ResponseTextDelta) and ev.text:
                self.text.append(ev.text)
                kind = "response.output_text.delta" if self.text_only else "response.output_audio_transcript.delta"
                await c.emit({"type": kind, **self.base(), "delta": ev.text})
            elif isinstance(ev, P.ResponseAudioDelta) and ev.audio.size and not self.text_only:
                if first_audio is None:
                    first_audio = time.perf_counter() - t_commit
                await c.emit({"type": "response.output_audio.delta", **self.base(),
                              "delta": base64.b64encode(self.pcm16(ev)).decode()})
            elif isinstance(ev, P.ResponseDone):
                await self.finish(ev, first_audio)
                return

    def pcm16(self, ev: P.ResponseAudioDelta) -> bytes:
        a = ev.audio
        if a.dtype != np.int16:
            a = np.clip(np.rint(a * 32767), -32768, 32767).astype(np.int16)
        if ev.sample_rate != self.conn.out_rate:
            if self.resample is None:
                self.resample = soxr.ResampleStream(ev.sample_rate, self.conn.out_rate, 1, dtype="int16")
            a = self.resample.resample_chunk(a, last=ev.final)
        self.samples += a.size
        return a.astype("<i2").tobytes()

    async def finish(self, done: P.ResponseDone, first_audio: float | None) -> None:
        c, text = self.conn, "".join(self.text)
        if self.text_only:
            await c.emit({"type": "response.output_text.done", **self.base(), "text": text})
        else:
            await c.emit({"type": "response.output_audio.done", **self.base()})
            await c.emit({"type": "response.output_audio_transcript.done", **self.base(), "transcript": text})
        if done.finish_reason == "cancelled":
            status, details = "cancelled", {"type": "cancelled", "reason": self.cancel_reason or "client_cancelled"}
        elif done.finish_reason in ("length", "context"):
            status = "incomplete"
            details = {"type": "incomplete",
                       "reason": "max_output_tokens" if done.finish_reason == "length" else "max_context"}
        else:
            status, details = "completed", None
        item_status = "completed" if status == "completed" else "incomplete"
        if status != "cancelled":  # in the engine's conversation: a truncate may cut it
            c.answered[self.item] = Heard(done.turn, len(done.token_ids), len(done.units),
                                          self.samples * 1000 // c.out_rate)
        await self.end_item(text, item_status)
        usage = {"total_tokens": len(done.token_ids), "input_tokens": 0, "output_tokens": len(done.token_ids),
                 "output_token_details": {"text_tokens": len(done.token_ids), "audio_tokens": len(done.units)}}
        # The API's metadata is a map of up to 16 strings: our per-stage timings (seconds after commit) and more.
        metadata = {"omni2_turn": str(done.turn), "omni2_finish_reason": done.finish_reason,
                    "omni2_units": str(len(done.units)), "omni2_audio_ms": str(self.samples * 1000 // c.out_rate)}
        if first_audio is not None:
            metadata["omni2_first_audio_client_s"] = f"{first_audio:.4f}"
        for k, v in sorted(done.timings.items())[:10]:
            metadata[f"omni2_{k}"] = f"{v:.4f}"
        await c.emit({"type": "response.done", "response": self.describe(status, details, usage, metadata)})

    async def end_item(self, text: str, status: str) -> None:
        """Close what output_item.added and content_part.added opened: a client waits for their `.done` events."""
        c = self.conn
        part = {"type": "text", "text": text} if self.text_only else {"type": "audio", "transcript": text}
        await c.emit({"type": "response.content_part.done", **self.base(), "part": part})
        item = {"id": self.item, "type": "message", "object": "realtime.item", "role": "assistant",
                "status": status, "content": self.content(text)}
        await c.emit({"type": "response.output_item.done", "response_id": self.id, "output_index": 0, "item": item})
        await c.item_done(item, self.user_item)

    async def fail(self, code: str, message: str) -> None:
        c = self.conn
        await c.error(code, message, kind="server_error")
        if self.announced:  # failed mid-stream: the item ends incomplete, as the client was told it began
            await self.end_item("".join(self.text), "incomplete")
        await c.emit({"type": "response.done", "response": self.describe(
            "failed", {"type": "failed", "error": {"type": "server_error", "code": code, "message": message}})})

    async def cancel(self, reason: str) -> None:
        if self.cancel_reason is None:
            self.cancel_reason = reason
            if self.turn >= 0:
                await self.send_cancel()

    async def send_cancel(self) -> None:
        """Once: a second response.cancel would find no reply in flight (no_response)."""
        if not self.cancel_sent:
            self.cancel_sent = True
            await self.conn.session.cancel()
