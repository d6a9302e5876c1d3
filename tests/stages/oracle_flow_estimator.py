"""Independent oracle for CosyVoice2's flow-matching decoder: the causal U-Net estimator and the Euler/CFG solver.

A functional, plain-torch transcription of the upstream algorithm, written from these sources:
* ictnlp/LLaMA-Omni2 @ c8afa90, vendored `cosyvoice/flow/decoder.py`: `ConditionalDecoder(causal=True)` (called
  `CausalConditionalDecoder` in FunAudioLLM/CosyVoice HEAD, whose `streaming=True` branch is this one), with
  `CausalConv1d`, `CausalBlock1D`, `CausalResnetBlock1D`; LLaMA-Omni2 sets its `static_chunk_size` to 100 at runtime.
* the same tree's `cosyvoice/flow/flow_matching.py`: `CausalConditionalCFM.forward` (fixed noise slice, t-schedule)
  and `ConditionalCFM.solve_euler` (CFG batch of 2, `inference_cfg_rate`);
  `cosyvoice/utils/mask.py` (`add_optional_chunk_mask`, `subsequent_chunk_mask`), `cosyvoice/utils/common.py`
  (`mask_to_bias`).
* shivammehta25/Matcha-TTS @ 108906c, `matcha/models/components/decoder.py` (SinusoidalPosEmb, TimestepEmbedding,
  Block1D, ResnetBlock1D) and `transformer.py` (BasicTransformerBlock, FeedForward), which build on diffusers'
  `Attention` + `AttnProcessor2_0` (bias-free q/k/v, heads repeated into an additive mask, scale head_dim^-0.5) and
  `GELU` (Linear then exact erf GELU).

Everything is computed over the whole sequence with the upstream padding and chunk masks, including every
`* mask` product the official modules apply; nothing here uses omni2.stages (nor its streaming caches or SDPA).
Weights come from a state dict keyed by the official flow.pt names (`decoder.estimator.*`): each function takes
the dict plus the key prefix of the module it transcribes.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

from omni2.engine.config import FlowEstimatorConfig

StateDict = Mapping[str, torch.Tensor]
ESTIMATOR = "decoder.estimator."
LN_EPS = 1e-5  # every LayerNorm here is a default nn.LayerNorm


# --------------------------------------------------------------------------------------------- primitives
def linear(sd: StateDict, p: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, sd[f"{p}.weight"], sd.get(f"{p}.bias"))


def layer_norm(sd: StateDict, p: str, x: torch.Tensor) -> torch.Tensor:  # normalises the last dim
    return F.layer_norm(x, (x.shape[-1],), sd[f"{p}.weight"], sd[f"{p}.bias"], LN_EPS)


def conv1d(sd: StateDict, p: str, x: torch.Tensor) -> torch.Tensor:  # (B, Cin, T) -> (B, Cout, T), unpadded k=1
    return F.conv1d(x, sd[f"{p}.weight"], sd[f"{p}.bias"])


def causal_conv1d(sd: StateDict, p: str, x: torch.Tensor) -> torch.Tensor:
    """CausalConv1d: zero-pad k-1 frames on the left only, so output t reads inputs t-k+1..t; stride 1."""
    w = sd[f"{p}.weight"]  # (Cout, Cin, k)
    return F.conv1d(F.pad(x, (w.shape[-1] - 1, 0)), w, sd[f"{p}.bias"])


# --------------------------------------------------------------------------------------------- time embedding
def sinusoidal_pos_emb(t: torch.Tensor, dim: int, scale: float = 1000.0) -> torch.Tensor:
    """Matcha SinusoidalPosEmb: (B,) -> (B, dim) = [sin(scale t f_k), cos(scale t f_k)], f_k = 1e4^(-k/(dim/2-1))."""
    assert dim % 2 == 0
    if t.ndim < 1:
        t = t[None]
    half = dim // 2
    freqs = torch.exp(torch.arange(half, device=t.device).float() * -(math.log(10000) / (half - 1)))  # (half,)
    arg = scale * t[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([arg.sin(), arg.cos()], dim=-1)


def timestep_embedding(sd: StateDict, p: str, emb: torch.Tensor) -> torch.Tensor:
    """Matcha TimestepEmbedding with act_fn 'silu', no cond_proj, no post_act: (B, in) -> (B, 4C)."""
    return linear(sd, f"{p}.linear_2", F.silu(linear(sd, f"{p}.linear_1", emb)))


def decoder_time(sd: StateDict, t: torch.Tensor, in_channels: int, prefix: str = ESTIMATOR) -> torch.Tensor:
    """The decoder's first two lines: the sinusoid is cast back to t's dtype before the MLP."""
    return timestep_embedding(sd, f"{prefix}time_mlp", sinusoidal_pos_emb(t, in_channels).to(t.dtype))


# --------------------------------------------------------------------------------------------- resnet blocks
def causal_block1d(sd: StateDict, p: str, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """CausalBlock1D: Sequential(CausalConv1d k3, Transpose, LayerNorm(C), Transpose, Mish) on x*mask, then *mask.
    The Sequential's parameter-holding entries are indices 0 (conv) and 2 (norm). x (B, C, T), mask (B, 1, T)."""
    h = causal_conv1d(sd, f"{p}.block.0", x * mask)  # (B, Cout, T)
    h = layer_norm(sd, f"{p}.block.2", h.transpose(1, 2)).transpose(1, 2)  # per-frame norm over channels
    return F.mish(h) * mask


