"""`omni2-engine` given bad input: exit status 2 and one line `omni2-engine: error: ...` that names the problem, no
traceback, and nothing done first — no model loaded, no demo checkpoint written, no daemon contacted, no voice
file written. Called in process (`main([...])`); where a case would go on past its check, a guard (a patched
loader or client) fails the test instead of loading or connecting.

Covers `chat --wav` without `--out`, unusable `--token-file`s (serve and chat), half a model (`--model-dir`
without `--vocoder-dir` and the reverse), bad `--dtype` / `--placement` / counts for serve, a missing or corrupt
question for `generate`, `--max-new-tokens 0` (generate, chat), a `--max-context` below 16 or below the prompt
(generate: one error line, exit 1), and `voice add`'s refusals: a missing embedding, a pickled .npy (never
unpickled), a misshaped one, unsafe names, a prompt over 30 s (and exactly 30 s accepted).
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from omni2.engine.checkpoints import demo
from omni2.engine.cli import chat, generate
from omni2.engine.cli import main as cli
from omni2.engine.config import default_worker_threads
from tests.engine.serve.daemon_harness import free_port

PROG = "omni2-engine: error: "


def run(argv: list[str], capsys) -> str:
    """main(argv) must return 2 and print exactly one error line (and nothing on stdout); returns that line."""
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 2, (rc, out, err)
    assert "Traceback" not in err and err.startswith(PROG) and err.count("\n") == 1, err
    return err.strip()


def _refuse(*args, **kwargs):
    raise AssertionError("the command went past its input checks (loaded a model or connected)")


@pytest.fixture
def guard(monkeypatch, tmp_path):
    """No model loads, no demo checkpoint is written and no daemon is contacted while it is active; the demo cache
    points into tmp_path (returned), so a test can also check it stayed empty."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("OMNI2_CACHE", str(cache))
    monkeypatch.setattr(demo, "demo_dirs", _refuse)
    monkeypatch.setattr(generate, "ReferencePipeline", _refuse)
    monkeypatch.setattr(chat, "run_wav", _refuse)
    monkeypatch.setattr(chat, "run_mic", _refuse)
    return cache


@pytest.fixture
def question(tmp_path) -> Path:
    q = tmp_path / "q.wav"
    sf.write(q, (np.random.default_rng(0).standard_normal(8000) * 0.1).astype(np.float32), 16000)
    return q


def bind() -> list[str]:
    return ["--bind", f"tcp://127.0.0.1:{free_port()}"]


# -- chat / serve / generate ---------------------------------------------------------------------------------------
def test_chat_wav_needs_out(guard, question, tmp_path, capsys):
    assert run(["chat", "--wav", question], capsys) == PROG + "--wav needs --out (where to write the reply audio)"
    # --mic writes its last reply only beside --out: a --json alone would be silently ignored
    assert run(["chat", "--mic", "--json", tmp_path / "r.json"], capsys) == \
        PROG + "--json needs --out (the reply's audio is written beside it)"


TOKEN_FILES = {  # name -> (file content, or None: a directory; the error it gives)
    "missing": (..., "cannot read --token-file"),
    "a directory": (None, "cannot read --token-file"),
    "not text": (b"\xff\xfe\x00\x81", "cannot read --token-file"),
    "empty": (b"", "must hold one printable token of 1-4096 characters"),
    "blank": (b" \n\t\n", "must hold one printable token of 1-4096 characters"),
    "non-printable": (b"abc\x07def", "must hold one printable token of 1-4096 characters"),
    "two lines": (b"abc\ndef\n", "must hold one printable token of 1-4096 characters"),
    "too long": (b"x" * 4097, "must hold one printable token of 1-4096 characters"),
}


@pytest.mark.parametrize("verb", ["serve", "chat"])
@pytest.mark.parametrize("kind", list(TOKEN_FILES))
def test_an_unusable_token_file(guard, question, tmp_path, capsys, verb, kind):
    content, message = TOKEN_FILES[kind]
    f = tmp_path / "token"
    if content is None:
        f.mkdir()
    elif content is not ...:
        f.write_bytes(content)
    argv = {"serve": ["serve", *bind()], "chat": ["chat", "--wav", question, "--out", tmp_path / "r.wav"]}[verb]
    err = run([*argv, "--token-file", f], capsys)
    assert err.startswith(f"{PROG}{'cannot read --token-file' if 'cannot' in message else '--token-file'} {f}")
    assert message in err
    assert not guard.exists()  # serve stopped before the demo checkpoint


