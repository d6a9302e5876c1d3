"""The TTS stage against a plain re-prefill implementation of the official generate_units (MODEL_SPEC §1.8).

The oracle runs transformers' Qwen2ForCausalLM on the tiny checkpoint's TTS LM weights, rebuilding
`tts_inputs` exactly as LLMSpeechGenerator does and re-running the whole history every chunk; it draws each
token with our counter-based sampler at the same per-session counter, so sampled runs are comparable too.
"""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from omni2.engine.checkpoints.model_dir import ModelDir
from omni2.engine.config import OFFICIAL_SAMPLING, ConfigError, Limits, SamplingParams, StreamParams, TTSOptions
from omni2.stages.sampling import sample
from omni2.stages.tts import TTSError, TTSInput, TTSStage, reply_positions
from tests.stages.recorded_graphs import stage_device


@pytest.fixture(scope="module")
def md(tiny_ckpt):
    return ModelDir(tiny_ckpt)


@pytest.fixture(scope="module")
def stage_factory(md):
    def make(**opts):
        limits = Limits(max_sessions=opts.pop("sessions", 4))
        return TTSStage.from_checkpoint(md, limits, TTSOptions(**opts))
    return make


@pytest.fixture(scope="module")
def oracle(md):
    sg = dict(md.config.raw["speech_generator"])
    hf = Qwen2ForCausalLM(Qwen2Config(**{k: v for k, v in sg.items() if k not in ("architectures", "model_type")}))
    sd = {k[len("speech_generator.model."):]: md.get_tensor(k) for k in md.keys("speech_generator.model.")}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not missing and not unexpected
    W = {k: md.get_tensor(k) for k in md.keys("speech_generator.", exclude=("speech_generator.model.",))}
    return hf.eval(), W


def official_fusion(W, h, e):
    """input_proj -> concat gate -> sigmoid blend, transcribed from LLMSpeechGenerator."""
    r = torch.relu(h @ W["speech_generator.input_proj.0.weight"].T + W["speech_generator.input_proj.0.bias"])
    r = r @ W["speech_generator.input_proj.2.weight"].T + W["speech_generator.input_proj.2.bias"]
    g = torch.sigmoid(torch.cat([r, e], -1) @ W["speech_generator.gate.0.weight"].T + W["speech_generator.gate.0.bias"])
    return r * g + e * (1 - g)


def official_units(oracle, md, ids, hidden, sampling, R=3, M=10):
    """The official chunk loop with a fresh full prefill per chunk. Returns the sampled TTS ids per chunk."""
    hf, W = oracle
    sp = md.special_ids()
    emb = hf.model.embed_tokens
    tts_inputs, chunks, counter = None, [], 0
    starts = list(range(0, len(ids), R))
    with torch.no_grad():
        for c, a in enumerate(starts):
            final = c == len(starts) - 1
            x = official_fusion(W, hidden[a:a + R], emb(torch.tensor(ids[a:a + R])))
            tts_inputs = x if tts_inputs is None else torch.cat([tts_inputs, x])
            if final:
                tts_inputs = torch.cat([tts_inputs, emb(torch.tensor([sp.sep_id]))])
            seq, new = tts_inputs, []
            for _ in range(1024 if final else M):
                logits = hf(inputs_embeds=seq[None]).logits[:, -1]
                tok = int(sample(logits, [sampling], [counter])[0])
                counter += 1
                new.append(tok)
                seq = torch.cat([seq, emb(torch.tensor([tok]))])
                if tok == sp.tts_eos_id:
                    break
            tts_inputs = seq
            chunks.append(new)
    return chunks


def run_stage(stage, sid, ids, hidden, per_step=1):
    """Feed thinker tokens `per_step` at a time (as the LLM emits them) and collect tokens per chunk."""
    chunks, cur, fed, done = [], [], 0, False
    while not done:
        inputs = []
        if fed < len(ids):
            n = min(per_step, len(ids) - fed)
            inputs = [TTSInput(sid, ids[fed:fed + n], hidden[fed:fed + n], final=fed + n == len(ids))]
            fed += n
        for t in stage.step(inputs):
            cur.append(t.token_id)
            if t.chunk_end:
                chunks.append(cur)
                cur = []
            done = t.done
    return chunks


def reply(md, n, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 500, (n,), generator=g).tolist()  # ids of the tiny text vocab
    return ids, torch.randn(n, md.config.thinker.hidden_size, generator=g)