def causal_resnet_block1d(sd: StateDict, p: str, x: torch.Tensor, mask: torch.Tensor,
                          temb: torch.Tensor) -> torch.Tensor:
    """Matcha ResnetBlock1D.forward with CosyVoice's causal blocks: x (B, Cin, T), temb (B, 4C) -> (B, Cout, T).
    The time embedding enters once, between the two blocks, as a per-channel shift broadcast over time."""
    h = causal_block1d(sd, f"{p}.block1", x, mask)
    h = h + linear(sd, f"{p}.mlp.1", F.mish(temb))[:, :, None]  # mlp = Sequential(Mish, Linear)
    h = causal_block1d(sd, f"{p}.block2", h, mask)
    return h + conv1d(sd, f"{p}.res_conv", x * mask)


# --------------------------------------------------------------------------------------------- attention
def subsequent_chunk_mask(size: int, chunk_size: int, num_left_chunks: int = -1) -> torch.Tensor:
    """(size, size) bool: row i sees columns from its left-chunk limit up to the end of its own chunk."""
    allowed = torch.zeros(size, size, dtype=torch.bool)
    for i in range(size):
        first = 0 if num_left_chunks < 0 else max((i // chunk_size - num_left_chunks) * chunk_size, 0)
        allowed[i, first:min((i // chunk_size + 1) * chunk_size, size)] = True
    return allowed


def chunk_attention_bias(mask: torch.Tensor, static_chunk_size: int, dtype: torch.dtype) -> torch.Tensor:
    """add_optional_chunk_mask(x, mask.bool(), False, False, 0, static_chunk_size, -1) then mask_to_bias:
    padding mask (B, 1, T) AND chunk mask (1, T, T) -> (B, T, T) additive bias, 0 where allowed, finfo.min not."""
    T = mask.shape[-1]
    if static_chunk_size > 0:
        allowed = mask.bool() & subsequent_chunk_mask(T, static_chunk_size).to(mask.device)[None]  # (B, T, T)
    else:
        allowed = mask.bool()  # (B, 1, T): broadcast over queries
    return (1.0 - allowed.to(dtype)) * torch.finfo(dtype).min


def attention(sd: StateDict, p: str, x: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
    """diffusers Attention (AttnProcessor2_0) as BasicTransformerBlock builds attn1: x (B, T, C), bias (B, T, T).
    Written out as softmax(q k^T / sqrt(d) + bias) v rather than through SDPA, to stay independent of ours."""
    B, T, _ = x.shape
    q, k, v = (linear(sd, f"{p}.to_{n}", x) for n in "qkv")  # (B, T, inner); no bias on q/k/v
    d = q.shape[-1] // heads
    q, k, v = (y.view(B, T, heads, d).transpose(1, 2) for y in (q, k, v))  # (B, H, T, d)
    # prepare_attention_mask repeats the (B, T, T) mask per head, then views it (B, H, T, T).
    scores = q @ k.transpose(-2, -1) * d ** -0.5 + bias[:, None]  # (B, H, T, T)
    out = torch.softmax(scores, dim=-1) @ v  # (B, H, T, d)
    return linear(sd, f"{p}.to_out.0", out.transpose(1, 2).reshape(B, T, heads * d))


def feed_forward(sd: StateDict, p: str, x: torch.Tensor) -> torch.Tensor:
    """FeedForward(activation_fn='gelu', mult 4): net = [GELU(proj), Dropout, Linear]; exact erf GELU."""
    return linear(sd, f"{p}.net.2", F.gelu(linear(sd, f"{p}.net.0.proj", x)))


def basic_transformer_block(sd: StateDict, p: str, x: torch.Tensor, bias: torch.Tensor, heads: int) -> torch.Tensor:
    """Pre-norm block with layer_norm norms (no ada-norm), self-attention only (no attn2/norm2): x (B, T, C)."""
    x = x + attention(sd, f"{p}.attn1", layer_norm(sd, f"{p}.norm1", x), bias, heads)
    return x + feed_forward(sd, f"{p}.ff", layer_norm(sd, f"{p}.norm3", x))


def _transformer_stack(sd: StateDict, p: str, n_blocks: int, x: torch.Tensor, mask: torch.Tensor,
                       cfg: FlowEstimatorConfig) -> torch.Tensor:
    """(B, C, T) -> (B, C, T): the rearranges around a level's transformer blocks, with its mask's bias."""
    x = x.transpose(1, 2)  # (B, T, C)
    bias = chunk_attention_bias(mask, cfg.static_chunk_size, x.dtype)
    for j in range(n_blocks):
        x = basic_transformer_block(sd, f"{p}.{j}", x, bias, cfg.num_heads)
    return x.transpose(1, 2)


# --------------------------------------------------------------------------------------------- the U-Net
def estimator_forward(sd: StateDict, cfg: FlowEstimatorConfig, x: torch.Tensor, mask: torch.Tensor,
                      mu: torch.Tensor, t: torch.Tensor, spks: torch.Tensor | None, cond: torch.Tensor | None,
                      prefix: str = ESTIMATOR) -> torch.Tensor:
    """ConditionalDecoder(causal=True).forward(x, mask, mu, t, spks, cond) -> (B, out, T).

    x, mu, cond (B, 80, T); mask (B, 1, T); t (B,); spks (B, 80). Upstream argument order (mask second)."""
    p = prefix
    temb = decoder_time(sd, t, cfg.in_channels, p)  # (B, 4C)
    parts = [x, mu]
    if spks is not None:
        parts.append(spks[:, :, None].repeat(1, 1, x.shape[-1]))
    if cond is not None:
        parts.append(cond)
    x = torch.cat(parts, dim=1)  # (B, in_channels, T)

    levels = len(cfg.channels)
    hiddens, masks = [], [mask]
    for i in range(levels):
        mask_down = masks[-1]
        x = causal_resnet_block1d(sd, f"{p}down_blocks.{i}.0", x, mask_down, temb)
        x = _transformer_stack(sd, f"{p}down_blocks.{i}.1", cfg.n_blocks, x, mask_down, cfg)
        hiddens.append(x)  # the skip this level's up block reads
        if i != levels - 1:
            # Inner levels use Matcha's strided Downsample1D; CosyVoice2 has a single level, so it never runs.
            raise NotImplementedError("multi-level estimator (Downsample1D / Upsample1D) is not transcribed")
        x = causal_conv1d(sd, f"{p}down_blocks.{i}.2", x * mask_down)
        masks.append(mask_down[:, :, ::2])
    masks = masks[:-1]
    mask_mid = masks[-1]

    for k in range(cfg.num_mid_blocks):
        x = causal_resnet_block1d(sd, f"{p}mid_blocks.{k}.0", x, mask_mid, temb)
        x = _transformer_stack(sd, f"{p}mid_blocks.{k}.1", cfg.n_blocks, x, mask_mid, cfg)

    for i in range(levels):
        mask_up, skip = masks.pop(), hiddens.pop()
        x = torch.cat([x[:, :, :skip.shape[-1]], skip], dim=1)  # (B, 2C, T): up-path first, then the skip
        x = causal_resnet_block1d(sd, f"{p}up_blocks.{i}.0", x, mask_up, temb)
        x = _transformer_stack(sd, f"{p}up_blocks.{i}.1", cfg.n_blocks, x, mask_up, cfg)
        x = causal_conv1d(sd, f"{p}up_blocks.{i}.2", x * mask_up)  # the last level's "upsample"
    x = causal_block1d(sd, f"{p}final_block", x, mask_up)
    return conv1d(sd, f"{p}final_proj", x * mask_up) * mask


# --------------------------------------------------------------------------------------------- the CFM solver
Estimator = Callable[..., torch.Tensor]  # (x, mask, mu, t, spks, cond) -> (B, 80, T)


def t_span(n_timesteps: int, t_scheduler: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n+1,) times from 0 to 1; 'cosine' bends them toward 0 (small steps first)."""
    ts = torch.linspace(0, 1, n_timesteps + 1, dtype=dtype)
    if t_scheduler == "cosine":
        ts = 1 - torch.cos(ts * 0.5 * torch.pi)
    return ts


def solve_euler(estimator: Estimator, x: torch.Tensor, ts: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor,
                spks: torch.Tensor, cond: torch.Tensor, inference_cfg_rate: float) -> torch.Tensor:
    """ConditionalCFM.solve_euler: x the noise (B, 80, T) -> x at t=1, fp32.

    With CFG, each step runs the estimator once on [conditioned rows; rows with mu, spks, cond zeroed] (same x, mask,
    t) and mixes v = (1 + r) v_cond - r v_uncond. t advances by accumulating dt, and each next dt is measured from
    that accumulated t (not from ts[step]), which is what upstream does."""
    B, C, T = x.shape
    t, dt = ts[0][None], ts[1] - ts[0]  # t (1,)
    for step in range(1, len(ts)):
        if inference_cfg_rate > 0:
            zeros = torch.zeros_like
            v = estimator(torch.cat([x, x]), torch.cat([mask, mask]), torch.cat([mu, zeros(mu)]),
                          t.expand(2 * B), torch.cat([spks, zeros(spks)]), torch.cat([cond, zeros(cond)]))
            v_cond, v_uncond = v[:B], v[B:]
            v = (1.0 + inference_cfg_rate) * v_cond - inference_cfg_rate * v_uncond
        else:
            v = estimator(x, mask, mu, t.expand(B), spks, cond)
        x = x + dt * v
        t = t + dt
        if step < len(ts) - 1:
            dt = ts[step + 1] - t
    return x.float()


def cfm_inference(estimator: Estimator, rand_noise: torch.Tensor, mu: torch.Tensor, mask: torch.Tensor,
                  n_timesteps: int, spks: torch.Tensor, cond: torch.Tensor, t_scheduler: str = "cosine",
                  inference_cfg_rate: float = 0.7, temperature: float = 1.0) -> torch.Tensor:
    """CausalConditionalCFM.forward: noise is the first T columns of the fixed (1, 80, N) draw, not fresh."""
    z = rand_noise[:, :, :mu.shape[2]].to(mu.device) * temperature
    return solve_euler(estimator, z, t_span(n_timesteps, t_scheduler, mu.dtype).to(mu.device), mu, mask, spks, cond,
                       inference_cfg_rate)
