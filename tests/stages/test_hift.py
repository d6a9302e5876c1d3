import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from omni2.engine.config import HiFTConfig
from omni2.stages.hift import (
    HiFT,
    ResBlock,
    Snake,
    WNConv1d,
    WNConvTranspose1d,
    draw_source_randomness,
    sine_gen,
)
from tests.stages import oracle_hift as oracle

CFG = HiFTConfig(base_channels=32, f0_cond_channels=32)  # the tiny preset; every other number as CosyVoice2
SR = CFG.sampling_rate


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # NOTE(hift): on 2-core CI boxes torch's intra-op threads turn these tiny convs from ~15 ms into ~2 s a call
    # (thread wake-ups), and xdist already runs one worker per core.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _torch_wn(layer: nn.Module) -> nn.Module:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # legacy weight_norm is deprecated, but it is what hift.pt was saved from
        return nn.utils.weight_norm(layer)


def random_hift(seed: int = 0, voiced: bool = True) -> HiFT:
    torch.manual_seed(seed)
    h = HiFT(CFG)
    with torch.no_grad():
        for name, p in h.named_parameters():
            if name.endswith("alpha"):
                p.copy_(0.5 + torch.rand_like(p))
        if voiced:  # f0 around 150 Hz, so the harmonic source (not just noise) drives the output
            h.f0_predictor.classifier.bias.fill_(150.0)
    return h.eval()


def random_mel(B: int = 1, T: int = 12, seed: int = 0) -> torch.Tensor:
    return torch.randn(B, 80, T, generator=torch.Generator().manual_seed(seed))


# --- weight norm: the same tensors as torch's own weight_norm layers ---------------------------------------------
@pytest.mark.parametrize("transpose", [False, True])
def test_weight_norm_layers_match_torch(transpose):
    torch.manual_seed(0)
    if transpose:
        ref = _torch_wn(nn.ConvTranspose1d(12, 6, 11, 5, padding=3))
        ours = WNConvTranspose1d(12, 6, 11, 5, padding=3)
    else:
        ref = _torch_wn(nn.Conv1d(6, 12, 7, 1, padding=9, dilation=3))
        ours = WNConv1d(6, 12, 7, padding=9, dilation=3)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == want
    assert list(ours.state_dict()) == list(ref.state_dict())  # bias, weight_g, weight_v
    if transpose:  # dim=0 is the *input* channel of a transposed conv
        assert want["weight_g"] == (12, 1, 1)
    with torch.no_grad():
        ref.weight_g.mul_(torch.rand_like(ref.weight_g) + 0.5)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, ours.weight_v.shape[0] if transpose else 6, 40)
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)
    ours.fold()
    torch.testing.assert_close(ours(x), ref(x), atol=1e-6, rtol=1e-5)


def test_fresh_weight_norm_is_torch_default_init():
    torch.manual_seed(0)
    m = WNConv1d(8, 4, 3)
    w = m.weight()
    torch.testing.assert_close(w, m.weight_v)  # g = ‖v‖ on a fresh layer, as weight_norm leaves it
    bound = 1 / math.sqrt(8 * 3)
    assert w.abs().max() <= bound and m.bias.abs().max() <= bound


