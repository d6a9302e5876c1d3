"""Counter-based, batch-invariant sampling in plain torch: greedy, temperature, top-k, top-p, Gumbel-max.

The noise for (seed, step counter, token id) is a fixed 32-bit integer hash turned into Gumbel noise, and the sample
is argmax(logits / T + gumbel) over the tokens that survive top-k / top-p. So a row's token is a pure function of
its seed and its own counter — which rows share its batch, or which device runs it, cannot change it — and no host
sync or torch.Generator state is needed. This is the reference that the Triton sampler of fsq_decode.py reproduces
bit for bit, and what every LM of the engine samples with (stages/sampling.py turns per-session SamplingParams into
the tensors these functions take).
"""
from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF
_MIX = 0x045D9F3B  # < 2**31, so products of 32-bit values stay inside int64


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser (xor-shift-multiply), on int64 tensors holding values < 2**32."""
    x = (((x >> 16) ^ x) * _MIX) & _M32
    x = (((x >> 16) ^ x) * _MIX) & _M32
    return (x >> 16) ^ x


def token_noise(seeds: torch.Tensor, counters: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """U(0,1) noise (B, n) for the token ids listed in token_ids (n,), as a pure function of (seed, counter,
    token id); fp32, never 0 or 1. kernels/fsq_decode.py computes the same hash in Triton."""
    seed_lo, seed_hi = seeds & _M32, (seeds >> 32) & _M32
    key = _mix32(_mix32(_mix32(seed_lo) ^ seed_hi) ^ (counters & _M32))  # (B,)
    h = _mix32(key[:, None] ^ _mix32(token_ids.long())[None, :])  # (B, n)
    # 23 bits: (x + 0.5) / 2**23 is exact in fp32, so u < 1. With 24 bits the top value rounds to 1.0, whose
    # Gumbel noise is +inf: that token won whatever its logit (or, filtered out, -inf + inf = nan won argmax).
    return ((h >> 9).float() + 0.5) * (1.0 / (1 << 23))


def uniform_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """U(0,1) noise (B, vocab) for token ids 0..vocab-1."""
    return token_noise(seeds, counters, torch.arange(vocab, device=seeds.device, dtype=torch.int64))


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor) -> torch.Tensor:
    """Temperature, then top-k, then top-p (transformers' warper order); removed tokens become -inf.

    logits (B, V) fp32; temperature (B,) > 0; top_k (B,) int, 0 = off; top_p (B,) in (0, 1].
    """
    B, V = logits.shape
    x = logits / temperature[:, None]
    sorted_x, order = x.sort(dim=-1, descending=True)
    ranks = torch.arange(V, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=V), torch.full_like(top_k, V))
    kth = sorted_x.gather(-1, (k - 1)[:, None])
    keep = sorted_x >= kth  # ties with the k-th value stay, as in transformers' TopKLogitsWarper
    probs = torch.where(keep, sorted_x, torch.full_like(sorted_x, -float("inf"))).softmax(-1)
    # A token stays if the mass strictly above it is below top_p; the first token always stays, and
    # top_p = 1 is off (a float cumsum can reach 1.0 before the tail and would cut it).
    mass_before = probs.cumsum(-1) - probs
    keep_p = (mass_before < top_p[:, None]) | (ranks == 0) | (top_p[:, None] >= 1.0)
    # A tie group's first token in sort order has the mass strictly above the group: the whole group stays with it
    # (as the Triton sampler decides by value, not by position in a sort).
    last = torch.where(keep_p, sorted_x, torch.full_like(sorted_x, float("inf"))).amin(-1, keepdim=True)
    keep &= sorted_x >= last
    kept_sorted = torch.where(keep, sorted_x, torch.full_like(sorted_x, -float("inf")))
    return torch.full_like(x, -float("inf")).scatter(-1, order, kept_sorted)


def sample_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor,
                  seeds: torch.Tensor, counters: torch.Tensor, token_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Tensor form of `sample`, without a host sync: row b of logits (B, n) is argmax-sampled with its own
    temperature / top_k / top_p / seed / counter (temperature 0 = greedy). Column c holds token token_ids[c]
    (default: c), which keys its noise. Returns column indices (B,)."""
    logits = logits.float()
    ids = torch.arange(logits.shape[-1], device=logits.device) if token_ids is None else token_ids
    hot = temperature > 0
    # Greedy rows are filtered with T = 1 only to keep the arithmetic finite; their result is the plain argmax.
    filtered = filter_logits(logits, torch.where(hot, temperature, torch.ones_like(temperature)), top_k, top_p)
    gumbel = -torch.log(-torch.log(token_noise(seeds, counters, ids)))
    return torch.where(hot, (filtered + gumbel).argmax(-1), logits.argmax(-1))
