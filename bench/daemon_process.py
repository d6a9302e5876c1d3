"""A daemon in a child process for the bench scripts: started on a free loopback port, waited for until it answers a
ping, stopped with SIGTERM (a clean stop: its workers end and its shared memory is swept), killed only if that
hangs. Its output goes to a log file kept beside the results; if it dies while starting, the error quotes the log.

    with DaemonProcess(serve_argv(address, "--max-sessions", "6"), address, out / "daemon.log"):
        ...                                     # talk to `address` with omni2.engine.client
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from omni2.engine.client import Client, DaemonUnavailable

START_TIMEOUT_S = 900.0  # 7b on a cold disk loads for minutes; the tiny preset on 2 busy cores takes ~25 s


def free_address() -> str:
    """tcp://127.0.0.1:PORT on a port nobody holds now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def serve_argv(address: str, *serve_args: str) -> list[str]:
    """`omni2-engine serve` of this interpreter's environment, bound to `address`."""
    exe = os.path.join(os.path.dirname(sys.executable), "omni2-engine")
    return [exe, "serve", "--bind", address, *serve_args]


class DaemonProcess:
    """start() -> address; stop() -> exit status. `argv` must make the child serve on `address`."""

    def __init__(self, argv: list[str], address: str, log_path: Path | None = None, token: str = ""):
        self.argv, self.address, self.log_path, self.token = argv, address, log_path, token
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = START_TIMEOUT_S) -> str:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log = open(self.log_path, "w")
        else:
            log = None  # the child writes to this terminal
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT if log else None, env=env,
                                     preexec_fn=_die_with_parent)
        if log is not None:
            log.close()  # the child holds its own copy of the descriptor
        deadline = time.monotonic() + timeout
        with Client(self.address, token=self.token) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the daemon exited with {self.proc.returncode} while starting"
                                       + self._log_tail())
                try:
                    c.ping(timeout=0.5)
                    return self.address
                except DaemonUnavailable:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"the daemon was not ready in {timeout:.0f} s" + self._log_tail()) \
                            from None

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> DaemonProcess:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.is_file():
            return ""
        return f"; its log ({self.log_path}):\n{self.log_path.read_text()[-3000:]}"


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
