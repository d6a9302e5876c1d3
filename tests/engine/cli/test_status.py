"""`omni2-engine status`: the table it prints for a running daemon (one sessions line, one row per stage in pipeline
order, one line per ring, each value the daemon's own), the token it presents from --token-file, and exit status
1 with one `error:` line (no traceback), within --timeout, when nothing listens at --connect."""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from omni2.engine.cli import main as cli
from omni2.engine.config import STAGES
from tests.engine.serve.daemon_harness import EXE, Daemon, alive, env, free_port, speech

TOKEN = "status-test-token"
# ring -> slots: runtime/topology.ring_sizes with the default ring_slots (8); asr_in and asr_llm have 4.
RING_SLOTS = {"asr_in": 4, "asr_llm": 4, "llm_tts": 8, "llm_out": 8, "tts_voc": 8, "tts_out": 8, "voc_out": 8}


@pytest.fixture(scope="module")
def token_file(tmp_path_factory):
    f = tmp_path_factory.mktemp("token") / "token"
    f.write_text(TOKEN + "\n")  # a trailing newline, as an editor leaves it: stripped on both sides
    return f


@pytest.fixture(scope="module")
def daemon(tiny_ckpt, tiny_vocoder, token_file, tmp_path_factory):
    d = Daemon(["--model-dir", str(tiny_ckpt), "--vocoder-dir", str(tiny_vocoder), "--max-sessions", "3",
                "--token-file", str(token_file)], tmp_path_factory.mktemp("status") / "serve.log", token=TOKEN)
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def test_the_table_shows_sessions_stages_and_rings(daemon, token_file, capsys):
    with daemon.client() as holder:
        held = holder.open("held", max_new_tokens=6)
        assert held.reply(speech(1.0, seed=3), 16000, timeout=120).finish_reason in ("stop", "length")
        # Every worker reports its sessions and steps in its heartbeats (every 0.2 s): wait until all four count
        # this session and report the same numbers twice (the turn's last step is in).
        deadline, last = time.monotonic() + 30, None
        while True:
            st = holder.status()
            now = {s: (w["sessions"], w["steps"], w["last_batch"], w["last_step_ms"]) for s, w in st["stages"].items()}
            if all(st["stages"][s]["sessions"] == 1 for s in STAGES) and now == last:
                break
            assert time.monotonic() < deadline, st["stages"]
            last = now
            time.sleep(0.5)
        assert cli.main(["status", "--connect", daemon.address, "--token-file", str(token_file)]) == 0
        out, err = capsys.readouterr()
        held.close()
    assert err == ""
    lines = out.splitlines()
    assert len(lines) == 1 + 1 + len(STAGES) + len(RING_SLOTS), out
    # 1 session of --max-sessions 3, none replying; 2 clients: the one holding the session and `status` itself.
    assert re.fullmatch(rf"{re.escape(daemon.address)}: 1/3 sessions, 0 replies in flight, 2 clients, up \d+ s",
                        lines[0]), lines[0]
    assert lines[1].split() == ["stage", "pid", "alive", "busy", "sessions", "queued", "step", "ms", "batch",
                                "steps", "restarts"]
    rows = [ln.split() for ln in lines[2:2 + len(STAGES)]]
    assert [r[0] for r in rows] == list(STAGES)  # pipeline order
    for name, pid, alive_, busy, sessions, queued, step_ms, batch, steps, restarts in rows:
        assert pid == str(st["stages"][name]["pid"]) and alive(int(pid)), name
        assert (alive_, busy, sessions, queued, restarts) == ("True", "False", "1", "0", "0"), name
        w = st["stages"][name]  # the daemon's own numbers (the turn above made them non-zero and distinct)
        assert (step_ms, int(batch), int(steps)) == (f"{w['last_step_ms']:.1f}", w["last_batch"], w["steps"]), name
        assert w["steps"] >= 1 and w["last_batch"] == 1, name
    rings = [ln.split() for ln in lines[2 + len(STAGES):]]
    assert [r[1] for r in rings] == list(RING_SLOTS)
    for word, edge, use, *rest in rings:
        assert word == "ring" and rest == ["slots", "in", "use"]
        assert use == f"0/{RING_SLOTS[edge]}", (edge, use)  # idle: nothing in flight on any ring


def test_a_missing_token_is_an_error(daemon, capsys):
    assert cli.main(["status", "--connect", daemon.address, "--timeout", "10"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("omni2-engine status: error: unauthorized") and "--token-file" in err, err


def test_no_daemon_is_exit_status_1_within_the_timeout():
    port = free_port()  # nothing listens there
    t0 = time.monotonic()
    r = subprocess.run([EXE, "status", "--connect", f"tcp://127.0.0.1:{port}", "--timeout", "1"], capture_output=True,
                       text=True, env=env(), timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.startswith("omni2-engine status: error: ") and r.stderr.count("\n") == 1, r.stderr
    assert f"tcp://127.0.0.1:{port}" in r.stderr and "no connection" in r.stderr and "Traceback" not in r.stderr
    # --timeout bounds the wait for a connection too (it used to wait the client's own 10 s whatever --timeout said).
    assert took < 8, took
