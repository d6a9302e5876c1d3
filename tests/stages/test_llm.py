"""The LLM stage against transformers' Qwen2ForCausalLM on the tiny checkpoint's thinker weights.

The oracle builds the official merged input itself (MODEL_SPEC §1.4): chat template over the conversation,
each `<speech>` id replaced by that turn's embeddings, a full prefill every turn, greedy decoding, and the
post-norm last-layer hidden state at the position that produced each token (MODEL_SPEC §1.7-1.8).
"""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from omni2.engine.checkpoints.model_dir import THINKER_EXCLUDE, ModelDir
from omni2.engine.config import Limits, SamplingParams
from omni2.stages.llm import LLMError, LLMStage, LLMTurn
from tests.stages.recorded_graphs import stage_device


@pytest.fixture(scope="module")
def md(tiny_ckpt):
    return ModelDir(tiny_ckpt)


@pytest.fixture(scope="module")
def oracle(md):
    cfg = {k: v for k, v in md.config.raw.items() if k not in ("architectures", "model_type", "speech_generator")}
    hf = Qwen2ForCausalLM(Qwen2Config(**cfg)).eval()
    sd = {k: md.get_tensor(k) for k in md.keys("", exclude=THINKER_EXCLUDE)}
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all(k == "lm_head.weight" for k in missing)
    return hf


def speech(n, H, seed):
    return torch.randn(n, H, generator=torch.Generator().manual_seed(seed)) * 0.5


def chat(turns, answers) -> list[dict]:
    messages = []
    for i in range(len(turns)):
        messages.append({"role": "user", "content": "<speech>"})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def oracle_reply(hf, md, turns, answers, max_new, prompt=None):
    """Greedy reply of the official algorithm (or to the token ids `prompt`); returns (ids, hidden (n, H))."""
    tok, ids = md.tokenizer(), md.special_ids()
    if prompt is None:
        prompt = tok.apply_chat_template(chat(turns, answers), add_generation_prompt=True)
        prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    emb = hf.model.embed_tokens
    pieces, turn = [], 0
    for t in prompt:
        if t == ids.speech_token_id:
            pieces.append(turns[turn])
            turn += 1
        else:
            pieces.append(emb(torch.tensor([t])))
    x = torch.cat(pieces)[None]
    out_ids, hiddens = [], []
    with torch.no_grad():
        for _ in range(max_new):
            o = hf(inputs_embeds=x, output_hidden_states=True)
            nxt = int(o.logits[0, -1].argmax())
            out_ids.append(nxt)
            hiddens.append(o.hidden_states[-1][0, -1])
            if nxt in ids.thinker_eos_ids:
                break
            x = torch.cat([x, emb(torch.tensor([[nxt]]))], dim=1)
    return out_ids, torch.stack(hiddens)


def run_turn(stage, sid, emb, max_new=None):
    toks = stage.step([LLMTurn(sid, emb, max_new)])
    while not toks[-1].finished:
        toks += [t for t in stage.step() if t.session_id == sid]
    return toks


def test_greedy_reply_and_hidden_pairing_match_the_official_algorithm(md, oracle):
    stage = LLMStage.from_checkpoint(md, Limits(max_sessions=2, max_context=1024, max_new_tokens=40))
    H = md.config.thinker.hidden_size
    stage.open("a")
    emb = speech(300, H, 0)
    toks = run_turn(stage, "a", emb)
    ref_ids, ref_h = oracle_reply(oracle, md, [emb], [], 40)
    assert [t.token_id for t in toks] == ref_ids
    assert len(set(ref_ids)) > 3
    assert (torch.stack([t.hidden for t in toks]) - ref_h).abs().max().item() < 1e-4
    assert toks[-1].finish_reason == ("stop" if ref_ids[-1] in md.special_ids().thinker_eos_ids else "length")
    text = "".join(t.text for t in toks)
    plain = [i for i in ref_ids if i not in md.special_ids().thinker_eos_ids]
    assert text == md.tokenizer().decode(plain, skip_special_tokens=True)


