"""The engine, in process: four stage workers behind one small API (docs/ARCHITECTURE.md, "Runtime").

    engine (this process)                      workers (runtime/worker.py)
    commit() --asr_in--> asr --asr_llm--> llm --llm_tts--> tts --tts_voc--> vocoder
                 events <--llm_out----------'   <--tts_out---'   <--voc_out-----'

User threads call open/append/commit/cancel/close. One loop thread owns every socket the engine reads (the control
ROUTER and the three output rings): each pass it waits up to 50 ms for a message or a wake-up, runs the commands
user threads queued, turns what workers sent into events (runtime/turns.py) and asks the supervisor whether a
worker died or hung. Only the asr_in ring is written from user threads, under a lock, so a full ASR queue blocks
the caller that submitted, never the loop that drains replies.

Sessions get a wire key of their own ("s<n>") so a user's session id can be reused at once after close without
stale data of the old session ever meeting the new one; turns are numbered per session and every data row
carries its turn, so whatever is still in flight from a cancelled or failed turn is dropped wherever it lands.
A lost worker's turns (the ones it still held: Turn.held_by) end with an ErrorEvent and are cancelled in every
stage; the producer that fed it frees the slots it held; a replacement is spawned and, once ready, re-opened for
every session. Sessions it did not hold carry on. Each worker tells the engine, as a turn ends in its stage, what a
successor would need to go on with the session (SessionState: the thinker's turn as its conversation holds it,
sampler counters, the vocoder's generator); the engine keeps those of the conversation's turns and gives them to
the replacement (RestoreSession), so a session's next turn answers as if no worker had been lost.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import zmq

from omni2.engine.audio import AudioError, prepare_audio
from omni2.engine.checkpoints.model_dir import ModelDir
from omni2.engine.checkpoints.vocoder_dir import VocoderDir
from omni2.engine.config import (
    DTYPE_BYTES,
    STAGES,
    EngineConfig,
    ModelConfig,
    Placement,
    SessionOptions,
    VocoderConfig,
)
from omni2.engine.runtime.runners import to_wire
from omni2.engine.runtime.supervisor import Supervisor
from omni2.engine.runtime.topology import EDGES, ENGINE, inputs_of, ring_sizes
from omni2.engine.runtime.turns import Turn
from omni2.engine.runtime.worker import WorkerSpec
from omni2.engine.wire import protocol, ring, shm
from omni2.engine.wire.codec import ProtocolError
from omni2.engine.wire.protocol import (
    Barrier,
    CancelSession,
    CloseSession,
    EngineToAsr,
    ErrorEvent,
    Event,
    Heartbeat,
    LlmToEngine,
    RestoreSession,
    RingReset,
    SessionAck,
    SessionState,
    Shutdown,
    StageError,
    TtsToEngine,
    TurnDone,
    VocoderToEngine,
    WorkerReady,
)
from omni2.engine.wire.wakeup import Wakeup
from omni2.stages.device import check_device
from omni2.stages.flow import state_bytes_bound
from omni2.stages.tts import FINAL_MAX_UNITS, tts_context

log = logging.getLogger("omni2.engine")
_CANCELLED = object()  # ends an events() iterator without an event
OUTPUT_EDGES = ("llm_out", "tts_out", "voc_out")


def graphs_hint(devices: Iterable[str], cuda_graphs: bool) -> str | None:
    """What start-up says when stages run on a GPU without CUDA graphs: their steps are then host-bound."""
    if cuda_graphs or not any(d.startswith("cuda") for d in devices):
        return None
    return ("stages on a GPU without cuda_graphs (serve --cuda-graphs): the decode steps and vocoder writes run "
            "dynamically, bound by Python and kernel launches rather than by the GPU")


class EngineError(RuntimeError):
    """A request the engine refuses, or a failure; `code` is machine-readable."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class _Session:
    user_id: str
    key: str
    options: SessionOptions
    flow_bytes: int  # the most vocoder flow state its replies can hold (admission against the memory budget)
    events: queue.Queue = field(default_factory=queue.Queue)
    chunks: list = field(default_factory=list)  # audio appended for the next turn
    rate: int = 0
    turn: Turn | None = None
    next_turn: int = 0
    history: list[int] = field(default_factory=list)  # turns that finished: the conversation the thinker reads
    answer_tokens: dict[int, int] = field(default_factory=dict)  # text tokens of each finished turn's answer
    cuts: dict[int, int] = field(default_factory=dict)  # turn -> answer tokens the thinker reads (truncate())
    # stage -> turn -> what that stage's worker said at the end of the turn; only the conversation's turns (the
    # llm: all of them, bounded by the context limit; the others: the last) and the turn in flight are kept.
    states: dict[str, dict[int, SessionState]] = field(default_factory=dict)


