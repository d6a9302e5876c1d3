"""The stage worker processes: spawn, readiness, health, restart, shutdown, and the shared-memory sweep.

The supervisor owns no socket; the engine's loop thread (runtime/engine.py) feeds it what the workers say
(`ready`, `beat`) and asks it, every turn of that loop, which workers are dead or hung (`check`). A worker is
dead when its process has exited; hung when its heartbeat thread has been silent for `hang_s`, or its
current step has run for longer than `step_timeout_s`. Either way it is killed, what it owned in /dev/shm is
swept, and it is spawned again (up to `max_restarts` in `restart_window_s`, after which the stage has failed).
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field, replace

from omni2.engine.runtime.topology import outputs_of
from omni2.engine.runtime.worker import WorkerSpec, main
from omni2.engine.wire import shm
from omni2.engine.wire.protocol import Heartbeat

log = logging.getLogger("omni2.supervisor")


@dataclass
class WorkerState:
    spec: WorkerSpec
    process: multiprocessing.Process | None = None
    ready: bool = False
    started: float = 0.0  # monotonic
    last_beat: float = 0.0
    beat: Heartbeat | None = None
    restarts: int = 0
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=32))
    failed: str = ""  # why the stage gave up (restart budget spent)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def alive(self) -> bool:
        return self.process is not None and self.process.is_alive()


class Supervisor:
    def __init__(self, specs: dict[str, WorkerSpec], *, hang_s: float = 1.0, step_timeout_s: float = 120.0,
                 max_restarts: int = 5, restart_window_s: float = 60.0):
        self.mp = multiprocessing.get_context("spawn")  # no fork: torch, CUDA and zmq threads do not survive it
        self.workers = {s: WorkerState(spec) for s, spec in specs.items()}
        self.hang_s, self.step_timeout_s = hang_s, step_timeout_s
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s

    def spawn(self, stage: str) -> None:
        w = self.workers[stage]
        w.spec = replace(w.spec, parent_pid=os.getpid())
        w.process = self.mp.Process(target=main, args=(w.spec,), name=f"omni2-{stage}", daemon=True)
        w.ready, w.beat = False, None
        w.started = w.last_beat = time.monotonic()
        w.process.start()
        log.info("%s worker started (pid %d, %s)", stage, w.process.pid, w.spec.device)

    def ready(self, stage: str) -> None:
        w = self.workers[stage]
        w.ready, w.last_beat = True, time.monotonic()
        log.info("%s worker ready (pid %s) after %.1f s", stage, w.pid, time.monotonic() - w.started)

    def beat(self, hb: Heartbeat) -> None:
        w = self.workers.get(hb.stage)
        if w is not None and w.pid == hb.pid:  # a late beat of a killed predecessor says nothing
            w.beat, w.last_beat = hb, time.monotonic()

    def all_ready(self) -> bool:
        return all(w.ready for w in self.workers.values())

    def sentinels(self) -> list[int]:
        return [w.process.sentinel for w in self.workers.values() if w.process is not None]

    def check(self) -> list[tuple[str, str]]:
        """(stage, why) for every worker found dead or hung now; each is killed, reaped and swept."""
        now, lost = time.monotonic(), []
        for stage, w in self.workers.items():
            if w.process is None or w.failed:
                continue
            why = ""
            if not w.process.is_alive():
                code = w.process.exitcode
                why = f"exited with {'signal ' + signal.Signals(-code).name if code and code < 0 else code}"
            elif w.ready and now - w.last_beat > self.hang_s:
                why = f"no heartbeat for {now - w.last_beat:.1f} s"
            elif w.ready and w.beat is not None and w.beat.step_s > self.step_timeout_s:
                why = f"a step has run for {w.beat.step_s:.0f} s (limit {self.step_timeout_s:.0f} s)"
            if why:
                log.error("%s worker (pid %s) lost: %s", stage, w.pid, why)
                self._kill(w)
                lost.append((stage, why))
        return lost

    def restart(self, stage: str) -> bool:
        """Spawn a replacement; False (and the stage marked failed) once the restart budget is spent."""
        w, now = self.workers[stage], time.monotonic()
        w.recent.append(now)
        if sum(1 for t in w.recent if now - t < self.restart_window_s) > self.max_restarts:
            w.failed = f"{stage} worker died {self.max_restarts + 1} times within {self.restart_window_s:.0f} s"
            log.error("%s; not restarting it", w.failed)
            return False
        w.restarts += 1
        self.spawn(stage)
        return True

    def failed(self) -> dict[str, str]:
        return {s: w.failed for s, w in self.workers.items() if w.failed}

    def stop(self, timeout: float = 5.0) -> None:
        """After the engine sent Shutdown: wait for clean exits, then kill what is left, then sweep."""
        deadline = time.monotonic() + timeout
        for w in self.workers.values():
            if w.process is not None:
                w.process.join(max(0.0, deadline - time.monotonic()))
        for w in self.workers.values():
            if w.process is not None and w.process.is_alive():
                log.warning("%s worker did not stop in time; killing it", w.spec.stage)
                w.process.terminate()
                w.process.join(1.0)
            self._kill(w)

    def status(self) -> dict:
        out = {}
        for s, w in self.workers.items():
            b = w.beat
            out[s] = {"pid": w.pid, "alive": w.alive(), "ready": w.ready, "restarts": w.restarts,
                      "device": w.spec.device, "failed": w.failed,
                      "busy": bool(b and b.busy), "sessions": b.sessions if b else 0, "queued": b.queued if b else 0,
                      "last_step_ms": round(b.last_step_ms, 3) if b else 0.0, "last_batch": b.last_batch if b else 0,
                      "max_batch": b.max_batch if b else 0, "blocked": b.blocked if b else "",
                      "active": b.active if b else 0,
                      "steps": b.steps if b else 0, "rings": dict(b.rings) if b else {}}
        return out

    def _kill(self, w: WorkerState) -> None:
        p = w.process
        if p is not None:
            if p.is_alive():
                os.kill(p.pid, signal.SIGKILL)
            p.join(5.0)
        w.process, w.ready = None, False
        for edge in outputs_of(w.spec.stage):  # the segments and ipc files it owned as a producer
            shm.sweep(f"{w.spec.prefix}{edge}.", w.spec.ipc_dir)
