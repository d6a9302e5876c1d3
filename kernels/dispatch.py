"""Which path a kernel call takes: its Triton kernel or its plain-torch reference.

Decided once, at import: whether triton is importable, whether the Triton path is forced, whether triton runs
in its interpreter. Per call only the tensors' device is read: CUDA tensors take the Triton path; CPU tensors
take the reference unless forced (tests force it under TRITON_INTERPRET=1, which runs the kernels on CPU).
"""
from __future__ import annotations

import os
import warnings

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only users need not install triton: every kernel has a torch reference
    triton = tl = None

HAS_TRITON = triton is not None
# NOTE(kernels): triton reads TRITON_INTERPRET when a kernel is decorated, i.e. when a kernel module is first
# imported; setting it later has no effect (tests/conftest.py sets it before anything imports omni2.kernels).
INTERPRET = os.environ.get("TRITON_INTERPRET", "") == "1"
# Take the Triton path on CPU tensors too. Module attributes, so tests and benches can flip them.
FORCE_TRITON = os.environ.get("OMNI2_FORCE_TRITON", "") == "1"
# Take the reference even on CUDA tensors (benches compare the two; a suspected kernel bug can be ruled out).
FORCE_REFERENCE = os.environ.get("OMNI2_FORCE_REFERENCE", "") == "1"

_warned: set[str] = set()


def jit(fn):
    """`triton.jit`, or the bare function when triton is absent (the module still imports; it never runs)."""
    return triton.jit(fn) if HAS_TRITON else fn


def use_triton(op: str, *tensors: torch.Tensor) -> bool:
    """True if `op` on these tensors should run its Triton kernel; warns once per op when triton is missing."""
    want = not FORCE_REFERENCE and (FORCE_TRITON or all(t.is_cuda for t in tensors))
    if not want:
        return False
    if not HAS_TRITON:
        if op not in _warned:
            _warned.add(op)
            warnings.warn(f"triton is not installed: {op} runs its plain-torch reference", RuntimeWarning,
                          stacklevel=3)
        return False
    if not INTERPRET and not all(t.is_cuda for t in tensors):
        raise RuntimeError(f"{op}: the Triton path on CPU tensors needs TRITON_INTERPRET=1 in the environment "
                           "before omni2.kernels is imported")
    return True


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
