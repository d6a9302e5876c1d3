"""The engine, in process: four stage workers behind one small API (docs/ARCHITECTURE.md, "Runtime").

    engine (this process)                      workers (engine/worker.py)
    commit() --asr_in--> asr --asr_llm--> llm --llm_tts--> tts --tts_voc--> vocoder
                 events <--llm_out----------'   <--tts_out---'   <--voc_out-----'

User threads call open/commit/cancel/close; one loop thread owns every socket the engine reads (the control
ROUTER and the three output rings), turns what comes back into events (engine/turns.py) and runs the
supervisor's health checks. Only the asr_in ring is written from user threads, under a lock, so a full ASR
queue blocks the caller that submitted, never the loop that drains replies.

Sessions get a wire key of their own ("s<n>") so a user's session id can be reused at once after close without
stale data of the old session ever meeting the new one; turns are numbered per session and every data row
carries its turn, so whatever is still in flight from a cancelled or failed turn is dropped wherever it lands.
"""
from __future__ import annotations

import atexit
import itertools
import logging
import os
import queue
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import zmq

from omni2.engine import ring, shm
from omni2.engine.audio import AudioError, prepare_audio
from omni2.engine.config import ConfigError, Limits, Placement
from omni2.engine.engine_loop import _CANCELLED, EngineError, EngineLoop
from omni2.engine.protocol import (
    ErrorEvent,
    Event,
    ServerToAsr,
    TurnDone,
)
from omni2.engine.reference import SessionOptions
from omni2.engine.runners import EDGES, STAGES
from omni2.engine.supervisor import Supervisor
from omni2.engine.turns import Turn
from omni2.engine.worker import WorkerSpec
from omni2.stages.tts import TTSOptions
from omni2.stages.vocoder import VocoderOptions

log = logging.getLogger("omni2.engine")
@dataclass(frozen=True)
class EngineConfig:
    model_dir: str
    vocoder_dir: str
    placement: str = "cpu"  # cpu | cuda | asr=0,llm=1,tts=1,vocoder=1
    dtype: str = "float32"
    limits: Limits = Limits()
    tts_options: TTSOptions = TTSOptions()
    vocoder_options: VocoderOptions = VocoderOptions()
    ring_slots: int = 8
    asr_batch: int = 4
    heartbeat_s: float = 0.2
    hang_s: float = 1.0  # a worker silent this long is hung
    step_timeout_s: float = 300.0  # one step running this long is hung
    start_timeout_s: float = 600.0
    open_timeout_s: float = 60.0
    worker_threads: int | None = None  # torch threads per worker (None: the cores shared out among the four)


@dataclass
class _Session:
    user_id: str
    key: str
    options: SessionOptions
    events: queue.Queue = field(default_factory=queue.Queue)
    chunks: list = field(default_factory=list)  # audio appended for the next turn
    rate: int = 0
    turn: Turn | None = None
    next_turn: int = 0


