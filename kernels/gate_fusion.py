"""Gate fusion of the speech generator (MODEL_SPEC §1.8, step 1):

    g   = sigmoid([r ; e] @ W^T + b)        r: projected thinker state (N, D), e: TTS text embedding (N, D)
    out = r * g + e * (1 - g)               W: (D, 2D), b: (D,)

`gate_fusion` is what the TTS stage calls; `gate_fusion_ref` is the plain-torch formula, kept as the
reference and the fallback; `gate_fusion_triton` launches `_gate_fusion_kernel`, a GEMM with the sigmoid-blend
epilogue that reads W's two halves in place (no materialised concat). Triton on CUDA tensors, the reference on
CPU unless forced (kernels/dispatch.py).

The input_proj layers before it are not folded in: every output column of the gate needs all D columns of
r = input_proj(h), so a fused kernel would need a grid-wide barrier between the two GEMMs or would recompute
r once per output tile; input_proj stays two cuBLAS linears.
"""
from __future__ import annotations

import torch

from omni2.kernels.dispatch import INTERPRET, cdiv, jit, next_pow2, tl, use_triton


@jit
def _gate_fusion_kernel(r_ptr, e_ptr, w_ptr, b_ptr, out_ptr, N, D, g_fixed,
                        stride_rn, stride_rd, stride_en, stride_ed, stride_wo, stride_wi, stride_on, stride_od,
                        FIXED_GATE: tl.constexpr, DOT_F32: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, j] = r[n, j] * g + e[n, j] * (1 - g),  g = sigmoid(sum_k r[n, k] W[j, k] + e[n, k] W[j, D + k] + b[j])

    One program = a (BLOCK_N, BLOCK_D) output tile; fp32 accumulation and epilogue, stored in out's dtype.
    FIXED_GATE: g = g_fixed (no GEMM). DOT_F32: upcast tiles before tl.dot (the interpreter's bf16 dot is wrong).
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)  # int64: N * stride may pass 2**31
    cols = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < N, cols < D
    tile_ok = row_ok[:, None] & col_ok[None, :]
    if FIXED_GATE:
        g = tl.zeros((BLOCK_N, BLOCK_D), tl.float32) + g_fixed
    else:
        acc = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
        for k0 in range(0, D, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            a_ok = row_ok[:, None] & (k[None, :] < D)
            w_ok = col_ok[:, None] & (k[None, :] < D)
            r = tl.load(r_ptr + rows[:, None] * stride_rn + k[None, :] * stride_rd, mask=a_ok, other=0.0)
            e = tl.load(e_ptr + rows[:, None] * stride_en + k[None, :] * stride_ed, mask=a_ok, other=0.0)
            w_r = tl.load(w_ptr + cols[:, None] * stride_wo + k[None, :] * stride_wi, mask=w_ok, other=0.0)
            w_e = tl.load(w_ptr + cols[:, None] * stride_wo + (k[None, :] + D) * stride_wi, mask=w_ok, other=0.0)
            if DOT_F32:
                r, e, w_r, w_e = r.to(tl.float32), e.to(tl.float32), w_r.to(tl.float32), w_e.to(tl.float32)
            # "ieee": fp32 inputs must not be rounded to tf32 (16-bit inputs ignore the setting).
            acc = tl.dot(r, tl.trans(w_r), acc, input_precision="ieee")
            acc = tl.dot(e, tl.trans(w_e), acc, input_precision="ieee")
        bias = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        g = tl.sigmoid(acc + bias[None, :])
    r = tl.load(r_ptr + rows[:, None] * stride_rn + cols[None, :] * stride_rd, mask=tile_ok, other=0.0)
    e = tl.load(e_ptr + rows[:, None] * stride_en + cols[None, :] * stride_ed, mask=tile_ok, other=0.0)
    out = r.to(tl.float32) * g + e.to(tl.float32) * (1.0 - g)
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_od, out.to(out_ptr.dtype.element_ty),
             mask=tile_ok)


def gate_fusion_ref(r: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    gate_override: float | None = None) -> torch.Tensor:
    """(N, D), (N, D), (D, 2D), (D,) -> (N, D). `gate_override` fixes g (the paper's g=0 / g=1 ablation)."""
    if gate_override is not None:
        g = torch.full_like(r, float(gate_override))
    else:
        g = torch.sigmoid(torch.cat([r, e], dim=-1) @ weight.T + bias)
    return r * g + e * (1 - g)


def gate_fusion_triton(r: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       gate_override: float | None = None) -> torch.Tensor:
    """The Triton kernel, whatever the device (CPU tensors need TRITON_INTERPRET=1). Same contract as the ref."""
    N, D = r.shape
    if e.shape != (N, D) or weight.shape != (D, 2 * D) or bias.shape != (D,):
        raise ValueError(f"gate_fusion: r {tuple(r.shape)}, e {tuple(e.shape)}, W {tuple(weight.shape)}, "
                         f"b {tuple(bias.shape)} do not fit (N, D), (N, D), (D, 2D), (D,)")
    if len({r.dtype, e.dtype, weight.dtype, bias.dtype}) != 1:
        raise ValueError(f"gate_fusion: mixed dtypes {r.dtype}, {e.dtype}, {weight.dtype}, {bias.dtype}")
    out = torch.empty_like(r, memory_format=torch.contiguous_format)
    if N == 0:
        return out
    if INTERPRET:  # the interpreter runs programs one after another: few, large tiles
        BLOCK_N, BLOCK_D, BLOCK_K, warps = min(max(next_pow2(N), 16), 128), min(max(next_pow2(D), 16), 256), 128, 4
    else:  # memory-bound for the N of a chunk (3 per session): small tiles give enough programs to fill the SMs
        BLOCK_N, BLOCK_D, BLOCK_K, warps = 16, 32, 64, 4
    grid = (cdiv(N, BLOCK_N), cdiv(D, BLOCK_D))
    _gate_fusion_kernel[grid](
        r, e, weight, bias, out, N, D, 0.0 if gate_override is None else float(gate_override),
        r.stride(0), r.stride(1), e.stride(0), e.stride(1), weight.stride(0), weight.stride(1),
        out.stride(0), out.stride(1),
        FIXED_GATE=gate_override is not None, DOT_F32=INTERPRET and r.dtype == torch.bfloat16,
        BLOCK_N=BLOCK_N, BLOCK_D=BLOCK_D, BLOCK_K=BLOCK_K, num_warps=warps)
    return out


def gate_fusion(r: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                gate_override: float | None = None) -> torch.Tensor:
    """(N, D), (N, D), (D, 2D), (D,) -> (N, D): the Triton kernel on CUDA, the reference elsewhere."""
    if use_triton("gate_fusion", r, e, weight, bias):
        return gate_fusion_triton(r, e, weight, bias, gate_override)
    return gate_fusion_ref(r, e, weight, bias, gate_override)
