"""The front door's transport: the ZMQ ROUTER socket engine/server.py serves on (its options, CURVE keys with
the ZAP authenticator, the bind) and a receive that cannot be made to allocate without bound.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import zmq

from omni2.engine.config import ConfigError

if TYPE_CHECKING:
    from omni2.engine.daemon import ServerConfig

MAX_FRAMES = 8  # identity + kind + body + tensors: no request has more than 4


def router_socket(ctx: zmq.Context, cfg: ServerConfig) -> zmq.Socket:
    """A ROUTER with the options the server relies on (not yet bound)."""
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished peer raises EHOSTUNREACH, not a drop
    sock.setsockopt(zmq.ROUTER_HANDOVER, 1)  # a client reconnecting under its routing id takes it over
    sock.setsockopt(zmq.MAXMSGSIZE, 2 * cfg.max_frame_bytes)  # far bigger frames: drop the peer unread
    sock.setsockopt(zmq.SNDHWM, cfg.send_hwm)
    sock.setsockopt(zmq.RCVHWM, 10_000)
    sock.setsockopt(zmq.HEARTBEAT_IVL, 2000)  # ZMTP pings: a peer that went silent (cable, crash) is dropped
    sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, 6000)
    sock.setsockopt(zmq.LINGER, 1000)
    return sock


def curve_server(ctx: zmq.Context, sock: zmq.Socket, cfg: ServerConfig):
    """Make `sock` a CURVE server with --curve-secret-file; with --curve-clients also start the ZAP
    authenticator and return it (the caller stops it), else None."""
    import zmq.auth
    import zmq.auth.thread

    try:
        public, secret = zmq.auth.load_certificate(cfg.curve_secret_file)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read --curve-secret-file {cfg.curve_secret_file}: {e}") from e
    if not secret:
        raise ConfigError(f"{cfg.curve_secret_file} holds no secret key (pass the .key_secret file)")
    auth = None
    if cfg.curve_clients is not None:
        # ZAP: the handshake of a client whose public key is not in the directory fails; it never reaches us
        auth = zmq.auth.thread.ThreadAuthenticator(ctx)
        try:
            auth.start()
            auth.configure_curve(domain="*", location=cfg.curve_clients)
        except BaseException:
            auth.stop()  # the caller never sees it: stop it here, or the context could not terminate
            raise
    sock.curve_secretkey, sock.curve_publickey, sock.curve_server = secret, public, True
    return auth


def bind_router(sock: zmq.Socket, endpoint: str) -> str:
    """Bind; returns the endpoint (with the real port when the bind asked for port 0)."""
    if endpoint.startswith("tcp://") and endpoint.endswith(":0"):
        endpoint = endpoint[:-2] + ":*"  # port 0 = any free port, as with sockets
    sock.bind(endpoint)
    return sock.getsockopt_string(zmq.LAST_ENDPOINT)


def recv_request(sock: zmq.Socket) -> list | None:
    """One request's frames, or None when none is waiting. Like recv_multipart, but a request of more than
    MAX_FRAMES frames keeps only its first ones (enough to be answered with an error): a message of a million
    empty frames must not become a million Python objects."""
    try:
        frames = [sock.recv(zmq.NOBLOCK, copy=False)]
    except zmq.Again:
        return None
    while sock.getsockopt(zmq.RCVMORE):
        f = sock.recv(copy=False)  # the rest of a message has arrived with its first frame
        if len(frames) <= MAX_FRAMES:
            frames.append(f)
    return frames