def test_fusion_equals_the_official_formula(md, oracle, stage_factory):
    stage = stage_factory()
    ids, h = reply(md, 7, 0)
    e = stage.lm.embed(torch.tensor(ids))
    with torch.no_grad():
        ours = stage.gen.fuse(h, e)
        assert (ours - official_fusion(oracle[1], h, e)).abs().max().item() < 1e-6
        only_h = stage.gen.fuse(h, e, gate_override=1.0)
        assert torch.allclose(only_h, stage.gen.input_proj(h))
        assert torch.allclose(stage.gen.fuse(h, e, gate_override=0.0), e)


@pytest.mark.parametrize("sampling", [SamplingParams(), OFFICIAL_SAMPLING.__class__(1.0, 50, 1.0, seed=3)],
                         ids=["greedy", "sampled"])
def test_incremental_equals_official_reprefill(md, oracle, stage_factory, sampling):
    ids, h = reply(md, 17, 1)  # 6 chunks: five of 3 tokens, a final one of 2 + <sep>
    stage = stage_factory()
    stage.open("s", sampling)
    ours = run_stage(stage, "s", ids, h)
    ref = official_units(oracle, md, ids, h, sampling)
    assert ours == ref
    assert len(ours) == 6
    eos = md.special_ids().tts_eos_id
    if sampling.greedy:  # this random head ends greedy chunks early on EOS: the early-EOS path is covered
        assert sum(c[-1] == eos and len(c) < 10 for c in ours[:-1]) >= 2
    else:  # the sampled run writes full chunks and a long final flush
        assert sum(t != eos for c in ours for t in c) >= 60 and ours[-1][-1] == eos


def test_early_eos_in_a_non_final_chunk_behaves_as_official(md, oracle, stage_factory):
    """Find a seed whose run samples EOS inside a streaming chunk; both sides must then agree token by token."""
    eos = md.special_ids().tts_eos_id
    ids, h = reply(md, 12, 2)
    for seed in range(40):
        p = SamplingParams(1.0, 50, 1.0, seed=seed)
        stage = stage_factory()
        stage.open("s", p)
        ours = run_stage(stage, "s", ids, h)
        if any(c[-1] == eos and len(c) < 10 for c in ours[:-1]):
            assert ours == official_units(oracle, md, ids, h, p)
            return
    pytest.fail("no seed in 0..39 sampled an early EOS; the test checks nothing")


def test_reprefill_baseline_gives_the_same_tokens(md, stage_factory):
    ids, h = reply(md, 11, 4)
    a, b = stage_factory(), stage_factory(reprefill=True)
    a.open("s", OFFICIAL_SAMPLING)
    b.open("s", OFFICIAL_SAMPLING)
    assert run_stage(a, "s", ids, h, per_step=2) == run_stage(b, "s", ids, h, per_step=5)


def test_sessions_batched_equal_each_alone(md, stage_factory):
    replies = [reply(md, n, 10 + n) for n in (4, 9, 1, 14)]
    params = [SamplingParams(1.0, 50, 1.0, seed=i) for i in range(4)]
    alone = []
    for i, (ids, h) in enumerate(replies):
        st = stage_factory()
        st.open(f"s{i}", params[i])
        alone.append(sum(run_stage(st, f"s{i}", ids, h), []))
    st = stage_factory()
    for i in range(4):
        st.open(f"s{i}", params[i])
    got = {f"s{i}": [] for i in range(4)}
    outs = st.step([TTSInput(f"s{i}", ids, h, final=True) for i, (ids, h) in enumerate(replies)])
    while outs:
        for t in outs:
            got[t.session_id].append(t.token_id)
        outs = st.step()
    assert [got[f"s{i}"] for i in range(4)] == alone