def test_second_turn_reuses_the_cache_and_equals_a_full_reprefill(md, oracle):
    stage = LLMStage.from_checkpoint(md, Limits(max_sessions=1, max_context=2048, max_new_tokens=12))
    H = md.config.thinker.hidden_size
    stage.open("s")
    e1, e2 = speech(300, H, 1), speech(300, H, 2)
    first = run_turn(stage, "s", e1)
    answer = md.tokenizer().decode(stage.sessions["s"].answers[0], skip_special_tokens=True)
    cached_before = len(stage.sessions["s"].cached)
    second = run_turn(stage, "s", e2)
    ref_ids, ref_h = oracle_reply(oracle, md, [e1, e2], [answer], 12)
    assert [t.token_id for t in second] == ref_ids
    assert (torch.stack([t.hidden for t in second]) - ref_h).abs().max().item() < 1e-4
    assert len(first) > 0 and cached_before > 300


def test_batched_sessions_of_different_lengths_equal_each_alone(md):
    H = md.config.thinker.hidden_size
    lengths = [300, 120, 7, 45]
    limits = Limits(max_sessions=4, max_context=1024, max_new_tokens=15)
    alone = []
    for i, n in enumerate(lengths):
        stage = LLMStage.from_checkpoint(md, limits)
        stage.open(f"s{i}")
        alone.append([t.token_id for t in run_turn(stage, f"s{i}", speech(n, H, 10 + i))])
    stage = LLMStage.from_checkpoint(md, limits)
    got = {f"s{i}": [] for i in range(4)}
    for i in range(4):
        stage.open(f"s{i}")
    outs = stage.step([LLMTurn(f"s{i}", speech(n, H, 10 + i)) for i, n in enumerate(lengths)])
    while outs:
        for t in outs:
            got[t.session_id].append(t.token_id)
        outs = stage.step()
    assert [got[f"s{i}"] for i in range(4)] == alone


@pytest.mark.parametrize("device", [
    "cpu", "recorded",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
    ids=["cpu", "recorded", "cuda-graphs"])
def test_fixed_shape_decode_steps_give_the_same_turns(md, device, monkeypatch):
    """cuda_graphs=True (on a CPU the fixed-shape steps run eagerly; on CUDA they are captured when the stage loads
    and replayed; "recorded": on a CPU, captured as recorded graphs, tests/stages/recorded_graphs.py): four sessions,
    sampled, s1 asking a second turn whose prefill runs beside the others' decode steps; the same tokens and hidden
    states as the dynamic steps."""
    captured = device != "cpu"
    device = stage_device(device, monkeypatch)
    H = md.config.thinker.hidden_size
    limits = Limits(max_sessions=4, max_context=1024, max_new_tokens=12)

    def run(cuda_graphs):
        stage = LLMStage.from_checkpoint(md, limits, device=device, cuda_graphs=cuda_graphs)
        got = {f"s{i}": [] for i in range(4)}
        for i in range(4):
            stage.open(f"s{i}", SamplingParams(0.8, 20, 0.9, seed=i))
        outs = stage.step([LLMTurn(f"s{i}", speech(n, H, 20 + i).to(device)) for i, n in enumerate([40, 9, 3, 25])])
        second = False
        while outs:
            for t in outs:
                got[t.session_id].append((t.token_id, t.hidden))
            turns = []
            if not second and any(t.finished and t.session_id == "s1" for t in outs):
                turns, second = [LLMTurn("s1", speech(6, H, 99).to(device))], True
            outs = stage.step(turns)
        return got, stage

    dynamic, _ = run(False)
    fixed, stage = run(True)
    assert {k: [i for i, _ in v] for k, v in fixed.items()} == {k: [i for i, _ in v] for k, v in dynamic.items()}
    assert len(fixed["s1"]) > 12  # s1 answered twice
    for k in fixed:
        a, b = torch.stack([h for _, h in fixed[k]]), torch.stack([h for _, h in dynamic[k]])
        assert (a - b).abs().max().item() < 1e-5, k
    assert stage.graphs is not None and len(stage.graphs.steps) >= 2
    assert all(s.graph is not None for s in stage.graphs.steps.values()) == captured


def test_seeded_sampling_is_reproducible_and_batch_invariant(md):
    H = md.config.thinker.hidden_size
    p = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=7)
    limits = Limits(max_sessions=3, max_context=1024, max_new_tokens=15)
    stage = LLMStage.from_checkpoint(md, limits)
    stage.open("x", p)
    alone = [t.token_id for t in run_turn(stage, "x", speech(50, H, 3))]
    stage = LLMStage.from_checkpoint(md, limits)
    stage.open("y", SamplingParams(temperature=0.7, seed=1))
    stage.open("x", p)
    outs = stage.step([LLMTurn("y", speech(80, H, 4)), LLMTurn("x", speech(50, H, 3))])
    got = []
    while outs:
        got += [t.token_id for t in outs if t.session_id == "x"]
        outs = stage.step()
    assert got == alone
    greedy = LLMStage.from_checkpoint(md, limits)
    greedy.open("x")
    assert [t.token_id for t in run_turn(greedy, "x", speech(50, H, 3))] != alone


