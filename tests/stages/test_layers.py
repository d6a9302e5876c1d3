"""Our Qwen2 decoder with its slot KV cache against transformers' Qwen2ForCausalLM on the same weights."""
import inspect

import pytest
import torch
from transformers import Qwen2Config as HFQwen2Config
from transformers import Qwen2ForCausalLM

from omni2.engine.config import Qwen2Config
from omni2.stages.layers import Batch, Qwen2LM, SlotKVCache

CFG = Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-6)


def random_qwen2(seed=0) -> Qwen2LM:
    torch.manual_seed(seed)
    ours = Qwen2LM(CFG).eval()
    # Norm weights are ones at init; perturb them so a wrong norm would show.
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    return ours


def make_pair(seed=0):
    ours = random_qwen2(seed)
    hf = Qwen2ForCausalLM(HFQwen2Config(**{k: v for k, v in CFG.to_dict().items()},
                                        attn_implementation="eager")).eval()
    missing, unexpected = hf.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return ours, hf


def run_ours(lm, prompts, steps, slots=None, cache=None):
    """Greedy: prefill all prompts in one padded batch, then decode `steps` tokens for all rows together."""
    B = len(prompts)
    slots = slots or list(range(B))
    cache = cache or SlotKVCache(CFG, 8, 128, "cpu", torch.float32)
    T = max(len(p) for p in prompts)
    ids = torch.zeros(B, T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, : len(p)] = torch.tensor(p)
    batch = Batch.make(slots, [0] * B, [len(p) for p in prompts], "cpu")
    _, logits = lm(lm.embed(ids), batch, cache)
    all_logits = [logits]
    toks = [logits.argmax(-1)]
    pos = [len(p) for p in prompts]
    for _ in range(steps):
        batch = Batch.make(slots, pos, [1] * B, "cpu")
        _, logits = lm(lm.embed(toks[-1][:, None]), batch, cache)
        all_logits.append(logits)
        toks.append(logits.argmax(-1))
        pos = [p + 1 for p in pos]
    return torch.stack(all_logits, 1), torch.stack(toks, 1)  # (B, steps+1, V), (B, steps+1)


def run_hf(hf, prompt, steps):
    # transformers 5 renamed the KV cache's argument and output `past_key_values` -> `cache` (the old name is
    # deprecated); the oracle speaks whichever the installed version takes.
    name = "cache" if "cache" in inspect.signature(type(hf).forward).parameters else "past_key_values"
    ids = torch.tensor([prompt])
    out = hf(input_ids=ids, use_cache=True)
    logits, past = [out.logits[:, -1]], out[name]
    toks = [logits[-1].argmax(-1)]
    for _ in range(steps):
        out = hf(input_ids=toks[-1][:, None], use_cache=True, **{name: past})
        past = out[name]
        logits.append(out.logits[:, -1])
        toks.append(logits[-1].argmax(-1))
    return torch.stack(logits, 1)[0], torch.stack(toks, 1)[0]


@torch.inference_mode()
def test_prefill_and_50_decode_steps_match_transformers():
    ours, hf = make_pair()
    prompt = torch.randint(0, CFG.vocab_size, (23,), generator=torch.Generator().manual_seed(1)).tolist()
    ol, ot = run_ours(ours, [prompt], 50)
    hl, ht = run_hf(hf, prompt, 50)
    assert (ol[0] - hl).abs().max().item() < 1e-4
    assert ot[0].tolist() == ht.tolist()
    assert len(set(ht.tolist())) > 3  # the comparison is over varied tokens, not one repeated id


@torch.inference_mode()
def test_four_prompt_lengths_batched_equal_alone():
    ours, _ = make_pair(seed=3)
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, CFG.vocab_size, (n,), generator=g).tolist() for n in (5, 31, 1, 12)]
    bl, bt = run_ours(ours, prompts, 20, slots=[3, 0, 6, 1])
    for b, p in enumerate(prompts):
        al, at = run_ours(ours, [p], 20)
        assert at[0].tolist() == bt[b].tolist()
        assert (al[0] - bl[b]).abs().max().item() < 1e-4


@torch.inference_mode()
@pytest.mark.parametrize("split", [1, 7, 16])
def test_chunked_prefill_equals_one_shot(split):
    ours, _ = make_pair(seed=4)
    prompt = list(range(10, 40))
    cache = SlotKVCache(CFG, 2, 64, "cpu", torch.float32)
    ids = torch.tensor([prompt])
    _, one_shot = ours(ours.embed(ids), Batch.make([0], [0], [30], "cpu"), cache)
    ours(ours.embed(ids[:, :split]), Batch.make([1], [0], [split], "cpu"), cache)
    _, chunked = ours(ours.embed(ids[:, split:]), Batch.make([1], [split], [30 - split], "cpu"), cache)
    assert (one_shot - chunked).abs().max().item() < 1e-5
