"""Qwen2 decoder shared by the thinker (LLM stage) and the TTS LM, with a static per-slot KV cache.

Attribute names follow transformers' Qwen2ForCausalLM (`model.layers.{i}.self_attn.q_proj` ...), so official
checkpoint tensors load without renaming. Sessions own fixed *slots* of the cache; a forward pass takes a
right-padded batch of new tokens for any set of slots, each starting at its own position, so prefill of
different lengths and one-token decode share one code path.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from omni2.engine.config import Qwen2Config


def prefer_planless_attention(device) -> None:
    """On CUDA, leave cuDNN out of scaled_dot_product_attention's choices (process-wide).

    torch prefers cuDNN's fused attention on Hopper, and cuDNN builds an execution plan for every new shape: in
    a decode step the key length grows by one, and a profile on an H200 (torch 2.11, bench/profile_step.py)
    showed up to ~12 ms of host time per attention call. Flash and memory-efficient attention build nothing."""
    if torch.device(device).type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in fp32 like the reference implementation: bf16 variance drifts visibly over 28 layers.
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


def rope_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos/sin tables for integer positions (B, T) -> (B, T, head_dim) each, computed in fp32."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim))
    freqs = positions.float()[..., None] * inv_freq  # (B, T, D/2)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, heads, T, D); cos/sin: (B, T, D). Qwen2 rotates the two halves (not interleaved pairs).
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class SlotKVCache:
    """Preallocated keys/values for `slots` sessions x `max_len` positions, one pair per layer.

    The cache does not track lengths: the owner (a stage) keeps each slot's length and passes the start
    positions of every forward. Positions past a slot's length may hold stale values; the causal mask never
    lets a query see them.
    """

    def __init__(self, cfg: Qwen2Config, slots: int, max_len: int, device, dtype):
        shape = (slots, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.num_hidden_layers)]
        self.slots, self.max_len = slots, max_len

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class SlotPool:
    """Which cache slots are free: the session bookkeeping the LLM and TTS stages share."""

    def __init__(self, n: int, stage: str, error: type[Exception]):
        self.n, self.stage, self.error = n, stage, error
        self.free = list(range(n))[::-1]

    def take(self, session_id: str, sessions: dict) -> int:
        if session_id in sessions:
            raise self.error(f"session {session_id!r} is already open")
        if not self.free:
            raise self.error(f"all {self.n} {self.stage} session slots are in use")
        return self.free.pop()

    def give(self, slot: int) -> None:
        self.free.append(slot)


class Batch:
    """Index tensors of one forward: which slots, where each row starts, how many of its T tokens are real.

    Built on the host from plain lists, in one host-to-device copy: nothing a layer reads (the key length, where
    each real token is written) needs a value back from the device, so a step never waits for the GPU mid-way.
    """

    def __init__(self, slots: list[int], starts: list[int], lengths: list[int], device):
        B, T = len(slots), max(lengths)
        rows = [b for b in range(B) for _ in range(lengths[b])]
        cols = [t for b in range(B) for t in range(lengths[b])]
        packed = torch.tensor([*slots, *starts, *lengths, *rows, *cols, *(slots[b] for b in rows),
                               *(starts[b] + t for b, t in zip(rows, cols))], dtype=torch.long).to(device)
        n = len(rows)
        self.slots, self.starts, self.lengths = packed[:B], packed[B:2 * B], packed[2 * B:3 * B]  # each (B,)
        # Real tokens: row and column in the (B, T) input, and the slot and position each is written to.
        self.rows, self.cols = packed[3 * B:3 * B + n], packed[3 * B + n:3 * B + 2 * n]
        self.write_slots, self.write_positions = packed[3 * B + 2 * n:3 * B + 3 * n], packed[3 * B + 3 * n:]
        self.kv_len = max(s + n for s, n in zip(starts, lengths))  # keys each row may need, at most
        # A lone slot's keys are a view of the cache; several slots' are gathered into a copy.
        self.lone_slot = slots[0] if B == 1 else None
        ar = torch.arange(T, device=device)
        self.positions = self.starts[:, None] + ar  # (B, T)
        keys = torch.arange(self.kv_len, device=device)
        self.mask = keys[None, None, :] <= self.positions[:, :, None]  # (B, T, L) causal over absolute positions

    @classmethod
    def make(cls, slots: list[int], starts: list[int], lengths: list[int], device) -> Batch:
        return cls(list(slots), list(starts), list(lengths), device)


class Attention(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.n_head, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_head * self.head_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, batch: Batch, cache_k: torch.Tensor, cache_v: torch.Tensor):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, Hq, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)

        # Write only the real tokens into each row's slot: padding must not spill past max_len.
        cache_k[batch.write_slots, :, batch.write_positions] = k[batch.rows, :, batch.cols]
        cache_v[batch.write_slots, :, batch.write_positions] = v[batch.rows, :, batch.cols]

        if batch.lone_slot is not None:
            s = batch.lone_slot
            keys, values = cache_k[s:s + 1, :, : batch.kv_len], cache_v[s:s + 1, :, : batch.kv_len]
        else:
            keys = cache_k[batch.slots, :, : batch.kv_len]  # (B, Hkv, L, D)
            values = cache_v[batch.slots, :, : batch.kv_len]
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=batch.mask[:, None],
                                             enable_gqa=self.n_head != self.n_kv)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, batch, cache_k, cache_v):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, batch, cache_k, cache_v)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds: torch.Tensor, batch: Batch, cache: SlotKVCache) -> torch.Tensor:
        """embeds (B, T, H) right-padded -> final-norm hidden states (B, T, H)."""
        cos, sin = rope_cos_sin(batch.positions, self.cfg.head_dim, self.cfg.rope_theta, embeds.dtype)
        x = embeds
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, batch, cache.k[i], cache.v[i])
        return self.norm(x)


class Qwen2LM(nn.Module):
    """Qwen2ForCausalLM's module tree: `model` + `lm_head` (tied or not, as the checkpoint says)."""

    def __init__(self, cfg: Qwen2Config):
        super().__init__()
        self.cfg = cfg
        self.model = Qwen2Model(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def forward(self, embeds: torch.Tensor, batch: Batch, cache: SlotKVCache, head: bool = True):
        """Returns the final-norm hidden state (B, H) and logits (B, V) of each row's last real position.
        head=False skips the lm_head (logits None), for callers that apply the head themselves."""
        hidden = self.model(embeds, batch, cache)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), batch.lengths - 1]  # (B, H)
        return last, self.lm_head(last) if head else None


def forward_rows(lm: Qwen2LM, cache: SlotKVCache, slots: list[int], starts: list[int], rows: list[torch.Tensor],
                 head: bool = True):
    """One forward over several sessions: row b appends embeddings rows[b] (n_b, H) to slot slots[b] at
    position starts[b]. Returns the final-norm hidden (B, H) and logits (B, V) of each row's last position
    (logits None when head=False)."""
    embeds, lengths = pad_rows(rows)
    return lm(embeds, Batch.make(slots, starts, lengths, embeds.device), cache, head)


def pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    """Rows of embeddings (n_b, H) -> one right-padded (B, max n_b, H) batch (zeros past each row) and the n_b."""
    lengths = [r.shape[0] for r in rows]
    embeds = rows[0].new_zeros(len(rows), max(lengths), rows[0].shape[-1])
    for b, r in enumerate(rows):
        embeds[b, :lengths[b]] = r
    return embeds, lengths
