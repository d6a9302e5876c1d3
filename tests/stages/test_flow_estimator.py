"""CosyVoice2 CFM estimator and Euler/CFG solver against the independent oracle (oracle_flow_estimator.py).

Our modules are built with small random configs, and the oracle runs on their state_dict() under the official
flow.pt names, on the same inputs, in fp32 on CPU. Tolerances are tight (rounding only); each comparison states the
max error measured when it was written.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from omni2.engine.config import CFMConfig, FlowConfig, FlowEncoderConfig, FlowEstimatorConfig
from omni2.stages.flow import Flow, make_noise, solve_euler
from omni2.stages.flow_cache import Span
from omni2.stages.flow_estimator import FlowEstimator

from . import oracle_flow_estimator as oracle
from .test_flow import randomize

CHUNK = 8  # frames per attention chunk: 37 frames span 5 chunks, the last one partial
T_ODD = 37


def est_cfg(chunk: int = CHUNK) -> FlowEstimatorConfig:
    """Two blocks per stage and two mid blocks, so block order and indexing matter; 4 heads x 24 = 96 inner
    channels != 64 channels, as in CosyVoice2 (512 != 256), so q/k/v and to_out shapes cannot be confused."""
    return FlowEstimatorConfig(channels=(64,), n_blocks=2, num_mid_blocks=2, num_heads=4, attention_head_dim=24,
                               static_chunk_size=chunk)


def official(est: FlowEstimator) -> dict[str, torch.Tensor]:
    """Our estimator's weights under their flow.pt names."""
    return {oracle.ESTIMATOR + k: v for k, v in est.state_dict().items()}


def close(got: torch.Tensor, want: torch.Tensor, atol: float, rtol: float) -> None:
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


@pytest.fixture(scope="module")
def est() -> FlowEstimator:
    return randomize(FlowEstimator(est_cfg()), seed=1)