@dataclass
class _OpenAck:
    """A session.open waiting for every worker's SessionAck."""

    left: set[str] = field(default_factory=lambda: set(STAGES))
    errors: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)


# What user threads ask of the loop thread (the only one that may touch the control socket).
@dataclass(frozen=True, slots=True)
class _Send:
    """These frames (an encoded message) to the control socket of each of `stages`."""

    stages: tuple[str, ...]
    frames: list


@dataclass(frozen=True, slots=True)
class _Stop:
    pass


class Engine:
    """start() the workers, open sessions, submit turns, read events (`events()` or an `on_event` callback)."""

    def __init__(self, config: EngineConfig, on_event: Callable[[str, Event], None] | None = None):
        self.config, self.on_event = config, on_event
        self.placement = Placement.parse(config.placement)
        md = ModelDir(config.model_dir)
        self.model_config = md.config
        self.vocoder_dir = VocoderDir(config.vocoder_dir)
        self.sample_rate = self.vocoder_dir.config.sample_rate
        self.read = md.config.generator.stream.read
        self.limits = config.limits
        tts_context(config.limits, config.tts_options, md.config.generator.stream, md.config.generator.lm)
        self._lock = threading.RLock()  # sessions, turns and acks: user threads and the loop thread
        self._sessions: dict[str, _Session] = {}  # by user id
        self._by_key: dict[str, _Session] = {}
        self._keys = itertools.count()
        self._commands: queue.Queue = queue.Queue()
        self._acks: dict[str, _OpenAck] = {}
        self._asr_lock = threading.Lock()
        self._reclaim_asr = threading.Event()
        self._ready, self._stopped = threading.Event(), threading.Event()
        self._thread: threading.Thread | None = None
        self._errors = 0
        self._ending = False  # stop() or a failed loop: commits are refused under the lock (see _end_all)
        self._replay: set[str] = set()  # restarted stages to re-open every session in, once they are ready
        # Turns committed while a stage restarts wait here: sent now, they could reach the replacement before it
        # knows their session (it would drop them) or its conversation (it would refuse them).
        self._held: list[EngineToAsr] = []
        # stage -> the Barrier sent after its replacement's re-opens: its answer means they are all applied.
        self._barriers: dict[str, int] = {}
        self._barrier_seq = itertools.count(1)
        # Made by start(); None until then (and status() says so).
        self.prefix: str | None = None
        self.ipc_dir: str | None = None
        self._specs: dict[str, ring.RingSpec] = {}
        self._ctx: zmq.Context | None = None
        self._wake: Wakeup | None = None
        self._asr_in: ring.Producer | None = None
        self._outs: dict[str, ring.Consumer] = {}
        self._ctl: zmq.Socket | None = None
        self._sup: Supervisor | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        cfg = self.config
        for device in sorted(set(self.placement.devices.values())):
            check_device(device)  # a GPU this torch cannot use: one clear error before any worker is spawned
        # An engine killed with -9 (or by the OOM killer) could not clean up, and nobody else knows its names: the
        # next engine to start removes them, never touching those of an engine that still runs.
        try:
            removed = shm.sweep_dead()
        except OSError as e:  # someone else's mess must not keep this engine from starting
            log.warning("could not sweep leftovers of dead engines: %s", e)
        else:
            if removed:
                log.warning("removed %d leftover(s) of engines that no longer run: %s", len(removed),
                            ", ".join(removed))
        self.prefix = shm.new_prefix()
        try:
            self.ipc_dir = shm.make_ipc_dir(self.prefix)  # the sockets are not for other users to connect to
            self._ctx = zmq.Context()
            self._wake = Wakeup()
            self._specs = {e: ring.ipc_spec(e, self.prefix, n_slots=k, slot_bytes=b, ipc_dir=self.ipc_dir)
                           for e, (k, b) in ring_sizes(cfg, self.model_config).items()}
            asr_in = self._specs["asr_in"]
            self._asr_in = ring.Producer("asr_in", self.prefix, n_slots=asr_in.n_slots, slot_bytes=asr_in.slot_bytes,
                                         ipc_dir=self.ipc_dir, ctx=self._ctx)
            self._outs = {e: ring.Consumer(self._specs[e], ctx=self._ctx) for e in OUTPUT_EDGES}
            self._ctl = self._ctx.socket(zmq.ROUTER)
            self._ctl.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes over its identity
            self._ctl.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a missing worker raises, never vanishes
            self._ctl.setsockopt(zmq.LINGER, 0)
            ctl_addr = f"ipc://{os.path.join(self.ipc_dir, self.prefix + 'control')}"
            self._ctl.bind(ctl_addr)
            threads = cfg.worker_threads
            workers = {s: WorkerSpec(s, str(cfg.model_dir), str(cfg.vocoder_dir), self.placement.devices[s],
                                     cfg.dtype, cfg.limits, cfg.tts_options, cfg.vocoder_options, ctl_addr,
                                     self._specs, self.prefix, self.ipc_dir, os.getpid(), cfg.heartbeat_s,
                                     cfg.asr_batch, threads, cfg.cuda_graphs) for s in STAGES}
            self._sup = Supervisor(workers, hang_s=cfg.hang_s, step_timeout_s=cfg.step_timeout_s,
                                   ready_timeout_s=cfg.start_timeout_s)
            log.info("starting %d stage workers (%s, %s, %d torch threads each)", len(STAGES), cfg.placement,
                     cfg.dtype, threads)
            for s in STAGES:
                self._sup.spawn(s)
            self._thread = threading.Thread(target=self._loop, name="omni2-engine", daemon=True)
            self._thread.start()
            deadline = time.monotonic() + cfg.start_timeout_s
            while not self._ready.wait(0.1):
                failed = self._sup.failed()
                if failed or self._stopped.is_set() or time.monotonic() > deadline:
                    raise EngineError("start_failed", "; ".join(failed.values()) or "workers were not ready in "
                                      f"{cfg.start_timeout_s:.0f} s")
        except BaseException:
            self.stop()
            raise
        atexit.register(self.stop)  # before multiprocessing's own exit hook terminates the workers under us
        log.info("engine ready: %s", ", ".join(f"{s}={self.placement.devices[s]}" for s in STAGES))
        if hint := graphs_hint(self.placement.devices.values(), cfg.cuda_graphs):
            log.info(hint)
        return self

    def stop(self) -> None:
        """End every turn in flight with an error event, stop the workers, release all shared memory."""
        if self.prefix is None:
            return
        if self._stopped.is_set():  # stopped already, or a loop that failed is tearing down: wait for the end of it
            if self._thread is not None and self._thread is not threading.current_thread():
                self._thread.join(30)
            return
        self._end_all("shutdown", "the engine is shutting down")
        if self._thread is not None and self._thread.is_alive():
            self._command(_Stop())
            if self._thread is not threading.current_thread():  # stop() from on_event: the loop ends after it
                self._thread.join(30)
        else:
            self._teardown()
        atexit.unregister(self.stop)

    def _end_all(self, code: str, message: str) -> None:
        """No turn will run any more: a commit from now on is refused, every turn in flight ends with an error, and
        every reader — one between turns too — is woken and ends."""
        with self._lock:
            self._ending = True
            for s in list(self._sessions.values()):
                self._fail_turn(s, code, message, broadcast=False)
                s.events.put(_CANCELLED)

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- sessions -------------------------------------------------------------------------------------------
    def voices(self) -> list[str]:
        return self.vocoder_dir.voices()

    def open(self, session_id: str, options: SessionOptions = SessionOptions()) -> None:
        self._check_running()
        with self._lock:
            if session_id in self._sessions:
                raise EngineError("session_exists", f"session {session_id!r} is already open")
            if len(self._sessions) >= self.limits.max_sessions:
                raise EngineError("too_many_sessions", f"all {self.limits.max_sessions} sessions are in use "
                                  "(close one, or start the engine with more --max-sessions)")
            budget = self.config.vocoder_memory_bytes
            flow_bytes = session_flow_bytes(self.config, self.model_config, self.vocoder_dir.config,
                                            options.vocoder_schedule)
            held = sum(s.flow_bytes for s in self._sessions.values())
            if budget is not None and held + flow_bytes > budget:
                raise EngineError("engine_full", f"{len(self._sessions)} sessions are open and could hold "
                                  f"{held / 1e9:.2f} GB of vocoder state; another could hold {flow_bytes / 1e9:.2f} "
                                  f"GB, past the {budget / 1e9:.2f} GB budget (close a session, or use a bounded "
                                  "vocoder memory mode: --vocoder-left-chunks)")
            if options.voice not in self.voices():
                known = ", ".join(self.voices()) or "none"  # and no server path: this goes to remote clients
                raise EngineError("unknown_voice", f"unknown voice {options.voice!r} (known voices: {known}); the "
                                  f"daemon's operator adds one with `omni2-engine voice add {options.voice} --wav "
                                  f"prompt.wav --vocoder-dir DIR`")
            s = _Session(session_id, f"s{next(self._keys)}", options, flow_bytes)
            self._sessions[session_id] = self._by_key[s.key] = s
            ack = self._acks[s.key] = _OpenAck()
        self._broadcast(to_wire(s.key, s.options))
        if not ack.done.wait(self.config.open_timeout_s):
            ack.errors.append(f"not every stage answered within {self.config.open_timeout_s:.0f} s")
        with self._lock:
            self._acks.pop(s.key, None)
        if ack.errors:
            self._forget(s)
            raise EngineError("open_failed", f"session {session_id!r}: " + "; ".join(ack.errors))

    def append(self, session_id: str, pcm: np.ndarray, sample_rate: int) -> None:
        """Buffer a chunk of the user's turn (float32 in [-1, 1] or int16, mono)."""
        s = self._get(session_id)
        pcm = np.asarray(pcm)
        with self._lock:
            if s.chunks and sample_rate != s.rate:
                raise EngineError("bad_audio", f"sample rate changed within a turn ({s.rate} -> {sample_rate})")
            if pcm.ndim != 1:
                raise EngineError("bad_audio", f"audio chunks must be mono 1-D, got shape {pcm.shape}")
            have = sum(c.shape[0] for c in s.chunks) + pcm.shape[0]
            if sample_rate > 0 and have > self.limits.max_audio_seconds * sample_rate:
                raise EngineError("too_long", f"the turn is longer than {self.limits.max_audio_seconds:g} s; "
                                  "commit earlier (the chunk was not added)")
            s.chunks.append(pcm)
            s.rate = sample_rate

    def discard_input(self, session_id: str) -> None:
        """Drop the audio appended for the next turn (a reply in flight goes on)."""
        s = self._get(session_id)
        with self._lock:
            s.chunks = []

    def commit(self, session_id: str) -> int:
        """End of the user's turn: send it through the pipeline. Returns the turn number."""
        self._check_running()
        s = self._get(session_id)
        with self._lock:
            if self._ending:
                raise EngineError("stopped", "the engine is not running")
            if s.turn is not None:
                raise _busy(session_id)
            chunks, rate, s.chunks = s.chunks, s.rate, []
            if not chunks:
                raise EngineError("bad_audio", "no audio was appended for this turn")
            try:
                audio = prepare_audio(np.concatenate(chunks), rate, max_seconds=self.limits.max_audio_seconds)
            except (AudioError, ValueError, TypeError) as e:
                raise EngineError("bad_audio", str(e)) from None
            n, s.next_turn = s.next_turn, s.next_turn + 1
            s.turn = Turn(n, time.perf_counter(), self.read)
            _drop_cancel_marks(s.events)  # a cancel nobody waited for must not end the new turn's events()
            history = list(s.history)
            cuts = [x for t, k in sorted(s.cuts.items()) if t in history for x in (t, k)]
            msg = EngineToAsr([s.key], [n], [audio], [True], 16000, time.perf_counter(), [history],
                              [cuts] if cuts else [])
            if self._replay:
                self._held.append(msg)
                return n
        try:
            self._put_asr(msg)
        except BaseException:
            with self._lock:  # not sent: no turn in flight (a stage failed or the engine stops meanwhile)
                if s.turn is not None and s.turn.number == n:
                    s.turn = None
            raise
        return n

    def truncate(self, session_id: str, turn: int, tokens: int) -> int:
        """From the next turn on, the thinker reads only the first `tokens` text tokens of finished turn `turn`'s
        answer: what the user heard of it (the Realtime API's conversation.item.truncate). Returns the tokens
        kept (at most the answer's length). A cancelled or failed turn is not in the conversation at all."""
        s = self._get(session_id)
        with self._lock:
            if turn not in s.history:
                raise EngineError("bad_turn", f"turn {turn} is not in the conversation of session {session_id!r}: "
                                  "only finished turns are (a cancelled or failed one is left out whole)")
            if tokens < 0:
                raise EngineError("bad_request", f"tokens must be >= 0, got {tokens}")
            kept = min(tokens, s.answer_tokens.get(turn, tokens))
            s.cuts[turn] = kept
            return kept

    def submit(self, session_id: str, audio: np.ndarray, sample_rate: int = 16000) -> int:
        """A whole turn: what was appended before is replaced by `audio`. A refusal (`busy`) changes nothing."""
        s = self._get(session_id)
        with self._lock:
            if s.turn is not None:
                raise _busy(session_id)
            s.chunks = []
        self.append(session_id, audio, sample_rate)
        return self.commit(session_id)

    def events(self, session_id: str, timeout: float | None = None) -> Iterator[Event]:
        """The session's events in order, up to its turn's TurnDone or ErrorEvent (or its cancellation)."""
        if self.on_event is not None:
            raise EngineError("no_queue", "events are delivered to on_event for this engine")
        q = self._get(session_id).events
        while True:
            try:
                ev = q.get(timeout=timeout)
            except queue.Empty:
                raise EngineError("timeout", f"no event for {session_id!r} within {timeout} s") from None
            if ev is _CANCELLED:
                return
            yield ev
            if isinstance(ev, (TurnDone, ErrorEvent)):
                return

    def turn(self, session_id: str, audio: np.ndarray, sample_rate: int = 16000,
             timeout: float | None = None) -> Iterator[Event]:
        self.submit(session_id, audio, sample_rate)
        return self.events(session_id, timeout)

    def cancel(self, session_id: str) -> bool:
        """Barge-in: stop the turn in every stage; none of its events is delivered after this returns. False when
        no turn was in flight: its TurnDone (or ErrorEvent) has been delivered already, and it stays in the
        conversation. Audio appended for the next turn is dropped either way."""
        s = self._get(session_id)
        with self._lock:
            turn, s.turn = s.turn, None
            s.chunks = []
            if turn is None:
                return False
            drain(s.events)  # what is queued of that turn is not delivered either
            s.events.put(_CANCELLED)
        self._broadcast(CancelSession(s.key, turn.number))
        return True

    def close(self, session_id: str) -> None:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                return
            self.cancel(session_id)
            s.events.put(_CANCELLED)  # a reader waiting between turns ends too
            self._forget(s)

    def status(self) -> dict:
        with self._lock:
            sessions = len(self._sessions)
            flying = sum(1 for s in self._sessions.values() if s.turn is not None)
        stages = self._sup.status() if self._sup is not None else {}
        rings = {}
        for edge, (producer, _) in EDGES.items():
            spec = self._specs.get(edge)
            if producer == ENGINE:
                used = self._asr_in.stats(refresh=True).in_use if self._asr_in is not None else 0
            else:
                used = stages.get(producer, {}).get("rings", {}).get(edge, 0)
            rings[edge] = {"in_use": used, "n_slots": spec.n_slots if spec else 0,
                           "slot_bytes": spec.slot_bytes if spec else 0}
        return {"sessions": sessions, "max_sessions": self.limits.max_sessions, "turns_in_flight": flying,
                "stages": stages, "rings": rings, "errors": self._errors, "ready": self._ready.is_set(),
                "stopped": self._stopped.is_set()}

    def send_raw(self, stage: str, frames: list[bytes]) -> None:
        """Send raw frames to a worker's control socket: fault injection and debugging (a worker must survive
        anything that arrives there)."""
        self._command(_Send((stage,), list(frames)))

    # -- helpers for user threads -----------------------------------------------------------------------------
    def _get(self, session_id: str) -> _Session:
        s = self._sessions.get(session_id)
        if s is None:
            raise EngineError("unknown_session", f"no open session {session_id!r}")
        return s

    def _check_running(self) -> None:
        if self._stopped.is_set() or not self._ready.is_set():
            raise EngineError("stopped", "the engine is not running")
        failed = self._sup.failed()
        if failed:
            raise EngineError("stage_failed", "; ".join(failed.values()))

    def _forget(self, s: _Session) -> None:
        with self._lock:
            if self._sessions.get(s.user_id) is s:  # a close and a new open of the same id may have come between
                del self._sessions[s.user_id]
            self._by_key.pop(s.key, None)
        self._broadcast(CloseSession(s.key))

    def _broadcast(self, msg) -> None:
        """`msg` to every worker, from any thread (the loop thread sends it)."""
        self._command(_Send(STAGES, protocol.encode(msg)))

    def _command(self, cmd: _Send | _Stop) -> None:
        self._commands.put(cmd)
        self._wake.wake()

    def _put_asr(self, msg: EngineToAsr) -> None:
        with self._asr_lock:
            while True:
                self._check_running()
                if self._reclaim_asr.is_set():
                    self._reclaim_asr.clear()
                    self._asr_in.reclaim()
                try:
                    self._asr_in.put(msg, timeout=0.2)
                    return
                except ring.RingTimeout:
                    continue  # the ASR is behind: wait for a credit (backpressure on the caller)

    # -- the loop thread ------------------------------------------------------------------------------------
    def _loop(self) -> None:
        poller = zmq.Poller()
        poller.register(self._ctl, zmq.POLLIN)
        poller.register(self._wake.fd, zmq.POLLIN)
        for c in self._outs.values():
            poller.register(c.socket, zmq.POLLIN)
        try:
            while True:
                # 1. wait for a worker's message, an output, or a user thread's wake-up
                ready = dict(poller.poll(50))
                if self._wake.fd in ready:
                    self._wake.drain()
                # 2. what user threads asked for
                if not self._run_commands():
                    return
                # 3. what workers said, and what they produced
                if self._ctl in ready:
                    while self._ctl.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                        self._on_control(self._ctl.recv_multipart(zmq.NOBLOCK))
                for c in self._outs.values():
                    if c.socket in ready:
                        self._drain_out(c)
                # 4. health
                for stage, why in self._sup.check():
                    self._on_lost(stage, why)
                if not self._ready.is_set() and self._sup.all_ready():
                    self._ready.set()
        except Exception as e:
            log.exception("engine loop failed")
            # No event of any turn will come: every reader gets its final one now.
            self._end_all("stage_failed", f"the engine failed: {type(e).__name__}: {e}")
            raise
        finally:
            self._teardown()

    def _run_commands(self) -> bool:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True
            if isinstance(cmd, _Stop):
                return False
            for stage in cmd.stages:
                self._send(stage, cmd.frames)

    def _send(self, stage: str, frames: list) -> bool:
        try:
            self._ctl.send_multipart([stage.encode(), *frames], zmq.NOBLOCK)
            return True
        except zmq.ZMQError as e:  # not connected (starting or restarting): re-opened when it is ready
            log.debug("%s: control message not delivered: %s", stage, e)
            return False

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
            if self._sup.ready(msg.stage, msg.pid) and msg.stage in self._replay:
                self._reopen(msg.stage)
                seq = next(self._barrier_seq)
                self._barriers[msg.stage] = seq
                if not self._send(msg.stage, protocol.encode(Barrier(msg.stage, seq))):
                    self._replayed(msg.stage)  # nothing will answer (gone again: its loss starts a new replay)
        elif isinstance(msg, Barrier):
            if self._barriers.get(msg.stage) == msg.seq:  # an older one was a worker that died meanwhile
                self._replayed(msg.stage)
        elif isinstance(msg, SessionAck):
            with self._lock:
                ack = self._acks.get(msg.session_id)
                # A stage that answered already may answer again: a replacement worker was sent the open a second
                # time when it came up (_reopen), and refuses it as a session it holds. The first answer counts.
                if ack is not None and msg.stage in ack.left:
                    if msg.error:
                        ack.errors.append(f"{msg.stage}: {msg.error}")
                    ack.left.discard(msg.stage)
                    if not ack.left:
                        ack.done.set()
        elif isinstance(msg, SessionState):
            with self._lock:
                s = self._by_key.get(msg.session_id)
                if s is not None:
                    s.states.setdefault(msg.stage, {})[msg.turn] = msg
                    _keep_states(s)
                    if s.turn is not None and s.turn.number == msg.turn:
                        s.turn.on_state(msg.stage)
                        self._finish_if_done(s)
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

    def _drain_out(self, consumer: ring.Consumer) -> None:
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

    def _route(self, msg: LlmToEngine | TtsToEngine | VocoderToEngine) -> None:
        for i, key in enumerate(msg.session_ids):
            s = self._by_key.get(key)
            if s is None or s.turn is None or s.turn.number != msg.turns[i]:
                continue  # a closed session, or a turn that was cancelled or failed
            t, uid = s.turn, s.user_id
            if isinstance(msg, LlmToEngine):
                events = t.on_text(uid, msg.token_ids[i], msg.texts[i], msg.finish_reasons[i],
                                   msg.asr_t[i] if msg.asr_t else 0.0)
            elif isinstance(msg, TtsToEngine):
                events = t.on_units(uid, msg.units[i], msg.finals[i])
            elif isinstance(msg, VocoderToEngine):
                events = t.on_audio(uid, msg.pcm[i], msg.finals[i], msg.sample_rate, msg.in_t[i] if msg.in_t else 0.0)
            else:
                log.warning("unexpected %s on an output ring", type(msg).__name__)
                return
            for ev in events:
                self._emit(s, ev)
            self._finish_if_done(s)

    def _finish_if_done(self, s: _Session) -> None:
        t = s.turn
        if t is None or not t.done():
            return
        s.turn = None
        s.history.append(t.number)  # only a finished turn: a cancelled or failed one never enters it
        done = t.finish(s.user_id)
        s.answer_tokens[t.number] = len(done.token_ids)
        _keep_states(s)
        self._emit(s, done)

    def _emit(self, s: _Session, ev: Event) -> None:
        if self.on_event is not None:
            try:
                self.on_event(s.user_id, ev)
            except Exception:
                log.exception("on_event callback failed")
        else:
            s.events.put(ev)

    def _fail_turn(self, s: _Session, code: str, message: str, broadcast: bool = True) -> None:
        turn, s.turn = s.turn, None
        if turn is None:
            return
        self._emit(s, ErrorEvent(s.user_id, code, message, time.perf_counter()))
        if broadcast:
            self._broadcast(CancelSession(s.key, turn.number))

    # -- losing and regaining a worker (loop thread) -----------------------------------------------------------
    def _on_lost(self, stage: str, why: str) -> None:
        # A Barrier answer the lost worker sent before dying must not count for its replacement.
        self._barriers.pop(stage, None)
        edge = inputs_of(stage)[0]
        producer = EDGES[edge][0]
        if producer == ENGINE:
            self._reclaim_asr.set()
        else:
            self._send(producer, protocol.encode(RingReset(edge)))
        with self._lock:
            if self._ready.is_set():
                self._replay.add(stage)  # from now on new turns wait for the replacement (commit, _held)
            for s in list(self._by_key.values()):
                if s.turn is not None and s.turn.held_by(stage):
                    self._fail_turn(s, "worker_crashed", f"the {stage} worker {why}; this turn was lost "
                                    "(the worker is being restarted; the session stays open)")
        if not self._ready.is_set():
            # Still starting: a worker that died while loading would die again (a bad checkpoint, a device that
            # is not there); start() fails now instead of after the restart budget.
            self._sup.give_up(stage, f"the {stage} worker {why} before the engine was ready")
        elif not self._sup.restart(stage):
            self._barriers.pop(stage, None)
            with self._lock:
                self._replay.discard(stage)
                self._held = []  # their turns end with stage_failed below
                for s in list(self._by_key.values()):
                    self._fail_turn(s, "stage_failed", self._sup.failed()[stage])

    def _replayed(self, stage: str) -> None:
        """The replacement of `stage` holds every session again: once no stage is left to replay, the turns held
        meanwhile go out (sent earlier, they could overtake the re-opens that the worker has not read yet)."""
        self._barriers.pop(stage, None)
        with self._lock:
            self._replay.discard(stage)
            held, self._held = (self._held, []) if not self._replay else ([], self._held)
        if held:
            # Not from this thread: the ASR's credits wait on outputs only this loop drains.
            threading.Thread(target=self._put_held, args=(held,), name="held-turns", daemon=True).start()

    def _put_held(self, held: list[EngineToAsr]) -> None:
        for msg in held:
            try:
                self._put_asr(msg)
            except EngineError:
                return  # stopping: every turn in flight gets its shutdown event

    def _reopen(self, stage: str) -> None:
        """A replacement worker knows no session: open each again, and drop whatever of their past turns is
        still in flight towards it."""
        with self._lock:
            for s in self._by_key.values():
                self._send(stage, protocol.encode(to_wire(s.key, s.options)))
                restore = _restore_message(s, stage)
                if restore is not None:
                    self._send(stage, protocol.encode(restore))
                last = (s.turn.number if s.turn is not None else s.next_turn) - 1
                if last >= 0:
                    self._send(stage, protocol.encode(CancelSession(s.key, last)))

    def _teardown(self) -> None:
        """Stop workers, close sockets and rings, remove the engine's segments from /dev/shm and its ipc dir.
        Also after a start that failed half-way: whatever was not made yet is None."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self._sup is not None:
            if self._ctl is not None:
                for stage in STAGES:
                    self._send(stage, protocol.encode(Shutdown("engine stopping")))
            self._sup.stop()
        for c in self._outs.values():
            c.close()
        if self._asr_in is not None:
            self._asr_in.close()
        if self._ctl is not None:
            self._ctl.close(linger=0)
        if self._ctx is not None:
            self._ctx.destroy(linger=0)
        if self._wake is not None:
            self._wake.close()
        shm.sweep(self.prefix, self.ipc_dir)
        if self.ipc_dir is not None:
            shm.remove_dir(self.ipc_dir)
        log.info("engine stopped")


def session_flow_bytes(cfg: EngineConfig, model: ModelConfig, vocoder: VocoderConfig,
                       schedule: str | None = None) -> int:
    """The most flow state one session's reply can hold under `schedule` (None: the engine's): the longest reply
    the limits allow is ceil(max_new_tokens / R) writes of W units plus the final flush, voiced in calls of W units
    (live), of the hop (hop), or of whole writes, the final flush included (official-live)."""
    stream = model.generator.stream
    units = -(-cfg.limits.max_new_tokens // stream.read) * stream.write + FINAL_MAX_UNITS
    opts = cfg.vocoder_options
    call = {"live": stream.write, "hop": opts.token_hop or vocoder.token_hop,
            "official-live": FINAL_MAX_UNITS}[schedule or opts.schedule]
    return state_bytes_bound(vocoder.flow, units, opts.left_chunks, opts.mode == "recompute", DTYPE_BYTES[cfg.dtype],
                             call_units=call)


def _keep_states(s: _Session) -> None:
    """Forget the SessionStates no successor will need: those of turns that left the conversation (cancelled,
    failed) and, but for the thinker's, those of turns before its last."""
    history, last = set(s.history), (s.history[-1] if s.history else -1)
    current = s.turn.number if s.turn is not None else s.next_turn
    for stage, by_turn in s.states.items():
        for turn in [t for t in by_turn if t < current and t not in history or stage != "llm" and t < last]:
            del by_turn[turn]


