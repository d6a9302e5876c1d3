"""UpsampleConformerEncoder of the CosyVoice2 flow (`flow.encoder.*` in flow.pt), one-shot or streamed.

tokens embedded (B, T, 512) -> Linear+LN, x sqrt(512) -> pre-lookahead conv (sees 3 future tokens) -> 6 rel-pos
conformer layers, chunk mask of 50 tokens -> nearest x2 + causal conv k5 -> Linear+LN, x sqrt(512) -> 4 conformer
layers, chunk mask of 100 frames -> LayerNorm: (B, 2T, 512) at 50 Hz. Pre-norm layers, no macaron FFN, no conv
module (cosyvoice2.yaml). Attribute names follow the vendored cosyvoice/transformer/*.py.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omni2.engine.config import ConfigError, FlowConfig
from omni2.stages.flow_cache import (
    ConvCache,
    Span,
    SpanBatch,
    StreamKVCache,
    assign_slots,
    causal_pad,
    visible_keys,
)


def rel_pos_rows(lo: int, hi: int, d_model: int, device: torch.device | None = None) -> torch.Tensor:
    """(hi - lo, d_model): EspnetRelPositionalEncoding's row for each relative distance d = i - j in [lo, hi),
    sin(d w_k) at even and cos(d w_k) at odd channels (the official table stores d = T-1 ... -(T-1))."""
    d = torch.arange(lo, hi, dtype=torch.float32, device=device)[:, None]
    w = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / d_model))
    pe = torch.zeros(hi - lo, d_model, device=device)
    pe[:, 0::2] = torch.sin(d * w)
    pe[:, 1::2] = torch.cos(d * w)
    return pe


class RelPosAttention(nn.Module):
    """RelPositionMultiHeadedAttention (Transformer-XL): score(i, j) = ((q_i + u) k_j + (q_i + v) p_{i-j}) / sqrt(d_k).

    The official code builds p for distances T-1..-(T-1) and applies `rel_shift`, which picks column T-1-i+j of row
    i, i.e. distance i - j. We index the same rows directly by absolute distance, so it works for a query chunk
    against cached keys too. p = linear_pos(pe) depends only on the distance, so each layer keeps a growing table
    of projected rows shared by all streams (recomputing it per call would cost O(context * d^2)).
    """

    def __init__(self, n_feat: int, n_head: int):
        super().__init__()
        self.h, self.d_k = n_head, n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))
        self._table: torch.Tensor | None = None  # (R, n_feat) projected rows for distances [_lo, _lo + R)
        self._lo, self._key = 0, None
        self.register_load_state_dict_post_hook(lambda module, _: setattr(module, "_table", None))

    def new_cache(self) -> StreamKVCache:
        return StreamKVCache()

    def pos_rows(self, lo: int, hi: int) -> torch.Tensor:
        """linear_pos(pe) for distances [lo, hi): (hi - lo, n_feat)."""
        w = self.linear_pos.weight
        # The table must follow the weights: _version changes on in-place edits and loads (inference tensors have
        # none; load_state_dict also drops the table through the hook below).
        key = (w.data_ptr(), None if w.is_inference() else w._version, w.dtype, w.device)
        have = self._table is not None and self._key == key
        if not have or lo < self._lo or hi > self._lo + self._table.shape[0]:
            # Grow geometrically so a stream's ever longer context rebuilds the table O(log) times.
            new_lo = min(lo, self._lo) if have else lo
            new_hi = max(hi, self._lo + 2 * self._table.shape[0]) if have else hi
            self._table = self.project_rows(new_lo, new_hi)
            self._lo, self._key = new_lo, key
        return self._table[lo - self._lo:hi - self._lo]

    @torch.no_grad()
    def project_rows(self, lo: int, hi: int) -> torch.Tensor:
        """linear_pos(pe) for distances [lo, hi), computed now (pos_rows keeps a table of them)."""
        w = self.linear_pos.weight
        return self.linear_pos(rel_pos_rows(lo, hi, w.shape[1], w.device).to(w.dtype))

    def rel_scores(self, q: torch.Tensor, span, k_starts: list[int] | None, n_keys: int) -> torch.Tensor:
        """(B, H, Tq, d_k) queries (with bias v) . projected row of distance i - j -> (B, H, Tq, n_keys), for
        each stream's queries at its span positions and keys at [k_start, k_start + n_keys) (a fixed-shape
        step's span, flow_graph.WindowSpan, knows its own rows and distances)."""
        if isinstance(span, (Span, SpanBatch)):
            spans = span.spans
            # A visible key lies before the end of its query's chunk, so distances below 1 - chunk are always
            # masked: clamp them instead of projecting rows nobody reads.
            lo = min(max(s.start - (k0 + n_keys - 1), 1 - s.chunk) for s, k0 in zip(spans, k_starts))
            hi = max(s.start + span.width - k0 for s, k0 in zip(spans, k_starts))  # one past the largest distance
            rows = self.pos_rows(lo, hi)
            cols = torch.arange(span.width, device=q.device)
            idx = torch.stack([(s.start + cols)[:, None] - torch.arange(k0, k0 + n_keys, device=q.device)[None, :]
                               for s, k0 in zip(spans, k_starts)])  # (streams, Tq, Tk)
            idx = idx.clamp(min=lo) - lo
        else:
            rows, idx = span.rel_positions(self)
        p = rows.view(rows.shape[0], self.h, self.d_k).transpose(0, 1)  # (H, R, d_k)
        by_distance = torch.matmul(q, p.transpose(-2, -1))  # (B, H, Tq, R)
        idx = idx.repeat_interleave(q.shape[0] // idx.shape[0], dim=0)[:, None]  # (B, 1, Tq, Tk)
        return by_distance.gather(-1, idx.expand(-1, q.shape[1], -1, -1))

    def forward(self, x: torch.Tensor, span: Span | SpanBatch) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.linear_q(x).view(B, T, self.h, self.d_k)
        k = self.linear_k(x).view(B, T, self.h, self.d_k).transpose(1, 2)  # (B, H, T, d_k)
        v = self.linear_v(x).view(B, T, self.h, self.d_k).transpose(1, 2)
        k, v, mask, k_starts = visible_keys(k, v, span, self)
        ac = torch.matmul((q + self.pos_bias_u).transpose(1, 2), k.transpose(-2, -1))  # (B, H, T, Tk)
        bd = self.rel_scores((q + self.pos_bias_v).transpose(1, 2), span, k_starts, k.shape[2])
        scores = (ac + bd) / math.sqrt(self.d_k)
        # The official code also zeroes masked probabilities after the softmax: a no-op, no row is fully masked.
        scores = scores.masked_fill(~mask, -float("inf"))
        out = torch.matmul(torch.softmax(scores, dim=-1), v)  # (B, H, T, d_k)
        return self.linear_out(out.transpose(1, 2).reshape(B, T, self.h * self.d_k))


class FeedForward(nn.Module):
    """PositionwiseFeedForward with swish (SiLU)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerLayer(nn.Module):
    """ConformerEncoderLayer as configured: pre-norm MHA + pre-norm FFN, LayerNorm eps 1e-12 (not 1e-5)."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn = RelPosAttention(dim, heads)
        self.feed_forward = FeedForward(dim, hidden)
        self.norm_ff = nn.LayerNorm(dim, eps=1e-12)
        self.norm_mha = nn.LayerNorm(dim, eps=1e-12)

    def forward(self, x: torch.Tensor, span: Span | SpanBatch) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), span)
        return x + self.feed_forward(self.norm_ff(x))


