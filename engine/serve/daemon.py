"""`omni2-engine serve`: the daemon process. Bind the front door, start the engine, serve until SIGINT/SIGTERM,
then stop cleanly (replies in flight end with an error event, workers stop, shared memory is released).

Order matters: the bind is taken before minutes of model loading, so a taken port fails at once; requests that
arrive while the engine loads wait in the socket. The command line (cli/main.py) turns its options into the two
configs and picks the model (the demo checkpoint when none is given).
"""
from __future__ import annotations

import logging
import signal
import time

import zmq

from omni2.engine.config import ConfigError, EngineConfig, ServerConfig
from omni2.engine.runtime import Engine
from omni2.engine.serve.front_door import FrontDoor

log = logging.getLogger("omni2.serve")


def serve(cfg: ServerConfig, engine_cfg: EngineConfig) -> int:
    """Bind, start the engine, serve until SIGINT/SIGTERM, shut down cleanly; returns the exit status."""
    server = FrontDoor(cfg)
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
    realtime = None
    if cfg.realtime is not None:
        from omni2.engine.serve.realtime import RealtimeServer

        realtime = RealtimeServer(cfg.realtime, endpoint, cfg.token, cfg.max_turn_seconds)
        try:
            url = realtime.start()
        except OSError as e:
            server.close()
            raise ConfigError(f"cannot bind --realtime {cfg.realtime.host}:{cfg.realtime.port}: {e}") from None
        except RuntimeError as e:  # server VAD cannot run (silero-vad missing)
            server.close()
            raise ConfigError(f"--realtime: {e}") from None
        log.info("realtime endpoint on %s%s", url, f"; demo page at http://{url.split('/', 3)[2]}/"
                 if cfg.realtime.demo else "")
    old = {sig: signal.signal(sig, during_start) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        log.info("listening on %s; starting the engine's workers (placement %s) ...", endpoint,
                 engine_cfg.placement)
        t0 = time.monotonic()
        engine.start()
        log.info("engine ready in %.1f s; voices: %s", time.monotonic() - t0, ", ".join(engine.voices()) or "none")
        if not engine.voices():  # an official cosy2_decoder has none: every session would be refused
            log.warning("no voices in %s: sessions are refused until one is added, e.g. `omni2-engine voice add "
                        "default --wav llama_omni2/inference/prompt_en.wav --vocoder-dir %s` (the official "
                        "prompt)", engine.vocoder_dir.path, engine.vocoder_dir.path)
        for sig in old:
            signal.signal(sig, while_serving)
        log.info("ready on %s%s", endpoint, "" if cfg.token is None else " (token required)")
        server.run(engine)  # returns after stop(); stops the engine
    except _Interrupted as e:
        log.info("%s during start-up: stopping", e)
        engine.stop()
        server.close()
    except BaseException:
        engine.stop()  # after a failed start a no-op (Engine.start stops what it started); else the turns end
        server.close()
        raise
    finally:
        if realtime is not None:
            realtime.stop()
        # Not the old handlers: a second SIGTERM while the process winds down would kill it with -15 after
        # a clean stop. Once stopped, further signals are only noted.
        for sig in old:
            signal.signal(sig, lambda signum, frame: log.info("%s: already stopping", signal.Signals(signum).name))
    log.info("stopped")
    return 0
