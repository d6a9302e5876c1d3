"""Streaming state shared by the flow's encoder and estimator: spans, conv tails and growable K/V buffers.

Every layer of the CosyVoice2 flow sees only the past, except attention inside a chunk (and the encoder's 3-token
lookahead conv, handled by its owner). So a stream can run a layer stack over just the positions that are not final
yet (the *open* span), provided each layer keeps what later positions read from the final ones: the last k-1 inputs
of a causal conv, the keys and values of an attention layer. The one-shot recompute is the same code with no caches.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


def chunk_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, chunk: int, end: int,
               left_chunks: int | None = None) -> torch.Tensor:
    """(Tq, Tk) bool, True where query position i may see key position j (cosyvoice utils/mask.py
    `subsequent_chunk_mask`): j < min(end of i's chunk, end); with `left_chunks`, j also lies at most that many
    whole chunks left of i's chunk."""
    q_chunk = q_pos // chunk
    visible = k_pos[None, :] < torch.clamp((q_chunk + 1) * chunk, max=end)[:, None]
    if left_chunks is not None:
        visible &= k_pos[None, :] >= ((q_chunk - left_chunks) * chunk)[:, None]
    return visible


@dataclass
class Span:
    """The positions [start, start + length) one layer stack computes in this call, at one time resolution.

    The first `commit` of them are final: every layer appends what it keeps of them to its cache before returning.
    `caches` holds one cache per stateful layer (indexed by the layer's `slot`); None means a one-shot recompute.
    """

    start: int
    length: int
    chunk: int
    commit: int = 0
    left_chunks: int | None = None
    caches: list | None = None
    _masks: dict = field(default_factory=dict, repr=False)

    @property
    def end(self) -> int:
        return self.start + self.length

    def cache(self, layer: nn.Module):
        return None if self.caches is None else self.caches[layer.slot]

    def positions(self, device: torch.device) -> torch.Tensor:
        return torch.arange(self.start, self.end, device=device)

    def mask(self, k_start: int, n_keys: int, device: torch.device) -> torch.Tensor:
        """Chunk mask of this span's queries over keys at [k_start, k_start + n_keys); every attention layer of a
        stack shares it, so it is built once per call."""
        key = (k_start, n_keys, device)
        if key not in self._masks:
            k_pos = torch.arange(k_start, k_start + n_keys, device=device)
            self._masks[key] = chunk_mask(self.positions(device), k_pos, self.chunk, self.end, self.left_chunks)
        return self._masks[key]


class ConvCache:
    """The inputs of a causal conv just left of the open span; None (= the official zero padding) at the start."""

    def __init__(self):
        self.tail: torch.Tensor | None = None  # (B, C, k-1)

    def nbytes(self) -> int:
        return 0 if self.tail is None else self.tail.numel() * self.tail.element_size()


def causal_pad(x: torch.Tensor, pad: int, cache: ConvCache | None, commit: int) -> torch.Tensor:
    """(B, C, T) -> (B, C, pad + T): prepend the `pad` inputs left of x (kept ones in a stream, zeros otherwise).

    Keeps the `pad` inputs just left of position `commit` for the next call, whose span starts there."""
    if pad == 0:
        return x
    if cache is None or cache.tail is None:
        x = F.pad(x, (pad, 0))
    else:
        x = torch.cat([cache.tail, x], dim=-1)
    if cache is not None:
        cache.tail = x[..., commit:commit + pad].clone()  # clone: do not pin this call's whole activation
    return x


class StreamKVCache:
    """Keys/values of committed positions [pos, pos + len) at the front of a growable (B, H, capacity, D) buffer.

    Each call writes its open keys/values right after the committed ones and attends over the buffer in place (no
    concatenation, so a call copies only its own positions); only the first `span.commit` of them stay committed.
    With `left_chunks` the buffer keeps that many whole chunks, so its size and the attention cost stay flat.
    """

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.pos = 0
        self.len = 0

    def extend(self, k: torch.Tensor, v: torch.Tensor, span: Span) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Add this call's (B, H, T, D) keys/values; return all visible keys/values and the first one's position."""
        assert self.pos + self.len == span.start, "a stream's calls must continue where the last commit ended"
        if span.left_chunks is not None and self.len > span.left_chunks * span.chunk:
            # span.start is a chunk boundary (commits end on one), so this keeps exactly the last left_chunks chunks.
            drop = self.len - span.left_chunks * span.chunk
            self.k[:, :, :self.len - drop] = self.k[:, :, drop:self.len].clone()
            self.v[:, :, :self.len - drop] = self.v[:, :, drop:self.len].clone()
            self.pos, self.len = self.pos + drop, self.len - drop
        need = self.len + k.shape[2]
        if self.k is None or need > self.k.shape[2]:
            # Grow by half: amortised O(1) copies per position, at most 1.5x the live bytes.
            cap = need if self.k is None else max(need, self.k.shape[2] * 3 // 2)
            self.k, self.v = _grown(self.k, k, self.len, cap), _grown(self.v, v, self.len, cap)
        self.k[:, :, self.len:need] = k
        self.v[:, :, self.len:need] = v
        keys, values, first = self.k[:, :, :need], self.v[:, :, :need], self.pos
        if span.commit:
            assert (span.start + span.commit) % span.chunk == 0, "commits must end on a chunk boundary"
        self.len += span.commit
        return keys, values, first

    def nbytes(self) -> int:
        """Bytes allocated (the capacity, not only the committed length)."""
        return 0 if self.k is None else 2 * self.k.numel() * self.k.element_size()

    def live_bytes(self) -> int:
        """Bytes of the committed keys and values."""
        return 0 if self.k is None else self.nbytes() * self.len // self.k.shape[2]


def _grown(buf: torch.Tensor | None, like: torch.Tensor, keep: int, cap: int) -> torch.Tensor:
    new = like.new_empty(like.shape[0], like.shape[1], cap, like.shape[3])
    if buf is not None:
        new[:, :, :keep] = buf[:, :, :keep]
    return new


def assign_slots(module: nn.Module) -> list[nn.Module]:
    """Number the stateful layers under `module` (those with `new_cache`) in a fixed order; return them."""
    stateful = [m for m in module.modules() if hasattr(m, "new_cache")]
    for i, m in enumerate(stateful):
        m.slot = i
    return stateful
