"""One TTS decode step for a batch of sessions: final hidden state -> sampled TTS token id.

    logits[b, c] = hidden[b] . W[ids[c]]             ids: unit0 .. unit0+n_units-1 and eos, ascending
    id[b]        = ids[argmax_c(filter(logits[b] / T_b) + gumbel(seed_b, counter_b, ids[c]))]   (T_b > 0)
                 = ids[argmax_c(logits[b])]                                                        (T_b = 0)

The restricted mode reads only the 6561 unit rows + EOS of the TTS head (instead of all ~158k rows): the dominant
saving of a decode step. It equals sampling the full-vocab logits with the other rows masked to -inf, because the
noise is keyed by the token id, not by the column. `full_vocab=True` reads every row (official semantics).
filter = temperature, top-k, top-p exactly as kernels/sampling.py filter_logits; the noise is
kernels/sampling.py token_noise (a 32-bit integer hash, reproduced bit for bit here in uint32 arithmetic).

Paths (kernels/dispatch.py picks one per call: Triton on CUDA, `fsq_decode_ref` on CPU unless forced):
  _head_logits_kernel  Triton: GEMM of the hidden states with the selected head rows -> fp32 logits (B, n)
  _fsq_sample_kernel   Triton: temperature, top-k and top-p (by bisection on the logits' bit patterns, no sort),
                       noise and argmax, one program per block of rows holding whole rows (n <= 16384)
  above 16384 columns  (full_vocab on a real vocab) torch: kernels/sampling.py sample_logits on the kernel's logits
`fsq_codes` / `fsq_index` map unit ids to the 8 FSQ levels in {-1, 0, 1} and back (MODEL_SPEC §2.2).
"""
from __future__ import annotations

import torch

from omni2.kernels.dispatch import INTERPRET, cdiv, jit, next_pow2, tl, use_triton
from omni2.kernels.sampling import sample_logits

FSQ_DIMS, FSQ_LEVELS = 8, 3  # CosyVoice2's S3 tokenizer: 8 dims x 3 levels = 6561 units
N_FSQ_UNITS = FSQ_LEVELS ** FSQ_DIMS
MAX_FUSED_COLS = 16384  # rows the sampling kernel holds whole; wider rows sample in torch
_POW3 = [FSQ_LEVELS ** j for j in range(FSQ_DIMS)]