def test_hift_keys_and_shapes_are_official():
    with torch.device("meta"):
        h = HiFT(HiFTConfig())  # CosyVoice2's numbers
    sd = {k: tuple(v.shape) for k, v in h.state_dict().items()}
    # every weight-normed conv looks exactly like torch's weight_norm of the same layer
    for name, m in h.named_modules():
        if isinstance(m, (WNConv1d, WNConvTranspose1d)):
            cin, cout = (m.weight_v.shape[0], m.weight_v.shape[1]) if isinstance(m, WNConvTranspose1d) else \
                (m.weight_v.shape[1], m.weight_v.shape[0])
            cls = nn.ConvTranspose1d if isinstance(m, WNConvTranspose1d) else nn.Conv1d
            with torch.device("meta"):
                ref = _torch_wn(cls(cin, cout, m.weight_v.shape[2]))
            assert {f"{name}.{k}": tuple(v.shape) for k, v in ref.state_dict().items()} == \
                {k: v for k, v in sd.items() if k.rsplit(".", 1)[0] == name}
    expect = {  # MODEL_SPEC §2.5
        "conv_pre.weight_v": (512, 80, 7), "conv_pre.weight_g": (512, 1, 1),
        "ups.0.weight_g": (512, 1, 1), "ups.0.weight_v": (512, 256, 16), "ups.2.weight_v": (128, 64, 7),
        "source_downs.0.weight": (256, 18, 30), "source_downs.1.weight": (128, 18, 6),
        "source_downs.2.weight": (64, 18, 1), "source_resblocks.2.convs1.2.weight_v": (64, 64, 11),
        "resblocks.8.convs1.0.weight_v": (64, 64, 11), "resblocks.0.activations1.0.alpha": (256,),
        "resblocks.3.activations2.2.alpha": (128,), "conv_post.weight_v": (18, 64, 7), "conv_post.bias": (18,),
        "f0_predictor.condnet.0.weight_v": (512, 80, 3), "f0_predictor.condnet.8.weight_g": (512, 1, 1),
        "f0_predictor.classifier.weight": (1, 512), "m_source.l_linear.weight": (1, 9),
    }
    for k, shape in expect.items():
        assert sd[k] == shape, k
    assert "source_downs.0.weight_g" not in sd  # plain convs
    assert not any(".condnet.1." in k or "stft_window" in k for k in sd)
    assert len(sd) == 328 and len(h.resblocks) == 9


# --- pieces against their formulas --------------------------------------------------------------------------------
def test_snake():
    s = Snake(5)
    with torch.no_grad():
        s.alpha.copy_(torch.tensor([0.3, 1.0, 2.5, 0.7, 1e-3]))
    x = torch.randn(2, 5, 9)
    a = s.alpha.view(1, -1, 1)
    torch.testing.assert_close(s(x), x + torch.sin(a * x) ** 2 / a)


def test_resblock_formula():
    torch.manual_seed(0)
    rb = ResBlock(8, 5, (1, 3, 5))
    x = torch.randn(2, 8, 30)
    ref = x
    for c1, c2, a1, a2 in zip(rb.convs1, rb.convs2, rb.activations1, rb.activations2):
        w1 = torch._weight_norm(c1.weight_v, c1.weight_g, 0)
        w2 = torch._weight_norm(c2.weight_v, c2.weight_g, 0)
        h = F.conv1d(a1(ref), w1, c1.bias, padding=2 * c1.dilation, dilation=c1.dilation)
        ref = F.conv1d(a2(h), w2, c2.bias, padding=2) + ref
    torch.testing.assert_close(rb(x), ref, atol=1e-5, rtol=1e-5)


def test_f0_predictor_matches_torch_weight_norm_stack():
    h = random_hift(voiced=False)
    layers = []
    for i in range(5):
        layers += [_torch_wn(nn.Conv1d(80 if i == 0 else 32, 32, 3, padding=1)), nn.ELU()]
    ref_net, ref_cls = nn.Sequential(*layers), nn.Linear(32, 1)
    ref_net.load_state_dict(h.f0_predictor.condnet.state_dict())
    ref_cls.load_state_dict(h.f0_predictor.classifier.state_dict())
    mel = random_mel(2, 15)
    want = ref_cls(ref_net(mel).transpose(1, 2)).squeeze(-1).abs()
    torch.testing.assert_close(h.f0_predictor(mel), want, atol=1e-5, rtol=1e-5)


def test_sine_gen_harmonics_by_fft():
    L, f0_hz, H = SR, 200.0, CFG.nb_harmonics
    f0 = torch.full((1, 1, L), f0_hz)
    sines, uv = sine_gen(f0, SR, H, 0.1, 0.003, 10.0, torch.zeros(1, H + 1, 1), torch.zeros(1, H + 1, L))
    assert sines.shape == (1, H + 1, L) and bool(uv.all())
    spec = torch.fft.rfft(sines[0].double(), dim=-1).abs()  # 1 s of audio: 1 Hz per bin
    for k in range(H + 1):
        assert int(spec[k].argmax()) == round(f0_hz * (k + 1))
    n = torch.arange(1, L + 1, dtype=torch.float64)  # the phase cumsum includes the current sample
    ref = 0.1 * torch.sin(2 * math.pi * n * f0_hz * 3 / SR)
    torch.testing.assert_close(sines[0, 2].double(), ref, atol=2e-4, rtol=0)


