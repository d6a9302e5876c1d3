from __future__ import annotations

import pytest

from tests.stages.recorded_graphs import record_captures


@pytest.fixture
def recorded_graphs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The fixed-shape families made during the test capture into recorded graphs (tests/stages/recorded_graphs.py):
    a CUDA graph's replay semantics on a CPU."""
    record_captures(monkeypatch)
