"""Hang detection without false alarms: a worker whose heartbeats are late but which runs (a call holding the GIL, a
machine out of CPU or memory) is slow and is left alone; one in which nothing moves (stopped, deadlocked) is hung
`hang_s` after its last heartbeat (docs/ARCHITECTURE.md, "Reliability")."""
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from omni2.engine.cli.generate import session_options
from omni2.engine.config import EngineConfig, Limits
from omni2.engine.runtime import Engine
from omni2.engine.runtime.supervisor import Liveness
from omni2.engine.wire.protocol import TurnDone

HANG_S = 0.6  # short: three missed heartbeats (every 0.2 s) would be enough to kill a worker on the deadline alone
PASS_S = 0.05  # the engine loop looks at its workers at least this often
SLACK_S = 0.25  # what a loaded test machine may add to a sleep of this process
AUDIO = (np.random.default_rng(3).standard_normal(16000) * 0.1).astype(np.float32)

# A process whose heartbeat thread prints every 20 ms until its main thread enters a C loop that never lets go of
# the GIL (a builtin summing a range checks for no thread switch): the beats stop, the CPU time grows.
GIL_HOG = """
import threading, time
def beat():
    while True:
        print(time.monotonic(), flush=True)
        time.sleep(0.02)
threading.Thread(target=beat, daemon=True).start()
time.sleep(0.3)
sum(range(10 ** 12))
"""
DEADLOCK = "import threading; lock = threading.Lock(); lock.acquire(); print('locked', flush=True); lock.acquire()"
SPIN = "print('spinning', flush=True)\nwhile True: pass"


def child(code: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    p.stdout.readline()  # it runs its code now
    return p


def watch(liveness: Liveness, pid: int, last_beat, seconds: float) -> tuple[str, float, float]:
    """Ask for a verdict every loop pass, as the engine does, for up to `seconds`: (why, when, longest silence)."""
    t0, longest = time.monotonic(), 0.0
    while time.monotonic() - t0 < seconds:
        now = time.monotonic()
        silent = now - last_beat()
        longest = max(longest, silent)
        why = liveness.verdict(pid, silent)
        if why:
            return why, now, longest
        time.sleep(PASS_S)
    return "", time.monotonic(), longest


def test_a_call_holding_the_gil_starves_the_beats_but_is_not_a_hang():
    p = child(GIL_HOG)
    beats = [time.monotonic()]

    def read():
        for _ in p.stdout:
            beats.append(time.monotonic())

    threading.Thread(target=read, daemon=True).start()
    try:
        liveness = Liveness("gil", HANG_S, limit_s=60)
        why, _, longest = watch(liveness, p.pid, lambda: beats[-1], 4 * HANG_S)
        assert longest > 3 * HANG_S  # the beats really stopped ...
        assert why == "" and liveness.slow == 1  # ... and it was found running, once per silence
    finally:
        p.kill()
        p.wait()


@pytest.mark.parametrize("how", ["stopped", "deadlocked"])
def test_a_process_in_which_nothing_moves_is_hung_after_hang_s(how):
    p = child(SPIN if how == "stopped" else DEADLOCK)
    try:
        if how == "stopped":
            os.kill(p.pid, signal.SIGSTOP)
        last_beat = time.monotonic()  # the worker's last heartbeat cannot be later than this
        liveness = Liveness(how, HANG_S, limit_s=60)
        why, when, _ = watch(liveness, p.pid, lambda: last_beat, 4 * HANG_S)
        assert "nothing ran in it" in why, why
        assert HANG_S < when - last_beat < HANG_S + 2 * PASS_S + SLACK_S
        assert liveness.slow == 0
    finally:
        p.kill()
        p.wait()


def test_a_silence_past_the_limit_is_a_hang_even_while_running():
    p = child(SPIN)
    try:
        liveness = Liveness("spin", HANG_S, limit_s=1.0)
        last_beat = time.monotonic()
        why, when, _ = watch(liveness, p.pid, lambda: last_beat, 3.0)
        assert "the limit" in why and 1.0 < when - last_beat < 1.0 + 2 * PASS_S + SLACK_S
    finally:
        p.kill()
        p.wait()


# -- a real engine on a loaded machine ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def engine(tiny_ckpt, tiny_vocoder):
    eng = Engine(EngineConfig(str(tiny_ckpt), str(tiny_vocoder), limits=Limits(max_sessions=2, max_new_tokens=6),
                              threads=1, hang_s=HANG_S)).start()
    yield eng
    eng.stop()


def stages(engine) -> dict:
    return engine.status()["stages"]


def schedule(pid: int, policy: int) -> None:
    """Every thread of `pid` under `policy` (sched_setscheduler changes one thread)."""
    for tid in os.listdir(f"/proc/{pid}/task"):
        os.sched_setscheduler(int(tid), policy, os.sched_param(0))


def test_load_makes_workers_slow_not_hung_and_a_stopped_one_is_still_caught(engine):
    pids = {s: w["pid"] for s, w in stages(engine).items()}
    asr = pids["asr"]
    # 1. Load: two CPU hogs per core beside the four workers, 2 GB touched and held, the ASR worker in the lowest
    #    scheduling class so that it waits for a CPU far longer than HANG_S, a thread of this process (the engine's)
    #    holding the GIL, and a turn in flight through all of it.
    #    Whether the scheduler starves the heartbeat past HANG_S / 2 in a given round depends on the machine, so the
    #    load comes in up to three rounds, until the ASR worker has been seen silent-but-slow at least once.
    for _ in range(3):
        hogs = [subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.DEVNULL)
                for _ in range(2 * (os.cpu_count() or 2))]
        memory = subprocess.Popen([sys.executable, "-c", "import time; x = b'1' * (2 << 30); time.sleep(60)"])
        schedule(asr, os.SCHED_IDLE)
        engine.open("s", session_options(seed=1, greedy=True))
        try:
            engine.submit("s", AUDIO)
            gil = threading.Thread(target=lambda: sum(range(5 * 10 ** 7)))
            gil.start()
            time.sleep(4.0)
            gil.join()
        finally:
            for p in (*hogs, memory):
                p.kill()
                p.wait()
            with contextlib.suppress(PermissionError):  # unprivileged, RLIMIT_NICE may forbid the way back
                schedule(asr, os.SCHED_OTHER)
        events = list(engine.events("s", timeout=60))
        engine.close("s")
        assert isinstance(events[-1], TurnDone), events[-1]
        st = stages(engine)
        assert {s: w["pid"] for s, w in st.items()} == pids and all(w["restarts"] == 0 for w in st.values()), st
        if st["asr"]["slow"] >= 1:
            break
    assert st["asr"]["slow"] >= 1  # it was silent past HANG_S under the load: the deadline alone would have killed it

    # 2. A stopped worker is caught HANG_S after its last heartbeat at most (plus two passes of the engine loop),
    #    and restarted.
    os.kill(asr, signal.SIGSTOP)
    stopped = time.monotonic()
    while stages(engine)["asr"]["pid"] == asr:
        assert time.monotonic() - stopped < HANG_S + 2.0, "the stopped worker was not detected"
        time.sleep(0.01)
    assert time.monotonic() - stopped < HANG_S + 0.5
    deadline = time.monotonic() + 120
    while not (w := stages(engine)["asr"])["ready"]:
        assert time.monotonic() < deadline, w
        time.sleep(0.1)
    assert w["restarts"] == 1 and w["pid"] != asr
    engine.open("after", session_options(seed=1, greedy=True))
    try:
        assert isinstance(list(engine.turn("after", AUDIO, timeout=60))[-1], TurnDone)
    finally:
        engine.close("after")
