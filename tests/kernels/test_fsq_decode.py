"""FSQ speech-token decoding: the Triton kernels against the torch reference and against masked full-vocab
sampling (CPU: triton's interpreter, see conftest), plus the FSQ digit mapping."""
import pytest
import torch

from omni2.engine.config import SamplingParams
from omni2.kernels import dispatch
from omni2.kernels.fsq_decode import (
    MAX_FUSED_COLS,
    N_FSQ_UNITS,
    fsq_codes,
    fsq_decode,
    fsq_decode_ref,
    fsq_decode_triton,
    fsq_index,
)
from omni2.kernels.sampling import filter_logits
from omni2.stages.sampling import sample

DEV = "cuda" if torch.cuda.is_available() else "cpu"
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
# The tiny checkpoint's TTS vocabulary: 512 text ids, EOS at 512, 6561 units from 535.
V, H, UNIT0, EOS = 7100, 64, 535, 512
MIXED = [SamplingParams(1.0, 50, 1.0), SamplingParams(0.7, 0, 0.9), SamplingParams(1.3, 10, 0.6),
         SamplingParams(0.9, 0, 1.0), SamplingParams(), SamplingParams(1.0, 7000, 0.95)]


def head(vocab=V, hidden=H, dtype=torch.float32, seed=0, scale=0.25):
    """A random head whose logits spread over a few units (std ~2), so sampling has real choices."""
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(vocab, hidden, generator=g) * scale).to(DEV, dtype)


def hidden_states(B, hidden=H, dtype=torch.float32, seed=1):
    return torch.randn(B, hidden, generator=torch.Generator().manual_seed(seed)).to(DEV, dtype)


def row_args(params, counters):
    """The per-row tensors fsq_decode takes, from SamplingParams (seeds differ per row unless set)."""
    col = lambda xs, dt: torch.tensor(xs, dtype=dt, device=DEV)  # noqa: E731
    return (col([p.temperature for p in params], torch.float32), col([p.top_k for p in params], torch.int64),
            col([p.top_p for p in params], torch.float32), col([p.seed for p in params], torch.int64),
            col(counters, torch.int64))


def seeded(params, base=100):
    return [SamplingParams(p.temperature, p.top_k, p.top_p, seed=base + i * 7919) for i, p in enumerate(params)]


def test_fsq_codes_round_trip_all_units():
    u = torch.arange(N_FSQ_UNITS)
    codes = fsq_codes(u)
    assert codes.shape == (6561, 8) and set(codes.unique().tolist()) == {-1, 0, 1}
    assert torch.equal(fsq_index(codes), u)
    assert len({tuple(c) for c in codes.tolist()}) == 6561
    # Digit j has weight 3**j (CosyVoice2 paper): unit 1 moves only the first level, unit 3**7 only the last.
    assert fsq_codes(torch.tensor([0, 1, 3**7, 6560])).tolist() == [
        [-1] * 8, [0] + [-1] * 7, [-1] * 7 + [0], [1] * 8]
    with pytest.raises(ValueError):
        fsq_codes(torch.tensor([6561]))
    with pytest.raises(ValueError):
        fsq_index(torch.full((1, 8), 2))