class LinearEmbed(nn.Module):
    """LinearNoSubsampling + EspnetRelPositionalEncoding: Linear, LayerNorm(1e-5), then x sqrt(d). The positional
    table it also returns upstream is rebuilt per attention layer by distance (RelPosAttention.pos_rows)."""

    def __init__(self, idim: int, odim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(idim, odim), nn.LayerNorm(odim, eps=1e-5))
        self.xscale = math.sqrt(odim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(x) * self.xscale


class PreLookahead(nn.Module):
    """x + conv2(causal pad 2, leaky_relu(conv1(x right-padded with `lookahead` zeros))) over time.

    The right zeros stand at the end of the tokens we have, so a token's output is final only once `lookahead`
    tokens follow it; the stream re-runs those (they are in its open span) and keeps conv2's left inputs."""

    def __init__(self, channels: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def new_cache(self) -> ConvCache:
        return ConvCache()

    def forward(self, x: torch.Tensor, span: Span | SpanBatch) -> torch.Tensor:  # (B, T, C)
        h = x.transpose(1, 2)
        if span.ragged:  # a shorter stream's own zero pad starts at its end
            h = h * span.valid(x.device)[:, None, :]
        h = F.pad(h, (0, self.lookahead))
        h = F.leaky_relu(self.conv1(h))  # slope 0.01
        h = self.conv2(causal_pad(h, 2, span, self))
        return h.transpose(1, 2) + x


class Upsample1D(nn.Module):
    """Nearest-neighbour x stride, then left-pad 2*stride zeros and Conv1d(k = 2*stride + 1): causal."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, 2 * stride + 1)

    def new_cache(self) -> ConvCache:
        return ConvCache()

    def forward(self, x: torch.Tensor, span: Span | SpanBatch) -> torch.Tensor:
        # (B, C, T) -> (B, C, stride*T); span in frames
        x = x.repeat_interleave(self.stride, dim=-1)
        return self.conv(causal_pad(x, 2 * self.stride, span, self))


class FlowEncoder(nn.Module):
    def __init__(self, cfg: FlowConfig):
        super().__init__()
        e = cfg.encoder
        if cfg.input_size != e.output_size:
            # up_embed reads the upsampled encoder output with an input_size-wide Linear (and the official code
            # hard-codes 512 channels in the pre-lookahead and upsample layers).
            raise ConfigError(f"flow input_size {cfg.input_size} must equal encoder output_size {e.output_size}")
        d = e.output_size
        self.embed = LinearEmbed(cfg.input_size, d)
        self.after_norm = nn.LayerNorm(d, eps=1e-5)
        self.pre_lookahead_layer = PreLookahead(d, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList(ConformerLayer(d, e.attention_heads, e.linear_units)
                                      for _ in range(e.num_blocks))
        self.up_layer = Upsample1D(d, cfg.token_mel_ratio)
        self.up_embed = LinearEmbed(cfg.input_size, d)
        self.up_encoders = nn.ModuleList(ConformerLayer(d, e.attention_heads, e.linear_units)
                                         for _ in range(e.num_up_blocks))
        self._stateful = assign_slots(self)

    def new_caches(self) -> list:
        return [m.new_cache() for m in self._stateful]

    def forward(self, x: torch.Tensor, tokens: Span | SpanBatch, frames: Span | SpanBatch) -> torch.Tensor:
        """(B, T, input_size) embedded tokens -> (B, ratio*T, d). `tokens`/`frames`: the same span in tokens and in
        frames (chunk 50 tokens / 100 frames); their caches, if any, are one list for the whole encoder."""
        x = self.embed(x)
        x = self.pre_lookahead_layer(x, tokens)
        for layer in self.encoders:
            x = layer(x, tokens)
        x = self.up_layer(x.transpose(1, 2), frames).transpose(1, 2)
        x = self.up_embed(x)
        for layer in self.up_encoders:
            x = layer(x, frames)
        return self.after_norm(x)
