"""engine/config.py: values derived from the configs (the dataclasses themselves are exercised everywhere)."""
from __future__ import annotations

from omni2.engine.config import StreamParams


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
