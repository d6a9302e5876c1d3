"""CosyVoice2 flow: official key layout, each block against its formula, and streaming == recompute."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omni2.engine.config import FlowConfig, FlowEncoderConfig, FlowEstimatorConfig
from omni2.stages.flow import Flow, kv_bytes_per_second, make_noise, solve_euler, state_bytes_bound
from omni2.stages.flow_cache import ConvCache, Span, chunk_mask
from omni2.stages.flow_encoder import PreLookahead, RelPosAttention, Upsample1D
from omni2.stages.flow_estimator import Attention, CausalConv1d, SinusoidalPosEmb

CE, CD = 4, 8  # small chunks (tokens / frames) so a 40-token reply spans many of them


def small_cfg(enc_chunk: int = CE, est_chunk: int = CD) -> FlowConfig:
    return FlowConfig(
        vocab_size=100,
        encoder=FlowEncoderConfig(num_blocks=1, num_up_blocks=2, linear_units=256, attention_heads=2,
                                  static_chunk_size=enc_chunk),
        estimator=FlowEstimatorConfig(channels=(64,), n_blocks=1, num_mid_blocks=1, num_heads=2, attention_head_dim=32,
                                      static_chunk_size=est_chunk))


def randomize(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights with non-trivial norm scales/shifts; fan-in scaled so activations stay O(1)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and name.endswith("weight"):
                p.copy_(1 + 0.2 * r)
            elif p.dim() == 1:
                p.copy_(0.1 * r)
            else:
                p.copy_(r / max(1, p[0].numel()) ** 0.5)
    return module.eval().requires_grad_(False)


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def flow() -> Flow:
    return randomize(Flow(small_cfg()))


# --------------------------------------------------------------------------------------------- official layout
def official_flow_keys(cfg: FlowConfig) -> list[tuple[str, tuple[int, ...]]]:
    """flow.pt key -> shape in state_dict order, from the vendored cosyvoice/Matcha/diffusers constructors: a
    module's own parameters precede its children; CausalResnetBlock1D re-assigns block1/2 after `mlp`; the
    encoder registers after_norm before the pre-lookahead layer; one estimator level, so its "downsample" and
    "upsample" are CausalConv1d(C, C, 3) and the up block reads 2C channels."""
    e, d = cfg.encoder, cfg.estimator
    D, FF, H = e.output_size, e.linear_units, e.attention_heads
    lin = lambda p, o, i, bias=True: [(f"{p}.weight", (o, i))] + ([(f"{p}.bias", (o,))] if bias else [])  # noqa
    norm = lambda p, n: [(f"{p}.weight", (n,)), (f"{p}.bias", (n,))]  # noqa
    conv = lambda p, o, i, k: [(f"{p}.weight", (o, i, k)), (f"{p}.bias", (o,))]  # noqa

    def conformer(p):
        a = f"{p}.self_attn"
        return ([(f"{a}.pos_bias_u", (H, D // H)), (f"{a}.pos_bias_v", (H, D // H))]
                + lin(f"{a}.linear_q", D, D) + lin(f"{a}.linear_k", D, D) + lin(f"{a}.linear_v", D, D)
                + lin(f"{a}.linear_out", D, D) + lin(f"{a}.linear_pos", D, D, bias=False)
                + lin(f"{p}.feed_forward.w_1", FF, D) + lin(f"{p}.feed_forward.w_2", D, FF)
                + norm(f"{p}.norm_ff", D) + norm(f"{p}.norm_mha", D))

    keys = [("input_embedding.weight", (cfg.vocab_size, cfg.input_size))]
    keys += lin("spk_embed_affine_layer", cfg.output_size, cfg.spk_embed_dim)
    keys += lin("encoder.embed.out.0", D, cfg.input_size) + norm("encoder.embed.out.1", D)
    keys += norm("encoder.after_norm", D)
    keys += conv("encoder.pre_lookahead_layer.conv1", D, D, cfg.pre_lookahead_len + 1)
    keys += conv("encoder.pre_lookahead_layer.conv2", D, D, 3)
    for i in range(e.num_blocks):
        keys += conformer(f"encoder.encoders.{i}")
    keys += conv("encoder.up_layer.conv", D, D, 2 * cfg.token_mel_ratio + 1)
    keys += lin("encoder.up_embed.out.0", D, cfg.input_size) + norm("encoder.up_embed.out.1", D)
    for i in range(e.num_up_blocks):
        keys += conformer(f"encoder.up_encoders.{i}")
    keys += lin("encoder_proj", cfg.output_size, D)

    C, TE, inner, p = d.channels[0], 4 * d.channels[0], d.num_heads * d.attention_head_dim, "decoder.estimator"

    def resnet(q, cin):
        return (lin(f"{q}.mlp.1", C, TE) + conv(f"{q}.block1.block.0", C, cin, 3) + norm(f"{q}.block1.block.2", C)
                + conv(f"{q}.block2.block.0", C, C, 3) + norm(f"{q}.block2.block.2", C)
                + conv(f"{q}.res_conv", C, cin, 1))

    def transformers(q):
        return [kv for j in range(d.n_blocks) for kv in (
            norm(f"{q}.{j}.norm1", C) + lin(f"{q}.{j}.attn1.to_q", inner, C, bias=False)
            + lin(f"{q}.{j}.attn1.to_k", inner, C, bias=False) + lin(f"{q}.{j}.attn1.to_v", inner, C, bias=False)
            + lin(f"{q}.{j}.attn1.to_out.0", C, inner) + norm(f"{q}.{j}.norm3", C)
            + lin(f"{q}.{j}.ff.net.0.proj", 4 * C, C) + lin(f"{q}.{j}.ff.net.2", C, 4 * C))]

    keys += lin(f"{p}.time_mlp.linear_1", TE, d.in_channels) + lin(f"{p}.time_mlp.linear_2", TE, TE)
    keys += resnet(f"{p}.down_blocks.0.0", d.in_channels) + transformers(f"{p}.down_blocks.0.1")
    keys += conv(f"{p}.down_blocks.0.2", C, C, 3)
    for k in range(d.num_mid_blocks):
        keys += resnet(f"{p}.mid_blocks.{k}.0", C) + transformers(f"{p}.mid_blocks.{k}.1")
    keys += resnet(f"{p}.up_blocks.0.0", 2 * C) + transformers(f"{p}.up_blocks.0.1")
    keys += conv(f"{p}.up_blocks.0.2", C, C, 3)
    keys += conv(f"{p}.final_block.block.0", C, C, 3) + norm(f"{p}.final_block.block.2", C)
    keys += conv(f"{p}.final_proj", d.out_channels, C, 1)
    return keys


@pytest.mark.parametrize("cfg", [FlowConfig(), small_cfg()], ids=["default", "small"])
def test_state_dict_is_official_layout(cfg):
    with torch.device("meta"):
        flow = Flow(cfg)
    got = [(k, tuple(v.shape)) for k, v in flow.state_dict().items()]
    assert got == official_flow_keys(cfg)
    if cfg == FlowConfig():
        assert len(got) == 1121


def test_noise_is_seeded_randn():
    cfg = small_cfg()
    state = torch.get_rng_state()
    torch.manual_seed(cfg.cfm.noise_seed)
    want = torch.randn([1, cfg.output_size, cfg.cfm.noise_frames])
    torch.set_rng_state(state)
    assert torch.equal(make_noise(cfg), want)


# --------------------------------------------------------------------------------------------- blocks vs formulas
@pytest.mark.parametrize("size,chunk,left", [(13, 4, None), (13, 4, 1), (7, 3, 0), (5, 8, None)])
def test_chunk_mask_rule(size, chunk, left):
    want = torch.zeros(size, size, dtype=torch.bool)  # cosyvoice utils/mask.py subsequent_chunk_mask
    for i in range(size):
        start = 0 if left is None else max((i // chunk - left) * chunk, 0)
        want[i, start:min((i // chunk + 1) * chunk, size)] = True
    pos = torch.arange(size)
    assert torch.equal(chunk_mask(pos, pos, chunk, size, left), want)


def espnet_rel_attention(att: RelPosAttention, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """The official forward on a whole sequence: table of distances T-1 .. -(T-1), Transformer-XL rel_shift."""
    B, T, D = x.shape
    h, dk = att.h, att.d_k
    pos = torch.arange(T, dtype=torch.float32)[:, None]
    w = torch.exp(torch.arange(0, D, 2, dtype=torch.float32) * -(math.log(10000.0) / D))
    pe_pos, pe_neg = torch.zeros(T, D), torch.zeros(T, D)
    pe_pos[:, 0::2], pe_pos[:, 1::2] = torch.sin(pos * w), torch.cos(pos * w)
    pe_neg[:, 0::2], pe_neg[:, 1::2] = torch.sin(-1 * pos * w), torch.cos(-1 * pos * w)
    pe = torch.cat([torch.flip(pe_pos, [0]), pe_neg[1:]])[None]  # (1, 2T-1, D)
    q = att.linear_q(x).view(B, T, h, dk)
    k = att.linear_k(x).view(B, T, h, dk).transpose(1, 2)
    v = att.linear_v(x).view(B, T, h, dk).transpose(1, 2)
    p = att.linear_pos(pe).view(1, -1, h, dk).transpose(1, 2)
    ac = (q + att.pos_bias_u).transpose(1, 2) @ k.transpose(-2, -1)
    bd = (q + att.pos_bias_v).transpose(1, 2) @ p.transpose(-2, -1)  # (B, h, T, 2T-1)
    padded = torch.cat([bd.new_zeros(B, h, T, 1), bd], dim=-1).view(B, h, 2 * T, T)
    bd = padded[:, :, 1:].reshape(B, h, T, 2 * T - 1)[:, :, :, :T]  # rel_shift
    # ... which is exactly "column = distance i - j":
    for i in range(T):
        for j in range(T):
            d = i - j
            want = ((q[0, i] + att.pos_bias_v) * p[0, :, T - 1 - d].reshape(h, dk)).sum(-1)
            torch.testing.assert_close(bd[0, :, i, j], want, rtol=1e-5, atol=1e-5)
    scores = (ac + bd) / math.sqrt(dk)
    allowed = torch.zeros(T, T, dtype=torch.bool)
    for i in range(T):
        allowed[i, :min((i // chunk + 1) * chunk, T)] = True
    scores = scores.masked_fill(~allowed, -float("inf"))
    out = torch.softmax(scores, -1) @ v
    return att.linear_out(out.transpose(1, 2).reshape(B, T, D))


def test_rel_pos_attention_matches_official_and_streams():
    T, chunk = 11, 4
    att = randomize(RelPosAttention(16, 2), seed=1)
    x = torch.randn(1, T, 16, generator=torch.Generator().manual_seed(2))
    want = espnet_rel_attention(att, x, chunk)
    torch.testing.assert_close(att(x, Span(0, T, chunk)), want, rtol=1e-5, atol=1e-5)
    # Streamed: chunk-aligned commits, queries of the open span against cached keys.
    caches = [att.new_cache()]
    att.slot = 0
    out = att(x[:, :6], Span(0, 6, chunk, commit=4, caches=caches))  # positions 4, 5 are open
    torch.testing.assert_close(out[:, :4], want[:, :4], rtol=1e-5, atol=1e-5)
    out = att(x[:, 4:], Span(4, T - 4, chunk, commit=4, caches=caches))
    torch.testing.assert_close(out, want[:, 4:], rtol=1e-5, atol=1e-5)


def test_estimator_attention_matches_additive_bias_form():
    T, chunk = 10, 4
    att = randomize(Attention(12, 2, 8), seed=3)
    x = torch.randn(2, T, 12, generator=torch.Generator().manual_seed(4))
    q, k, v = (m(x).view(2, T, 2, 8).transpose(1, 2) for m in (att.to_q, att.to_k, att.to_v))
    allowed = chunk_mask(torch.arange(T), torch.arange(T), chunk, T)
    bias = (1.0 - allowed.float()) * torch.finfo(torch.float32).min  # cosyvoice mask_to_bias
    p = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(8) + bias, dim=-1)
    want = att.to_out[0]((p @ v).transpose(1, 2).reshape(2, T, 16))
    torch.testing.assert_close(att(x, Span(0, T, chunk)), want, rtol=1e-5, atol=1e-5)


def test_sinusoidal_pos_emb():
    t = torch.tensor([0.0, 0.3, 1.0])
    half = 160
    freq = torch.tensor([math.exp(-math.log(10000) * k / (half - 1)) for k in range(half)])
    arg = 1000 * t[:, None] * freq[None]
    torch.testing.assert_close(SinusoidalPosEmb(320)(t), torch.cat([arg.sin(), arg.cos()], -1), rtol=1e-5, atol=1e-4)


def conv_at(w: torch.Tensor, b: torch.Tensor, x: torch.Tensor, t0: int) -> torch.Tensor:
    """One output column: b + sum_m w[:, :, m] @ x[:, t0 + m], x zero outside [0, T)."""
    out = b.clone()
    for m in range(w.shape[2]):
        if 0 <= t0 + m < x.shape[1]:
            out += w[:, :, m] @ x[:, t0 + m]
    return out


def test_causal_conv1d_and_its_stream():
    conv = randomize(CausalConv1d(3, 5, 3), seed=5)
    x = torch.randn(1, 3, 9, generator=torch.Generator().manual_seed(6))
    want = torch.stack([conv_at(conv.weight, conv.bias, x[0], t - 2) for t in range(9)], -1)[None]
    torch.testing.assert_close(conv(x), want, rtol=1e-5, atol=1e-5)
    conv.slot, caches = 0, [ConvCache()]
    a = conv(x[..., :5], Span(0, 5, 4, commit=4, caches=caches))  # position 4 open, recomputed next call
    b = conv(x[..., 4:], Span(4, 5, 4, commit=0, caches=caches))
    torch.testing.assert_close(torch.cat([a[..., :4], b], -1), want, rtol=1e-5, atol=1e-5)


def test_pre_lookahead():
    layer = randomize(PreLookahead(6, 3), seed=7)
    x = torch.randn(1, 8, 6, generator=torch.Generator().manual_seed(8))
    xt = x[0].T  # (C, T)
    h = torch.stack([F.leaky_relu(conv_at(layer.conv1.weight, layer.conv1.bias, xt, t)) for t in range(8)], -1)
    want = torch.stack([conv_at(layer.conv2.weight, layer.conv2.bias, h, t - 2) for t in range(8)], 0) + x[0]
    torch.testing.assert_close(layer(x, Span(0, 8, 4))[0], want, rtol=1e-5, atol=1e-5)


def test_upsample1d():
    up = randomize(Upsample1D(4, 2), seed=9)
    x = torch.randn(1, 4, 5, generator=torch.Generator().manual_seed(10))
    rep = torch.stack([x[0, :, g // 2] for g in range(10)], -1)  # nearest x2
    want = torch.stack([conv_at(up.conv.weight, up.conv.bias, rep, f - 4) for f in range(10)], -1)
    torch.testing.assert_close(up(x, Span(0, 10, 8))[0], want, rtol=1e-5, atol=1e-5)


def test_speaker_projection(flow):
    e = torch.randn(192, generator=torch.Generator().manual_seed(11))
    want = flow.spk_embed_affine_layer.weight @ (e / e.norm()) + flow.spk_embed_affine_layer.bias
    torch.testing.assert_close(flow.speaker(e), want, rtol=1e-5, atol=1e-5)


def test_euler_cfg_solver(flow):
    """Reference loop around the estimator as a black box: CFG batch [cond; uncond], v = 1.7 v0 - 0.7 v1."""
    cfg, est = flow.cfg, flow.decoder.estimator
    g = torch.Generator().manual_seed(12)
    z, mu, spks = torch.randn(80, 13, generator=g), torch.randn(80, 13, generator=g), torch.randn(80, generator=g)
    span = Span(0, 13, CD)
    n = cfg.cfm.n_timesteps
    t_span = [1 - math.cos(s / n * math.pi / 2) for s in range(n + 1)]
    x = z.clone()
    for s in range(n):
        t = torch.full((2,), t_span[s])
        v = est(torch.stack([x, x]), torch.stack([mu, 0 * mu]), t, torch.stack([spks, 0 * spks]),
                torch.zeros(2, 80, 13), span)
        x = x + (t_span[s + 1] - t_span[s]) * (1.7 * v[0] - 0.7 * v[1])
    got = solve_euler(est, cfg.cfm, z, mu, spks, torch.zeros_like(mu), [span] * n)
    torch.testing.assert_close(got, x, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------------------------- streaming
T_REPLY = 40


def replies(cfg: FlowConfig):
    g = torch.Generator().manual_seed(13)
    return torch.randint(0, cfg.vocab_size, (T_REPLY,), generator=g), torch.randn(192, generator=g)


def cosy2_decoder_schedule(T: int, hop: int, look: int = 3) -> list[tuple[int, bool]]:
    """run_cosy2_decoder.py --stream: calls on tokens[:offset + hop + look] while enough, then one final call."""
    calls, offset = [], 0
    while T - offset >= hop + look:
        calls.append((offset + hop + look, False))
        offset += hop
    return calls + [(T, True)]


def bursts(T: int, sizes: list[int]) -> list[tuple[int, bool]]:
    """Gradio path: units arrive in bursts; every call but the last is non-final."""
    calls, n, i = [], 0, 0
    while n < T:
        n = min(T, n + sizes[i % len(sizes)])
        calls.append((n, n == T))
        i += 1
    return calls


SCHEDULES = {
    "cosy2_decoder": cosy2_decoder_schedule(T_REPLY, hop=CE),
    "gradio_10": bursts(T_REPLY, [10]),
    "odd_1_7_13": bursts(T_REPLY, [1, 7, 13]),
    "finalize_at_once": [(T_REPLY, True)],
}


def run_stream(flow: Flow, tokens, spk, noise, calls, left_chunks=None, recompute=True):
    """Returns the stream and per call (stream frames, recompute frames for the same call or None)."""
    stream = flow.new_stream(spk, noise, left_chunks)
    out, have = [], 0
    for n, finalize in calls:
        stream.push(tokens[have:n])
        have, start = n, stream.emitted
        mel = stream.mel(finalize)
        ref = flow.inference(tokens[:n], spk, noise, finalize, left_chunks=left_chunks) if recompute else None
        out.append((mel, None if ref is None else ref[:, start:]))
    return stream, out


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_stream_equals_recompute(flow, name):
    tokens, spk = replies(flow.cfg)
    noise = make_noise(flow.cfg)
    stream, calls = run_stream(flow, tokens, spk, noise, SCHEDULES[name])
    for mel, ref in calls:
        assert mel.shape == ref.shape
    got, want = torch.cat([c[0] for c in calls], 1), torch.cat([c[1] for c in calls], 1)
    assert got.shape == (80, 2 * T_REPLY)
    assert (got - want).abs().max().item() < 1e-4, (got - want).abs().max().item()
    assert stream.cache_bytes() == 0  # freed at finalize


def test_stream_step_batches_sessions(flow):
    """Eight sessions advanced together by stream_step, each at its own point of its reply (different starts and
    burst sizes, some windowed, some idle in a step) give what each gives alone, to fp32 rounding: the batch runs
    their open spans right-padded in one encoder and one estimator pass (measured max 4.3e-6)."""
    noise = make_noise(flow.cfg)
    tokens, spk = replies(flow.cfg)
    rng = np.random.default_rng(0)
    toks = [tokens.roll(3 * i) for i in range(8)]
    spks = [spk * (1 + 0.1 * i) for i in range(8)]
    lefts = [None, 2, None, None, 1, None, 2, None]
    calls = [[None] * (i % 4) + bursts(T_REPLY, rng.choice([1, 5, 10, 13], size=4).tolist()) for i in range(8)]

    def drive(together: bool) -> list[torch.Tensor]:
        streams = [flow.new_stream(spks[i], noise, lefts[i]) for i in range(8)]
        have, out = [0] * 8, [[] for _ in range(8)]
        for r in range(max(len(c) for c in calls)):
            now = [(i, calls[i][r]) for i in range(8) if r < len(calls[i]) and calls[i][r] is not None]
            for i, (n, _) in now:
                streams[i].push(toks[i][have[i]:n])
                have[i] = n
            group = [streams[i] for i, _ in now]
            fin = [f for _, (_, f) in now]
            mels = flow.stream_step(group, fin) if together else [flow.stream_step([s], [f])[0]
                                                                 for s, f in zip(group, fin)]
            for (i, _), mel in zip(now, mels):
                out[i].append(mel)
        return [torch.cat(o, 1) for o in out]

    for a, b in zip(drive(True), drive(False)):
        assert a.shape == b.shape == (80, 2 * T_REPLY)
        assert (a - b).abs().max().item() < 2e-5


@pytest.mark.parametrize("name", ["gradio_10", "odd_1_7_13"])
def test_stream_work_per_call_is_bounded(flow, name):
    """Structural cost: each call runs the estimator on at most one chunk of old frames plus its new frames, and
    the encoder on at most one chunk + lookahead of old tokens plus its new tokens (never the whole prefix)."""
    tokens, spk = replies(flow.cfg)
    stream = flow.new_stream(spk, make_noise(flow.cfg))
    have, look = 0, flow.cfg.pre_lookahead_len
    for n, finalize in SCHEDULES[name]:
        stream.push(tokens[have:n])
        new_tokens, have = n - have, n
        mel = stream.mel(finalize)
        assert stream.frames_estimated <= CD + mel.shape[1]
        if mel.shape[1]:
            assert stream.tokens_encoded <= CE + look + new_tokens


def test_windowed_stream(flow):
    """left_chunks=k: equal to a recompute with every attention limited to k left chunks; its difference from
    the exact flow is measured (documented in docs/ARCHITECTURE.md); its cache stays flat as the reply grows."""
    cfg = flow.cfg
    tokens, spk = replies(cfg)
    noise = make_noise(cfg)
    calls = SCHEDULES["gradio_10"]
    _, win = run_stream(flow, tokens, spk, noise, calls, left_chunks=2)
    got = torch.cat([c[0] for c in win], 1)
    assert (got - torch.cat([c[1] for c in win], 1)).abs().max().item() < 1e-4
    _, ex = run_stream(flow, tokens, spk, noise, calls, recompute=False)  # exact stream == recompute: tested above
    exact = torch.cat([c[0] for c in ex], 1)
    # Frames whose every attention fits in the window are exact; later ones differ. Measured with these random
    # weights: max 0.80, rms 0.134 (output max 4.8, rms 1.33) -- see docs/ARCHITECTURE.md.
    diff = (got - exact).abs()
    exact_frames = (2 + 1) * CD
    assert diff[:, :exact_frames].max().item() < 1e-4
    assert 0.05 < diff.pow(2).mean().sqrt().item() < 0.2
    assert diff.max().item() < 1.0

    long = torch.randint(0, cfg.vocab_size, (96,), generator=torch.Generator().manual_seed(14))
    sizes = {}
    for left in (1, None):
        stream = flow.new_stream(spk, noise, left_chunks=left)
        sizes[left] = []
        for i in range(0, 96, 4):
            stream.push(long[i:i + 4])
            stream.mel(False)
            sizes[left].append(stream.cache_bytes())
    assert max(sizes[1][4:]) == sizes[1][4]  # flat once the window is full
    assert sizes[None][-1] > 3 * sizes[None][4]  # the exact stream keeps growing


@pytest.mark.parametrize("write", [3, 10])
@pytest.mark.parametrize("left", [1, 2, None])
def test_stream_memory_stays_within_the_admission_bound(flow, left, write):
    """Over a long reply voiced in writes of `write` units (10: each call adds more than a chunk of 4), the K/V
    bytes a stream allocates never pass state_bytes_bound, the figure admission charges a session: a window holds
    its chunks plus one call's open positions and no growth slack past them, and stays flat once full."""
    cfg = flow.cfg
    _, spk = replies(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (120,), generator=torch.Generator().manual_seed(15))
    noise = make_noise(cfg)
    stream = flow.new_stream(spk, noise, left_chunks=left)
    sizes = []
    for n in range(write, 121, write):
        stream.push(tokens[n - write:n])
        stream.mel(False)
        kv = stream.kv_allocated()
        assert kv <= state_bytes_bound(cfg, n, left, False, call_units=write), (n, kv)
        sizes.append(kv)
    assert sizes[-1] > 0
    if left is not None:
        assert sizes[-1] == max(sizes) == sizes[len(sizes) // 2]  # flat once the window is full
    else:
        assert sizes[-1] > 5 * sizes[1]


def test_kv_bytes_per_second_formula(flow):
    cfg = flow.cfg
    tokens, spk = replies(cfg)
    stream = flow.new_stream(spk, make_noise(cfg))
    stream.push(tokens)
    stream.mel(False)
    assert stream.enc_done > 0 and stream.est_done == 2 * stream.enc_done
    per_token = kv_bytes_per_second(cfg) / cfg.input_frame_rate
    assert stream.kv_bytes() == per_token * stream.enc_done
    assert kv_bytes_per_second(FlowConfig()) == pytest.approx(230.8e6, rel=1e-3)


@pytest.mark.parametrize("n_tokens,finalize", [(19, True), (19, False), (40, True)])
def test_inference_equals_the_composed_oracles(flow, n_tokens, finalize):
    """Flow.inference (token2mel, the official recompute) against a composition of the independent transcriptions:
    CausalMaskedDiffWithXvec.inference = embedding + UpsampleConformerEncoder + encoder_proj (oracle_flow_encoder),
    the normalised x-vector through spk_embed_affine_layer, then CausalConditionalCFM (oracle_flow_estimator), on the
    same weights, tokens, x-vector and fixed noise."""
    from . import oracle_flow_encoder, oracle_flow_estimator

    cfg, sd = flow.cfg, flow.state_dict()
    g = torch.Generator().manual_seed(n_tokens)
    tokens, xvec = torch.randint(0, cfg.vocab_size, (n_tokens,), generator=g), torch.randn(192, generator=g)
    noise = make_noise(cfg)
    got = flow.inference(tokens, xvec, noise, finalize)  # (80, L)
    mu = oracle_flow_encoder.flow_encode(sd, tokens[None], cfg, finalize).transpose(1, 2)  # (1, 80, L)
    spks = F.linear(F.normalize(xvec[None], dim=1), sd["spk_embed_affine_layer.weight"],
                    sd["spk_embed_affine_layer.bias"])  # (1, 80)
    estimator = lambda *a: oracle_flow_estimator.estimator_forward(sd, cfg.estimator, *a)  # noqa: E731
    want = oracle_flow_estimator.cfm_inference(estimator, noise, mu, torch.ones(1, 1, mu.shape[2]), cfg.cfm.n_timesteps,
                                               spks, torch.zeros_like(mu), cfg.cfm.t_scheduler,
                                               cfg.cfm.inference_cfg_rate, cfg.cfm.temperature)[0]
    assert got.shape == want.shape == (80, 2 * n_tokens - (0 if finalize else 2 * cfg.pre_lookahead_len))
    err = (got - want).abs().max().item()
    assert err < 1e-5, err  # measured 1.4e-6 (mel values up to 4.8)
