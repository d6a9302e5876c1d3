"""Streaming state shared by the flow's encoder and estimator: spans, conv tails and growable K/V buffers.

Every layer of the CosyVoice2 flow sees only the past, except attention inside a chunk (and the encoder's 3-token
lookahead conv, handled by its owner). So a stream can run a layer stack over just the positions that are not final
yet (the *open* span), provided each layer keeps what later positions read from the final ones: the last k-1 inputs
of a causal conv, the keys and values of an attention layer. The one-shot recompute is the same code with no caches.

Several streams run as one batch through a SpanBatch: stream b's open positions sit at columns [0, length_b) of its
rows, right-padded to the longest. No real position reads the padding: convs are causal, attention masks padded keys,
and the one conv that looks right (the encoder's pre-lookahead) sees the padding zeroed, as its own zero pad.
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

    @property
    def spans(self) -> list[Span]:
        return [self]

    @property
    def width(self) -> int:
        return self.length

    @property
    def ragged(self) -> bool:
        """A lone stream has no padded columns."""
        return False

    def mask(self, k_start: int, n_keys: int, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Chunk mask of this span's queries over keys at [k_start, k_start + n_keys) (boolean; with `dtype`, as an
        additive bias); every attention layer of a stack shares it, so it is built once per call."""
        key = (k_start, n_keys, device, dtype)
        if key not in self._masks:
            if dtype is None:
                k_pos = torch.arange(k_start, k_start + n_keys, device=device)
                self._masks[key] = chunk_mask(self.positions(device), k_pos, self.chunk, self.end, self.left_chunks)
            else:
                self._masks[key] = additive(self.mask(k_start, n_keys, device), dtype)
        return self._masks[key]


class ConvCache:
    """The inputs of a causal conv just left of the open span; None (= the official zero padding) at the start."""

    def __init__(self):
        self.tail: torch.Tensor | None = None  # (B, C, k-1)

    def nbytes(self) -> int:
        return 0 if self.tail is None else self.tail.numel() * self.tail.element_size()


class SpanBatch:
    """The spans of several streams computed in one call (see the module docstring); each stream owns `rows`
    consecutive tensor rows (the estimator's two CFG rows, say)."""

    def __init__(self, spans: list[Span]):
        self.spans = spans
        self.width = max(s.length for s in spans)
        self.ragged = any(s.length < self.width for s in spans)
        self._masks: dict = {}

    def mask(self, layout: tuple[tuple[int, int], ...], rows: int, device: torch.device,
             dtype: torch.dtype | None = None) -> torch.Tensor:
        """(B * rows, 1, width, n) chunk mask of each stream's queries over its keys, where stream b's keys are
        `layout[b]` = (first position, count), padded to the longest count n (boolean; with `dtype`, as an additive
        bias). Every attention layer of a stack sees the same layout (their caches commit together), so it is built
        once per call, not once per layer."""
        key = (layout, rows, device, dtype)
        if key not in self._masks:
            if dtype is None:
                n = max(m for _, m in layout)
                mask = torch.zeros(len(self.spans) * rows, 1, self.width, n, dtype=torch.bool, device=device)
                for b, (s, (first, m)) in enumerate(zip(self.spans, layout)):
                    r = slice(b * rows, (b + 1) * rows)
                    mask[r, 0, :s.length, :m] = s.mask(first, m, device)
                    mask[r, 0, s.length:, 0] = True  # a padding query reads one key: no fully masked row (NaN)
                self._masks[key] = mask
            else:
                self._masks[key] = additive(self.mask(layout, rows, device), dtype)
        return self._masks[key]

    def valid(self, device: torch.device) -> torch.Tensor:
        """(streams, width) bool: True at the columns that hold a real position (for a stack whose streams own one
        row each: the encoder's)."""
        cols = torch.arange(self.width, device=device)
        return torch.stack([cols < s.length for s in self.spans])


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A boolean mask as the additive bias scaled_dot_product_attention would make of it in each call (0 where
    visible, -inf elsewhere, in `dtype`): made once per stack instead."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def batch_of(spans: list[Span]) -> Span | SpanBatch:
    """One stream runs on its plain Span: the same kernels, shapes and masks as a single-stream call."""
    return spans[0] if len(spans) == 1 else SpanBatch(spans)


