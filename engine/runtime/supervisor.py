"""The stage worker processes: spawn, readiness, health, restart, shutdown, and the shared-memory sweep.

The supervisor owns no socket; the engine's loop thread (runtime/engine.py) feeds it what the workers say
(`ready`, `beat`) and asks it, every turn of that loop, which workers are dead or hung (`check`). A worker is
dead when its process has exited; hung when its current step has run for longer than `step_timeout_s`, or when
its heartbeats stopped and the process is not moving either (`Liveness`). Either way it is killed, what it owned
in /dev/shm is swept, and it is spawned again (up to `max_restarts` in `restart_window_s`, after which the stage
has failed; while the engine is still starting, the engine `give_up`s on the stage instead).
"""
from __future__ import annotations

import collections
import contextlib
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import dataclass, field, replace

from omni2.engine.config import WORKER_ENV, ConfigError
from omni2.engine.runtime.topology import outputs_of
from omni2.engine.runtime.worker import WorkerSpec, main
from omni2.engine.wire import shm
from omni2.engine.wire.protocol import Heartbeat

log = logging.getLogger("omni2.supervisor")

HAVE_PROC = os.path.exists("/proc/self/task")  # Linux: the kernel says what a silent worker is doing
TICK_NS = 1_000_000_000 // os.sysconf("SC_CLK_TCK")
LOG_EVERY_S = 30.0  # at most one "slow, not hung" warning per worker in this long
BACKGROUND = ("ZMQbg/",)  # thread names of libzmq's own io threads: they wake for every message, whatever ours do


@dataclass(frozen=True, slots=True)
class Probe:
    """What the kernel says about a process at one instant (/proc/<pid>/task/*), its libzmq threads left out."""

    t: float  # monotonic
    cpu_ns: int  # time on a CPU, summed over its threads
    states: str  # a letter per thread: R running or waiting for a CPU, D waiting for the disk (paging memory back
    #              in, say), S sleeping, T stopped

    @property
    def moving(self) -> bool:
        """Some thread runs, or waits for a CPU or the disk: the process is slow, not stuck."""
        return any(c in "RD" for c in self.states)


