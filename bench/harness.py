"""Timing, checkpoints and logging shared by the bench scripts (run as `python bench/<name>.py`, so this imports
as `harness`)."""
from __future__ import annotations

import logging
import statistics
import sys
import time
from pathlib import Path

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


def preset_dirs(root: str | Path, preset: str) -> tuple[Path, Path]:
    """(model dir, cosy2_decoder dir) of a random `preset` checkpoint under ROOT/PRESET, written there once."""
    from omni2.engine.checkpoints.model_writer import write_checkpoint
    from omni2.engine.checkpoints.vocoder_writer import write_vocoder_checkpoint

    root = Path(root) / preset
    model_dir, vocoder_dir = root / f"omni2-{preset}", root / "cosy2_decoder"
    if not (model_dir / "config.json").is_file():
        print(f"writing the random {preset} model into {root} (once)", file=sys.stderr)
        write_checkpoint(root, preset=preset)
    if not (vocoder_dir / "cosyvoice.yaml").is_file():
        print(f"writing the random {preset} cosy2_decoder into {root} (once)", file=sys.stderr)
        write_vocoder_checkpoint(root, preset=preset)
    return model_dir, vocoder_dir


def bench_dtype(device: torch.device, name: str | None) -> torch.dtype:
    """--dtype fp32 | bf16; by default fp32 on a CPU, bf16 on a GPU."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name or ("bf16" if device.type == "cuda" else "fp32")]


def stage_logs() -> None:
    """The stages' INFO lines on stderr, as a worker's log has them: on a GPU each family's captures (how many, in
    how long, the memory reserved), which a bench that loads stages itself would otherwise drop."""
    logging.basicConfig(level="INFO", format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
