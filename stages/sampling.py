"""Per-session token sampling: each row of a batch with its own SamplingParams and step counter.

The arithmetic is kernels/sampling.py (counter-based Gumbel-max: a session's tokens depend only on its seed and its
own step counter, never on its batch mates); this module turns the sessions' parameters into its tensors and skips
the sort and the noise when every row is greedy.
"""
from __future__ import annotations

import torch

from omni2.engine.config import SamplingParams
from omni2.kernels.sampling import sample_logits


def sample(logits: torch.Tensor, params: list[SamplingParams], counters: list[int]) -> torch.Tensor:
    """Pick one token id per row of logits (B, V); row b uses params[b] and its own step counter[b]."""
    logits = logits.float()
    out = logits.argmax(-1)
    hot = [i for i, p in enumerate(params) if not p.greedy]
    if not hot:  # known on the host: skip the sort and the noise
        return out
    dev = logits.device
    P = [params[i] for i in hot]
    idx = torch.tensor(hot, device=dev)
    out[idx] = sample_logits(logits[idx], torch.tensor([p.temperature for p in P], device=dev),
                             torch.tensor([p.top_k for p in P], device=dev),
                             torch.tensor([p.top_p for p in P], device=dev),
                             torch.tensor([p.seed for p in P], device=dev),
                             torch.tensor([counters[i] for i in hot], device=dev))
    return out