def probe(pid: int) -> Probe | None:
    """None if the process is gone (or there is no /proc)."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except (FileNotFoundError, ProcessLookupError, NotADirectoryError):
        return None
    cpu, states = 0, []
    for tid in tids:
        stat = shm.proc_stat(pid, int(tid))
        if stat is None:
            continue  # the thread ended meanwhile
        name, fields = stat
        if name.startswith(BACKGROUND):
            continue
        states.append(fields[0])
        try:
            with open(f"/proc/{pid}/task/{tid}/schedstat", "rb") as f:
                cpu += int(f.read().split()[0])  # nanoseconds on a CPU
        except (OSError, ValueError, IndexError):  # a kernel without schedstat: clock ticks (10 ms) will do
            cpu += (int(fields[11]) + int(fields[12])) * TICK_NS
    return Probe(time.monotonic(), cpu, "".join(states)) if states else None


class Liveness:
    """Tells a hung worker from a slow one once its heartbeats stop.

    Silence alone proves nothing: a long step or a call that holds the GIL starves the io thread that beats, and a
    busy or memory-starved machine delays every thread of every process. So once a worker has been silent for
    `hang_s / 2`, the kernel is asked what it does (`probe`, every pass of the engine loop): while one of its
    threads runs or waits for a CPU or the disk, or its CPU time grows, it is slow and is left alone. It is hung
    when it has been silent for `hang_s` and nothing moved in it for the last `hang_s / 2` of that (stopped,
    deadlocked, blocked with the GIL held), and whatever it does once it has been silent for `limit_s` (a loop
    that never ends). Without /proc, silence for `hang_s` is hung.
    """

    def __init__(self, name: str, hang_s: float, limit_s: float):
        self.name, self.hang_s, self.limit_s = name, hang_s, max(limit_s, hang_s)
        self.still: Probe | None = None  # the first look at it since it last moved
        self.slow = 0  # silences past hang_s in which it was found moving (the deadline alone would have killed it)
        self._counted = False  # this silence is counted in `slow` already
        self._told = -LOG_EVERY_S  # when a slow silence was last logged (monotonic)

    def heard(self) -> None:
        """A heartbeat (or the ready message) arrived."""
        self.still, self._counted = None, False

    def verdict(self, pid: int, silent: float) -> str:
        """Why the worker is hung after `silent` s without a heartbeat, or "" (not hung, or not yet known)."""
        if silent > self.limit_s:
            return f"no heartbeat for {silent:.1f} s (the limit, whatever it is doing)"
        if silent <= self.hang_s / 2:
            return ""
        if not HAVE_PROC:
            return f"no heartbeat for {silent:.1f} s" if silent > self.hang_s else ""
        p = probe(pid)
        if p is None:
            return ""  # it exited: the next check reports how
        if p.moving or self.still is not None and p.cpu_ns != self.still.cpu_ns:
            self.still = None if p.moving else p
            if silent > self.hang_s and not self._counted:  # where the deadline alone would have killed it
                self._counted, self.slow = True, self.slow + 1
                if p.t - self._told >= LOG_EVERY_S:  # an overloaded machine would say so every second
                    log.warning("%s worker (pid %d): no heartbeat for %.1f s, but it is running (threads %s): slow, "
                                "not hung (%d times so far)", self.name, pid, silent, p.states, self.slow)
                    self._told = p.t
            return ""
        if self.still is None:
            self.still = p
            return ""
        if silent > self.hang_s and p.t - self.still.t >= self.hang_s / 2:
            return (f"no heartbeat for {silent:.1f} s, and nothing ran in it for {p.t - self.still.t:.1f} s "
                    f"(threads {p.states})")
        return ""


@dataclass
class WorkerState:
    spec: WorkerSpec
    liveness: Liveness
    process: multiprocessing.Process | None = None
    ready: bool = False
    started: float = 0.0  # monotonic
    last_beat: float = 0.0
    beat: Heartbeat | None = None
    restarts: int = 0
    recent: collections.deque = field(default_factory=lambda: collections.deque(maxlen=32))
    failed: str = ""  # why the stage gave up (restart budget spent, or it died while the engine started)

    # Read by user threads (status) while the loop thread replaces `process`: one read of it each.
    @property
    def pid(self) -> int | None:
        p = self.process
        return p.pid if p is not None else None

    def alive(self) -> bool:
        p = self.process
        return p is not None and p.is_alive()


class Supervisor:
    def __init__(self, specs: dict[str, WorkerSpec], *, hang_s: float = 1.0, step_timeout_s: float = 120.0,
                 max_restarts: int = 5, restart_window_s: float = 60.0, ready_timeout_s: float = 600.0):
        beat_s = max(spec.heartbeat_s for spec in specs.values())
        if hang_s < 2 * beat_s:  # an idle worker moves once per heartbeat: Liveness looks for hang_s / 2
            raise ConfigError(f"the hang timeout ({hang_s:g} s) must be at least twice the heartbeat period "
                              f"({beat_s:g} s)")
        self.mp = multiprocessing.get_context("spawn")  # no fork: torch, CUDA and zmq threads do not survive it
        self.workers = {s: WorkerState(spec, Liveness(s, hang_s, step_timeout_s))
                        for s, spec in specs.items()}
        self.hang_s, self.step_timeout_s, self.ready_timeout_s = hang_s, step_timeout_s, ready_timeout_s
        self.max_restarts, self.restart_window_s = max_restarts, restart_window_s

    def spawn(self, stage: str) -> None:
        w = self.workers[stage]
        w.spec = replace(w.spec, parent_pid=os.getpid())
        w.process = self.mp.Process(target=main, args=(w.spec,), name=f"omni2-{stage}", daemon=True)
        w.ready, w.beat = False, None
        w.started = w.last_beat = time.monotonic()
        w.liveness.heard()
        with _environment(WORKER_ENV):  # a spawned process starts with the environment of this moment
            w.process.start()
        log.info("%s worker started (pid %d, %s)", stage, w.process.pid, w.spec.device)

    def ready(self, stage: str, pid: int) -> bool:
        """A worker says it is ready; False (and nothing changes) when `pid` is not the stage's current worker: a
        predecessor that said so and was lost before the message was read must not mark its replacement ready."""
        w = self.workers.get(stage)
        if w is None or w.pid != pid:
            log.info("%s: ignoring the ready of pid %s (not the stage's worker now)", stage, pid)
            return False
        w.ready, w.last_beat = True, time.monotonic()
        w.liveness.heard()
        log.info("%s worker ready (pid %s) after %.1f s", stage, w.pid, time.monotonic() - w.started)
        return True

    def beat(self, hb: Heartbeat) -> None:
        w = self.workers.get(hb.stage)
        if w is not None and w.pid == hb.pid:  # a late beat of a killed predecessor says nothing
            w.beat, w.last_beat = hb, time.monotonic()
            w.liveness.heard()

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
                why = f"exited with {exit_status(w.process.exitcode)}"
            elif not w.ready:
                # A first start has the engine's own deadline; a replacement that never comes up would hold every
                # new turn (they wait for it) forever.
                if w.restarts and now - w.started > self.ready_timeout_s:
                    why = f"its replacement was not ready {self.ready_timeout_s:.0f} s after it started"
            else:
                silent = now - w.last_beat
                # The step clock keeps running while the beats that report it are late.
                step_s = w.beat.step_s + silent if w.beat is not None and w.beat.busy else 0.0
                if step_s > self.step_timeout_s:
                    why = f"a step has run for {step_s:.0f} s (limit {self.step_timeout_s:.0f} s)"
                else:
                    why = w.liveness.verdict(w.pid, silent)
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

    def give_up(self, stage: str, why: str) -> None:
        """Mark the stage failed without a restart (a worker that died while the engine was starting)."""
        self.workers[stage].failed = why
        log.error("%s; not restarting it", why)

    def failed(self) -> dict[str, str]:
        return {s: w.failed for s, w in self.workers.items() if w.failed}

    def stop(self, timeout: float = 5.0) -> None:
        """After the engine sent Shutdown: wait for clean exits, then kill what is left, then sweep. A worker still
        loading reads no Shutdown before it has loaded (minutes, for a large model), and owns nothing the sweeps do
        not remove: it is killed at once."""
        for w in self.workers.values():
            if w.process is not None and not w.ready and w.process.is_alive():
                w.process.kill()
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
                      "active": b.active if b else 0, "slow": w.liveness.slow,
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


def exit_status(code: int | None) -> str:
    """A process's exit code as words: 1, or signal SIGKILL (a real-time signal has no name: signal 40)."""
    if code is None or code >= 0:
        return str(code)
    try:
        return f"signal {signal.Signals(-code).name}"
    except ValueError:
        return f"signal {-code}"


@contextlib.contextmanager
def _environment(values: dict[str, str]):
    """os.environ with `values` added where absent, for the duration (the engine's own process keeps its own)."""
    added = [k for k in values if k not in os.environ]
    os.environ.update({k: values[k] for k in added})
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)
