"""The self-pipe every polling loop is woken by: readable after wake(), quiet after drain(), never blocking on a
full pipe, and inert once closed."""
import select

from omni2.engine.wire.wakeup import Wakeup


def readable(w: Wakeup) -> bool:
    return bool(select.select([w.fd], [], [], 0)[0])


def test_wake_drain_close():
    w = Wakeup()
    assert not readable(w)
    w.wake()
    assert readable(w)
    w.drain()
    assert not readable(w)
    for _ in range(200_000):  # far more than a pipe holds: the writer never blocks
        w.wake()
    assert readable(w)
    w.drain()
    assert not readable(w)
    w.close()
    w.close()
    w.wake()  # after close: nothing written anywhere (the descriptor may belong to someone else by now)