def test_sine_gen_uv_noise_and_phases():
    L, H = 4800, 3
    f0 = torch.cat([torch.zeros(L // 2), torch.full((L // 2,), 120.0)]).view(1, 1, L)
    f0[..., 100] = 10.0  # exactly the threshold: unvoiced (f0 > threshold is voiced)
    phases = torch.tensor([1.0, 0.5, -2.0, 3.0]).view(1, H + 1, 1)
    ones = torch.ones(1, H + 1, L)
    quiet, uv = sine_gen(f0, SR, H, 0.1, 0.003, 10.0, phases, torch.zeros_like(ones))
    noisy, _ = sine_gen(f0, SR, H, 0.1, 0.003, 10.0, phases, ones)
    assert torch.equal(uv[0, 0], (f0[0, 0] > 10.0).float()) and uv[0, 0, 100] == 0
    assert quiet[..., : L // 2].abs().max() == 0  # unvoiced: no sines
    torch.testing.assert_close(noisy - quiet, torch.where(uv.bool(), 0.003, 0.1 / 3).expand_as(ones))
    # the fundamental's phase is forced to 0; harmonics keep theirs (phase = 2π·(float32 cumsum of f/sr mod 1))
    for k, ph in ((0, 0.0), (2, -2.0)):
        cycles = torch.cumsum(f0[0, 0] * (k + 1) / SR, dim=0) % 1
        ref = 0.1 * torch.sin(2 * math.pi * cycles + ph) * uv[0, 0]
        torch.testing.assert_close(quiet[0, k], ref, atol=1e-6, rtol=0)


def test_source_draws_follow_upstream_order():
    B, H1, L = 2, 9, 960
    torch.manual_seed(7)
    phases, noise = draw_source_randomness(B, H1, L, torch.device("cpu"), None)
    after = torch.rand(4)
    torch.manual_seed(7)  # upstream: Uniform(-π, π).sample, randn_like(sines), randn_like(uv) (unused)
    want_phases = torch.distributions.Uniform(-math.pi, math.pi).sample((B, H1, 1))
    want_noise = torch.randn(B, H1, L)
    torch.randn(B, L, 1)
    assert torch.equal(phases, want_phases) and torch.equal(noise, want_noise)
    assert torch.equal(after, torch.rand(4))
    # an explicit generator: the same stream, and the global RNG untouched
    state = torch.get_rng_state()
    p2, n2 = draw_source_randomness(B, H1, L, torch.device("cpu"), torch.Generator().manual_seed(7))
    assert torch.equal(p2, want_phases) and torch.equal(n2, want_noise)
    assert torch.equal(state, torch.get_rng_state())


def test_istft_head_is_overlap_add_of_irfft_frames():
    h = random_hift()
    B, Fr, n_fft, hop = 2, 25, CFG.istft_n_fft, CFG.istft_hop_len
    x = torch.randn(B, n_fft + 2, Fr, generator=torch.Generator().manual_seed(0)) - 1.0
    x[0, 3, 5] = 9.0  # exp(9) > 100: clipped magnitude
    got = h.istft_head(x)
    assert got.shape == (B, (Fr - 1) * hop)

    mag = torch.exp(x[:, : n_fft // 2 + 1]).clamp(max=100.0).double()
    phase = torch.sin(x[:, n_fft // 2 + 1:]).double()  # upstream's sin() of the phase channels
    frames = torch.fft.irfft(torch.polar(mag, phase), n=n_fft, dim=1)  # (B, n_fft, F)
    win = torch.hann_window(n_fft, periodic=True, dtype=torch.float64)
    total = n_fft + hop * (Fr - 1)
    y, wsum = torch.zeros(B, total, dtype=torch.float64), torch.zeros(total, dtype=torch.float64)
    for f in range(Fr):
        y[:, f * hop: f * hop + n_fft] += frames[:, :, f] * win
        wsum[f * hop: f * hop + n_fft] += win**2
    ref = (y / wsum)[:, n_fft // 2: n_fft // 2 + (Fr - 1) * hop].clamp(-0.99, 0.99)
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


# --- the whole generator -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("B,T", [(1, 1), (2, 13)])
def test_output_lengths(B, T):
    h = random_hift()
    speech, source = h.inference(random_mel(B, T), generator=torch.Generator().manual_seed(0))
    assert speech.shape == (B, 480 * T) and source.shape == (B, 1, 480 * T)
    assert speech.abs().max() <= CFG.audio_limit and torch.isfinite(speech).all()


def test_randomness_is_explicit():
    h, mel = random_hift(), random_mel(1, 10)
    a, sa = h.inference(mel, deterministic=True)
    b, sb = h.inference(mel, deterministic=True)
    assert torch.equal(a, b) and torch.equal(sa, sb)
    g1, g2 = (h.inference(mel, generator=torch.Generator().manual_seed(3)) for _ in range(2))
    assert torch.equal(g1[0], g2[0]) and torch.equal(g1[1], g2[1])
    g3 = h.inference(mel, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(g1[1], g3[1]) and not torch.allclose(g1[0], g3[0])
    assert not torch.allclose(a, g1[0])
    torch.manual_seed(11)
    r1 = h.inference(mel)[0]
    torch.manual_seed(11)
    assert torch.equal(r1, h.inference(mel)[0])  # generator=None: the global RNG, as upstream


def test_batch_rows_are_independent():
    h, mel = random_hift(), random_mel(3, 9)
    both = h.inference(mel, deterministic=True)[0]
    for b in range(3):
        one = h.inference(mel[b: b + 1], deterministic=True)[0]
        torch.testing.assert_close(both[b: b + 1], one, atol=1e-5, rtol=1e-4)


def test_cache_source_overwrites_the_head():
    T = 48
    h, mel = random_hift(), random_mel(2, T)
    plain, s = h.inference(mel, generator=torch.Generator().manual_seed(0))
    cache = 0.05 * torch.randn(2, 1, 8 * 480)
    cached, s2 = h.inference(mel, cache, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s2[:, :, : cache.shape[-1]], cache)
    assert torch.equal(s2[:, :, cache.shape[-1]:], s[:, :, cache.shape[-1]:])
    assert not torch.allclose(cached[:, :2000], plain[:, :2000])
    # the receptive field is finite (~20 mel frames): far past the cache the output is unchanged
    torch.testing.assert_close(cached[:, -2000:], plain[:, -2000:], atol=1e-6, rtol=0)
    same, _ = h.inference(mel, s[:, :, :960], generator=torch.Generator().manual_seed(0))
    assert torch.equal(same, plain)  # overwriting the source with itself changes nothing
    with pytest.raises(ValueError, match="cache_source"):
        h.inference(mel, torch.zeros(2, 1, T * 480 + 1))


def test_fold_weight_norm_and_reload():
    h, mel = random_hift(), random_mel(1, 6)
    a = h.inference(mel, deterministic=True)[0]
    h.fold_weight_norm()
    torch.testing.assert_close(h.inference(mel, deterministic=True)[0], a)
    sd = h.state_dict()
    sd["conv_post.weight_g"] = sd["conv_post.weight_g"] * 2
    h.load_state_dict(sd)  # drops the folded weights
    assert not torch.allclose(h.inference(mel, deterministic=True)[0], a)


# --- against the independent oracle (tests/stages/oracle_hift.py: upstream's algorithm over hift.pt keys) ---------
# NOTE(hift): both sides run float32 and fold weight norm with differently ordered roundings. With f0 near the
# classifier bias (`random_hift`), f0 comes out equal and everything agrees to ~1e-7. With f0 set by the mel
# (`_wide_f0_hift`, classifier weights ×4000) f0 differs by ulps, and the source's phase integration (a float32
# cumsum of f0·k/sr over 480·T samples) turns those into ~1e-5 of source amplitude, so those checks allow 5e-5 -
# still ~2000× below the 0.1 sine amplitude.
def _wide_f0_hift() -> HiFT:
    """`random_hift` whose f0 swings over ~0-300 Hz from frame to frame (unvoiced frames included): the classifier's
    tiny random weights are scaled up and its bias pulled down, so the mel, not the bias, sets f0."""
    h = random_hift()
    with torch.no_grad():
        h.f0_predictor.classifier.weight.mul_(4000.0)
        h.f0_predictor.classifier.bias.fill_(-60.0)
    return h


def _f0_contour(T: int = 25) -> torch.Tensor:
    """Frame-level f0 (2, T) with unvoiced runs, a frame exactly at the 10 Hz threshold and jumps up to 400 Hz."""
    g = torch.Generator().manual_seed(1)
    f0 = 60.0 + 340.0 * torch.rand(2, T, generator=g)
    f0[0, :4] = 0.0
    f0[0, 10] = CFG.nsf_voiced_threshold  # not voiced: upstream's test is f0 > threshold
    f0[1, 7:12] = 3.0
    return f0


def test_oracle_weight_fold_matches_torch_parametrizations():
    h = random_hift()
    sd = h.state_dict()
    new_names = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
    for name, cls, args in (("conv_pre", nn.Conv1d, (80, 32, 7)), ("ups.0", nn.ConvTranspose1d, (32, 16, 16, 8))):
        layer = nn.utils.parametrizations.weight_norm(cls(*args))  # dim=0: in-channels for the transposed conv
        layer.load_state_dict({new_names.get(k, k): sd[f"{name}.{k}"] for k in ("bias", "weight_g", "weight_v")})
        torch.testing.assert_close(oracle.weight(sd, name), layer.weight.detach(), atol=1e-7, rtol=0)  # 1.1e-8
    # the oracle reads hift.pt as saved (`generator.` prefix) and the parametrizations key form alike
    renamed = {}
    for k, v in sd.items():
        layer, leaf = k.rsplit(".", 1)
        renamed[f"generator.{layer}.{new_names.get(leaf, leaf)}"] = v
    mel, s = random_mel(1, 5), 0.1 * torch.randn(1, 1, 5 * 480, generator=torch.Generator().manual_seed(0))
    assert torch.equal(oracle.decode(oracle.official_state_dict(renamed), CFG, mel, s), oracle.decode(sd, CFG, mel, s))


def test_f0_predictor_matches_oracle():
    h = _wide_f0_hift()
    mel = random_mel(2, 15)
    # measured max |Δf0| 7.6e-5 Hz on f0 of 0-300 Hz (folded-weight rounding, amplified ×4000 by the classifier)
    torch.testing.assert_close(h.f0_predictor(mel), oracle.f0_predictor(h.state_dict(), mel), atol=2e-4, rtol=0)


def test_source_module_matches_oracle():
    h = random_hift()
    sd = h.state_dict()
    f0 = _f0_contour()
    f0_up = F.interpolate(f0[:, None], scale_factor=480.0, mode="nearest")  # (2, 1, 12000), as HiFT.excite does
    torch.testing.assert_close(oracle.upsample_f0(f0, CFG), f0_up, atol=0, rtol=0)
    B, _, L = f0_up.shape
    H1 = CFG.nb_harmonics + 1

    torch.manual_seed(5)  # generator=None: both sides draw from the global RNG in upstream's order
    ours = h.m_source(f0_up)
    torch.manual_seed(5)
    want = oracle.source_module(sd, f0_up, CFG, *oracle.upstream_draws(B, H1, L))
    assert want.shape == (B, L, 1)
    torch.testing.assert_close(ours, want, atol=1e-7, rtol=0)  # measured max |Δ| 3.0e-8
    # an explicit generator gives the stream the global RNG gives after the same seed
    torch.testing.assert_close(h.m_source(f0_up, torch.Generator().manual_seed(5)), want, atol=1e-7, rtol=0)
    zeros = (torch.zeros(B, H1, 1), torch.zeros(B, H1, L))
    torch.testing.assert_close(h.m_source(f0_up, deterministic=True), oracle.source_module(sd, f0_up, CFG, *zeros),
                               atol=1e-7, rtol=0)  # measured max |Δ| 1.5e-8
    # the contour did exercise both branches: unvoiced samples are noise only, voiced ones carry the sines
    _, uv = oracle.sine_gen(f0_up, CFG, *zeros)
    assert 0 < uv.mean() < 1 and uv[0, 0, 10 * 480] == 0


@pytest.mark.parametrize("fold", [False, True])
@pytest.mark.parametrize("B,T", [(1, 12), (2, 7)])
def test_decode_matches_oracle(B, T, fold):
    h = random_hift()
    sd = h.state_dict()  # g / v as hift.pt stores them; folding only caches the effective weight
    if fold:
        h.fold_weight_norm()
    mel = random_mel(B, T, seed=T)
    f0_up = oracle.upsample_f0(_f0_contour()[:B, :T], CFG)
    L = f0_up.shape[-1]
    g = torch.Generator().manual_seed(0)
    draws = (torch.rand(B, 9, 1, generator=g) * 6 - 3, torch.randn(B, 9, L, generator=g))
    s = oracle.source_module(sd, f0_up, CFG, *draws).transpose(1, 2)  # (B, 1, 480·T)
    got, want = h.decode(mel, s), oracle.decode(sd, CFG, mel, s)
    assert got.shape == want.shape == (B, 480 * T)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)  # measured max |Δ| 1.3e-7
    # the source fusion matters at this scale of weights (measured 0.045), so a broken fusion cannot hide
    assert (oracle.decode(sd, CFG, mel, torch.zeros_like(s)) - want).abs().max() > 1e-2


@pytest.mark.parametrize("B,T", [(1, 12), (2, 7)])
def test_inference_matches_oracle(B, T):
    h, mel = random_hift(), random_mel(B, T, seed=T)
    sd = h.state_dict()
    torch.manual_seed(3)
    speech, s = h.inference(mel)
    torch.manual_seed(3)  # the oracle draws like upstream: phases on the CPU, noise, the unused noise branch
    want_speech, want_s = oracle.inference(sd, CFG, mel)
    assert speech.shape == want_speech.shape == (B, 480 * T)
    torch.testing.assert_close(s, want_s, atol=1e-7, rtol=0)  # measured max |Δ| 1.5e-8
    torch.testing.assert_close(speech, want_speech, atol=1e-6, rtol=0)  # measured max |Δ| 1.4e-7
    h.fold_weight_norm()  # same g / v in the state dict; now our convs use the cached folded weights
    got = h.inference(mel, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(got[1], want_s, atol=1e-7, rtol=0)  # measured max |Δ| 1.5e-8
    torch.testing.assert_close(got[0], want_speech, atol=1e-6, rtol=0)  # measured max |Δ| 1.4e-7
    zeros = (torch.zeros(B, 9, 1), torch.zeros(B, 9, 480 * T))
    torch.testing.assert_close(h.inference(mel, deterministic=True)[0],
                               oracle.inference(sd, CFG, mel, draws=zeros)[0], atol=1e-6, rtol=0)  # measured 1.0e-7


@pytest.mark.parametrize("B,T", [(1, 12), (2, 7)])
def test_inference_with_swinging_f0_matches_oracle(B, T):
    h, mel = _wide_f0_hift(), random_mel(B, T, seed=T - 6)
    sd = h.state_dict()
    f0 = oracle.f0_predictor(sd, mel)
    assert (f0 <= CFG.nsf_voiced_threshold).any() and (f0 > 100).any()  # voiced and unvoiced frames both occur
    torch.manual_seed(3)
    speech, s = h.inference(mel)
    torch.manual_seed(3)
    want_speech, want_s = oracle.inference(sd, CFG, mel)
    torch.testing.assert_close(s, want_s, atol=5e-5, rtol=0)  # measured max |Δ| 9.9e-6 (f0 ulps, integrated)
    torch.testing.assert_close(speech, want_speech, atol=5e-5, rtol=0)  # measured max |Δ| 3.1e-6


def test_inference_with_cache_source_matches_oracle():
    """Two streaming chunks as token2wav runs them: chunk 2 re-reads chunk 1's last 8 mel frames and overwrites
    the head of its source with chunk 1's last 8·480 source samples."""
    h = random_hift()
    sd = h.state_dict()
    mel1, new = random_mel(1, 20, seed=1), random_mel(1, 7, seed=2)
    torch.manual_seed(0)
    _, s1 = h.inference(mel1)
    torch.manual_seed(0)
    _, want_s1 = oracle.inference(sd, CFG, mel1)
    torch.testing.assert_close(s1, want_s1, atol=1e-7, rtol=0)
    cache, mel2 = s1[:, :, -8 * 480:], torch.cat([mel1[:, :, -8:], new], dim=2)  # (1, 1, 3840), (1, 80, 15)
    torch.manual_seed(1)
    speech, s = h.inference(mel2, cache)
    torch.manual_seed(1)
    want_speech, want_s = oracle.inference(sd, CFG, mel2, cache_source=cache)
    assert torch.equal(want_s[:, :, :3840], cache) and speech.shape == (1, 15 * 480)
    torch.testing.assert_close(s, want_s, atol=1e-7, rtol=0)  # measured: equal
    torch.testing.assert_close(speech, want_speech, atol=1e-6, rtol=0)  # measured max |Δ| 9.7e-8
    # the cache did change the output (measured 0.036), else this would only re-test plain inference
    torch.manual_seed(1)
    assert (oracle.inference(sd, CFG, mel2)[0] - want_speech).abs().max() > 1e-3
