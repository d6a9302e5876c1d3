"""bench/latency_daemon.py: a sweep's DaemonSpec becomes the configs `omni2-engine serve` would build from the same
flags (here the vocoder's batch, which `latency.py --vocoder-batch` sets)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"


@pytest.fixture
def latency_daemon(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # it imports its sibling daemon_process
    spec = importlib.util.spec_from_file_location("latency_daemon", BENCH / "latency_daemon.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "latency_daemon", module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("batch,want", [(None, 16), (3, 3)])
def test_the_vocoder_batch_reaches_the_engine_config(latency_daemon, tiny_ckpt: Path, tiny_vocoder: Path, monkeypatch,
                                                     batch, want):
    from omni2.engine.config import VocoderOptions
    from omni2.engine.serve import daemon

    seen = {}
    monkeypatch.setattr(daemon, "serve", lambda server, engine: seen.update(server=server, engine=engine) or 0)
    spec = latency_daemon.DaemonSpec(str(tiny_ckpt), str(tiny_vocoder), left_chunks=1, vocoder_batch=batch)
    assert latency_daemon._serve(spec, "tcp://127.0.0.1:5999") == 0
    opts = seen["engine"].vocoder_options
    assert (opts.max_batch, opts.left_chunks) == (want, 1) and VocoderOptions.max_batch == 16
    assert seen["server"].bind == "tcp://127.0.0.1:5999"