def test_limits_and_bad_requests_are_clear_errors(md):
    H = md.config.thinker.hidden_size
    stage = LLMStage.from_checkpoint(md, Limits(max_sessions=1, max_context=64, max_new_tokens=5))
    with pytest.raises(LLMError, match="unknown session"):
        stage.step([LLMTurn("nope", speech(3, H, 0))])
    stage.open("a")
    with pytest.raises(LLMError, match="already open"):
        stage.open("a")
    with pytest.raises(LLMError, match="slots are in use"):
        stage.open("b")
    with pytest.raises(LLMError, match="context limit"):
        stage.step([LLMTurn("a", speech(300, H, 0))])
    with pytest.raises(LLMError, match=r"must be \(n>0"):
        stage.step([LLMTurn("a", speech(3, H + 1, 0))])
    toks = stage.step([LLMTurn("a", speech(3, H, 0))])
    with pytest.raises(LLMError, match="still answering"):
        stage.step([LLMTurn("a", speech(3, H, 0))])
    while not toks[-1].finished:
        toks += stage.step()
    assert len(toks) <= 5
    stage.close("a")
    stage.open("b")  # the slot came back


def test_generation_stops_at_the_context_limit_with_a_reason(md):
    H = md.config.thinker.hidden_size
    stage = LLMStage.from_checkpoint(md, Limits(max_sessions=1, max_context=80, max_new_tokens=100))
    stage.eos_ids = frozenset()
    stage.open("a")
    toks = run_turn(stage, "a", speech(10, H, 0))
    assert toks[-1].finish_reason == "context"
    assert len(stage.sessions["a"].cached) == 80 and len(toks) == 80 - 70 + 1


def test_cancel_drops_the_turn_and_frees_the_session_for_a_new_one(md):
    H = md.config.thinker.hidden_size
    stage = LLMStage.from_checkpoint(md, Limits(max_sessions=1, max_context=1024, max_new_tokens=30))
    stage.eos_ids = frozenset()
    stage.open("a")
    stage.step([LLMTurn("a", speech(20, H, 0))])
    stage.step()
    stage.cancel("a")
    assert not stage.busy() and stage.step() == []
    fresh = LLMStage.from_checkpoint(md, Limits(max_sessions=1, max_context=1024, max_new_tokens=30))
    fresh.eos_ids = frozenset()
    fresh.open("a")
    e = speech(25, H, 5)
    assert [t.token_id for t in run_turn(stage, "a", e)] == [t.token_id for t in run_turn(fresh, "a", e)]


