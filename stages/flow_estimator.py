"""The CFM vector-field estimator: ConditionalDecoder(causal=True) (`flow.decoder.estimator.*` in flow.pt).

A 1-D U-Net with one level (channels [256]), so no down/up-sampling: the "downsample" and "upsample" of that level
are plain causal convs k3. Every conv is causal (left pad k-1), every norm is per frame, and attention is masked
to 100-frame chunks, so frames left of the open chunk are final and a stream only keeps conv tails and K/V.
Blocks come from Matcha-TTS (SinusoidalPosEmb, TimestepEmbedding, ResnetBlock1D) and diffusers
(BasicTransformerBlock: LayerNorm, bias-free q/k/v, exact-erf GELU FFN x4). Names follow the official modules.

NOTE: the official estimator multiplies by the padding mask before and after most layers; LLaMA-Omni2 runs batch 1
with an all-ones mask, so those products are identities and are left out here.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omni2.engine.config import FlowEstimatorConfig
from omni2.stages.flow_cache import (
    ConvCache,
    Span,
    SpanBatch,
    StreamKVCache,
    assign_slots,
    causal_pad,
    visible_keys,
)


class SinusoidalPosEmb(nn.Module):
    """(B,) times in [0, 1] -> (B, dim): [sin(1000 t w_k), cos(1000 t w_k)], w_k = 1e4^(-k / (dim/2 - 1))."""

    def __init__(self, dim: int):
        super().__init__()
        assert dim % 2 == 0
        self.dim = dim

    def forward(self, t: torch.Tensor, scale: float = 1000) -> torch.Tensor:
        half = self.dim // 2
        w = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))
        arg = scale * t[:, None] * w[None, :]
        return torch.cat((arg.sin(), arg.cos()), dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(t)))


class CausalConv1d(nn.Conv1d):
    """Conv1d with k-1 zeros (in a stream: the kept inputs) on the left only."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int):
        super().__init__(in_channels, out_channels, kernel_size)

    def new_cache(self) -> ConvCache:
        return ConvCache()

    def forward(self, x: torch.Tensor, span: Span | SpanBatch | None = None) -> torch.Tensor:  # (B, C, T)
        return super().forward(causal_pad(x, self.kernel_size[0] - 1, span, self))


