"""A real `omni2-engine serve` subprocess for the daemon tests: start on a free loopback port, wait until it answers,
stop with SIGTERM and check that nothing is left behind (worker processes, shared memory, ipc files)."""
from __future__ import annotations

import glob
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from omni2.engine.client import Client, DaemonUnavailable

EXE = str(Path(sys.executable).parent / "omni2-engine")
START_TIMEOUT = 120.0


def _die_with_parent() -> None:
    """In the child: SIGTERM when the test process dies (a killed pytest must not leave a daemon behind)."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def free_port() -> int:
    """A free loopback port below the kernel's ephemeral range: a port the kernel hands out (bind to 0) can be
    given again, between this check and the daemon's bind, as the source port of any outgoing connection, and
    the daemon then fails with 'Address already in use'."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    rng = random.Random()  # not the tests' seeded global generator: parallel workers must draw apart
    while True:
        port = rng.randrange(10000, max(low, 10001))
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def env(**extra) -> dict:
    e = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    e.update(extra)
    return e


class Daemon:
    def __init__(self, args: list[str], log_path: Path, *, host: str = "127.0.0.1", port: int | None = None,
                 token: str = "", extra_env: dict | None = None, argv: list[str] | None = None,
                 cwd: Path | None = None, client_kw: dict | None = None):
        """`omni2-engine serve ARGS --bind tcp://HOST:PORT`, or exactly `argv` (run in `cwd`) when given."""
        self.port = port or free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.token = token
        self.client_kw = dict(client_kw or {}, token=token)  # how wait_ready() and client() connect
        self.log_path = log_path
        if "--bind" not in args:
            args = [*args, "--bind", f"tcp://{host}:{self.port}"]
        if "--threads" not in args:
            args = [*args, "--threads", "1"]  # the test process's count (tests/conftest.py): PCM compares bit-exact
        if "--hang-timeout" not in args:
            args = [*args, "--hang-timeout", "5"]  # a loaded test machine must not make a healthy worker look hung
        self._log = open(log_path, "w")
        self.proc = subprocess.Popen(argv or [EXE, "serve", *args], stdout=self._log, stderr=subprocess.STDOUT,
                                     env=env(**(extra_env or {})), cwd=cwd, preexec_fn=_die_with_parent)
        self.stopped = self.ready = False

    def wait_ready(self, timeout: float = START_TIMEOUT) -> Daemon:
        """Block until the daemon answers a ping (client() calls it: fixtures may start a daemon and go on)."""
        if self.ready:
            return self
        deadline = time.monotonic() + timeout
        with Client(self.address, **self.client_kw) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
                try:
                    c.ping(timeout=0.5)
                    self.ready = True
                    return self
                except DaemonUnavailable:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"daemon not ready in {timeout} s:\n{self.log()}") from None

    def client(self, **kw) -> Client:
        self.wait_ready()
        return Client(self.address, **{**self.client_kw, **kw})

    def log(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text()

    def worker_pids(self) -> list[int]:
        with self.client() as c:
            return [s["pid"] for s in c.status()["stages"].values()]

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM; returns the exit status (kills it, and fails the caller's checks, if it hangs)."""
        if self.stopped:
            return self.proc.returncode
        self.stopped = True
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode

    def leftovers(self) -> list[str]:
        """Shared-memory segments and ipc files of this daemon's engine (named omni2-<pid>-...)."""
        pat = f"omni2-{self.proc.pid}-*"
        return glob.glob(f"/dev/shm/{pat}") + glob.glob(os.path.join(tempfile.gettempdir(), pat))


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0); it is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def speech(seconds: float = 1.0, seed: int = 0, sr: int = 16000) -> np.ndarray:
    """A voiced-sounding test signal: a few harmonics under a syllable-rate envelope, float32 in [-0.5, 0.5]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    f0 = 120 + 40 * rng.random()
    x = sum(np.sin(2 * np.pi * f0 * k * t + rng.random() * 6.28) / k for k in range(1, 6))
    env_ = 0.5 + 0.5 * np.sin(2 * np.pi * 3 * t) ** 2
    return (0.25 * x * env_ / 2.3).astype(np.float32)
