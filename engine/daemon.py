"""`omni2-engine serve`: the daemon process. Config and bind policy, the demo model when none is given, then the
engine's start, the front door (engine/server.py) and a clean stop on SIGINT/SIGTERM.

Order matters: the bind is checked (loopback, or a token / CURVE client list) and taken before minutes of model
loading, so a mistake or a taken port fails at once; requests that arrive while the engine loads wait in the socket.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq

from omni2.engine.config import CheckpointError, ConfigError, Limits, StreamParams
from omni2.engine.server import Server

log = logging.getLogger("omni2.serve")


@dataclass(frozen=True)
class ServerConfig:
    bind: str = "tcp://127.0.0.1:5555"
    token: str | None = None  # required for a non-loopback bind
    max_frame_bytes: int = 4 << 20  # one request, all frames together; 30 s of 48 kHz float32 is 5.8 MB: chunk it
    max_sessions_per_client: int = 8
    max_turn_seconds: float = 30.0  # user audio per turn (Limits.max_audio_seconds)
    max_new_tokens: int = 256  # the largest max_new_tokens a session may ask for (Limits.max_new_tokens)
    stream_params: str = "(3,10)"  # the model's Read-R-Write-W, reported in session.opened
    probe_s: float = 2.0  # a client with sessions that sent nothing for this long is probed (a pong it ignores)
    reclaim_s: float = 10.0  # a client unreachable this long loses its sessions (a reconnect within it keeps them)
    idle_timeout_s: float = 900.0  # a session with no request and no reply for this long is closed
    send_hwm: int = 100_000  # queued messages per client before it counts as unreachable (it is not reading)
    # ZMQ CURVE: encryption with the server's key pair (a zmq certificate file holding the secret key); with
    # curve_clients (a directory of allowed clients' public certificates) also authentication.
    curve_secret_file: str | None = None
    curve_clients: str | None = None

    def __post_init__(self):
        if self.curve_clients is not None and self.curve_secret_file is None:
            raise ConfigError("--curve-clients needs --curve-secret-file (the daemon's own key pair)")
        check_bind(self.bind, self.token, authenticated=self.curve_clients is not None)


def is_loopback(bind: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on 127.0.0.0/8, ::1 or localhost; False for anything else."""
    u = urlsplit(bind)
    if u.scheme in ("ipc", "inproc"):
        return True
    if u.scheme != "tcp":
        return False
    host = (u.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a DNS name: reachable from elsewhere


def check_bind(bind: str, token: str | None, authenticated: bool = False) -> None:
    """A bind other than loopback needs a token or CURVE client authentication (`authenticated`)."""
    if not re.fullmatch(r"(tcp|ipc|inproc)://.+", bind):
        raise ConfigError(f"--bind {bind!r} is not a ZMQ endpoint such as tcp://127.0.0.1:5555")
    if not is_loopback(bind) and not token and not authenticated:
        raise ConfigError(f"refusing to bind {bind}: it is reachable from other machines and no --token-file was "
                          f"given. Anyone who can connect could run the model; pass --token-file FILE (clients "
                          f"then need the same token), or --curve-secret-file with --curve-clients DIR (ZMQ CURVE "
                          f"keys), or bind tcp://127.0.0.1:PORT")


def main(args, token: str | None) -> int:
    """Entry of `omni2-engine serve` (argparse namespace from engine/cli.py); returns the exit status."""
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s omni2-engine serve: %(message)s",
                        stream=sys.stderr)
    limits = Limits(max_sessions=args.max_sessions, max_new_tokens=args.max_new_tokens)
    # Refuse an unsafe bind before minutes of model loading.
    cfg = ServerConfig(bind=args.bind, token=token, max_sessions_per_client=
                       args.max_sessions_per_client, max_turn_seconds=limits.max_audio_seconds,
                       max_new_tokens=limits.max_new_tokens, reclaim_s=args.reclaim_after,
                       idle_timeout_s=args.idle_timeout, curve_secret_file=args.curve_secret_file,
                       curve_clients=args.curve_clients)
    if (args.model_dir is None) != (args.vocoder_dir is None):
        raise ConfigError("give both --model-dir and --vocoder-dir, or neither (the demo model)")
    if args.model_dir is None:
        from omni2.engine.demo import demo_dirs

        model_dir, vocoder_dir = demo_dirs()
        log.warning("serving the DEMO model from %s: tiny random weights — it babbles, but every stage runs. "
                    "Pass --model-dir/--vocoder-dir for a real model.", model_dir.parent)
    else:
        model_dir, vocoder_dir = Path(args.model_dir), Path(args.vocoder_dir)
        log.info("model %s, vocoder %s", model_dir, vocoder_dir)
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir} is not a model directory (config.json: {e})") from e
    cfg = dataclasses.replace(cfg, stream_params=StreamParams.parse(raw.get("stream_params")).to_str())

    from omni2.engine.runtime import EngineConfig, EngineError

    engine_cfg = EngineConfig(model_dir=str(model_dir), vocoder_dir=str(vocoder_dir), placement=args.placement,
                              dtype=args.dtype, limits=limits)
    try:
        return serve(cfg, engine_cfg)
    except EngineError as e:
        print(f"omni2-engine serve: error: the engine failed to start: {e}", file=sys.stderr)
        return 1


def serve(cfg: ServerConfig, engine_cfg) -> int:
    """Bind, start the engine, serve until SIGINT/SIGTERM, shut down cleanly; returns the exit status."""
    from omni2.engine.runtime import Engine

    server = Server(cfg)
    engine = Engine(engine_cfg, on_event=server.on_event)

    class _Interrupted(Exception):
        pass

    def during_start(signum, frame):  # the engine is loading: abandon the start, stop what was started
        raise _Interrupted(signal.Signals(signum).name)

    def while_serving(signum, frame):
        log.info("%s received: stopping", signal.Signals(signum).name)
        server.stop()

    # Bind first: a taken port fails in a second, not after minutes of model loading. Requests that arrive
    # while the engine loads wait in the socket and are answered once it is ready.
    try:
        endpoint = server.bind()
    except zmq.ZMQError as e:
        server.close()
        raise ConfigError(f"cannot bind {cfg.bind}: {e}") from None
    old = {sig: signal.signal(sig, during_start) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        log.info("listening on %s; starting the engine's workers (placement %s) ...", endpoint,
                 getattr(engine_cfg, "placement", "?"))
        t0 = time.monotonic()
        engine.start()
        log.info("engine ready in %.1f s; voices: %s", time.monotonic() - t0, ", ".join(engine.voices()))
        for sig in old:
            signal.signal(sig, while_serving)
        log.info("ready on %s%s", endpoint, "" if cfg.token is None else " (token required)")
        server.run(engine)  # returns after stop(); stops the engine
    except _Interrupted as e:
        log.info("%s during start-up: stopping", e)
        engine.stop()
        server.close()
    except BaseException:
        server.close()  # the engine cleaned up after itself (Engine.start stops what it started)
        raise
    finally:
        # Not the old handlers: a second SIGTERM while the process winds down would kill it with -15 after
        # a clean stop. Once stopped, further signals are only noted.
        for sig in old:
            signal.signal(sig, lambda signum, frame: log.info("%s: already stopping", signal.Signals(signum).name))
    log.info("stopped")
    return 0