@pytest.mark.parametrize("device,offline", [
    ("cpu", False), ("cpu", True), ("recorded", False),
    pytest.param("cuda", False, marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
    ids=["streaming", "offline", "recorded-streaming", "cuda-graphs-streaming"])
def test_fixed_shape_decode_steps_give_the_same_units(md, device, offline, monkeypatch):
    """cuda_graphs=True (on a CPU the fixed-shape steps run eagerly; on CUDA they are captured when the stage loads
    and replayed; "recorded": on a CPU, captured as recorded graphs, tests/stages/recorded_graphs.py): sessions at
    different points of their replies, prefilling chunks and decoding in the same steps, write the units the dynamic
    step writes. Streaming, a chunk's text fits the 8-token bucket; offline, a reply's text is one chunk, here 2 to
    15 positions (the longer ones take the dynamic forward)."""
    captured = device != "cpu"
    device = stage_device(device, monkeypatch)
    replies = [reply(md, n, 30 + n) for n in (4, 9, 1, 14)]
    params = [SamplingParams(1.0, 50, 1.0, seed=i) for i in range(4)]

    def run(cuda_graphs):
        st = TTSStage.from_checkpoint(md, Limits(max_sessions=4), TTSOptions(offline=offline), device=device,
                                      cuda_graphs=cuda_graphs)
        got = {f"s{i}": [] for i in range(4)}
        for i in range(4):
            st.open(f"s{i}", params[i])
        fed = [0] * 4
        while True:  # two thinker tokens per step and session, so chunks start while others are mid-write
            inputs = []
            for i, (ids, h) in enumerate(replies):
                n = min(2, len(ids) - fed[i])
                if n:
                    inputs.append(TTSInput(f"s{i}", ids[fed[i]:fed[i] + n], h[fed[i]:fed[i] + n],
                                           final=fed[i] + n == len(ids)))
                    fed[i] += n
            outs = st.step(inputs)
            if not outs and not inputs:
                return got, st
            for t in outs:
                got[t.session_id].append(t.token_id)

    dynamic, _ = run(False)
    fixed, st = run(True)
    assert fixed == dynamic
    assert sum(len(v) for v in fixed.values()) > 40
    # The fixed-shape steps ran, at several batch sizes, for units and for chunks' text.
    assert len({r for r, _, _ in st.graphs.steps}) >= 2
    assert {t for _, t, _ in st.graphs.steps} == {1, 8}
    assert all(s.graph is not None for s in st.graphs.steps.values()) == captured


def test_options_units_only_and_offline(md, stage_factory):
    sp = md.special_ids()
    ids, h = reply(md, 10, 5)
    st = stage_factory(units_only=True)
    st.open("s", OFFICIAL_SAMPLING)
    toks = sum(run_stage(st, "s", ids, h), [])
    assert all(sp.is_unit(t) or t == sp.tts_eos_id for t in toks)
    off = stage_factory(offline=True)
    off.open("s", SamplingParams())
    chunks = run_stage(off, "s", ids, h)
    assert len(chunks) == 1  # speech starts only after the whole text


def test_units_are_id_arithmetic(md, stage_factory):
    sp = md.special_ids()
    st = stage_factory()
    st.open("s", OFFICIAL_SAMPLING)
    ids, h = reply(md, 6, 6)
    outs = st.step([TTSInput("s", ids, h, final=True)])
    while not outs[-1].done:
        outs += st.step()
    for t in outs:
        assert t.unit == (t.token_id - sp.unit0 if sp.is_unit(t.token_id) else None)
    assert any(t.unit is not None for t in outs)


def test_bad_inputs_are_clear_errors(md, stage_factory):
    st = stage_factory(sessions=1)
    ids, h = reply(md, 3, 7)
    with pytest.raises(Exception, match="unknown session"):
        st.step([TTSInput("x", ids, h)])
    st.open("s")
    with pytest.raises(Exception, match="slots are in use"):
        st.open("t")
    with pytest.raises(Exception, match="hidden states"):
        st.step([TTSInput("s", ids, h[:2])])
    st.step([TTSInput("s", ids, h, final=True)])
    with pytest.raises(Exception, match="after its reply's final token"):
        st.step([TTSInput("s", ids, h)])
    st.cancel("s")
    assert not st.busy()


def test_stream_params_come_from_the_checkpoint(md, oracle, tmp_path):
    """A model directory whose config.json says "(2,7)" runs Read-2-Write-7, equal to the official loop with R=2,
    M=7: the value reaches the stage, not only the config reader."""
    import json
    import os

    d = tmp_path / "omni2-r2w7"
    d.mkdir()
    for f in md.path.iterdir():  # the weights and tokenizers as they are; only config.json changes
        os.symlink(f, d / f.name)
    (d / "config.json").unlink()
    (d / "config.json").write_text(json.dumps({**md.config.raw, "stream_params": "(2,7)"}))
    stage = TTSStage.from_checkpoint(ModelDir(d), Limits(max_sessions=1))
    assert stage.stream == StreamParams(2, 7)
    sampling = SamplingParams(1.0, 50, 1.0, seed=0)  # this seed writes full chunks and a short final flush
    ids, h = reply(md, 7, 1)  # four chunks: three of 2 tokens, a final one of 1 + <sep>
    stage.open("s", sampling)
    ours = run_stage(stage, "s", ids, h)
    assert ours == official_units(oracle, md, ids, h, sampling, R=2, M=7)
    assert [len(c) for c in ours[:-1]] == [7, 7, 7]


@pytest.mark.parametrize("units_only", [True, False], ids=["units_only", "full_vocab"])
def test_kernels_give_the_same_units_as_the_references(md, force_triton, monkeypatch, units_only):
    """One session through the Triton kernels (gate fusion, FSQ decode; interpreted on CPU) and through the torch
    references: the same tokens, step for step. The final flush is capped at 20 units: the interpreter is slow."""
    from omni2.kernels import dispatch

    monkeypatch.setattr("omni2.stages.tts.FINAL_MAX_UNITS", 20)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ids, h = reply(md, 5, 8)
    runs = []
    for kernels in (True, False):
        monkeypatch.setattr(dispatch, "FORCE_TRITON", kernels)
        monkeypatch.setattr(dispatch, "FORCE_REFERENCE", not kernels)
        st = TTSStage.from_checkpoint(md, Limits(max_sessions=1), TTSOptions(units_only=units_only), device=device)
        st.open("s", SamplingParams(1.0, 50, 1.0, seed=21))
        runs.append(run_stage(st, "s", ids, h))
    assert runs[0] == runs[1]
    toks = sum(runs[0], [])
    assert sum(md.special_ids().is_unit(t) for t in toks) >= 15, toks


def test_a_session_past_the_context_is_named_and_nothing_is_computed(md, stage_factory):
    """One session's speech would pass the TTS context: the step refuses naming it (and only it), before any
    forward, so that its batch-mate, once the other is cancelled, speaks exactly as it would alone."""
    st, alone = stage_factory(sessions=2, max_context=60), stage_factory(sessions=1)
    long_ids, long_h = reply(md, 30, 1)
    ids, h = reply(md, 3, 2)
    for sid in ("long", "short"):
        st.open(sid)
    alone.open("short")
    st.step([TTSInput("long", long_ids, long_h, final=True)])  # 30 tokens read: ~30 positions ahead of "short"
    first = [TTSInput("short", ids, h, final=True)]

    def short_tokens(stage, inputs):
        return [t.token_id for t in stage.step(inputs) if t.session_id == "short"]

    got = []
    with pytest.raises(TTSError) as e:
        for i in range(60):
            got += short_tokens(st, first if i == 0 else [])
    assert e.value.sessions == ["long"]
    st.cancel("long")
    for _ in range(10):  # "short" stays well inside the context
        got += short_tokens(st, [])
    want = short_tokens(alone, first)
    while len(want) < len(got):
        want += short_tokens(alone, [])
    assert len(got) > 10 and got == want


def test_the_default_context_holds_the_longest_reply_the_limits_allow(md):
    """A reply of max_new_tokens tokens, fed one at a time as the thinker writes them, whose TTS never samples EOS
    (every chunk writes its W units, the final one all FINAL_MAX_UNITS) fits the default context exactly: one
    position less refuses it."""
    n = 7  # 7 // 3 = 2 written chunks before the final one, the most a reply of 7 tokens can have
    limits = Limits(max_sessions=1, max_new_tokens=n)
    ids, h = reply(md, n, 3)
    assert TTSStage.from_checkpoint(md, limits).max_context == reply_positions(n, StreamParams()) == 1051

    def speak(stage):
        stage._decode = lambda hidden, sessions: torch.full((len(sessions),), stage.unit0)  # never EOS
        stage.open("s")
        return run_stage(stage, "s", ids, h)

    assert [len(c) for c in speak(TTSStage.from_checkpoint(md, limits))] == [10, 10, 1024]
    short = TTSStage.from_checkpoint(md, limits, TTSOptions(max_context=1050))
    with pytest.raises(TTSError, match="would pass the TTS context of 1050 positions"):
        speak(short)
    with pytest.raises(ConfigError, match="lower --max-new-tokens"):
        TTSStage.from_checkpoint(md, Limits(max_new_tokens=8000))
