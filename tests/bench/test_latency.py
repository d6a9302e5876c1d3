"""bench/latency.py end to end, shrunk to fit the suite: one daemon (R=3, W=10) driven through the client at 1 and
2 sessions, both single-process systems on the same turns, the JSON checked against its schema, every turn's
latency terms positive and in pipeline order, and the engine's replies equal to the reference's."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench"
_spec = importlib.util.spec_from_file_location("latency_schema", BENCH / "latency_schema.py")
latency_schema = sys.modules.setdefault("latency_schema", importlib.util.module_from_spec(_spec))
_spec.loader.exec_module(latency_schema)  # registered first: its dataclasses look their module up by name

# --quick, less: one R/W instead of two, one short-reply script, 2 sessions instead of 4, and the next question
# right after a reply arrives, without a pause to think (the code paths are the same; the waiting is not).
ARGS = ["--quick", "--write", "10", "--seeds", "28", "--concurrency", "1", "2", "--no-listen", "--gap", "0",
        "--threads", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_root: Path, tiny_vocoder: Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path_factory.mktemp("latency")
    proc = subprocess.run([sys.executable, str(BENCH / "latency.py"), *ARGS, "--ckpt-root", str(tiny_root),
                           "--out", str(out)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc, out


@pytest.fixture(scope="module")
def doc(run) -> dict:
    return json.loads((run[1] / "latency.json").read_text())


def test_json_matches_the_schema(doc):
    assert latency_schema.validate(doc) == []
    assert doc["schema"] == latency_schema.SCHEMA_ID
    assert doc["command"][-1] == str(doc["command"][-1]) and "--quick" in doc["command"]
    assert doc["device"] == {"placement": "cpu", "dtype": "float32", "cuda_graphs": False, "name": "cpu",
                             "cuda": None}
    assert doc["settings"]["systems"] == ["engine", "baseline", "reference"]


def test_the_schema_catches_what_is_wrong(doc):
    broken = json.loads(json.dumps(doc))
    del broken["configs"][0]["cells"][0]["turns"][0]["t_llm"]
    broken["configs"][0]["cells"][1]["concurrency"] = "2"
    assert latency_schema.validate(broken) == ["$.configs[0].cells[0].turns[0]: missing 't_llm'",
                                               "$.configs[0].cells[1].concurrency: expected int, got str"]


def test_the_sweep_ran_every_system_on_the_same_turns(doc):
    (cfg,) = doc["configs"]
    assert (cfg["read"], cfg["write"], cfg["schedule"], cfg["mode"], cfg["question_s"]) == (3, 10, "live",
                                                                                          "streaming", 1.0)
    assert cfg["baseline_schedule"] == "official-live"
    for name in ("baseline", "reference"):
        assert [(t["seed"], t["turn"]) for t in cfg["single"][name]] == [(28, 0), (28, 1)]
    assert [c["concurrency"] for c in cfg["cells"]] == [1, 2]
    for cell in cfg["cells"]:
        n = cell["concurrency"]
        assert sorted((t["session"], t["turn"]) for t in cell["turns"]) == [(k, t) for k in range(n) for t in (0, 1)]
        assert cell["summary"]["turns"] == 2 * n
        assert [s["turns"] for s in cell["sessions"]] == [2] * n
        assert set(cell["stages"]) == {"asr", "llm", "tts", "vocoder"}
        assert all(st["steps"] > 0 for st in cell["stages"].values())
        assert cell["stages"]["asr"]["steps"] >= 2 * n  # one ASR step at most per question (batched when close)
        assert cell["ratio"]["first_audio_p50"] > 0
        assert cell["queued"]["baseline"]["summary"]["turns"] == 2 * n


def _turns(doc):
    for cfg in doc["configs"]:
        for name, turns in cfg["single"].items():
            for t in turns:
                yield name, t
        for cell in cfg["cells"]:
            for t in cell["turns"]:
                yield "engine", t


def test_every_term_is_positive_and_in_pipeline_order(doc):
    seen = 0
    for name, t in _turns(doc):
        assert 0 < t["t_asr"] <= t["t_llm"] <= t["t_tts"] <= t["first_audio"] <= t["end"], (name, t)
        if name == "engine":  # the engine's own first audio lies between its TTS and the client's
            assert t["t_tts"] <= t["engine_first_audio"] <= t["first_audio"], t
        assert t["audio_s"] > 0 and t["n_units"] > 0 and t["n_tokens"] == 8  # --quick caps replies at 8 tokens
        assert t["audio_s"] == pytest.approx(t["n_units"] / 25, abs=0.5)  # 25 units a second of speech
        assert t["stalls"] >= 0 and t["stall_s"] >= 0 and t["played_s"] >= t["first_audio"] + t["audio_s"] - 1e-6
        seen += 1
    assert seen == 2 + 2 + 2 + 4


def test_engine_replies_equal_the_reference(doc):
    (cfg,) = doc["configs"]
    truth = {(t["seed"], t["turn"]): t["reply"] for t in cfg["single"]["reference"]}
    assert cfg["baseline_same_as_reference"] is True
    for cell in cfg["cells"]:
        assert cell["same_as_reference"] is True and cell["mismatches"] == []
        assert [truth[(t["seed"], t["turn"])] for t in cell["turns"]] == [t["reply"] for t in cell["turns"]]
    assert truth[(28, 0)] != truth[(28, 1)]  # two different turns: the check compares something


def test_table_and_figures(run):
    proc, out = run
    rows = [line for line in proc.stdout.splitlines() if line.startswith("R3W10 live streaming q1s")]
    assert len(rows) == 4  # baseline alone, reference alone, 1 and 2 sessions
    assert rows[-1].split()[-1] == "true"
    for name in ("latency-breakdown.png", "latency-concurrency.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "latency-rw.png").exists()  # one W swept: no trade-off to draw
