"""Gate fusion: the Triton kernel against the plain-torch reference (CPU: triton's interpreter, see conftest)."""
import pytest
import torch

from omni2.kernels import dispatch
from omni2.kernels.gate_fusion import gate_fusion, gate_fusion_ref, gate_fusion_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# (atol, rtol) against the reference run in the same dtype. The kernel accumulates and blends in fp32 and rounds
# once; the 16-bit reference rounds after the GEMM, the sigmoid and each blend term. Where r*g and e*(1-g) cancel,
# its error follows the terms (|r|, |e| up to ~4 here), not the small output: hence an atol of ~1 ulp at 4-8.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (4e-2, 1.6e-2)}
ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


def inputs(N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    r, e = torch.randn(N, D, generator=g), torch.randn(N, D, generator=g)
    W, b = torch.randn(D, 2 * D, generator=g) / (2 * D) ** 0.5, torch.randn(D, generator=g) * 0.1
    return [t.to(DEV, dtype) for t in (r, e, W, b)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("D", [64, 896, 33])
@pytest.mark.parametrize("N", [1, 7, 128])
def test_kernel_equals_reference(force_triton, N, D, dtype):
    r, e, W, b = inputs(N, D, dtype)
    out = gate_fusion_triton(r, e, W, b)
    assert out.dtype == dtype and out.shape == (N, D)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, gate_fusion_ref(r, e, W, b), atol=atol, rtol=rtol)
    # Against the exact (fp32) formula the kernel is off by its single output rounding: half an ulp.
    exact = gate_fusion_ref(r.float(), e.float(), W.float(), b.float())
    torch.testing.assert_close(out.float(), exact, atol=1e-5, rtol=ULP[dtype])


@pytest.mark.parametrize("g", [0.0, 1.0, 0.25])
def test_gate_override(force_triton, g):
    r, e, W, b = inputs(5, 40, torch.float32, seed=1)
    torch.testing.assert_close(gate_fusion_triton(r, e, W, b, g), gate_fusion_ref(r, e, W, b, g), atol=1e-6, rtol=0)
    if g in (0.0, 1.0):
        assert torch.equal(gate_fusion_triton(r, e, W, b, g), e if g == 0.0 else r)


def test_strided_inputs(force_triton):
    """Views (a column slice of a wider tensor, a transposed weight) go in without copies."""
    r, e, W, b = inputs(9, 48, torch.float32, seed=2)
    wide = torch.cat([r, torch.zeros_like(r)], 1)[:, :48]
    Wt = W.T.contiguous().T
    assert not wide.is_contiguous() and not Wt.is_contiguous()
    torch.testing.assert_close(gate_fusion_triton(wide, e, Wt, b), gate_fusion_ref(r, e, W, b), atol=1e-5, rtol=1e-5)


def test_dispatch_forced_and_default(force_triton, monkeypatch):
    r, e, W, b = inputs(3, 64, torch.float32, seed=3)
    calls = []
    monkeypatch.setattr("omni2.kernels.gate_fusion.gate_fusion_triton", lambda *a: calls.append(1) or a[0])
    gate_fusion(r, e, W, b)
    assert calls == [1]
    monkeypatch.setattr(dispatch, "FORCE_TRITON", False)
    gate_fusion(r, e, W, b)
    assert calls == [1] + ([1] if DEV == "cuda" else [])  # CPU tensors take the reference unless forced


def test_missing_triton_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    monkeypatch.setattr(dispatch, "FORCE_TRITON", True)
    monkeypatch.setattr(dispatch, "_warned", set())
    r, e, W, b = inputs(2, 16, torch.float32)
    with pytest.warns(RuntimeWarning, match="triton is not installed"):
        out = gate_fusion(r, e, W, b)
    assert torch.equal(out, gate_fusion_ref(r, e, W, b))
    with _no_warnings():
        gate_fusion(r, e, W, b)


def test_bad_shapes_are_clear_errors(force_triton):
    r, e, W, b = inputs(2, 16, torch.float32)
    with pytest.raises(ValueError, match="do not fit"):
        gate_fusion_triton(r, e[:, :8], W, b)
    with pytest.raises(ValueError, match="mixed dtypes"):
        gate_fusion_triton(r, e.double(), W, b)


@requires_cuda
@pytest.mark.parametrize("N", [3, 24, 192])  # 1, 8, 64 sessions x one chunk of R=3 tokens
def test_tts_shapes_on_gpu(N):
    r, e, W, b = inputs(N, 896, torch.bfloat16)
    torch.testing.assert_close(gate_fusion(r, e, W, b), gate_fusion_ref(r, e, W, b), atol=4e-2, rtol=1.6e-2)


class _no_warnings:
    def __enter__(self):
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error")

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