def _restore_message(s: _Session, stage: str) -> RestoreSession | None:
    """What a restarted `stage` needs to go on with session `s` after its conversation's last turn -- or after
    the turn in flight, when `stage` had finished its part of it before the loss (the turn goes on elsewhere and
    may still join the conversation)."""
    kept = s.states.get(stage, {})
    latest = s.history + ([s.turn.number] if s.turn is not None and s.turn.number in kept else [])
    if stage == "llm":
        turns = [t for t in latest if t in kept]
        if len(turns) < len(latest):
            log.warning("session %s: the thinker's state of turns %s never arrived; its next turn will be refused",
                        s.user_id, sorted(set(latest) - set(turns)))
    else:
        turns = [latest[-1]] if latest and latest[-1] in kept else []
    if not turns:
        return None
    states = [kept[t] for t in turns]
    return RestoreSession(s.key, turns, [x.counter for x in states], states[-1].rng,
                          [x.speech for x in states] if stage == "llm" else [],
                          [x.answer for x in states] if stage == "llm" else [])


def _busy(session_id: str) -> EngineError:
    return EngineError("busy", f"session {session_id!r} is still answering its previous turn; cancel it or wait "
                       "for its response.done")


def drain(q: queue.Queue) -> list:
    """Empty q and return what it held; a reader taking an item at the same time is no error (empty() then
    get_nowait() would be)."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def _drop_cancel_marks(q: queue.Queue) -> None:
    for ev in drain(q):
        if ev is not _CANCELLED:
            q.put(ev)
