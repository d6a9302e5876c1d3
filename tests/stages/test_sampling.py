"""stages/sampling.py: per-session parameters over a batch: greedy rows, batch invariance, the sampled distribution."""
import pytest
import torch

from omni2.engine.config import SamplingParams
from omni2.kernels.sampling import filter_logits
from omni2.stages.sampling import sample


def test_greedy_is_argmax():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    ids = sample(logits, [SamplingParams()] * 5, [0] * 5)
    assert ids.tolist() == logits.argmax(-1).tolist()


def test_a_session_samples_the_same_alone_and_in_a_batch():
    g = torch.Generator().manual_seed(3)
    mine = SamplingParams(temperature=1.0, top_k=50, seed=1234)
    others = [SamplingParams(temperature=0.8, top_p=0.9, seed=s) for s in range(7)] + [SamplingParams()]
    alone, batched = [], []
    for step in range(40):
        logits = torch.randn(9, 500, generator=g)
        alone.append(sample(logits[3:4], [mine], [step]).item())
        params = others[:3] + [mine] + others[3:]
        counters = [step * 5 + i for i in range(9)]
        counters[3] = step
        batched.append(sample(logits, params, counters)[3].item())
    assert alone == batched
    assert len(set(alone)) > 10


def test_sampled_frequencies_match_the_filtered_softmax():
    """Chi-square goodness of fit over 20,000 draws (one per step counter) for fixed logits."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    params = SamplingParams(temperature=0.9, top_k=6, top_p=0.95, seed=99)
    n = 20_000
    ids = sample(logits.expand(n, -1).clone(), [params] * n, list(range(n)))
    filtered = filter_logits(logits[None], torch.tensor([0.9]), torch.tensor([6]), torch.tensor([0.95]))[0]
    probs = filtered.softmax(-1)
    counts = torch.bincount(ids, minlength=8).float()
    assert counts[probs == 0].sum() == 0  # filtered tokens never drawn
    keep = probs > 0
    expected = probs[keep] * n
    chi2 = (((counts[keep] - expected) ** 2) / expected).sum().item()
    # 99.9% critical value of chi-square with (kept - 1) <= 5 degrees of freedom is 20.5.
    assert int(keep.sum()) >= 4 and chi2 < 20.5, chi2


def test_bad_params_are_refused():
    for kw in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}, {"seed": -1},
               {"temperature": float("nan")}):
        with pytest.raises(ValueError):
            SamplingParams(**kw)
