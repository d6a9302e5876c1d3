"""kernels/sampling.py, the counter-based sampler's arithmetic: the filters equal transformers' warpers and the
noise is uniform and a pure function of (seed, counter, token id)."""
import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from omni2.kernels.sampling import filter_logits, uniform_noise


@pytest.mark.parametrize("temp,k,p", [(1.0, 50, 1.0), (0.7, 0, 0.8), (1.3, 5, 0.5), (1.0, 0, 1.0)])
def test_filter_matches_transformers_warpers(temp, k, p):
    logits = torch.randn(4, 300, generator=torch.Generator().manual_seed(1)) * 3
    ref = TemperatureLogitsWarper(temp)(None, logits.clone())
    if k:
        ref = TopKLogitsWarper(k)(None, ref)
    if p < 1.0:
        ref = TopPLogitsWarper(p)(None, ref)
    ours = filter_logits(logits, torch.full((4,), temp), torch.full((4,), k), torch.full((4,), p))
    assert torch.equal(torch.isinf(ours), torch.isinf(ref))
    kept = ~torch.isinf(ref)
    assert torch.allclose(ours[kept], ref[kept], atol=1e-6)


def test_noise_is_uniform_and_a_pure_function():
    u = uniform_noise(torch.tensor([7, 7, 8]), torch.tensor([0, 0, 0]), 100_000)
    assert torch.equal(u[0], u[1]) and not torch.equal(u[0], u[2])
    assert 0.0 < u.min() and u.max() < 1.0
    assert abs(u.mean().item() - 0.5) < 0.005 and abs(u.var().item() - 1 / 12) < 0.002
    # Neighbouring counters are uncorrelated.
    v = uniform_noise(torch.tensor([7]), torch.tensor([1]), 100_000)
    assert abs(torch.corrcoef(torch.stack([u[0], v[0]]))[0, 1].item()) < 0.02
