"""The engine's loop thread (a mixin of engine/runtime.Engine): the only reader of the control ROUTER and of the
three output rings, so every socket it touches has exactly one thread.

Each pass: wait up to 50 ms for a message or a wake-up, apply user commands (open/cancel/close/stop), turn
worker replies into events, then ask the supervisor whether a worker died or hung. A lost worker's turns — the
ones it still held (engine/turns.Turn.held_by) — end with an ErrorEvent and are cancelled in every stage; the
producer that fed it frees the slots it held; a replacement is spawned and, once ready, re-opened for every
session. Sessions it did not hold carry on.
"""
from __future__ import annotations

import logging
import os
import queue
import time

import zmq

from omni2.engine import protocol, ring, shm
from omni2.engine.protocol import (
    CancelSession,
    CloseSession,
    ErrorEvent,
    Heartbeat,
    LlmToServer,
    ProtocolError,
    RingReset,
    SessionAck,
    Shutdown,
    StageError,
    TtsToServer,
    VocoderToServer,
    WorkerReady,
)
from omni2.engine.runners import EDGES, STAGES, inputs_of, to_wire

log = logging.getLogger("omni2.engine")
_CANCELLED = object()  # ends an events() iterator without an event
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
SMALL_SLOT = 64  # edges whose messages carry no tensors: the slot is only a credit


