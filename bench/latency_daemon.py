"""A daemon for bench/latency.py: `serve/daemon.py`'s serve() in a child process, on a free loopback port.

Not `omni2-engine serve`: its command line fixes TTSOptions, and the offline side of the streaming-vs-offline
sweep needs `TTSOptions(offline=True)`. Everything else (front door, engine, workers, wire) is the daemon's own
code, so what the client measures is what a user of `serve` gets. The child is told its settings as one JSON
argument and dies with the bench (bench/daemon_process.py), so an interrupted sweep leaves no workers behind.
"""
from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from daemon_process import DaemonProcess, free_address


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
    left_chunks: int | None = None  # the flow's window; None = the exact official flow
    offline: bool = False
    cuda_graphs: bool = False
    vocoder_batch: int | None = None  # sessions the vocoder voices in one step; None = serve's default
    # A worker's heartbeat thread shares the GIL with its step: on a loaded 2-core machine the default 1 s would
    # restart healthy workers mid-sweep and show up as failed turns, not as latency.
    hang_s: float = 10.0


def bench_daemon(spec: DaemonSpec, log_path: Path) -> DaemonProcess:
    """The sweep's daemon for `spec`, not started yet."""
    address = free_address()
    return DaemonProcess([sys.executable, __file__, json.dumps(asdict(spec)), address], address, log_path)


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
                          tts_options=TTSOptions(offline=spec.offline), cuda_graphs=spec.cuda_graphs,
                          vocoder_options=VocoderOptions(schedule=spec.schedule, token_hop=spec.token_hop,
                                                         left_chunks=spec.left_chunks,
                                                         max_batch=spec.vocoder_batch or VocoderOptions.max_batch))
    return serve(server, engine)


if __name__ == "__main__":
    sys.exit(_serve(DaemonSpec(**json.loads(sys.argv[1])), sys.argv[2]))
