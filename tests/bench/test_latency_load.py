"""bench/latency_load.py and latency.py's argument parsing, without a daemon: each bench session asks for the
sweep's --max-new-tokens (a daemon given with --connect has its own, larger default), and a hop schedule needs a
hop of at least one unit."""
from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"


def load_module(monkeypatch, name: str):
    monkeypatch.syspath_prepend(str(BENCH))  # they import their siblings
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


class Opened(Exception):
    pass


@pytest.mark.parametrize("cap", [None, 8])
def test_a_bench_session_asks_for_the_sweeps_token_cap(monkeypatch, cap):
    latency_load = load_module(monkeypatch, "latency_load")
    asked = {}

    class Client:
        def __init__(self, address, **kw):
            pass

        async def __aenter__(self):
            return self

        async def __aexit__(self, *exc):
            return False

        async def status(self, timeout=None):
            return {"stages": {}}

        async def open(self, session_id, **options):
            asked.update(options)
            raise Opened

    monkeypatch.setattr(latency_load, "AsyncClient", Client)
    load = latency_load.Load(1, 1, (28,), 1.0, max_new_tokens=cap)
    with pytest.raises(Opened):
        latency_load.drive("tcp://127.0.0.1:1", load)
    assert asked == {"seed": 28, "max_new_tokens": cap}


def test_schedules_parse_and_a_zero_hop_is_refused(monkeypatch):
    latency = load_module(monkeypatch, "latency")
    assert latency.parse_schedule("hop:40") == ("hop", 40) and latency.parse_schedule("live") == ("live", None)
    for bad in ("hop:0", "live:5", "hop:x", "fast"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"schedule '{bad}' is not"):
            latency.parse_schedule(bad)