class EngineError(RuntimeError):
    """A request the engine refuses, or a failure; `code` is machine-readable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


class EngineLoop:
    def _ring_specs(self) -> dict:
        cfg, mc, n = self.config, self.model_config, self.config.ring_slots
        isz, H = _ITEMSIZE[cfg.dtype], mc.thinker.hidden_size
        n_out = mc.encoder.n_ctx // mc.projector.ds_rate
        sizes = {"asr_in": (4, int(self.limits.max_audio_seconds * 16000) * 4 + 4096),
                 "asr_llm": (4, cfg.asr_batch * (n_out * H * isz + 64)),
                 "llm_tts": (n, self.limits.max_sessions * H * isz + 4096),
                 "llm_out": (n, SMALL_SLOT), "tts_out": (n, SMALL_SLOT), "tts_voc": (n, SMALL_SLOT),
                 "voc_out": (n, 1 << 20)}
        self._specs = {e: ring.ipc_spec(e, self.prefix, n_slots=k, slot_bytes=b, ipc_dir=self.ipc_dir)
                       for e, (k, b) in sizes.items()}
        return self._specs

    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._ctl, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        for c in self._outs.values():
            poller.register(c.socket, zmq.POLLIN)
        paused = False
        try:
            while True:
                if self._paused.is_set() != paused:  # tests stall the tail of the pipeline here
                    paused = self._paused.is_set()
                    poller.modify(self._outs["voc_out"].socket, 0 if paused else zmq.POLLIN)
                ready = dict(poller.poll(50))
                if self._wake_r in ready:
                    try:
                        while os.read(self._wake_r, 4096):
                            pass
                    except BlockingIOError:
                        pass
                if not self._run_commands():
                    return
                if self._ctl in ready:
                    while self._ctl.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        self._on_control(self._ctl.recv_multipart(zmq.NOBLOCK))
                for edge, c in self._outs.items():
                    if c.socket in ready and not (paused and edge == "voc_out"):
                        self._drain_out(c)
                for stage, why in self._sup.check():
                    self._on_lost(stage, why)
                if not self._ready.is_set() and self._sup.all_ready():
                    self._ready.set()
        except Exception:
            log.exception("engine loop failed")
            raise
        finally:
            self._teardown()

    def _run_commands(self) -> bool:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
            if cmd[0] == "stop":
                return False
            if cmd[0] == "open":
                s = self._by_key.get(cmd[1])
                if s is not None:
                    self._broadcast(to_wire(s.key, s.options))
            elif cmd[0] == "cancel":
                self._broadcast(CancelSession(cmd[1], cmd[2]))
            elif cmd[0] == "close":
                self._broadcast(CloseSession(cmd[1]))
            elif cmd[0] == "raw":
                try:
                    self._ctl.send_multipart([cmd[1].encode(), *cmd[2]], zmq.NOBLOCK)
                except zmq.ZMQError as e:
                    log.warning("raw frames to %s not sent: %s", cmd[1], e)

    def _send(self, stage: str, msg) -> bool:
        try:
            self._ctl.send_multipart([stage.encode(), *protocol.encode(msg)], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # not connected (starting or restarting): replayed when it is ready
            log.debug("%s: %s not delivered: %s", stage, type(msg).__name__, e)
            return False

    def _broadcast(self, msg) -> None:
        for s in STAGES:
            self._send(s, msg)

    # -- what workers say -----------------------------------------------------------------------------------
    def _on_control(self, frames) -> None:
        ident, body = frames[0].decode(errors="replace"), frames[1:]
        try:
            msg = protocol.decode(body)
        except ProtocolError as e:
            log.warning("malformed control message from %r: %s", ident, e)
            return
        if isinstance(msg, Heartbeat):
            self._sup.beat(msg)
        elif isinstance(msg, WorkerReady):
            self._sup.ready(msg.stage)
            if msg.stage in self._replay:
                self._replay.discard(msg.stage)
                self._reopen(msg.stage)
        elif isinstance(msg, SessionAck):
            ack = self._acks.get(msg.session_id)
            if ack is not None:
                if msg.error:
                    ack["errors"].append(f"{msg.stage}: {msg.error}")
                ack["left"].discard(msg.stage)
                if not ack["left"]:
                    ack["done"].set()
        elif isinstance(msg, StageError):
            self._errors += 1
            if not msg.session_ids:
                log.warning("%s worker: %s: %s", msg.stage, msg.code, msg.message)
            turns = msg.turns if len(msg.turns) == len(msg.session_ids) else [None] * len(msg.session_ids)
            with self._lock:
                for key, turn in zip(msg.session_ids, turns):
                    s = self._by_key.get(key)
                    if s is not None and s.turn is not None and turn in (None, s.turn.number):
                        self._fail_turn(s, msg.code, f"{msg.stage}: {msg.message}")

    def _drain_out(self, consumer) -> None:
        while True:
            try:
                msg, _ = consumer.recv(timeout=0, copy=True)
            except ring.RingTimeout:
                return
            except ProtocolError as e:
                log.warning("malformed message on %r: %s", consumer.edge, e)
                continue
            with self._lock:
                self._route(msg)

    def _route(self, msg) -> None:
        for i, key in enumerate(msg.session_ids):
            s = self._by_key.get(key)
            if s is None or s.turn is None or s.turn.number != msg.turns[i]:
                continue  # a closed session, or a turn that was cancelled or failed
            t, uid = s.turn, s.user_id
            if isinstance(msg, LlmToServer):
                events = t.on_text(uid, msg.token_ids[i], msg.texts[i], msg.finish_reasons[i],
                                   msg.asr_t[i] if msg.asr_t else 0.0)
            elif isinstance(msg, TtsToServer):
                events = t.on_units(uid, msg.units[i], msg.finals[i])
            elif isinstance(msg, VocoderToServer):
                events = t.on_audio(uid, msg.pcm[i], msg.finals[i], msg.sample_rate, msg.in_t[i] if msg.in_t else 0.0)
            else:
                log.warning("unexpected %s on an output ring", type(msg).__name__)
                return
            for ev in events:
                self._emit(s, ev)
            if t.done():
                s.turn = None
                self._emit(s, t.finish(uid))

    def _emit(self, s, ev) -> None:
        if self.on_event is not None:
            try:
                self.on_event(s.user_id, ev)
            except Exception:
                log.exception("on_event callback failed")
        else:
            s.events.put(ev)

    def _fail_turn(self, s, code: str, message: str, broadcast: bool = True) -> None:
        turn, s.turn = s.turn, None
        if turn is None:
            return
        self._emit(s, ErrorEvent(s.user_id, code, message, time.perf_counter()))
        if broadcast:
            self._command(("cancel", s.key, turn.number))

    # -- losing and regaining a worker ------------------------------------------------------------------------
    def _on_lost(self, stage: str, why: str) -> None:
        edge = inputs_of(stage)[0]
        producer = EDGES[edge][0]
        if producer == "server":
            self._reclaim_asr.set()
        else:
            self._send(producer, RingReset(edge))
        with self._lock:
            for s in list(self._by_key.values()):
                if s.turn is not None and s.turn.held_by(stage):
                    self._fail_turn(s, "worker_crashed", f"the {stage} worker {why}; this turn was lost "
                                    "(the worker is being restarted; the session stays open)")
        if self._sup.restart(stage):
            self._replay.add(stage)
        else:
            with self._lock:
                for s in list(self._by_key.values()):
                    self._fail_turn(s, "stage_failed", self._sup.failed()[stage])

    def _reopen(self, stage: str) -> None:
        """A replacement worker knows no session: open each again, and drop whatever of their past turns is
        still in flight towards it."""
        with self._lock:
            for s in self._by_key.values():
                self._send(stage, to_wire(s.key, s.options))
                last = (s.turn.number if s.turn is not None else s.next_turn) - 1
                if last >= 0:
                    self._send(stage, CancelSession(s.key, last))

    def _teardown(self) -> None:
        """Stop workers, close sockets and rings, sweep the engine's names out of /dev/shm and the temp dir."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if hasattr(self, "_sup"):
            if hasattr(self, "_ctl"):
                self._broadcast(Shutdown("engine stopping"))
            self._sup.stop()
        for c in getattr(self, "_outs", {}).values():
            c.close()
        if hasattr(self, "_asr_in"):
            self._asr_in.close()
        if hasattr(self, "_ctl"):
            self._ctl.close(linger=0)
        self._ctx.destroy(linger=0)
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        shm.sweep(self.prefix, self.ipc_dir)
        log.info("engine stopped")
