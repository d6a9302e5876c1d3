"""Timing shared by the bench scripts (run as `python bench/<name>.py`, so this imports as `harness`)."""
from __future__ import annotations

import statistics
import time

import torch


def timed(fn, device: torch.device, warmup: int, iters: int) -> float:
    """Median wall-clock ms of fn(), synchronising the device around each call."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)