@pytest.mark.parametrize("given", ["--model-dir", "--vocoder-dir"])
def test_serve_needs_both_model_dirs_or_neither(guard, tiny_ckpt, tiny_vocoder, capsys, given):
    path = tiny_ckpt if given == "--model-dir" else tiny_vocoder
    err = run(["serve", given, path, *bind()], capsys)
    assert err == PROG + "give both --model-dir and --vocoder-dir, or neither (the demo model)"
    assert not guard.exists()


@pytest.mark.parametrize("option, message", [
    (["--dtype", "float64"], "--dtype must be one of float32, bfloat16, float16, got 'float64'"),
    (["--dtype", "fp16"], "--dtype must be one of float32, bfloat16, float16, got 'fp16'"),
    (["--placement", "gpu"], "placement 'gpu' is not cpu, cuda or STAGE=DEVICE for every stage"),
    (["--placement", "asr=0,llm=1"], "placement: missing stages ['tts', 'vocoder']"),
    (["--placement", "asr=cpu,llm=cpu,tts=cpu,vocoder=tpu"], "placement: bad device 'tpu' for vocoder"),
    (["--placement", "asr=0,llm=0,tts=0,vocoder=0,npu=0"], "placement: unknown stage 'npu'"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--max-sessions", "0"], "--max-sessions must be >= 1, got 0"),
    (["--max-sessions-per-client", "0"], "--max-sessions-per-client must be >= 1, got 0"),
    (["--threads", "0"], "--threads must be >= 1, got 0"),
    (["--vocoder-left-chunks", "0"], "--vocoder-left-chunks must be >= 1, got 0"),
    (["--vocoder-batch", "0"], "--vocoder-batch must be >= 1, got 0"),
    (["--max-context", "15"], "--max-context must be >= 16, got 15"),
])
@pytest.mark.parametrize("model", ["demo", "dirs"])
def test_serve_refuses_bad_options_before_anything_loads(guard, tmp_path, capsys, option, message, model):
    """With the demo model the check must come before the demo checkpoint is written (seconds, and files in the
    user's cache); with model directories, before they are read (these ones do not exist: reading them first
    would report that instead)."""
    dirs = [] if model == "demo" else ["--model-dir", tmp_path / "no-model", "--vocoder-dir", tmp_path / "no-voc"]
    t0 = time.monotonic()
    err = run(["serve", *option, *dirs, *bind()], capsys)
    assert err.startswith(PROG + message), err
    assert not guard.exists() and time.monotonic() - t0 < 5


def test_generate_a_missing_question_fails_before_the_model_loads(guard, tiny_ckpt, tiny_vocoder, tmp_path, capsys):
    missing = tmp_path / "nowhere.wav"
    err = run(["generate", "--model-dir", tiny_ckpt, "--vocoder-dir", tiny_vocoder, "--wav", missing, "--out",
               tmp_path / "r.wav"], capsys)
    assert err == f"{PROG}no audio file at {missing}"
    assert not (tmp_path / "r.wav").exists()


@pytest.mark.parametrize("content", [b"", b"RIFF\x24\x00\x00\x00WAVEfmt junk", b"not audio at all\n" * 10])
def test_generate_a_corrupt_question_fails_before_the_model_loads(guard, tiny_ckpt, tiny_vocoder, tmp_path, capsys,
                                                                  content):
    bad = tmp_path / "bad.wav"
    bad.write_bytes(content)
    err = run(["generate", "--model-dir", tiny_ckpt, "--vocoder-dir", tiny_vocoder, "--wav", bad, "--out",
               tmp_path / "r.wav"], capsys)
    assert err.startswith(f"{PROG}cannot read audio file {bad}: "), err
    assert not (tmp_path / "r.wav").exists()


@pytest.mark.parametrize("value", ["0", "-3"])
def test_max_new_tokens_below_one(guard, question, tiny_ckpt, tiny_vocoder, tmp_path, capsys, value):
    """0 used to mean "the default" to generate (256 tokens) and reach the daemon as bad_value from chat."""
    out = tmp_path / "r.wav"
    gen = ["generate", "--model-dir", tiny_ckpt, "--vocoder-dir", tiny_vocoder, "--wav", question, "--out", out]
    assert run([*gen, "--max-new-tokens", value], capsys) == f"{PROG}--max-new-tokens must be >= 1, got {value}"
    port = free_port()  # nothing listens: a chat that went on would fail to connect (and the guard fails first)
    chat_argv = ["chat", "--wav", question, "--out", out, "--connect", f"tcp://127.0.0.1:{port}", "--timeout", "1"]
    assert run([*chat_argv, "--max-new-tokens", value], capsys) == f"{PROG}--max-new-tokens must be >= 1, got {value}"
    assert run([*gen, "--threads", "0"], capsys) == f"{PROG}--threads must be >= 1, got 0"
    assert run([*gen, "--max-context", "8"], capsys) == f"{PROG}--max-context must be >= 16, got 8"
    assert not out.exists()


def test_generate_a_prompt_over_max_context_is_one_error_line(tiny_ckpt, tiny_vocoder, question, tmp_path, capsys):
    """The limit reaches the thinker (its message names the option to raise); nothing is written."""
    out = tmp_path / "r.wav"
    rc = cli.main(["generate", "--model-dir", str(tiny_ckpt), "--vocoder-dir", str(tiny_vocoder), "--wav",
                   str(question), "--out", str(out), "--max-context", "40", "--threads", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("omni2-engine generate: error: prompt of ") and last.endswith(
        "does not fit the context limit 40 (close the session or raise --max-context)"), err
    assert not out.exists()


def test_more_new_tokens_than_the_tts_lm_can_voice_are_refused_before_anything_loads(monkeypatch, tiny_ckpt,
                                                                                       tiny_vocoder, question,
                                                                                       tmp_path, capsys):
    """A reply of 8000 tokens could take 35,684 TTS positions, past the TTS LM's 32,768: serve and generate say so
    from the checkpoint's config, before a worker is spawned or a stage loaded."""
    from omni2.engine import reference
    from omni2.engine.runtime import engine

    monkeypatch.setattr(engine.Engine, "start", _refuse)
    monkeypatch.setattr(reference, "ASRStage", None)  # a load would fail with a TypeError, not the refusal
    dirs = ["--model-dir", tiny_ckpt, "--vocoder-dir", tiny_vocoder]
    want = (f"{PROG}a reply of 8000 tokens can take 35684 TTS positions, more than the TTS LM's 32768: "
            "lower --max-new-tokens")
    assert run(["serve", *dirs, "--max-new-tokens", "8000", *bind()], capsys) == want
    out = tmp_path / "r.wav"
    rc = cli.main([str(a) for a in ["generate", *dirs, "--wav", question, "--out", out, "--max-new-tokens", "8000"]])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and err.strip().splitlines()[-1] == want, err  # after "loading ..."
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--out", "--json"])
def test_an_output_that_cannot_be_written_is_refused_before_the_work(guard, question, tiny_ckpt, tiny_vocoder,
                                                                     tmp_path, capsys, flag):
    """A typo in a directory name used to cost the whole reply (generate: a traceback after generating it; with
    --json, the WAV written and then the error)."""
    files = {"--out": tmp_path / "r.wav", "--json": tmp_path / "r.json"}
    bad = {"--out": tmp_path / "nodir" / "r.wav", "--json": tmp_path / "nodir" / "r.json"}[flag]
    files[flag] = bad
    outs = [x for f, path in files.items() for x in (f, path)]
    gen = ["generate", "--model-dir", tiny_ckpt, "--vocoder-dir", tiny_vocoder, "--wav", question, *outs]
    want = f"{PROG}{flag} {bad}: there is no directory {bad.parent}"
    assert run(gen, capsys) == want
    assert run(["chat", "--wav", question, *outs], capsys) == want  # the guard refuses a connection
    assert run(["chat", "--mic", *outs], capsys) == want
    files[flag] = tmp_path
    assert run([*gen[:-4], *[x for f, path in files.items() for x in (f, path)]], capsys) == \
        f"{PROG}{flag} {tmp_path} is a directory; give a file name"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.wav"]  # nothing written, not even the demo cache


@pytest.mark.parametrize("option, message", [
    (["--connect", "foo"], "--connect 'foo' is not a ZMQ endpoint such as tcp://127.0.0.1:5555"),
    (["--connect", "127.0.0.1:5555"], "--connect '127.0.0.1:5555' is not a ZMQ endpoint such as tcp://127.0.0.1:5555"),
    (["--timeout", "-1"], "--timeout must be > 0 seconds, got -1"),
    (["--timeout", "0"], "--timeout must be > 0 seconds, got 0"),
])
def test_client_options_are_checked_before_connecting(guard, question, tmp_path, capsys, option, message):
    assert run(["status", *option], capsys) == PROG + message
    assert run(["chat", "--wav", question, "--out", tmp_path / "r.wav", *option], capsys) == PROG + message


def test_a_curve_key_that_cannot_be_read_is_one_line(tmp_path, capsys):
    missing = tmp_path / "server.key"
    assert cli.main(["status", "--connect", "tcp://127.0.0.1:1", "--curve-server-key", str(missing)]) == 1
    err = capsys.readouterr().err
    assert err == f"omni2-engine status: error: cannot read a CURVE key: Invalid certificate file: {missing}\n", err


# -- voice add -------------------------------------------------------------------------------------------------------
@pytest.fixture
def store(tiny_vocoder, tmp_path):
    """A --voices-dir to write into (the tiny vocoder fixture is read-only); checks afterwards that neither it nor
    the fixture's own voices/ gained a file."""
    d = tmp_path / "store"
    before = sorted(os.listdir(tiny_vocoder / "voices"))
    yield d
    assert sorted(os.listdir(tiny_vocoder / "voices")) == before == ["default.npy"]


def voice_add(name, tiny_vocoder, store, *source) -> list[str]:
    return ["voice", "add", name, *source, "--vocoder-dir", tiny_vocoder, "--voices-dir", store]


def written(store: Path) -> list[str]:
    return sorted(p.name for p in store.rglob("*")) if store.exists() else []


def test_voice_add_a_missing_embedding(tiny_vocoder, store, tmp_path, capsys):
    f = tmp_path / "nowhere.npy"
    err = run(voice_add("x", tiny_vocoder, store, "--embedding", f), capsys)
    assert err.startswith(f"{PROG}cannot read an embedding from {f}: ") and "No such file" in err
    assert written(store) == []


class _Payload:
    """Unpickling it would create a directory: the proof that a pickled .npy was opened and not just refused."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return os.mkdir, (self.path,)


def test_voice_add_refuses_a_pickled_npy(tiny_vocoder, store, tmp_path, capsys):
    marker = tmp_path / "unpickled"
    f = tmp_path / "evil.npy"
    np.save(f, np.array([_Payload(marker)] + [0.0] * 191, dtype=object), allow_pickle=True)
    err = run(voice_add("evil", tiny_vocoder, store, "--embedding", f), capsys)
    assert err.startswith(f"{PROG}cannot read an embedding from {f}: ") and "allow_pickle=False" in err
    assert not marker.exists()  # never unpickled
    assert written(store) == []
    # (the payload is real: numpy with allow_pickle runs it)
    np.load(f, allow_pickle=True)
    assert marker.is_dir()


@pytest.mark.parametrize("value, message", [
    (np.zeros((3, 64), np.float32),
     "a voice is a 192-d speaker x-vector, shaped (192,) or (1, 192); got shape (3, 64)"),
    (np.zeros(193, np.float32), "got shape (193,)"),
    (np.zeros((2, 192), np.float32), "got shape (2, 192)"),
    (np.arange(192, dtype=np.int64), "a voice holds floats, got dtype int64"),
    (np.full(192, np.inf, np.float32), "the embedding holds NaN or infinite values"),
])
def test_voice_add_refuses_a_misshaped_embedding(tiny_vocoder, store, tmp_path, capsys, value, message):
    f = tmp_path / "e.npy"
    np.save(f, value)
    err = run(voice_add("x", tiny_vocoder, store, "--embedding", f), capsys)
    assert err.startswith(f"{PROG}voice 'x': ") and message in err, err
    assert written(store) == []


@pytest.mark.parametrize("name", ["../x", "a b", "x/y", ".hidden", "x.npy", "a" * 65, ""])
def test_voice_add_refuses_an_unsafe_name(tiny_vocoder, store, tmp_path, capsys, name):
    f = tmp_path / "e.npy"
    np.save(f, np.ones(192, np.float32))
    err = run(voice_add(name, tiny_vocoder, store, "--embedding", f), capsys)
    assert err.startswith(f"{PROG}voice name {name!r} is not a safe file name"), err
    assert written(store) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["e.npy"]


HAS_ENROL = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "kaldi_native_fbank"))


@pytest.mark.skipif(not HAS_ENROL, reason="voice add --wav needs onnx (the tiny campplus.onnx), onnxruntime and "
                                          "kaldi-native-fbank: pip install -e .[voice] onnx")
def test_voice_add_refuses_a_prompt_over_30_seconds(tiny_vocoder, store, tmp_path, capsys):
    assert (tiny_vocoder / "campplus.onnx").is_file()  # written by the tiny writer when onnx is importable
    rng = np.random.default_rng(0)
    long, exact = tmp_path / "long.wav", tmp_path / "exact.wav"
    sf.write(long, (rng.standard_normal(16000 * 31) * 0.1).astype(np.float32), 16000)
    sf.write(exact, (rng.standard_normal(16000 * 30) * 0.1).astype(np.float32), 16000)
    err = run(voice_add("long", tiny_vocoder, store, "--wav", long), capsys)
    assert err.startswith(f"{PROG}voice prompt {long}: audio is 31.00 s long, more than the 30 s limit"), err
    assert written(store) == []
    # The limit is inclusive: exactly 30 s enrols.
    assert cli.main([str(a) for a in voice_add("exact", tiny_vocoder, store, "--wav", exact)]) == 0
    assert capsys.readouterr().out.strip() == str(store / "exact.npy")
    x = np.load(store / "exact.npy")
    assert x.shape == (192,) and x.dtype == np.float32 and np.isfinite(x).all() and np.abs(x).max() > 0


@pytest.mark.parametrize("given, left_chunks, batch", [([], 1, 16), (["--vocoder-left-chunks", "all"], None, 16),
                                                      (["--vocoder-left-chunks", "5", "--vocoder-batch", "1"], 5, 1)])
def test_vocoder_options_from_the_command_line(given, left_chunks, batch):
    """serve and generate voice with a bounded window by default; `all` is the exact official flow."""
    from omni2.engine.cli.main import build_parser, vocoder_options

    for verb in (["serve"], ["generate", "--model-dir", "m", "--vocoder-dir", "v", "--wav", "q.wav", "--out", "a.wav"]):
        opts = vocoder_options(build_parser().parse_args([*verb, *given]))
        assert (opts.left_chunks, opts.max_batch, opts.schedule) == (left_chunks, batch, "live")


@pytest.mark.parametrize("option, context", [([], 4096), (["--max-context", "512"], 512)])
def test_serve_hands_its_limits_to_the_engine(monkeypatch, tiny_ckpt, tiny_vocoder, option, context):
    from omni2.engine.serve import daemon

    seen = []
    monkeypatch.setattr(daemon, "serve", lambda cfg, engine_cfg: seen.append(engine_cfg) or 0)
    assert cli.main(["serve", "--model-dir", str(tiny_ckpt), "--vocoder-dir", str(tiny_vocoder), *bind(),
                     "--max-sessions", "3", "--max-new-tokens", "7", *option]) == 0
    limits = seen[0].limits
    assert (limits.max_context, limits.max_sessions, limits.max_new_tokens) == (context, 3, 7)


@pytest.mark.parametrize("option, threads", [([], default_worker_threads()), (["--threads", "3"], 3)])
def test_generate_runs_on_the_workers_thread_count_and_restores_the_callers(monkeypatch, question, capsys, option,
                                                                            threads):
    """The reference equals the engine bit for bit only on the same torch thread count (ARCHITECTURE "Threads"):
    with no --threads generate takes the count every stage worker of `serve` takes."""
    import torch

    seen = []

    def pipeline(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise ValueError("stop here")

    monkeypatch.setattr(generate, "ReferencePipeline", pipeline)
    before = torch.get_num_threads()
    assert cli.main(["generate", "--model-dir", "m", "--vocoder-dir", "v", "--wav", str(question), "--out", "a.wav",
                     *option]) == 2
    assert capsys.readouterr().err.endswith(PROG + "stop here\n")
    assert seen == [threads] and torch.get_num_threads() == before


@pytest.mark.parametrize("verb", ["serve", "generate"])
def test_a_gpu_this_torch_cannot_use_is_refused_before_anything_loads(guard, monkeypatch, question, tmp_path,
                                                                       capsys, verb):
    import torch

    monkeypatch.setattr(torch.version, "cuda", None)  # what a CPU build says, on any machine
    argv = {"serve": ["serve", "--placement", "asr=cpu,llm=cuda:1,tts=cpu,vocoder=cpu", *bind()],
            "generate": ["generate", "--model-dir", "m", "--vocoder-dir", "v", "--wav", question, "--out",
                         tmp_path / "r.wav", "--device", "cuda:1"]}[verb]
    err = run(argv, capsys)
    assert err.startswith(PROG + "device 'cuda:1': this torch ("), err
    assert not guard.exists() and not (tmp_path / "r.wav").exists()
