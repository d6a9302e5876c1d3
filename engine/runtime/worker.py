"""One stage worker process: receive -> batch -> step -> send, around any runner of runtime/runners.py.

Three threads, so that compute never waits on a socket and the supervisor always hears from us:
  io       owns the control DEALER and the input ring's consumer: decodes what arrives into the inbox, sends
           acks/errors from the outbox, beats every `heartbeat_s`, and exits the process if the parent is gone.
  main     the compute loop: applies session messages and data between steps (continuous batching: whatever
           arrived joins the next step), steps while the runner has work.
  sender   owns the output rings' producers: blocks on credits (backpressure), splits a batch that does not fit a
           slot, reclaims slots when the supervisor says the consumer was restarted; if it fails, the process
           exits so that it is restarted.
Input slots are released only after the runner has copied what it keeps, so a slow worker holds its input ring's
slots and its producer waits: memory stays bounded end to end.
"""
from __future__ import annotations

import contextlib
import dataclasses
import faulthandler
import logging
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np
import torch
import zmq

from omni2.engine.config import Limits, TTSOptions, VocoderOptions
from omni2.engine.runtime.runners import build
from omni2.engine.runtime.topology import inputs_of, outputs_of
from omni2.engine.wire import protocol, ring
from omni2.engine.wire.codec import ProtocolError
from omni2.engine.wire.protocol import (
    AsrToLlm,
    Barrier,
    CancelSession,
    CloseSession,
    EngineToAsr,
    Heartbeat,
    LlmToTts,
    OpenSession,
    RestoreSession,
    RingReset,
    SessionAck,
    Shutdown,
    StageError,
    TtsToVocoder,
    WorkerReady,
)
from omni2.engine.wire.wakeup import Wakeup

log = logging.getLogger("omni2.worker")

INPUT_TYPE = {"asr": EngineToAsr, "llm": AsrToLlm, "tts": LlmToTts, "vocoder": TtsToVocoder}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(slots=True)
class Arrived:
    """Inbox item: a data message from the input ring and the slot its tensors live in (released after use)."""

    msg: object
    slot: ring.Held | None


@dataclass(frozen=True)
class WorkerSpec:
    """Everything a worker needs, as plain values (it crosses the spawn boundary)."""

    stage: str
    model_dir: str
    vocoder_dir: str
    device: str
    dtype: str
    limits: Limits
    tts_options: TTSOptions
    vocoder_options: VocoderOptions
    control_addr: str
    rings: dict  # edge -> RingSpec of every edge; a worker binds its outputs and connects its input
    prefix: str
    ipc_dir: str
    parent_pid: int
    heartbeat_s: float = 0.2
    asr_batch: int = 4
    threads: int = 1  # torch threads (EngineConfig.worker_threads)
    cuda_graphs: bool = False


