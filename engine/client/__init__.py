"""Clients of `omni2-engine serve`: `Client` (blocking, client/sync.py) and `AsyncClient` (asyncio, client/aio.py).
What programs embed: no torch and no model code is imported (tests/test_boundaries.py holds it to that), and the
asyncio twin loads only when it is first named, so a blocking client does not pay for asyncio."""
from omni2.engine.client.core import (
    DEFAULT_ADDRESS,
    ClientError,
    ClientTimeout,
    DaemonUnavailable,
    RemoteError,
    Response,
    session_open_message,
    to_float,
)
from omni2.engine.client.sync import Client, Session

__all__ = ["AsyncClient", "AsyncSession", "Client", "ClientError", "ClientTimeout", "DEFAULT_ADDRESS",
           "DaemonUnavailable", "RemoteError", "Response", "Session", "session_open_message", "to_float"]


def __getattr__(name: str):
    if name in ("AsyncClient", "AsyncSession"):
        from omni2.engine.client import aio

        return getattr(aio, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