def test_a_turn_left_out_of_the_history_is_not_read_even_after_it_finished(md, oracle):
    """LLMTurn.history names the earlier turns the prompt holds: a finished turn left out (the engine leaves out
    cancelled ones) is gone from the prompt, and the reply equals the official algorithm on the turns kept."""
    stage = LLMStage.from_checkpoint(md, Limits(max_sessions=1, max_context=2048, max_new_tokens=8))
    H = md.config.thinker.hidden_size
    stage.open("h")
    e0, e1, e2 = speech(300, H, 5), speech(300, H, 6), speech(300, H, 7)
    turn(stage, LLMTurn("h", e0, uid=0, history=[]))
    turn(stage, LLMTurn("h", e1, uid=1, history=[0]))  # finished: its answer is in the session's state now ...
    ids0, ids1 = stage.sessions["h"].answers
    answer0, answer1 = (md.tokenizer().decode(a, skip_special_tokens=True) for a in (ids0, ids1))
    third = turn(stage, LLMTurn("h", e2, uid=3, history=[0]))  # ... and left out of the next turn's history
    assert stage.sessions["h"].uids == [0, 3] and stage.sessions["h"].answers[:1] == [ids0]
    ref_ids, ref_h = oracle_reply(oracle, md, [e0, e2], [answer0], 8)
    assert [t.token_id for t in third] == ref_ids
    assert (torch.stack([t.hidden for t in third]) - ref_h).abs().max().item() < 1e-4
    _, kept_h = oracle_reply(oracle, md, [e0, e1, e2], [answer0, answer1], 8)
    assert (kept_h[:1] - ref_h[:1]).abs().max().item() > 1e-3  # the left-out turn would have changed the reply
    with pytest.raises(LLMError, match="not new"):
        stage.step([LLMTurn("h", e2, uid=2, history=[0])])


def test_a_cut_answer_is_read_as_its_first_tokens(md, oracle):
    """LLMTurn.cuts: the prompt holds only the first k tokens of a cut turn's answer (what the user heard before
    talking over it), and the reply equals the official algorithm on that shortened conversation."""
    stage = LLMStage.from_checkpoint(md, Limits(max_sessions=1, max_context=2048, max_new_tokens=8))
    H, tok = md.config.thinker.hidden_size, md.tokenizer()
    stage.open("c")
    e0, e1 = speech(300, H, 8), speech(300, H, 9)
    turn(stage, LLMTurn("c", e0, uid=0, history=[]))
    ids0 = stage.sessions["c"].answers[0]
    assert len(ids0) >= 4
    k = 2
    second = turn(stage, LLMTurn("c", e1, uid=1, history=[0], cuts={0: k}))
    ref_ids, ref_h = oracle_reply(oracle, md, [e0, e1], [tok.decode(ids0[:k], skip_special_tokens=True)], 8)
    assert [t.token_id for t in second] == ref_ids
    assert (torch.stack([t.hidden for t in second]) - ref_h).abs().max().item() < 1e-4
    _, whole_h = oracle_reply(oracle, md, [e0, e1], [tok.decode(ids0, skip_special_tokens=True)], 8)
    assert (whole_h[:1] - ref_h[:1]).abs().max().item() > 1e-3  # the cut changed what the thinker read
    assert stage.sessions["c"].answers[0] == ids0  # the cut is the caller's to name each turn, not a deletion


def turn(stage, t: LLMTurn) -> list:
    """Every token of one turn of session t.session_id."""
    toks = stage.step([t])
    while stage.busy():
        toks += [x for x in stage.step() if x.session_id == t.session_id]
    return toks


SAMPLED = SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=11)


