"""A daemon for bench/latency.py: `serve/daemon.py`'s serve() in a child process, on a free loopback port.

Not `omni2-engine serve`: its command line fixes TTSOptions, and the offline side of the streaming-vs-offline
sweep needs `TTSOptions(offline=True)`. Everything else (front door, engine, workers, wire) is the daemon's own
code, so what the client measures is what a user of `serve` gets. The child is told its settings as one JSON
argument and dies with the bench (PR_SET_PDEATHSIG), so an interrupted sweep leaves no workers behind.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from omni2.engine.client import Client, DaemonUnavailable

START_TIMEOUT_S = 900.0  # 7b on a cold disk loads for minutes; the tiny preset on 2 busy cores takes ~25 s


@dataclass(frozen=True)
class DaemonSpec:
    """What one daemon of the sweep serves: the model variant and the options a sweep varies."""

    model_dir: str
    vocoder_dir: str
    placement: str = "cpu"
    dtype: str = "float32"
    threads: int | None = None
    max_sessions: int = 8
    max_new_tokens: int = 256
    schedule: str = "live"
    token_hop: int | None = None
    offline: bool = False
    # A worker's heartbeat thread shares the GIL with its step: on a loaded 2-core machine the default 1 s would
    # restart healthy workers mid-sweep and show up as failed turns, not as latency.
    hang_s: float = 10.0


class BenchDaemon:
    """start() -> address; stop() -> exit status. The child's log is kept beside the results."""

    def __init__(self, spec: DaemonSpec, log_path: Path):
        self.spec, self.log_path = spec, log_path
        self.port = _free_port()
        self.address = f"tcp://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = START_TIMEOUT_S) -> str:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen([sys.executable, __file__, json.dumps(asdict(self.spec)), self.address],
                                     stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=_die_with_parent)
        log.close()  # the child holds its own copy of the descriptor
        deadline = time.monotonic() + timeout
        with Client(self.address) as c:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the daemon exited with {self.proc.returncode}; its log "
                                       f"({self.log_path}):\n{self.log_path.read_text()[-3000:]}")
                try:
                    c.ping(timeout=0.5)
                    return self.address
                except DaemonUnavailable:
                    if time.monotonic() > deadline:
                        self.stop()
                        raise RuntimeError(f"the daemon was not ready in {timeout:.0f} s (log: {self.log_path})") \
                            from None

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)  # a clean stop: workers end and shared memory is swept
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def __enter__(self) -> BenchDaemon:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _serve(spec: DaemonSpec, bind: str) -> int:
    """In the child: the same configs `omni2-engine serve` builds from its flags, with the bench's TTS options."""
    import logging

    from omni2.engine.config import EngineConfig, Limits, ServerConfig, StreamParams, TTSOptions, VocoderOptions
    from omni2.engine.serve.daemon import serve

    logging.basicConfig(level="INFO", format="%(asctime)s bench daemon: %(message)s", stream=sys.stderr)
    raw = json.loads((Path(spec.model_dir) / "config.json").read_text())
    limits = Limits(max_sessions=spec.max_sessions, max_new_tokens=spec.max_new_tokens)
    server = ServerConfig(bind=bind, max_sessions_per_client=spec.max_sessions, max_new_tokens=spec.max_new_tokens,
                          max_turn_seconds=limits.max_audio_seconds,
                          stream_params=StreamParams.parse(raw.get("stream_params")).to_str())
    engine = EngineConfig(spec.model_dir, spec.vocoder_dir, placement=spec.placement, dtype=spec.dtype,
                          limits=limits, threads=spec.threads, hang_s=spec.hang_s,
                          tts_options=TTSOptions(offline=spec.offline),
                          vocoder_options=VocoderOptions(schedule=spec.schedule, token_hop=spec.token_hop))
    return serve(server, engine)


if __name__ == "__main__":
    sys.exit(_serve(DaemonSpec(**json.loads(sys.argv[1])), sys.argv[2]))
