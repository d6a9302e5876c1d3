"""engine/config.py: values derived from the configs (the dataclasses themselves are exercised everywhere), and which
binds need a token."""
from __future__ import annotations

import re

import pytest

from omni2.engine.config import ConfigError, RealtimeConfig, ServerConfig, StreamParams, is_loopback


def test_tokens_read_follows_the_read_write_layout():
    # Read-3-Write-10 on an 8-token reply: [x1 x2 x3][u1..u10][x4 x5 x6][u11..u20][x7 x8 <sep>][u21 .. EOS]
    s = StreamParams(3, 10)
    heard = {0: 0, 1: 3, 10: 3, 11: 6, 20: 6, 21: 8, 22: 8, 500: 8}
    assert {u: s.tokens_read(u, 8) for u in heard} == heard
    # 9 tokens: the third chunk is still a full read of three; the flush after <sep> reads nothing new.
    assert [s.tokens_read(u, 9) for u in (20, 21, 30, 31)] == [6, 9, 9, 9]
    # A reply shorter than one read: its only chunk is the final one.
    assert [s.tokens_read(u, 2) for u in (0, 1, 50)] == [0, 2, 2]
    assert StreamParams(1, 1).tokens_read(5, 10) == 5


@pytest.mark.parametrize("bind,loopback", [
    ("tcp://127.0.0.1:5555", True), ("tcp://127.0.0.2:5555", True), ("tcp://[::1]:5555", True),
    ("tcp://localhost:5555", True), ("ipc:///tmp/omni2.sock", True), ("inproc://x", True),
    ("tcp://0.0.0.0:5555", False), ("tcp://*:5555", False), ("tcp://myhost:5555", False),
    ("tcp://eth0:5555", False), ("tcp://10.1.2.3:5555", False), ("tcp://[::]:5555", False),
    ("udp://127.0.0.1:5555", False),
])
def test_only_loopback_binds_go_without_a_token(bind, loopback):
    """Anything that another machine may reach (every interface, a DNS or interface name) needs a token."""
    assert is_loopback(bind) == loopback
    if bind.startswith("udp"):
        return
    if loopback:
        ServerConfig(bind=bind)
    else:
        with pytest.raises(ConfigError, match=f"refusing to bind {re.escape(bind)}"):
            ServerConfig(bind=bind)
    ServerConfig(bind=bind, token="t")


@pytest.mark.parametrize("host", ["0.0.0.0", "myhost", "[::]"])
def test_a_realtime_endpoint_off_loopback_needs_a_token(host):
    realtime = RealtimeConfig.parse(f"{host}:8080")
    with pytest.raises(ConfigError, match="refusing to bind"):
        ServerConfig(realtime=realtime)
    ServerConfig(realtime=realtime, token="t")
    for loopback in ("127.0.0.1:8080", "[::1]:8080", "localhost:8080"):
        ServerConfig(realtime=RealtimeConfig.parse(loopback))