def causal_pad(x: torch.Tensor, pad: int, span: Span | SpanBatch | None, layer: nn.Module) -> torch.Tensor:
    """(B, C, T) -> (B, C, pad + T): prepend the `pad` inputs left of x (kept ones in a stream, zeros otherwise).

    Keeps, per stream, the `pad` inputs just left of its `commit` for the next call, whose span starts there."""
    if pad == 0:
        return x
    if span is None:
        return F.pad(x, (pad, 0))
    if not isinstance(span, (Span, SpanBatch)):  # a fixed-shape step's span keeps its own state (flow_graph)
        return span.causal_pad(x, pad, layer)
    spans = span.spans
    caches = [s.cache(layer) for s in spans]
    rows = x.shape[0] // len(spans)
    if all(c is None or c.tail is None for c in caches):
        x = F.pad(x, (pad, 0))
    else:
        if any(c is None or c.tail is None for c in caches):
            zeros = x.new_zeros(rows, x.shape[1], pad)
        left = [zeros if c is None or c.tail is None else c.tail for c in caches]
        x = torch.cat([left[0] if len(left) == 1 else torch.cat(left), x], dim=-1)
    for b, (s, c) in enumerate(zip(spans, caches)):
        if c is not None:  # clone: do not pin this call's whole activation
            c.tail = x[b * rows:(b + 1) * rows, :, s.commit:s.commit + pad].clone()
    return x


def visible_keys(k: torch.Tensor, v: torch.Tensor, span: Span | SpanBatch, layer: nn.Module,
                 bias: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """This call's (B, H, T, D) keys/values -> every key/value its queries may read, the chunk mask over them
    ((Tq, Tk), or (B, 1, Tq, Tk) for a batch; boolean, or with `bias` additive in k's dtype) and each stream's first
    key position. A stream's committed keys come from its cache, which also takes this call's; a batch pads every
    stream's keys to the longest."""
    if not isinstance(span, (Span, SpanBatch)):  # a fixed-shape step's span keeps its own state (flow_graph)
        return span.visible_keys(k, v, layer, bias)
    dtype = k.dtype if bias else None
    if isinstance(span, Span):
        k_start, cache = span.start, span.cache(layer)
        if cache is not None:
            k, v, k_start = cache.extend(k, v, span)
        return k, v, span.mask(k_start, k.shape[2], k.device, dtype), [k_start]
    rows = k.shape[0] // len(span.spans)
    parts = []
    for b, s in enumerate(span.spans):
        kb, vb = k[b * rows:(b + 1) * rows, :, :s.length], v[b * rows:(b + 1) * rows, :, :s.length]
        cache = s.cache(layer)
        parts.append(cache.extend(kb, vb, s) if cache is not None else (kb, vb, s.start))
    n = max(kb.shape[2] for kb, _, _ in parts)
    keys, values = k.new_zeros(*k.shape[:2], n, k.shape[3]), v.new_zeros(*v.shape[:2], n, v.shape[3])
    for b, (kb, vb, _) in enumerate(parts):
        r, m = slice(b * rows, (b + 1) * rows), kb.shape[2]
        keys[r, :, :m], values[r, :, :m] = kb, vb
    mask = span.mask(tuple((first, kb.shape[2]) for kb, _, first in parts), rows, k.device, dtype)
    return keys, values, mask, [first for _, _, first in parts]


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
            # Grow by half: amortised O(1) copies per position, at most 1.5x the live bytes...
            cap = need if self.k is None else max(need, self.k.shape[2] * 3 // 2)
            if span.left_chunks is not None:
                # ...but a window never holds more than its chunks plus one call's positions: no slack past those.
                cap = min(cap, max(need, (span.left_chunks + 1) * span.chunk))
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
