"""A self-pipe: how a thread that polls sockets is woken by other threads (or a signal handler).

The polling thread registers `fd` in its zmq.Poller beside its sockets and calls `drain()` when it is readable; any
thread calls `wake()`. Writes never block (a full pipe means the poller is awake already) and never land after
`close()`, when the descriptor number may already belong to something else.
"""
from __future__ import annotations

import os
import threading


class Wakeup:
    def __init__(self):
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._lock = threading.RLock()  # a signal handler may wake() on the thread inside wake() or close()
        self._closed = False

    def wake(self) -> None:
        with self._lock:
            if self._closed:
                return
            try:
                os.write(self._w, b"x")
            except BlockingIOError:
                pass  # full of wake-ups already

    def drain(self) -> None:
        try:
            while os.read(self.fd, 4096):
                pass
        except BlockingIOError:
            pass

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._closed = True
                os.close(self.fd)
                os.close(self._w)
