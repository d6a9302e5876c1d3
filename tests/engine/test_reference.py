"""The single-process reference pipeline end to end on the tiny checkpoint, and `omni2-engine generate`."""
import json

import numpy as np
import pytest

from omni2.engine.audio import read_wav, write_wav
from omni2.engine.cli.generate import run_turn, session_options
from omni2.engine.cli.main import main
from omni2.engine.config import Limits
from omni2.engine.reference import ReferencePipeline
from omni2.engine.wire.protocol import AudioDelta, TextDelta, TurnDone, UnitChunk

AUDIO = (np.random.default_rng(0).standard_normal(16000 * 2) * 0.1).astype(np.float32)


@pytest.fixture(scope="module")
def pipe(tiny_ckpt, tiny_vocoder):
    return ReferencePipeline(tiny_ckpt, tiny_vocoder, limits=Limits(max_sessions=2, max_new_tokens=10))


def collect(pipe, sid, audio=AUDIO, sr=16000):
    return list(pipe.turn(sid, audio, sr))


def test_a_turn_streams_text_units_and_audio_in_order(pipe):
    pipe.open("a", session_options(seed=4))  # a ~100-unit reply (greedy, the tiny TTS LM runs to 1024 units)
    events = collect(pipe, "a")
    pipe.close("a")
    done = events[-1]
    assert isinstance(done, TurnDone) and sum(isinstance(e, TurnDone) for e in events) == 1
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    units = [u for e in events if isinstance(e, UnitChunk) for u in e.units]
    pcm = np.concatenate([e.pcm for e in events if isinstance(e, AudioDelta)])
    assert text == done.text and units == done.units and len(done.token_ids) >= 1
    assert len(units) > 0 and pcm.shape == (960 * len(units),)  # 2 mel frames per unit x 480 samples
    assert [e for e in events if isinstance(e, AudioDelta)][-1].final
    t = done.timings
    assert 0 < t["t_asr"] <= t["t_llm"] <= t["total"] and t["first_audio"] <= t["total"]
    times = [e.t for e in events]
    assert times == sorted(times)


def test_same_seed_same_reply_and_baseline_agrees(pipe, tiny_ckpt, tiny_vocoder):
    opts = session_options(seed=7, max_new_tokens=12)  # official TTS sampling; 176 units: several vocoder calls
    a = run_turn(pipe, AUDIO, 16000, opts)
    b = run_turn(pipe, AUDIO, 16000, opts)
    assert a.token_ids == b.token_ids and a.units == b.units and np.array_equal(a.pcm, b.pcm)
    base = ReferencePipeline(tiny_ckpt, tiny_vocoder, limits=Limits(max_sessions=1, max_new_tokens=10), baseline=True)
    c = run_turn(base, AUDIO, 16000, opts)
    assert c.token_ids == a.token_ids and c.units == a.units
    # Same mel to ~1e-6; HiFT's phase integration turns rounding into up to ~1e-2 of PCM (docs/ARCHITECTURE.md).
    err = np.abs(c.pcm - a.pcm).max()
    # Measured 4.4e-3 here. The bound grows with the length of one vocoder call (a 578-unit final flush: 1.4e-2).
    assert len(a.units) > 53 and err < 1e-2, (len(a.units), err)


def test_two_turns_keep_the_conversation(pipe):
    pipe.open("m", session_options(seed=4))  # replies of ~100 and ~50 units
    first = collect(pipe, "m")[-1]
    second = collect(pipe, "m", AUDIO[::-1].copy())[-1]
    answers = pipe.llm.sessions["m"].answers  # the thinker keeps each answer's ids (a truncate may cut them)
    assert [pipe.llm.tok.decode(a, skip_special_tokens=True) for a in answers] == [first.text, second.text]
    pipe.close("m")


def test_bad_audio_is_refused_before_any_work(pipe):
    pipe.open("x", session_options())
    with pytest.raises(ValueError, match="empty"):
        collect(pipe, "x", np.zeros(0, np.float32))
    with pytest.raises(KeyError):
        collect(pipe, "nobody")
    pipe.close("x")


def test_generate_cli_writes_wav_and_json(tiny_ckpt, tiny_vocoder, tmp_path, capsys):
    wav, out, js = tmp_path / "q.wav", tmp_path / "reply.wav", tmp_path / "reply.json"
    write_wav(wav, AUDIO, 16000)
    args = ["generate", "--model-dir", str(tiny_ckpt), "--vocoder-dir", str(tiny_vocoder), "--wav", str(wav),
            "--out", str(out), "--json", str(js), "--greedy", "--seed", "3", "--max-new-tokens", "6"]
    assert main(args) == 0
    reply = json.loads(js.read_text())
    pcm, sr = read_wav(out)
    assert sr == 24000 and pcm.shape[0] == 960 * len(reply["units"]) == reply["samples"]
    assert set(reply) >= {"text", "token_ids", "units", "timings"} and len(reply["token_ids"]) <= 6
    assert main(args) == 0
    assert json.loads(js.read_text())["units"] == reply["units"]  # same seed, same reply
    assert main(args[:9] + ["--voice", "nobody"]) == 2  # unknown voice: one-line error, exit 2
    assert "voice" in capsys.readouterr().err
