"""Fixtures shared by every test package."""
from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` random checkpoint, written once per session; returns the model dir (…/omni2-tiny). Read-only."""
    from omni2.engine.checkpoint import write_checkpoint

    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), "tiny", seed=0)