def main(spec: WorkerSpec) -> None:
    """Process entry (spawn target)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # SystemExit unwinds through every finally
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the supervisor decides
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID` prints where every thread is
    logging.basicConfig(level=os.environ.get("OMNI2_LOG", "INFO"),
                        format=f"%(asctime)s {spec.stage}[%(process)d] %(levelname)s %(message)s")
    torch.set_num_threads(spec.threads)
    # tqdm (checkpoint loading bars) would otherwise make a multiprocessing lock: POSIX semaphores that the
    # os._exit below never unregisters, so the shared resource tracker warns about "leaked semaphores".
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    Worker(spec).run()
    logging.shutdown()
    os._exit(0)  # everything is released; skip seconds of interpreter teardown (garbage-collecting torch)


class Worker:
    def __init__(self, spec: WorkerSpec):
        self.spec, self.stage = spec, spec.stage
        self.ctx = zmq.Context()
        self.inbox: queue.Queue = queue.Queue()  # Arrived data, and session/shutdown messages, in arrival order
        self.outbox: queue.Queue = queue.Queue()  # control messages for the io thread to send
        self.sendq: queue.Queue = queue.Queue(maxsize=2)  # bounded: a blocked sender stalls compute
        self.stop = threading.Event()
        self.reclaim = {e: threading.Event() for e in outputs_of(self.stage)}
        self._wake = Wakeup()  # the io thread's poller: control messages to send
        self.step_started: float | None = None
        self.last_step_ms, self.last_batch, self.max_batch, self.steps = 0.0, 0, 0, 0
        self.blocked = ""  # set by the sender thread while an output ring has no free slot
        self.active = 0  # len(runner.active()) after the last pass of the compute loop (read by the heartbeat)
        self.producers: dict[str, ring.Producer] = {}
        self.runner = None

    # -- lifecycle --------------------------------------------------------------------------------------------
    def run(self) -> None:
        spec = self.spec
        cuda = spec.device.startswith("cuda")
        if cuda:
            torch.cuda.set_device(torch.device(spec.device))
        t0 = time.perf_counter()
        self.runner = build(self.stage, spec.model_dir, spec.vocoder_dir, device=spec.device,
                            dtype=DTYPES[spec.dtype], limits=spec.limits, tts_options=spec.tts_options,
                            vocoder_options=spec.vocoder_options, asr_batch=spec.asr_batch,
                            cuda_graphs=spec.cuda_graphs)
        log.info("loaded on %s in %.1f s", spec.device, time.perf_counter() - t0)
        self.stream = torch.cuda.Stream() if cuda else None  # each stage computes on a stream of its own
        threads = []
        try:
            for e in outputs_of(self.stage):
                rs = spec.rings[e]
                self.producers[e] = ring.Producer(e, spec.prefix, n_slots=rs.n_slots, slot_bytes=rs.slot_bytes,
                                                  ipc_dir=spec.ipc_dir, ctx=self.ctx)
            self.consumer = ring.Consumer(spec.rings[inputs_of(self.stage)[0]], ctx=self.ctx)
            threads = [threading.Thread(target=self._io, name="io", daemon=True),
                       threading.Thread(target=self._sender, name="sender", daemon=True)]
            for t in threads:
                t.start()
            with torch.cuda.stream(self.stream) if cuda else contextlib.nullcontext():
                self._compute()
        finally:
            self.stop.set()
            self._wake.wake()
            _drain(self.sendq)
            self.sendq.put(None)
            for t in threads:
                t.join(timeout=2)
            for p in self.producers.values():
                p.close()
            if hasattr(self, "consumer"):
                self.consumer.close()
            self.ctx.destroy(linger=0)

    def _compute(self) -> None:
        runner = self.runner
        while not self.stop.is_set():
            items = _drain(self.inbox)
            if not items and not runner.ready():
                try:
                    items = [self.inbox.get(timeout=0.5)]
                except queue.Empty:
                    continue
                items += _drain(self.inbox)
            for item in items:
                if isinstance(item, Shutdown):
                    log.info("shutdown: %s", item.reason)
                    return
                self._apply(item)
            if runner.ready():
                self._step()
            self._report()
            self.active = len(runner.active())

    def _apply(self, item: Arrived | OpenSession | CloseSession | CancelSession | RestoreSession | Barrier) -> None:
        runner, msg = self.runner, item
        if isinstance(item, Arrived):
            msg = item.msg
            try:
                check_rows(msg)
                runner.feed(msg)
            except Exception as e:  # a bad message concerns its sessions only
                log.warning("bad %s: %s", type(msg).__name__, e)
                for sid in getattr(msg, "session_ids", []):
                    if sid in runner.options:
                        runner.fail(sid, "bad_input", f"{self.stage}: {e}")
            finally:
                self.consumer.release(item.slot)
        elif isinstance(msg, OpenSession):
            error = ""
            try:
                runner.open(msg)
            except Exception as e:  # an unknown voice, a full stage: the user hears why
                error = str(e) or type(e).__name__
            self._control(SessionAck(self.stage, msg.session_id, error, time.perf_counter()))
        elif isinstance(msg, CloseSession):
            runner.close(msg.session_id)
        elif isinstance(msg, CancelSession):
            runner.cancel(msg.session_id, msg.turn)
        elif isinstance(msg, RestoreSession):
            try:
                runner.restore(msg)
            except Exception as e:  # the session's next turn is refused by the stage, with a reason
                log.warning("could not restore session %s: %s", msg.session_id, e)
        elif isinstance(msg, Barrier):
            self._control(msg)  # everything the engine sent before it is applied: the inbox keeps arrival order

    def _step(self) -> None:
        active = self.runner.active()
        self.step_started = time.perf_counter()
        outs = []
        try:
            outs = self.runner.step()
        except torch.AcceleratorError:
            # The device is left in an error state (an illegal access, a device assert): every later step would fail
            # too. A fresh process is the way back; the supervisor restarts it and fails the turns it held.
            log.exception("the device failed; exiting so that the worker is restarted")
            os._exit(1)
        except Exception as e:
            log.exception("step failed")
            for sid in active:
                self.runner.fail(sid, "stage_error", f"{self.stage} step failed: {type(e).__name__}: {e}")
        finally:
            self.last_step_ms = (time.perf_counter() - self.step_started) * 1e3
            self.step_started = None
            self.last_batch, self.steps = len(active), self.steps + 1
            self.max_batch = max(self.max_batch, self.last_batch)
        event = None
        if self.stream is not None and outs:
            event = torch.cuda.Event()
            event.record(self.stream)
        for edge, msg in outs:
            self.sendq.put((edge, msg, event))

    def _report(self) -> None:
        for f in self.runner.failures:
            self._control(StageError(self.stage, [f.session_id], f.code, f.message, False, time.perf_counter(),
                                     [f.turn]))
        self.runner.failures.clear()
        for st in self.runner.states:
            self._control(st)
        self.runner.states.clear()

    def _control(self, msg) -> None:
        self.outbox.put(msg)
        self._wake.wake()

    # -- io thread --------------------------------------------------------------------------------------------
    def _io(self) -> None:
        ctl = self.ctx.socket(zmq.DEALER)
        ctl.setsockopt(zmq.IDENTITY, self.stage.encode())
        ctl.setsockopt(zmq.LINGER, 500)
        ctl.connect(self.spec.control_addr)
        poller = zmq.Poller()
        poller.register(self.consumer.socket, zmq.POLLIN)
        poller.register(ctl, zmq.POLLIN)
        poller.register(self._wake.fd, zmq.POLLIN)
        ctl.send_multipart(protocol.encode(WorkerReady(self.stage, os.getpid(), self.spec.device,
                                                       time.perf_counter())))
        seq, next_beat = 0, 0.0
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                if now >= next_beat:
                    if os.getppid() != self.spec.parent_pid:
                        self._orphaned()
                    seq += 1
                    ctl.send_multipart(protocol.encode(self._heartbeat(seq)))
                    next_beat = now + self.spec.heartbeat_s
                ready = dict(poller.poll(max(1, int((next_beat - time.monotonic()) * 1000))))
                if self._wake.fd in ready:
                    self._wake.drain()
                # Control first: the engine sends a session's open before its data (a replacement worker gets
                # the open of every session, then the turns held for it), and the inbox keeps this order.
                if ctl in ready:
                    while ctl.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        self._recv_control(ctl.recv_multipart(zmq.NOBLOCK))
                if self.consumer.socket in ready:
                    self._recv_data()
                for msg in _drain(self.outbox):
                    ctl.send_multipart(protocol.encode(msg))
        except ring.RingClosed:
            pass
        finally:
            for msg in _drain(self.outbox):  # last words (a failure report) still go out
                ctl.send_multipart(protocol.encode(msg), zmq.NOBLOCK)
            ctl.close()

    def _recv_data(self) -> None:
        while True:
            try:
                msg, slot = self.consumer.recv(timeout=0)
            except ring.RingTimeout:
                return
            except ProtocolError as e:
                self._bad(f"malformed message on ring {inputs_of(self.stage)[0]!r}: {e}")
                continue
            if not isinstance(msg, INPUT_TYPE[self.stage]):
                self.consumer.release(slot)
                self._bad(f"unexpected {type(msg).__name__} on the {self.stage} input ring")
                continue
            self.inbox.put(Arrived(msg, slot))

    def _recv_control(self, frames) -> None:
        try:
            msg = protocol.decode(frames)
        except ProtocolError as e:
            self._bad(f"malformed control message: {e}")
            return
        if isinstance(msg, RingReset):
            if msg.edge in self.reclaim:
                self.reclaim[msg.edge].set()
        elif isinstance(msg, (Shutdown, OpenSession, CloseSession, CancelSession, RestoreSession, Barrier)):
            self.inbox.put(msg)
        else:
            self._bad(f"unexpected control message {type(msg).__name__}")

    def _bad(self, what: str) -> None:
        log.warning("%s", what)
        self.outbox.put(StageError(self.stage, [], "bad_message", what, False, time.perf_counter()))

    def _heartbeat(self, seq: int) -> Heartbeat:
        started = self.step_started
        return Heartbeat(self.stage, os.getpid(), seq, len(self.runner.options), started is not None,
                         time.perf_counter(), 0.0 if started is None else time.perf_counter() - started,
                         self.last_step_ms, self.last_batch, self.inbox.qsize(), self.steps,
                         {e: p.stats(refresh=True).in_use for e, p in self.producers.items()}, self.max_batch,
                         self.blocked, self.active)

    def _orphaned(self) -> None:
        # The engine is gone and nobody will sweep for us: give back what we own, then go at once.
        log.error("parent process %d is gone; exiting", self.spec.parent_pid)
        for p in self.producers.values():
            p.close()
        os._exit(1)

    # -- sender thread ----------------------------------------------------------------------------------------
    def _sender(self) -> None:
        try:
            while True:
                item = self.sendq.get()
                if item is None:
                    return
                edge, msg, event = item
                if event is not None:
                    event.synchronize()  # the device-to-host copies of that step are complete
                self._put(edge, msg)
        except ring.RingClosed:
            return
        except BaseException:
            # Without its sender the worker would look healthy (heartbeats on time, no step running) while its
            # compute thread waits on the full send queue forever and every session stalls: die, be restarted.
            log.exception("the sender thread failed; exiting so that the worker is restarted")
            os._exit(1)

    def _put(self, edge: str, msg) -> None:
        producer = self.producers[edge]
        while not self.stop.is_set():
            if self.reclaim[edge].is_set():
                self.reclaim[edge].clear()
                producer.reclaim()
            try:
                producer.put(msg, timeout=0.2)
                self.blocked = ""
                return
            except ring.RingTimeout:
                self.blocked = edge
                continue  # still no credit: look at reclaim/stop again
            except ring.PayloadTooLarge as e:
                halves = split_rows(msg)
                if halves is None:
                    self._control(StageError(self.stage, list(msg.session_ids), "payload_too_large", str(e), False,
                                             time.perf_counter(), list(msg.turns)))
                    return
                for part in halves:
                    self._put(edge, part)
                return


def split_rows(msg):
    """Two messages holding the first and second half of a batch message's rows; None for a single row."""
    n = len(msg.session_ids)
    if n < 2:
        return None
    parts = []
    for sl in (slice(0, n // 2), slice(n // 2, n)):
        values = {}
        for f in dataclasses.fields(msg):
            v = getattr(msg, f.name)
            rows = isinstance(v, list) or isinstance(v, (torch.Tensor, np.ndarray)) and v.ndim >= 1
            values[f.name] = v[sl] if rows and len(v) == n else v
        parts.append(type(msg)(**values))
    return parts


OPTIONAL_ROWS = ("asr_t", "in_t", "histories", "cuts", "ends", "stopped")  # per-row lists a message may leave empty


def check_rows(msg) -> None:
    """Parallel lists must be parallel: zip would silently drop rows."""
    n = len(msg.session_ids)
    for f in dataclasses.fields(msg):
        v = getattr(msg, f.name)
        if isinstance(v, list) and len(v) != n and not (f.name in OPTIONAL_ROWS and not v):
            raise ProtocolError(f"{type(msg).__name__}.{f.name} has {len(v)} rows for {n} sessions")
        if isinstance(v, torch.Tensor) and (v.ndim < 1 or v.shape[0] != n):
            raise ProtocolError(f"{type(msg).__name__}.{f.name} has shape {tuple(v.shape)} for {n} sessions")


def _drain(q: queue.Queue) -> list:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except queue.Empty:
            return out