def fsq_codes(unit_ids: torch.Tensor) -> torch.Tensor:
    """Unit ids (N,) in 0..6560 -> FSQ levels (N, 8) in {-1, 0, 1}; unit = sum_j (q_j + 1) * 3**j."""
    u = unit_ids.long()
    if u.numel() and (u.min() < 0 or u.max() >= N_FSQ_UNITS):
        raise ValueError(f"unit ids must lie in 0..{N_FSQ_UNITS - 1}")
    pow3 = torch.tensor(_POW3, device=u.device)
    return (u[..., None] // pow3) % FSQ_LEVELS - 1


def fsq_index(codes: torch.Tensor) -> torch.Tensor:
    """FSQ levels (N, 8) in {-1, 0, 1} -> unit ids (N,); the inverse of fsq_codes."""
    if codes.numel() and (codes.min() < -1 or codes.max() > 1):
        raise ValueError("FSQ levels must lie in {-1, 0, 1}")
    return ((codes.long() + 1) * torch.tensor(_POW3, device=codes.device)).sum(-1)


_ids_cache: dict[tuple, torch.Tensor] = {}


def candidate_ids(vocab: int, unit0: int, n_units: int, eos_id: int, full_vocab: bool, device) -> torch.Tensor:
    """The head rows a step reads, ascending (so argmax ties resolve as over the masked full vocab), int64."""
    key = (vocab, -1, 0, -1) if full_vocab else (vocab, unit0, n_units, eos_id)
    key += (str(device),)
    ids = _ids_cache.get(key)
    if ids is not None:
        return ids
    if full_vocab:
        ids = torch.arange(vocab, device=device)
    else:
        if not (0 <= unit0 and unit0 + n_units <= vocab and 0 <= eos_id < vocab):
            raise ValueError(f"units {unit0}..{unit0 + n_units - 1} and eos {eos_id} must lie in the vocab of {vocab}")
        if unit0 <= eos_id < unit0 + n_units:
            raise ValueError(f"eos id {eos_id} lies inside the unit range")
        ids = torch.cat([torch.arange(unit0, unit0 + n_units), torch.tensor([eos_id])]).sort().values.to(device)
    _ids_cache[key] = ids
    return ids


def _fp32_logits(hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """(B, H) x (n, H) -> fp32 (B, n), products of the head's dtype accumulated in fp32."""
    h = hidden.to(rows.dtype)
    return h @ rows.T if rows.dtype == torch.float32 else h.float() @ rows.float().T


def fsq_decode_ref(hidden: torch.Tensor, head_weight: torch.Tensor, unit0: int, n_units: int, eos_id: int,
                   temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
                   counters: torch.Tensor, full_vocab: bool = False) -> torch.Tensor:
    """Plain torch: the head on the selected rows, then stages.sampling. Returns TTS token ids (B,)."""
    ids = candidate_ids(head_weight.shape[0], unit0, n_units, eos_id, full_vocab, hidden.device)
    if full_vocab:
        logits = _fp32_logits(hidden, head_weight)
    else:  # the unit rows are one contiguous block: slice views, no gather of 6561 rows per step
        units = _fp32_logits(hidden, head_weight[unit0:unit0 + n_units])
        eos = _fp32_logits(hidden, head_weight[eos_id:eos_id + 1])
        logits = torch.cat([eos, units] if eos_id < unit0 else [units, eos], dim=1)
    return ids[sample_logits(logits, temperature, top_k, top_p, seeds, counters, token_ids=ids)]


@jit
def _head_logits_kernel(h_ptr, w_ptr, ids_ptr, out_ptr, B, N_COLS, H,
                        stride_hb, stride_hh, stride_wv, stride_wh, stride_ob,
                        DOT_F32: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """out[b, c] = sum_h hidden[b, h] * W[ids[c], h], fp32 accumulation; only the rows listed in ids are read."""
    rows = tl.program_id(1).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < B, cols < N_COLS
    w_rows = tl.load(ids_ptr + cols, mask=col_ok, other=0).to(tl.int64)  # int64: 158k rows x stride > 2**31
    acc = tl.zeros((BLOCK_B, BLOCK_V), tl.float32)
    for k0 in range(0, H, BLOCK_H):
        k = k0 + tl.arange(0, BLOCK_H)
        h = tl.load(h_ptr + rows[:, None] * stride_hb + k[None, :] * stride_hh,
                    mask=row_ok[:, None] & (k[None, :] < H), other=0.0)
        w = tl.load(w_ptr + w_rows[:, None] * stride_wv + k[None, :] * stride_wh,
                    mask=col_ok[:, None] & (k[None, :] < H), other=0.0)
        if DOT_F32:
            h, w = h.to(tl.float32), w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
    tl.store(out_ptr + rows[:, None] * stride_ob + cols[None, :], acc, mask=row_ok[:, None] & col_ok[None, :])


@jit
def _mix32(x):
    # stages.sampling._mix32 on uint32: the multiply wraps mod 2**32 exactly like its `& 0xFFFFFFFF`.
    x = ((x >> 16) ^ x) * 0x045D9F3B
    x = ((x >> 16) ^ x) * 0x045D9F3B
    return (x >> 16) ^ x


@jit
def _fsq_sample_kernel(logit_ptr, ids_ptr, temp_ptr, topk_ptr, topp_ptr, seed_ptr, ctr_ptr, out_ptr,
                       B, N_COLS, stride_lb, BLOCK_B: tl.constexpr, BLOCK_V: tl.constexpr):
    """out[b] = ids[argmax_c(keep[b, c] ? x[b, c] + gumbel[b, c] : -inf)], x = logits / T (T > 0), see module doc.

    Top-k and top-p need no sort: both keep a prefix of the descending order, i.e. every x at or above a
    threshold, found by bisecting over the 2**32 order-preserving integer keys of fp32 values (32 rounds):
    top-k: the largest key t with count(key >= t) >= k; top-p: the smallest t with mass(key > t) < top_p.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, BLOCK_V)
    row_ok, col_ok = rows < B, cols < N_COLS
    ok = row_ok[:, None] & col_ok[None, :]
    x = tl.load(logit_ptr + rows[:, None] * stride_lb + cols[None, :], mask=ok, other=-float("inf"))
    temp = tl.load(temp_ptr + rows, mask=row_ok, other=0.0)
    hot = temp > 0.0  # temperature 0 = greedy: raw logits, no filter, no noise
    # div_rn: IEEE division, as torch's logits / T (plain `/` may lower to an approximate division).
    x = tl.where(hot[:, None], tl.math.div_rn(x, tl.where(hot, temp, 1.0)[:, None]), x)
    bits = x.to(tl.int32, bitcast=True)
    key = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # fp32 order == int32 order (negatives: flip all but the sign)

    k = tl.load(topk_ptr + rows, mask=row_ok, other=0)
    k = tl.where(hot & (k > 0), tl.minimum(k, N_COLS), N_COLS)
    lo = tl.full((BLOCK_B,), -2147483648, tl.int64)
    hi = tl.full((BLOCK_B,), 2147483647, tl.int64)
    # k == n needs no search: lo stays below every key. A row is also done as soon as exactly k keys lie at or
    # above lo: distinct logits are ~2**17 keys apart, so that takes ~15 rounds, not 32 (ties take all 32).
    todo = row_ok & (k < N_COLS)
    while tl.max(todo.to(tl.int32)) > 0:
        mid = (lo + hi + 1) >> 1
        n_above = tl.sum((ok & (key >= mid.to(tl.int32)[:, None])).to(tl.int32), axis=1)
        enough = n_above >= k
        lo = tl.where(todo & enough, mid, lo)
        hi = tl.where(todo & ~enough, mid - 1, hi)
        todo = todo & ~(enough & (n_above == k)) & (lo < hi)
    keep = ok & (key >= lo.to(tl.int32)[:, None])

    p = tl.load(topp_ptr + rows, mask=row_ok, other=1.0)
    use_p = hot & (p < 1.0)
    if tl.max(use_p.to(tl.int32)) > 0:
        m = tl.where(row_ok, tl.max(tl.where(keep, x, -float("inf")), axis=1), 0.0)  # 0 on padding rows: no nan
        e = tl.where(keep, tl.exp(x - m[:, None]), 0.0)  # unnormalised softmax over the top-k survivors
        target = p * tl.sum(e, axis=1)
        lo = tl.full((BLOCK_B,), -2147483648, tl.int64)
        hi = tl.full((BLOCK_B,), 2147483647, tl.int64)
        for _ in range(32):
            mid = (lo + hi) >> 1
            above = tl.sum(tl.where(key > mid.to(tl.int32)[:, None], e, 0.0), axis=1)
            small = above < target
            hi = tl.where(small, mid, hi)
            lo = tl.where(small, lo, mid + 1)
        keep = keep & ((key >= lo.to(tl.int32)[:, None]) | ~use_p[:, None])

    # Noise of kernels/sampling.py token_noise, keyed by (seed, counter, token id).
    seed = tl.load(seed_ptr + rows, mask=row_ok, other=0)
    ctr = tl.load(ctr_ptr + rows, mask=row_ok, other=0)
    row_key = _mix32(_mix32(_mix32(seed.to(tl.uint32)) ^ (seed >> 32).to(tl.uint32)) ^ ctr.to(tl.uint32))
    tok = tl.load(ids_ptr + cols, mask=col_ok, other=0)
    hsh = _mix32(row_key[:, None] ^ _mix32(tok.to(tl.uint32))[None, :])
    u = ((hsh >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)  # exact in fp32, below 1: see token_noise
    gumbel = -tl.log(-tl.log(u))
    score = tl.where(keep, x + tl.where(hot[:, None], gumbel, 0.0), -float("inf"))
    best = tl.argmax(score, axis=1)  # first maximum, as torch.argmax
    tl.store(out_ptr + rows, tl.load(ids_ptr + best, mask=row_ok, other=0), mask=row_ok)


def head_logits_triton(hidden: torch.Tensor, head_weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """fp32 logits (B, n) of hidden (B, H) against the head rows ids (n,) int64: `_head_logits_kernel`."""
    (B, H), n = hidden.shape, ids.numel()
    h = hidden.to(head_weight.dtype)
    logits = torch.empty(B, n, dtype=torch.float32, device=hidden.device)
    # BLOCK_B is fixed: every row's dot products then run in the same tile shape whatever the batch, so a
    # session's logits (and ids) do not depend on who shares its batch.
    BLOCK_B = 16
    if INTERPRET:  # programs run one after another: few, large tiles
        BLOCK_V, BLOCK_H = min(next_pow2(n), 1024), min(max(next_pow2(H), 16), 128)
    else:  # memory-bound: narrow column tiles give ~100+ programs over 6562 rows
        BLOCK_V, BLOCK_H = 64, 64
    _head_logits_kernel[(cdiv(n, BLOCK_V), cdiv(B, BLOCK_B))](
        h, head_weight, ids, logits, B, n, H, h.stride(0), h.stride(1), head_weight.stride(0),
        head_weight.stride(1), logits.stride(0),
        DOT_F32=INTERPRET and h.dtype == torch.bfloat16, BLOCK_B=BLOCK_B, BLOCK_V=BLOCK_V, BLOCK_H=BLOCK_H,
        num_warps=4)
    return logits


def fsq_decode_triton(hidden: torch.Tensor, head_weight: torch.Tensor, unit0: int, n_units: int, eos_id: int,
                      temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
                      counters: torch.Tensor, full_vocab: bool = False) -> torch.Tensor:
    """The Triton kernels, whatever the device (CPU tensors need TRITON_INTERPRET=1). Same contract as the ref."""
    B, H = hidden.shape
    dev = hidden.device
    if head_weight.shape[1] != H:
        raise ValueError(f"fsq_decode: hidden {tuple(hidden.shape)} does not fit the head {tuple(head_weight.shape)}")
    ids = candidate_ids(head_weight.shape[0], unit0, n_units, eos_id, full_vocab, dev)
    n = ids.numel()
    out = torch.empty(B, dtype=torch.int64, device=dev)
    if B == 0:
        return out
    logits = head_logits_triton(hidden, head_weight, ids)
    as_t = lambda t, dtype: t.to(device=dev, dtype=dtype).contiguous()  # noqa: E731
    temperature, top_k, top_p = as_t(temperature, torch.float32), as_t(top_k, torch.int64), as_t(top_p, torch.float32)
    seeds, counters = as_t(seeds, torch.int64), as_t(counters, torch.int64)
    if n > MAX_FUSED_COLS:
        return ids[sample_logits(logits, temperature, top_k, top_p, seeds, counters, token_ids=ids)]
    BLOCK_V = max(next_pow2(n), 16)
    rows_per_prog = min(max(65536 // BLOCK_V, 1), next_pow2(B)) if INTERPRET else 1
    _fsq_sample_kernel[(cdiv(B, rows_per_prog),)](
        logits, ids, temperature, top_k, top_p, seeds, counters, out, B, n, logits.stride(0),
        BLOCK_B=rows_per_prog, BLOCK_V=BLOCK_V, num_warps=16 if BLOCK_V >= 4096 else 4)
    return out


def fsq_decode(hidden: torch.Tensor, head_weight: torch.Tensor, unit0: int, n_units: int, eos_id: int,
               temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, seeds: torch.Tensor,
               counters: torch.Tensor, full_vocab: bool = False) -> torch.Tensor:
    """hidden (B, H), head (V, H), per-row temperature / top_k / top_p / seeds / counters (B,) -> TTS ids (B,).

    Restricted to the unit rows + EOS unless full_vocab. Triton on CUDA, the reference elsewhere."""
    if use_triton("fsq_decode", hidden, head_weight):
        return fsq_decode_triton(hidden, head_weight, unit0, n_units, eos_id, temperature, top_k, top_p, seeds,
                                 counters, full_vocab)
    return fsq_decode_ref(hidden, head_weight, unit0, n_units, eos_id, temperature, top_k, top_p, seeds, counters,
                          full_vocab)