def inputs(B: int, T: int, seed: int) -> tuple[torch.Tensor, ...]:
    """x, mu, cond (B, 80, T), spks (B, 80), t (B,) in [0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x, mu, cond = (torch.randn(B, 80, T, generator=g) for _ in range(3))
    return x, mu, torch.rand(B, generator=g), torch.randn(B, 80, generator=g), cond


# --------------------------------------------------------------------------------------------- blocks
def test_timestep_embedding(est):
    """SinusoidalPosEmb(320) of 1000 t -> linear_1 -> SiLU -> linear_2, at the ends of [0, 1] and inside."""
    t = torch.tensor([0.0, 1e-3, 0.25, 0.5, 0.9, 1.0])
    got = est.time_mlp(est.time_embeddings(t))
    want = oracle.decoder_time(official(est), t, est_cfg().in_channels)
    assert got.shape == want.shape == (6, 4 * 64)
    close(got, want, atol=1e-6, rtol=1e-6)  # measured max |diff| 0 (same ops in the same order; outputs up to 2.1)


@pytest.mark.parametrize("where,cin", [("down_blocks.0.0", 320), ("mid_blocks.1.0", 64), ("up_blocks.0.0", 128)])
def test_causal_resnet_block(est, where, cin):
    """Both causal blocks (conv k3 left-padded, LayerNorm over channels, Mish), the Mish -> Linear time shift
    between them, and the 1x1 residual conv (which changes channels in the down and up blocks)."""
    g = torch.Generator().manual_seed(2)
    x, temb = torch.randn(2, cin, T_ODD, generator=g), torch.randn(2, 4 * 64, generator=g)
    block = est.get_submodule(where)
    got = block(x, temb, None)
    want = oracle.causal_resnet_block1d(official(est), oracle.ESTIMATOR + where, x, torch.ones(2, 1, T_ODD), temb)
    assert got.shape == want.shape == (2, 64, T_ODD)
    close(got, want, atol=1e-6, rtol=1e-6)  # measured max |diff| 0 in all three (outputs up to 5.7)
    # The time shift really reaches the output (a row-swapped temb changes it), so the check above covers it.
    assert (block(x, temb.flip(0), None) - got).abs().max() > 0.1


@pytest.mark.parametrize("T,chunk", [(T_ODD, CHUNK), (T_ODD, 100), (24, 8)], ids=["5-chunks", "1-chunk", "aligned"])
def test_basic_transformer_block_under_chunk_mask(T, chunk):
    """norm1 -> attention (bias-free q/k/v, 4 heads, inner 96) -> residual; norm3 -> GELU FFN x4 -> residual, with
    the official additive chunk bias: 5 chunks with a partial last one, one partial chunk (the real 100-frame chunk
    on a short input), and a chunk-aligned length."""
    est = randomize(FlowEstimator(est_cfg(chunk)), seed=3)
    where = "mid_blocks.0.1.1"
    x = torch.randn(2, T, 64, generator=torch.Generator().manual_seed(4))
    got = est.get_submodule(where)(x, Span(0, T, chunk))
    bias = oracle.chunk_attention_bias(torch.ones(2, 1, T), chunk, torch.float32)
    want = oracle.basic_transformer_block(official(est), oracle.ESTIMATOR + where, x, bias, est_cfg().num_heads)
    close(got, want, atol=1e-5, rtol=1e-5)  # measured max |diff| 9.5e-7 (outputs up to 5.8)
    if T > chunk:  # the mask matters: with full attention the first chunk's frames would see the future
        full = oracle.basic_transformer_block(official(est), oracle.ESTIMATOR + where, x, torch.zeros(2, T, T),
                                             est_cfg().num_heads)
        assert (full - want)[:, :chunk].abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- whole estimator
@pytest.mark.parametrize("T,chunk", [(T_ODD, CHUNK), (T_ODD, 100), (64, 16), (1, CHUNK)],
                         ids=["37-over-5-chunks", "37-in-1-chunk", "64-over-4-chunks", "1-frame"])
def test_estimator_forward(T, chunk):
    """The U-Net end to end: [x, mu, spks over time, cond] concatenation, time MLP, down resnet + transformers +
    causal conv, mid blocks, up resnet on [x, skip], final causal block and 1x1 projection."""
    cfg = est_cfg(chunk)
    est = randomize(FlowEstimator(cfg), seed=5)
    x, mu, t, spks, cond = inputs(2, T, seed=6)
    got = est(x, mu, t, spks, cond, Span(0, T, chunk))
    want = oracle.estimator_forward(official(est), cfg, x, torch.ones(2, 1, T), mu, t, spks, cond)
    assert got.shape == want.shape == (2, 80, T)
    assert want.abs().max() > 0.5  # not a degenerate near-zero output
    # measured max |diff| 2.4e-6, 1.7e-6, 1.9e-6, 0 in the order above (outputs up to 3.1)
    close(got, want, atol=1e-5, rtol=1e-5)


def test_estimator_is_causal_per_chunk(est):
    """The oracle's own structure: changing inputs in chunk 3 leaves chunks 0..2 untouched (masks and left padding
    are what make the flow streamable), and our estimator agrees on the perturbed input too."""
    x, mu, t, spks, cond = inputs(1, T_ODD, seed=7)
    run = functools.partial(oracle.estimator_forward, official(est), est_cfg())
    mask = torch.ones(1, 1, T_ODD)
    base = run(x, mask, mu, t, spks, cond)
    x2 = x.clone()
    x2[..., 3 * CHUNK + 2] += 1.0
    moved = run(x2, mask, mu, t, spks, cond)
    assert torch.equal(moved[..., :3 * CHUNK], base[..., :3 * CHUNK])
    assert (moved[..., 3 * CHUNK:] - base[..., 3 * CHUNK:]).abs().max() > 1e-3
    close(est(x2, mu, t, spks, cond, Span(0, T_ODD, CHUNK)), moved, atol=1e-5, rtol=1e-5)  # measured 1.9e-6


# --------------------------------------------------------------------------------------------- CFM solver
@pytest.mark.parametrize("t_scheduler,cfg_rate", [("cosine", 0.7), ("linear", 0.0)], ids=["cosine-cfg", "linear"])
def test_solve_euler_matches_oracle(est, t_scheduler, cfg_rate):
    """Our solve_euler with our estimator vs upstream solve_euler driving the ORACLE estimator, from the same noise:
    n_timesteps Euler steps over the t-schedule, CFG batch [cond; zeroed mu/spks/cond] mixed with the rate. (With
    rate 0 upstream runs a batch of 1; ours still runs the CFG batch and weighs the second row by 0.)"""
    cfm = dataclasses.replace(CFMConfig(), t_scheduler=t_scheduler, inference_cfg_rate=cfg_rate)
    z, mu, _, spks, cond = inputs(1, T_ODD, seed=8)
    got = solve_euler(est, cfm, z[0], mu[0], spks[0], cond[0], [Span(0, T_ODD, CHUNK)] * cfm.n_timesteps)
    estimator = functools.partial(oracle.estimator_forward, official(est), est_cfg())
    ts = oracle.t_span(cfm.n_timesteps, t_scheduler)
    want = oracle.solve_euler(estimator, z, ts, mu, torch.ones(1, 1, T_ODD), spks, cond, cfg_rate)[0]
    assert (want - z[0]).abs().max() > 1.0  # the ODE moved the noise
    # measured max |diff| 1.6e-6 (cosine-cfg), 1.2e-6 (linear), after 10 steps; mel up to 5.4
    close(got, want, atol=1e-5, rtol=1e-5)


def test_cosine_t_span():
    want = torch.tensor([1 - torch.cos(torch.tensor(s / 10 * torch.pi / 2)).item() for s in range(11)])
    close(oracle.t_span(10, "cosine"), want, atol=1e-6, rtol=0)  # measured 6e-8


@pytest.mark.parametrize("finalize", [True, False])
def test_flow_inference_runs_the_oracle_cfm(finalize):
    """Flow.inference's decoding step vs CausalConditionalCFM.forward on the same mu and spks: noise = the first L
    columns of the fixed draw, cond all zeros (LLaMA-Omni2's empty prompt), n_timesteps from the config, 0.7 CFG.
    mu and spks come from our encoder and speaker projection (checked elsewhere); only the CFM part is compared."""
    cfg = FlowConfig(vocab_size=100,
                     encoder=FlowEncoderConfig(num_blocks=1, num_up_blocks=1, linear_units=256, attention_heads=2,
                                               static_chunk_size=4),
                     estimator=est_cfg())
    flow = randomize(Flow(cfg), seed=9)
    g = torch.Generator().manual_seed(10)
    tokens, xvec = torch.randint(0, 100, (19,), generator=g), torch.randn(192, generator=g)
    noise = make_noise(cfg)
    got = flow.inference(tokens, xvec, noise, finalize)
    L = 2 * 19 if finalize else 2 * 19 - 6
    mu = flow.encode(tokens, *flow._spans(0, 19, 0, None, None))[None, :, :L]  # (1, 80, L)
    estimator = functools.partial(oracle.estimator_forward, official(flow.decoder.estimator), cfg.estimator)
    want = oracle.cfm_inference(estimator, noise, mu, torch.ones(1, 1, L), cfg.cfm.n_timesteps,
                                flow.speaker(xvec)[None], torch.zeros_like(mu), cfg.cfm.t_scheduler,
                                cfg.cfm.inference_cfg_rate, cfg.cfm.temperature)[0]
    assert got.shape == want.shape == (80, L)
    close(got, want, atol=1e-5, rtol=1e-5)  # measured max |diff| 1.1e-6 both ways (mel up to 5.0)
