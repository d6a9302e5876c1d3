"""Whether this torch can run a stage on a named device.

A placement naming a GPU that the installed torch cannot use (a CPU build, no driver, cuda:3 on a one-GPU machine)
fails at start, in one line that says what there is instead, rather than inside each worker's first CUDA call.
"""
from __future__ import annotations

import torch

from omni2.engine.config import ConfigError


def check_device(name: str) -> torch.device:
    """`name` ("cpu", "cuda", "cuda:N") as a torch.device this process can use; ConfigError if it cannot."""
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r}: expected cpu or cuda[:N]") from None
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ConfigError(f"device {name!r}: expected cpu or cuda[:N]")
    if torch.version.cuda is None:
        raise ConfigError(f"device {name!r}: this torch ({torch.__version__}) is built without CUDA; install a CUDA "
                          f"build of torch, or run on cpu")
    count = torch.cuda.device_count()  # no CUDA context is made here: spawned workers make their own
    if count == 0:
        raise ConfigError(f"device {name!r}: torch {torch.__version__} sees no CUDA device (driver, "
                          f"CUDA_VISIBLE_DEVICES?)")
    if (dev.index or 0) >= count:
        raise ConfigError(f"device {name!r}: only {count} CUDA device(s) visible: cuda:0..cuda:{count - 1}")
    return dev