class CausalBlock1D(nn.Module):
    """conv k3 -> LayerNorm over channels -> Mish. `block` indices 0 and 2 match the official Sequential
    (conv, Transpose, LayerNorm, Transpose, Mish) so the keys are block.0.* and block.2.*."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.block = nn.ModuleList([CausalConv1d(dim, dim_out, 3), nn.Identity(), nn.LayerNorm(dim_out),
                                    nn.Identity(), nn.Mish()])

    def forward(self, x: torch.Tensor, span: Span | SpanBatch | None) -> torch.Tensor:
        x = self.block[0](x, span)
        x = self.block[2](x.transpose(1, 2)).transpose(1, 2)
        return F.mish(x)


class CausalResnetBlock1D(nn.Module):
    def __init__(self, dim: int, dim_out: int, time_emb_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Mish(), nn.Linear(time_emb_dim, dim_out))
        self.block1 = CausalBlock1D(dim, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim, dim_out, 1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, span: Span | SpanBatch | None) -> torch.Tensor:
        # x (B, C, T), t (B, E)
        h = self.block1(x, span) + self.mlp(t)[:, :, None]
        return self.block2(h, span) + self.res_conv(x)


class Attention(nn.Module):
    """diffusers Attention as BasicTransformerBlock builds it: no q/k/v bias, output Linear with bias, scale
    1/sqrt(head_dim). The official chunk mask is an additive finfo.min bias; a boolean mask gives the same softmax."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])

    def new_cache(self) -> StreamKVCache:
        return StreamKVCache()

    def forward(self, x: torch.Tensor, span: Span | SpanBatch) -> torch.Tensor:  # (B, T, C)
        B, T, _ = x.shape
        split = lambda y: y.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # noqa: E731  (B, H, T, D)
        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        k, v, bias, _ = visible_keys(k, v, span, self, bias=True)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.to_out[0](out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class GELU(nn.Module):
    """diffusers GELU: Linear then exact (erf) GELU; the Linear is `proj`."""

    def __init__(self, dim: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList([GELU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class BasicTransformerBlock(nn.Module):
    """x + attn1(norm1(x)); x + ff(norm3(x)). LayerNorms eps 1e-5 with affine; no cross-attention (norm2/attn2)."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, span: Span | SpanBatch) -> torch.Tensor:  # (B, T, C)
        x = x + self.attn1(self.norm1(x), span)
        return x + self.ff(self.norm3(x))


class FlowEstimator(nn.Module):
    def __init__(self, cfg: FlowEstimatorConfig):
        super().__init__()
        if len(cfg.channels) != 1:
            # More levels mean strided Downsample1D / ConvTranspose upsampling, which are not causal; CosyVoice2
            # uses one level.
            raise NotImplementedError(f"estimator channels {cfg.channels}: only a single level is supported")
        ch, temb = cfg.channels[0], cfg.channels[0] * 4
        blocks = lambda: nn.ModuleList(  # noqa: E731
            BasicTransformerBlock(ch, cfg.num_heads, cfg.attention_head_dim) for _ in range(cfg.n_blocks))
        self.time_embeddings = SinusoidalPosEmb(cfg.in_channels)
        self.time_mlp = TimestepEmbedding(cfg.in_channels, temb)
        # [resnet, transformer blocks, "downsample"]: the last (here only) level's downsample is a causal conv.
        self.down_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock1D(cfg.in_channels, ch, temb), blocks(), CausalConv1d(ch, ch, 3)])])
        self.mid_blocks = nn.ModuleList(nn.ModuleList([CausalResnetBlock1D(ch, ch, temb), blocks()])
                                        for _ in range(cfg.num_mid_blocks))
        # The up block reads [x, skip] concatenated on channels: 2*ch in.
        self.up_blocks = nn.ModuleList([nn.ModuleList([
            CausalResnetBlock1D(2 * ch, ch, temb), blocks(), CausalConv1d(ch, ch, 3)])])
        self.final_block = CausalBlock1D(ch, ch)
        self.final_proj = nn.Conv1d(ch, cfg.out_channels, 1)
        self._stateful = assign_slots(self)

    def new_caches(self) -> list:
        return [m.new_cache() for m in self._stateful]

    @staticmethod
    def _transformers(blocks: nn.ModuleList, x: torch.Tensor, span: Span | SpanBatch) -> torch.Tensor:
        x = x.transpose(1, 2)  # (B, T, C)
        for block in blocks:
            x = block(x, span)
        return x.transpose(1, 2)

    def forward(self, x: torch.Tensor, mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor, cond: torch.Tensor,
                span: Span | SpanBatch) -> torch.Tensor:
        """x, mu, cond (B, 80, T); t (B,); spks (B, 80) -> vector field (B, 80, T) at frames [span.start, span.end)."""
        temb = self.time_mlp(self.time_embeddings(t).to(t.dtype))  # (B, 4*ch)
        x = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, x.shape[-1]), cond], dim=1)  # (B, 320, T)
        resnet, blocks, down = self.down_blocks[0]
        x = self._transformers(blocks, resnet(x, temb, span), span)
        skip = x
        x = down(x, span)
        for resnet, blocks in self.mid_blocks:
            x = self._transformers(blocks, resnet(x, temb, span), span)
        resnet, blocks, up = self.up_blocks[0]
        x = self._transformers(blocks, resnet(torch.cat([x, skip], dim=1), temb, span), span)
        x = up(x, span)
        return self.final_proj(self.final_block(x, span))