class Engine(EngineLoop):
    def __init__(self, config: EngineConfig, on_event: Callable[[str, Event], None] | None = None):
        from omni2.engine.checkpoint import ModelDir
        from omni2.engine.vocoder_ckpt import VocoderDir

        self.config, self.on_event = config, on_event
        self.placement = Placement.parse(config.placement)
        if config.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError(f"dtype must be float32, bfloat16 or float16, got {config.dtype!r}")
        md = ModelDir(config.model_dir)
        self.model_config = md.config
        self.vocoder_dir = VocoderDir(config.vocoder_dir)
        self.sample_rate = self.vocoder_dir.config.sample_rate
        self.read = md.config.generator.stream.read
        self.limits = config.limits
        self._lock = threading.RLock()
        self._sessions: dict[str, _Session] = {}  # by user id
        self._by_key: dict[str, _Session] = {}
        self._keys = itertools.count()
        self._commands: queue.Queue = queue.Queue()
        self._acks: dict[str, dict] = {}
        self._asr_lock = threading.Lock()
        self._reclaim_asr = threading.Event()
        self._ready, self._stopped = threading.Event(), threading.Event()
        self._paused = threading.Event()  # tests: stop reading voc_out, to stall the pipeline's tail
        self._thread: threading.Thread | None = None
        self._errors = 0
        self._replay: set[str] = set()

    # -- lifecycle ------------------------------------------------------------------------------------------
    def start(self) -> Engine:
        cfg = self.config
        self.prefix, self.ipc_dir = shm.new_prefix(), tempfile.gettempdir()
        self._ctx = zmq.Context()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        specs = self._ring_specs()
        try:
            self._asr_in = ring.Producer("asr_in", self.prefix, n_slots=specs["asr_in"].n_slots,
                                         slot_bytes=specs["asr_in"].slot_bytes, ipc_dir=self.ipc_dir, ctx=self._ctx)
            self._outs = {e: ring.Consumer(specs[e], ctx=self._ctx) for e in ("llm_out", "tts_out", "voc_out")}
            self._ctl = self._ctx.socket(zmq.ROUTER)
            self._ctl.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a restarted worker takes over its identity
            self._ctl.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a missing worker raises, never vanishes
            self._ctl.setsockopt(zmq.LINGER, 0)
            ctl_addr = f"ipc://{os.path.join(self.ipc_dir, self.prefix + 'control')}"
            self._ctl.bind(ctl_addr)
            # Four workers each spinning torch's default thread pool (one per core) thrash a small machine.
            threads = cfg.worker_threads or max(1, (os.cpu_count() or 4) // len(STAGES))
            workers = {s: WorkerSpec(s, str(cfg.model_dir), str(cfg.vocoder_dir), self.placement.devices[s],
                                     cfg.dtype, cfg.limits, cfg.tts_options, cfg.vocoder_options, ctl_addr, specs,
                                     self.prefix, self.ipc_dir, os.getpid(), cfg.heartbeat_s, cfg.asr_batch,
                                     threads) for s in STAGES}
            self._sup = Supervisor(workers, hang_s=cfg.hang_s, step_timeout_s=cfg.step_timeout_s)
            log.info("starting %d stage workers (%s, %s)", len(STAGES), cfg.placement, cfg.dtype)
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
        return self

    def stop(self) -> None:
        """End every turn in flight with an error event, stop the workers, release all shared memory."""
        if self._stopped.is_set() or not hasattr(self, "prefix"):
            return
        with self._lock:
            for s in list(self._sessions.values()):
                self._fail_turn(s, "shutdown", "the engine is shutting down", broadcast=False)
        if self._thread is not None and self._thread.is_alive():
            self._command(("stop",))
            self._thread.join(30)
        else:
            self._teardown()
        atexit.unregister(self.stop)

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
            if options.voice not in self.voices():
                raise EngineError("unknown_voice", f"no voice {options.voice!r}; voices: {', '.join(self.voices())}")
            s = _Session(session_id, f"s{next(self._keys)}", options)
            self._sessions[session_id] = self._by_key[s.key] = s
        ack = {"left": set(STAGES), "errors": [], "done": threading.Event()}
        self._acks[s.key] = ack
        self._command(("open", s.key))
        if not ack["done"].wait(self.config.open_timeout_s):
            ack["errors"].append(f"not every stage answered within {self.config.open_timeout_s:.0f} s")
        self._acks.pop(s.key, None)
        if ack["errors"]:
            self._forget(s)
            raise EngineError("open_failed", f"session {session_id!r}: " + "; ".join(ack["errors"]))

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

    def commit(self, session_id: str) -> int:
        """End of the user's turn: send it through the pipeline. Returns the turn number."""
        self._check_running()
        s = self._get(session_id)
        with self._lock:
            if s.turn is not None:
                raise EngineError("busy", f"session {session_id!r} is still answering its previous turn; "
                                  "cancel it or wait for its response.done")
            chunks, rate, s.chunks = s.chunks, s.rate, []
            if not chunks:
                raise EngineError("bad_audio", "no audio was appended for this turn")
            try:
                audio = prepare_audio(np.concatenate(chunks), rate, max_seconds=self.limits.max_audio_seconds)
            except (AudioError, ValueError, TypeError) as e:
                raise EngineError("bad_audio", str(e)) from None
            n, s.next_turn = s.next_turn, s.next_turn + 1
            s.turn = Turn(n, time.perf_counter(), self.read)
        self._put_asr(ServerToAsr([s.key], [n], [audio], [True], 16000, time.perf_counter()))
        return n

    def submit(self, session_id: str, audio: np.ndarray, sample_rate: int = 16000) -> int:
        self._get(session_id).chunks.clear()
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

    def cancel(self, session_id: str) -> None:
        """Barge-in: stop the turn in every stage; none of its events is delivered after this returns."""
        s = self._get(session_id)
        with self._lock:
            turn, s.turn = s.turn, None
            s.chunks = []
            if turn is None:
                return
            while not s.events.empty():  # what is queued of that turn is not delivered either
                s.events.get_nowait()
            s.events.put(_CANCELLED)
        self._command(("cancel", s.key, turn.number))

    def close(self, session_id: str) -> None:
        with self._lock:
            s = self._sessions.get(session_id)
            if s is None:
                return
            self.cancel(session_id)
            self._forget(s)

    def status(self) -> dict:
        with self._lock:
            sessions = len(self._sessions)
            flying = sum(1 for s in self._sessions.values() if s.turn is not None)
        stages = self._sup.status() if hasattr(self, "_sup") else {}
        rings = {}
        for edge, (producer, _) in EDGES.items():
            spec = self._specs[edge] if hasattr(self, "_specs") else None
            if producer == "server":
                used = self._asr_in.stats(refresh=True).in_use if hasattr(self, "_asr_in") else 0
            else:
                used = stages.get(producer, {}).get("rings", {}).get(edge, 0)
            rings[edge] = {"in_use": used, "n_slots": spec.n_slots if spec else 0,
                           "slot_bytes": spec.slot_bytes if spec else 0}
        return {"sessions": sessions, "max_sessions": self.limits.max_sessions, "turns_in_flight": flying,
                "stages": stages, "rings": rings, "errors": self._errors, "ready": self._ready.is_set(),
                "stopped": self._stopped.is_set()}

    def _inject(self, stage: str, frames: list[bytes]) -> None:
        """Send raw frames to a worker's control socket (tests and debugging: a worker must survive anything)."""
        self._command(("raw", stage, frames))

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
            self._sessions.pop(s.user_id, None)
            self._by_key.pop(s.key, None)
        self._command(("close", s.key))

    def _command(self, cmd: tuple) -> None:
        self._commands.put(cmd)
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass

    def _put_asr(self, msg) -> None:
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
