"""kernels/sampling.py, the counter-based sampler's arithmetic: the filters equal transformers' warpers and the
noise is uniform and a pure function of (seed, counter, token id)."""
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from omni2.kernels.sampling import filter_logits, sample_logits, token_noise, uniform_noise


@pytest.mark.parametrize("tied", [False, True], ids=["distinct", "tied"])
@pytest.mark.parametrize("temp,k,p", [(1.0, 50, 1.0), (0.7, 0, 0.8), (1.3, 5, 0.5), (1.0, 0, 1.0)])
def test_filter_matches_transformers_warpers(temp, k, p, tied):
    """Tied: logits on a coarse grid, as a bf16 head gives them; every token tied with the k-th one stays."""
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 3
    if tied:
        logits = logits.round()
    ref = TemperatureLogitsWarper(temp)(None, logits.clone())
    if k:
        ref = TopKLogitsWarper(k)(None, ref)
    if p < 1.0:
        ref = TopPLogitsWarper(p)(None, ref)
    ours = filter_logits(logits, torch.full((4,), temp), torch.full((4,), k), torch.full((4,), p))
    kept = ~torch.isinf(ref)
    assert torch.allclose(ours[kept], ref[kept], atol=1e-6)
    if tied and p < 1.0:
        # transformers cuts a tie group at the top-p boundary wherever its sort put the group's members; ours keeps
        # the group whole: the same tokens, and those tied with the lowest of them.
        tempered = TemperatureLogitsWarper(temp)(None, logits.clone())
        lowest = torch.where(kept, tempered, torch.full_like(ref, float("inf"))).amin(-1, keepdim=True)
        assert torch.equal(~torch.isinf(ours), kept | (tempered == lowest))
        if k == 0:
            assert not torch.equal(~torch.isinf(ours), kept)  # the case arose (row 0: 7 tokens of 13 tied)
    else:
        assert torch.equal(torch.isinf(ours), torch.isinf(ref))


def test_noise_is_uniform_and_a_pure_function():
    u = uniform_noise(torch.tensor([7, 7, 8]), torch.tensor([0, 0, 0]), 100_000)
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert 0.0 < u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    # Neighbouring counters are uncorrelated.
    v = uniform_noise(torch.tensor([7]), torch.tensor([1]), 100_000)
    assert abs(torch.corrcoef(torch.stack([u[0], v[0]]))[0, 1].item()) < 0.02


def test_the_noise_never_reaches_one_and_a_dominant_token_is_always_drawn():
    """At seed 0, counter 26 one of 152,000 token ids hashed to the top 24-bit value, whose noise rounded to 1.0:
    Gumbel +inf, so that token (56146) beat one 60 logits ahead of it, through top-k. 17 such draws in 1,280 steps
    of a Qwen-sized vocabulary (2 in these 128); none may be left."""
    ids = torch.arange(152_000)
    for seed in range(2):
        u = token_noise(torch.full((64,), seed), torch.arange(64), ids)
        assert 0.0 < u.min() and u.max() < 1.0, seed
    logits = torch.full((64, 152_000), -30.0)
    logits[:, 100] = 30.0
    one = torch.ones(64)
    drawn = sample_logits(logits, one, torch.full((64,), 50), one, torch.zeros(64, dtype=torch.int64),
                          torch.arange(64))
    assert drawn.tolist() == [100] * 64