def test_a_restored_conversation_answers_as_the_stage_it_came_from(md, oracle):
    """What a restarted worker is given (`finished_turn` of each turn, from the stage it replaces) makes it answer
    the next turn as that stage would: the same sampled ids, hidden states within rounding of the incremental cache
    (the restored stage prefills the whole conversation at once, as the official algorithm does)."""
    limits = Limits(max_sessions=1, max_context=2048, max_new_tokens=8)
    H = md.config.thinker.hidden_size
    e0, e1, e2 = speech(300, H, 12), speech(300, H, 13), speech(300, H, 14)
    old = LLMStage.from_checkpoint(md, limits)
    old.open("r", SAMPLED)
    given = []
    for uid, e in enumerate((e0, e1)):
        turn(old, LLMTurn("r", e, uid=uid, history=list(range(uid))))
        given.append(old.finished_turn("r"))
    assert [g[0] for g in given] == [0, 1] and given[1][3] > given[0][3] > 0
    want = turn(old, LLMTurn("r", e2, uid=2, history=[0, 1]))

    new = LLMStage.from_checkpoint(md, limits)
    new.open("r", SAMPLED)
    with pytest.raises(LLMError, match=r"does not hold"):  # without the conversation: refused, never forgotten
        new.step([LLMTurn("r", e2, uid=2, history=[0, 1])])
    uids, sp, answers, counters = (list(x) for x in zip(*given))
    new.restore("r", uids, sp, answers, counters)
    got = turn(new, LLMTurn("r", e2, uid=2, history=[0, 1]))
    assert [t.token_id for t in got] == [t.token_id for t in want]
    assert (torch.stack([t.hidden for t in got]) - torch.stack([t.hidden for t in want])).abs().max().item() < 1e-4

    unsampled = LLMStage.from_checkpoint(md, limits)  # the counters matter: restored at 0, the draws differ
    unsampled.open("r", SAMPLED)
    unsampled.restore("r", uids, sp, answers, [0, 0])
    assert [t.token_id for t in turn(unsampled, LLMTurn("r", e2, uid=2, history=[0, 1]))] != [t.token_id for t in want]
    with pytest.raises(LLMError, match="one speech, answer and counter per turn"):
        new.restore("r", [1, 0], sp, answers, counters)


def test_a_left_out_turn_does_not_move_the_sampler_on(md):
    """A turn left out of the history never happened for the sampler either: the next reply's draws are those of
    a conversation that never had it."""
    limits = Limits(max_sessions=1, max_context=2048, max_new_tokens=8)
    H = md.config.thinker.hidden_size
    e0, e1, e2 = speech(300, H, 15), speech(300, H, 16), speech(300, H, 17)
    a = LLMStage.from_checkpoint(md, limits)
    a.open("x", SAMPLED)
    turn(a, LLMTurn("x", e0, uid=0, history=[]))
    turn(a, LLMTurn("x", e1, uid=1, history=[0]))  # finished, then left out
    got = turn(a, LLMTurn("x", e2, uid=2, history=[0]))
    b = LLMStage.from_checkpoint(md, limits)
    b.open("x", SAMPLED)
    turn(b, LLMTurn("x", e0, uid=0, history=[]))
    want = turn(b, LLMTurn("x", e2, uid=2, history=[0]))
    assert [t.token_id for t in got] == [t.token_id for t in want]


def test_an_answer_that_spells_an_added_token_is_read_as_text(md, oracle):
    """The thinker wrote `<`, `speech`, `>`: the official code re-tokenizes the answer's text, reads a `<speech>`
    token, finds three speech slots for two turns and fails (IndexError), and so would every later turn of the
    session. Here the next turn reads that answer as the plain tokens it is, and is answered as the official
    algorithm answers that prompt."""
    limits = Limits(max_sessions=1, max_context=2048, max_new_tokens=6)
    tok, H = md.tokenizer(), md.config.thinker.hidden_size
    e0, e1 = speech(300, H, 21), speech(300, H, 22)
    answer = tok.encode("use the <", add_special_tokens=False) + tok.encode("speech> tag", add_special_tokens=False)
    text = tok.decode(answer, skip_special_tokens=True)
    assert text == "use the <speech> tag" and md.special_ids().speech_token_id in tok.encode(text)
    st = LLMStage.from_checkpoint(md, limits)
    st.open("r")
    st.restore("r", [0], [e0], [answer], [0])
    got = turn(st, LLMTurn("r", e1, uid=1, history=[0]))
    # The template around the answer as usual; the answer as its plain tokens.
    rendered = tok.apply_chat_template(chat([e0, e1], ["\x00"]), add_generation_prompt=True, tokenize=False)
    before, after = rendered.split("\x00")
    plain = tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    prompt = tok.encode(before, add_special_tokens=False) + plain + tok.encode(after, add_special_tokens=False)
    ids, hidden = oracle_reply(oracle, md, [e0, e1], None, 6, prompt=prompt)
    assert [t.token_id for t in got] == ids
    assert (torch.stack([t.hidden for t in got]) - hidden).abs().max().item() < 1e-4
