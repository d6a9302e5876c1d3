"""`omni2-engine chat` / `status` against the daemon the README starts (its exact commands, on a fresh cache: the demo
model), `chat --wav` == `generate`, and `chat --mic` with sounddevice replaced by a file-fed fake device."""
from __future__ import annotations

import _thread
import json
import os
import re
import shlex
import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from omni2.engine.audio import read_wav, write_wav
from omni2.engine.cli import chat
from omni2.engine.cli import main as cli
from omni2.engine.cli.chat import BLOCK_MS, TurnDetector
from omni2.engine.config import default_worker_threads
from tests.engine.serve.daemon_harness import Daemon, env, speech

REPO = Path(__file__).parents[3]
README = REPO / "README.md"


def readme_commands() -> list[str]:
    """The `.venv/bin/...` lines of README.md's quick start, in order (serve first)."""
    text = README.read_text()
    quick = text[text.index("## Quick start"):text.index("## What works today")]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    lines = [ln.split("  #")[0].strip() for b in blocks for ln in b.splitlines()]
    return [ln for ln in lines if ln.startswith(".venv/bin/")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """A fresh directory as a user's checkout would look from the README (`.venv` at hand), with its own cache."""
    d = tmp_path_factory.mktemp("readme")
    os.symlink(REPO / ".venv", d / ".venv")
    return d


@pytest.fixture(scope="module")
def daemon(workdir):
    """`.venv/bin/omni2-engine serve` exactly as the README says (default port 5555, the demo model)."""
    serve = readme_commands()[0]
    assert serve == ".venv/bin/omni2-engine serve", serve
    with socket.socket() as s:
        if s.connect_ex(("127.0.0.1", 5555)) == 0:
            pytest.fail("port 5555 (the README's default) is taken on this machine: the README's daemon cannot "
                        "start, so its commands cannot be checked; free the port and run again")
    d = Daemon([], workdir / "serve.log", port=5555, extra_env={"OMNI2_CACHE": str(workdir / "cache")},
               argv=shlex.split(serve), cwd=workdir)
    try:
        yield d
    finally:
        d.stop()


def run(cmd: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(shlex.split(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=env(OMNI2_CACHE=str(cwd / "cache")))


def test_the_readme_commands_work_on_a_fresh_machine(daemon, workdir):
    daemon.wait_ready()
    assert "DEMO model" in daemon.log() and "ready on tcp://127.0.0.1:5555" in daemon.log()
    for cmd in readme_commands()[1:]:
        r = run(cmd, workdir)
        assert r.returncode == 0, f"{cmd}\n{r.stdout}\n{r.stderr}"
        if " chat " in cmd:
            assert "first audio after" in r.stderr and r.stdout.strip()
        if cmd.endswith(" status"):
            assert "llm" in r.stdout and "sessions" in r.stdout
    samples, sr = sf.read(workdir / "reply.wav", dtype="int16")
    assert sr == 24000 and samples.size > 0


@pytest.mark.parametrize("flags", [["--seed", "5"], ["--seed", "3", "--greedy"]])
def test_chat_reproduces_generate_exactly(daemon, workdir, tmp_path, flags):
    daemon.wait_ready()
    root = workdir / "cache" / "demo-tiny"  # the daemon's own model: `generate` loads the same directories
    q = tmp_path / "q.wav"
    write_wav(q, np.stack([speech(1.2, seed=4), speech(1.2, seed=5)], axis=1), 22050)  # stereo, 22.05 kHz
    common = ["--wav", str(q), *flags, "--max-new-tokens", "6"]
    # The README's daemon runs its workers with the default thread count; bit-equality needs generate to use it too.
    threads = str(default_worker_threads())
    assert cli.main(["generate", "--model-dir", str(root / "omni2-tiny"), "--vocoder-dir", str(root / "cosy2_decoder"),
                     "--out", str(tmp_path / "gen.wav"), "--json", str(tmp_path / "gen.json"), "--threads", threads,
                     *common]) == 0
    assert cli.main(["chat", "--out", str(tmp_path / "chat.wav"), "--json", str(tmp_path / "chat.json"), *common]) == 0
    gen, got = (json.loads((tmp_path / f).read_text()) for f in ("gen.json", "chat.json"))
    assert set(gen) == set(got)
    for k in ("text", "token_ids", "units", "finish_reason", "sample_rate", "samples"):
        assert got[k] == gen[k], k
    a, b = (sf.read(tmp_path / f, dtype="int16") for f in ("gen.wav", "chat.wav"))
    assert a[1] == b[1] and np.array_equal(a[0], b[0])


def test_status_json(daemon, capsys):
    daemon.wait_ready()
    assert cli.main(["status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert set(st["stages"]) == {"asr", "llm", "tts", "vocoder"} and "server" in st


def test_turn_detector():
    d = TurnDetector(db=-40, silence_ms=300)
    block = 16000 * BLOCK_MS // 1000
    loud, quiet = np.full(block, 0.1, np.float32), np.zeros(block, np.float32)
    assert not any(d.push(quiet) for _ in range(20))  # silence: nothing
    assert not d.push(loud) and not d.push(quiet)  # a click (30 ms) is forgotten after the silence
    assert not any(d.push(quiet) for _ in range(20))  # (refills the 300 ms pre-roll)
    assert not any(d.push(loud) for _ in range(10))
    ends = [d.push(quiet) for _ in range(10)]
    assert ends.index(True) == 9  # 300 ms of silence
    audio = d.take()
    assert audio.size == block * (10 + 10 + 10)  # pre-roll + speech + trailing silence


# -- --mic with a fake sounddevice ------------------------------------------------------------------------------
class FakeSoundDevice:
    """Stands in for the sounddevice module: InputStream plays a script into the callback in real time, OutputStream
    pulls the speaker's audio 10x faster than real time and records it. The script: speak, wait for the reply to be
    heard, speak over it (barge-in), then stay silent."""

    def __init__(self, first: np.ndarray, second: np.ndarray):
        self.first, self.second = first, second
        self.heard = threading.Event()
        self.played: list[np.ndarray] = []
        self.stop = threading.Event()
        fake = self

        class Stream:
            def __init__(self, samplerate, channels, dtype, callback, blocksize=None):
                assert channels == 1 and dtype == "float32"
                self.sr, self.cb, self.block = samplerate, callback, blocksize or samplerate // 50
                self.thread = threading.Thread(target=self.run, daemon=True)

            def __enter__(self):
                self.thread.start()
                return self

            def __exit__(self, *exc):
                fake.stop.set()
                self.thread.join(5)

        class InputStream(Stream):
            def run(self):
                silence = np.zeros(self.block, np.float32)
                script = [*np.split(fake.first[: len(fake.first) // self.block * self.block], len(fake.first)
                                    // self.block)]
                script += [silence] * 30
                i, barged = 0, False
                while not fake.stop.is_set():
                    if i < len(script):
                        x = script[i]
                        i += 1
                    elif fake.heard.is_set() and not barged:  # the reply is audible: talk over it
                        barged = True
                        n = len(fake.second) // self.block
                        script += [*np.split(fake.second[: n * self.block], n), *[silence] * 30]
                        continue
                    else:
                        x = silence
                    self.cb(x[:, None].copy(), self.block, None, None)
                    time.sleep(self.block / self.sr)

        class OutputStream(Stream):
            def run(self):
                while not fake.stop.is_set():
                    out = np.full((self.block, 1), np.nan, np.float32)
                    self.cb(out, self.block, None, None)
                    assert not np.isnan(out).any()
                    if np.any(out):
                        fake.played.append(out[:, 0].copy())
                        fake.heard.set()
                    time.sleep(self.block / self.sr / 10)

        self.InputStream, self.OutputStream = InputStream, OutputStream


def test_chat_mic_with_barge_in(daemon, monkeypatch, capfd, tmp_path):
    """Until Ctrl-C (the default): the user speaks, talks over the reply (cancelled), and the second reply plays
    out; Ctrl-C after it ends the chat (exit 0) and writes that reply to --out and --json."""
    daemon.wait_ready()
    fake = FakeSoundDevice(speech(1.0, seed=8), speech(0.6, seed=9))
    monkeypatch.setattr(chat, "sounddevice", lambda: fake)
    ended = []

    class Reply(chat.Reply):  # Ctrl-C once the second reply has ended
        def __init__(self, *args):
            super().__init__(*args)
            ended.append(self)
            if len(ended) == 2:
                threading.Timer(0.2, _thread.interrupt_main).start()

    monkeypatch.setattr(chat, "Reply", Reply)
    out_wav, out_json = tmp_path / "last.wav", tmp_path / "last.json"
    rc = cli.main(["chat", "--mic", "--seed", "0", "--max-new-tokens", "6", "--out", str(out_wav), "--json",
                   str(out_json)])
    out, err = capfd.readouterr()
    assert rc == 0, err
    assert "[barge-in]" in err and "[cancelled]" in out and "bye" in err, (out, err)
    assert out.count("omni2: ") == 2 and ("[length]" in out or "[stop]" in out)
    assert fake.played and [r.finish_reason for r in ended][0] == "cancelled"
    doc = json.loads(out_json.read_text())
    assert doc["finish_reason"] == ended[1].finish_reason != "cancelled" and doc["units"] == ended[1].units
    pcm, rate = read_wav(out_wav)
    assert rate == doc["sample_rate"] and pcm.size == doc["samples"] == ended[1].pcm.size > 0
    with daemon.client() as c:
        assert c.status()["sessions"] == 0


def test_chat_mic_without_an_audio_device_is_one_line_and_closes_its_session(daemon, monkeypatch, capsys):
    """A machine without sound (PortAudio installed): the device error in one line, and the session it opened is
    closed at once, not left for the daemon's reclaim."""
    class NoDevice:
        class PortAudioError(Exception):
            pass

        def InputStream(self, **kw):
            raise self.PortAudioError("Error querying device -1")

    monkeypatch.setattr(chat, "sounddevice", NoDevice)
    with daemon.client() as c:
        before = c.status()["sessions"]
    assert cli.main(["chat", "--mic"]) == 1
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("omni2-engine chat: error: cannot open the audio devices: Error querying "
                                            "device -1 (`python -m sounddevice` lists them)"), err
    with daemon.client() as c:
        assert c.status()["sessions"] == before


def test_chat_mic_without_portaudio_says_what_to_install(monkeypatch, capsys):
    import sys

    monkeypatch.setitem(sys.modules, "sounddevice", None)  # import fails, as without the package
    assert cli.main(["chat", "--mic", "--connect", "tcp://127.0.0.1:1"]) == 1
    err = capsys.readouterr().err
    assert "libportaudio2" in err and "pip install" in err
