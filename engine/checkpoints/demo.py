"""The embedded demo model `omni2-engine serve` runs when no model is given: the `tiny` random-weight preset,
written once into a cache directory and reused. It babbles (random weights) but exercises every stage.

The cache is `$OMNI2_CACHE/demo-tiny` (default `~/.cache/omni2-engine/demo-tiny`). Writing goes to a temporary
directory beside it that is renamed into place, so two daemons starting at once never see a half-written
checkpoint: the loser of the rename discards its copy and uses the winner's.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from omni2.engine.checkpoints.model_writer import write_checkpoint
from omni2.engine.checkpoints.vocoder_writer import write_vocoder_checkpoint

log = logging.getLogger("omni2.demo")

PRESET = "tiny"
SEED = 0
COMPLETE = "COMPLETE"  # marker written last inside the temp dir: its presence means the rename target is whole


def cache_root() -> Path:
    return Path(os.environ.get("OMNI2_CACHE") or Path.home() / ".cache" / "omni2-engine")


def demo_dirs(root: str | Path | None = None) -> tuple[Path, Path]:
    """(model_dir, vocoder_dir) of the demo checkpoint, written first if the cache lacks it."""
    root = Path(root) if root is not None else cache_root()
    final = root / f"demo-{PRESET}"
    if not (final / COMPLETE).is_file():
        root.mkdir(parents=True, exist_ok=True)
        log.warning("no model given: writing the DEMO checkpoint (tiny, random weights) to %s ... (once)", final)
        tmp = Path(tempfile.mkdtemp(prefix=f".demo-{PRESET}-", dir=root))
        try:
            write_checkpoint(tmp, preset=PRESET, seed=SEED)
            write_vocoder_checkpoint(tmp, preset=PRESET, seed=SEED)
            (tmp / COMPLETE).write_text("written by omni2-engine serve\n")
            if final.exists() and not (final / COMPLETE).is_file():
                shutil.rmtree(final, ignore_errors=True)  # a crashed writer of an older version left it
            try:
                os.rename(tmp, final)  # atomic; fails if another daemon got there first
            except OSError:
                if not (final / COMPLETE).is_file():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return final / f"omni2-{PRESET}", final / "cosy2_decoder"


def question(seconds: float = 2.0, seed: int = 0, sample_rate: int = 16000):
    """A stand-in for a spoken question when there is no microphone: voiced harmonics (f0 ~130 Hz, gliding) under
    a syllable-rate envelope, float32 mono. The demo model hears noise either way; a real model hears a hum."""
    import numpy as np

    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 130 + 25 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase + rng.random() * 6.28) / k for k in range(1, 8))
    syllables = np.clip(np.sin(2 * np.pi * 2.5 * t), 0, None) ** 0.5
    return (0.3 * voiced * syllables / np.abs(voiced).max()).astype(np.float32)