@pytest.mark.parametrize("full_vocab", [False, True], ids=["units", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_greedy_equals_reference(force_triton, dtype, full_vocab):
    W, h = head(dtype=dtype), hidden_states(8, dtype=dtype)
    args = row_args([SamplingParams()] * 8, [0] * 8)
    ours = fsq_decode_triton(h, W, UNIT0, 6561, EOS, *args, full_vocab=full_vocab)
    ref = fsq_decode_ref(h, W, UNIT0, 6561, EOS, *args, full_vocab=full_vocab)
    assert ours.tolist() == ref.tolist()
    assert len(set(ours.tolist())) >= 6


@pytest.mark.parametrize("full_vocab", [False, True], ids=["units", "full"])
def test_sampled_equals_reference_step_by_step(force_triton, full_vocab):
    params = seeded(MIXED)
    W, ours, ref = head(), [], []
    for step in range(10):
        h = hidden_states(len(params), seed=step)
        args = row_args(params, [step] * len(params))
        ours.append(fsq_decode_triton(h, W, UNIT0, 6561, EOS, *args, full_vocab=full_vocab).tolist())
        ref.append(fsq_decode_ref(h, W, UNIT0, 6561, EOS, *args, full_vocab=full_vocab).tolist())
    assert ours == ref
    assert len({t for row in ours for t in row}) > 30  # really sampled, not one argmax


def test_tied_logits_sample_as_the_reference(force_triton):
    """Head rows that are copies of one another give logits tied exactly at the top-k boundary: both keep every
    token tied with the k-th one (as transformers does), so they draw the same ids."""
    W = head()
    h = hidden_states(6)
    top = (h @ W[UNIT0:UNIT0 + 6561].T).argmax(-1)
    for b, u in enumerate(top.tolist()):
        W[UNIT0 + (u + 1 + b) % 6561] = W[UNIT0 + u]  # a twin of each row's best unit
    params = seeded([SamplingParams(1.0, 1, 1.0)] * 3 + [SamplingParams(1.0, 2, 1.0)] * 3, base=11)
    twins = set()
    for step in range(16):
        args = row_args(params, [step] * 6)
        ours = fsq_decode_triton(h, W, UNIT0, 6561, EOS, *args)
        assert ours.tolist() == fsq_decode_ref(h, W, UNIT0, 6561, EOS, *args).tolist()
        twins |= set(ours[:3].tolist())
    assert len(twins) > 3  # top_k 1 drew both of a row's tied units, not only the first in sort order


def test_bf16_head_sampled_equals_reference(force_triton):
    params = seeded(MIXED[:4], base=5)
    W = head(dtype=torch.bfloat16)
    for step in range(4):
        h = hidden_states(4, dtype=torch.bfloat16, seed=10 + step)
        args = row_args(params, [step] * 4)
        assert fsq_decode_triton(h, W, UNIT0, 6561, EOS, *args).tolist() == \
            fsq_decode_ref(h, W, UNIT0, 6561, EOS, *args).tolist()


@pytest.mark.parametrize("path", ["ref", "triton"])
def test_restricted_equals_masked_full_vocab(force_triton, path):
    """Restricted decoding == stages.sampling.sample(full logits with every non-unit, non-EOS row at -inf)."""
    decode = fsq_decode_ref if path == "ref" else fsq_decode_triton
    params = seeded(MIXED)
    W = head()
    mask = torch.full((V,), -float("inf"), device=DEV)
    mask[UNIT0:UNIT0 + 6561] = 0.0
    mask[EOS] = 0.0
    for step in range(6):
        h = hidden_states(len(params), seed=50 + step)
        counters = [step * 3 + i for i in range(len(params))]
        want = sample(h @ W.T + mask, params, counters)
        assert decode(h, W, UNIT0, 6561, EOS, *row_args(params, counters)).tolist() == want.tolist()


def test_a_session_decodes_the_same_alone_and_in_a_batch(force_triton):
    W = head()
    mine = SamplingParams(1.0, 50, 1.0, seed=1234)
    others = seeded(MIXED + [SamplingParams(0.8, 20, 0.8)], base=7)
    alone, batched = [], []
    for step in range(6):
        h = hidden_states(8, seed=200 + step)
        alone.append(fsq_decode_triton(h[3:4], W, UNIT0, 6561, EOS, *row_args([mine], [step])).item())
        params = others[:3] + [mine] + others[3:]
        counters = [step * 5 + i for i in range(8)]
        counters[3] = step
        batched.append(fsq_decode_triton(h, W, UNIT0, 6561, EOS, *row_args(params, counters))[3].item())
    assert alone == batched


# 99.9% quantiles of chi-square, by degrees of freedom.
CHI2_999 = {1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46, 7: 24.32, 8: 26.12, 9: 27.88, 10: 29.59,
            11: 31.26, 12: 32.91}


def test_sampled_frequencies_match_the_filtered_softmax(force_triton):
    """Chi-square goodness of fit of 4000 kernel draws (one counter each) for one hidden state, on a small head
    (27 units + EOS), to softmax(filter_logits(logits)) after temperature, top-k and top-p."""
    vocab, hid, unit0, n_units, eos = 40, 16, 10, 27, 3
    W = head(vocab, hid, seed=3, scale=0.18)
    h = hidden_states(1, hid, seed=4)
    n = 4000
    T, k, p = 0.9, 12, 0.9
    args = (torch.full((n,), T, device=DEV), torch.full((n,), k, device=DEV), torch.full((n,), p, device=DEV),
            torch.full((n,), 99, device=DEV), torch.arange(n, device=DEV))
    ids = fsq_decode_triton(h.expand(n, -1).contiguous(), W, unit0, n_units, eos, *args)
    cand = torch.tensor(sorted([eos, *range(unit0, unit0 + n_units)]), device=DEV)
    logits = (h @ W[cand].T)
    probs = filter_logits(logits, torch.tensor([T], device=DEV), torch.tensor([k], device=DEV),
                          torch.tensor([p], device=DEV))[0].softmax(-1)
    counts = (ids[:, None] == cand[None, :]).sum(0).float()
    assert counts.sum() == n and counts[probs == 0].sum() == 0  # only candidates, never a filtered one
    keep = probs > 0
    expected = probs[keep] * n
    chi2 = (((counts[keep] - expected) ** 2) / expected).sum().item()
    dof = int(keep.sum()) - 1
    assert 4 <= dof <= 11 and expected.min() >= 5, (dof, expected.min())
    assert chi2 < CHI2_999[dof], (chi2, dof)


def test_wide_full_vocab_samples_in_torch(force_triton):
    """Above MAX_FUSED_COLS columns the kernel's logits are sampled by stages.sampling: still the reference."""
    vocab = MAX_FUSED_COLS + 3000
    W, h = head(vocab, 16, seed=5), hidden_states(3, 16, seed=6)
    args = row_args(seeded(MIXED[:3]), [0, 1, 2])
    assert fsq_decode_triton(h, W, 20, 6561, 4, *args, full_vocab=True).tolist() == \
        fsq_decode_ref(h, W, 20, 6561, 4, *args, full_vocab=True).tolist()


def test_dispatch_forced_and_default(force_triton, monkeypatch):
    W, h = head(), hidden_states(2)
    args = row_args([SamplingParams()] * 2, [0, 0])
    calls = []
    monkeypatch.setattr("omni2.kernels.fsq_decode.fsq_decode_triton", lambda *a, **k: calls.append(1))
    fsq_decode(h, W, UNIT0, 6561, EOS, *args)
    assert calls == [1]
    monkeypatch.setattr(dispatch, "FORCE_TRITON", False)
    out = fsq_decode(h, W, UNIT0, 6561, EOS, *args)
    assert calls == [1] + ([1] if DEV == "cuda" else [])
    if DEV == "cpu":
        assert out.tolist() == fsq_decode_ref(h, W, UNIT0, 6561, EOS, *args).tolist()


def test_bad_ids_are_clear_errors():
    W, h = head(), hidden_states(1)
    args = row_args([SamplingParams()], [0])
    with pytest.raises(ValueError, match="inside the unit range"):
        fsq_decode_ref(h, W, UNIT0, 6561, UNIT0 + 5, *args)
    with pytest.raises(ValueError, match="must lie in the vocab"):
        fsq_decode_ref(h, W, UNIT0 + 1000, 6561, EOS, *args)


@requires_cuda
@pytest.mark.parametrize("B", [1, 8, 64])
@pytest.mark.parametrize("full_vocab", [False, True], ids=["units", "full"])
def test_real_tts_shapes_on_gpu(B, full_vocab):
    """The 0.5b/7b TTS head (158227 x 896, units from 151666, EOS 151643) in bf16, kernels vs reference."""
    vocab, unit0, eos = 158227, 151666, 151643
    W = head(vocab, 896, torch.bfloat16, seed=8, scale=0.07)
    h = hidden_states(B, 896, torch.bfloat16, seed=9)
    params = seeded([MIXED[i % len(MIXED)] for i in range(B)])
    for step in range(3):
        args = row_args(params, [step] * B)
        assert fsq_decode(h, W, unit0, 6561, eos, *args, full_vocab=full_vocab).tolist() == \
            fsq_decode_ref(h, W, unit0, 6561, eos, *args, full_vocab=full_vocab).tolist()
