"""The CosyVoice2 flow encoder (stages/flow_encoder.py, Flow.encode) against an independent oracle.

oracle_flow_encoder.py transcribes the upstream layers (whole sequence, official rel-pos table + rel_shift, official
chunk-mask loops) and shares no code with omni2.stages; each test builds our module with random weights, hands its
state_dict() to the oracle and compares, fp32 on CPU. test_flow.py checks streaming == recompute; this file checks
that the recompute is the upstream algorithm.

Tolerances: both sides run the same fp32 ops in different arrangements (by-distance gather vs rel_shift, per-row
masks, repeat_interleave vs interpolate), so they agree to rounding. Measured max |ours - oracle| with these seeds
(1 thread): 0 for the embedding, positional table, feed-forward, pre-lookahead and upsampling; <= 7.2e-7 for the
attention and <= 1.2e-6 for a conformer layer (outputs up to ~5.5); <= 1.2e-6 for the whole encode (outputs up to
~4.4). FP32 = atol 1e-5, rtol 1e-6 leaves ~8x over the worst of them.
"""
from __future__ import annotations

import pytest
import torch

from omni2.engine.config import FlowConfig, FlowEncoderConfig
from omni2.stages.flow import Flow
from omni2.stages.flow_cache import Span, chunk_mask
from omni2.stages.flow_encoder import (
    ConformerLayer,
    FeedForward,
    LinearEmbed,
    PreLookahead,
    RelPosAttention,
    Upsample1D,
    rel_pos_rows,
)
from tests.stages import oracle_flow_encoder as oracle
from tests.stages.test_flow import randomize, small_cfg

FP32 = {"atol": 1e-5, "rtol": 1e-6}
D, HEADS, FF, CHUNK = 512, 2, 256, 4  # small blocks; the production encoder shape is tested once at the end
LENGTHS = [1, 7, 23]  # 1: a single query (no rel_shift upstream); 7, 23: partial last chunk


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


def rand(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return scale * torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def full_mask(T: int) -> torch.Tensor:
    return torch.ones(1, 1, T, dtype=torch.bool)  # (B, 1, T): no padding


def oracle_chunk_mask(x: torch.Tensor, chunk: int, left_chunks: int = -1) -> torch.Tensor:
    return oracle.add_optional_chunk_mask(x, full_mask(x.shape[1]), False, chunk, left_chunks)  # (1, T, T)


# --------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("size,chunk,left", [(23, 4, None), (23, 4, 1), (7, 50, None), (114, 100, None)])
def test_chunk_mask_is_subsequent_chunk_mask(size, chunk, left):
    pos = torch.arange(size)
    want = oracle.subsequent_chunk_mask(size, chunk, -1 if left is None else left)
    assert torch.equal(chunk_mask(pos, pos, chunk, size, left), want)


# --------------------------------------------------------------------------------------------- input layer
@pytest.mark.parametrize("scale", [1.0, 1e-3], ids=["unit", "small"])
@pytest.mark.parametrize("T", LENGTHS)
def test_linear_embed_and_rel_pos_table(T, scale):
    """LinearNoSubsampling + EspnetRelPositionalEncoding. A small input leaves the Linear's output near its bias
    (variance ~1e-2), where a wrong LayerNorm eps would show."""
    embed = randomize(LinearEmbed(D, D), seed=1)
    x = rand(1, T, D, seed=2, scale=scale)
    want, pos_emb, _ = oracle.linear_no_subsampling(embed.state_dict(), "", x, full_mask(T))
    torch.testing.assert_close(embed(x), want, **FP32)  # measured max error 0 (outputs up to ~120)
    # Ours builds rows by distance (ascending) where attention needs them; upstream's table runs T-1 .. -(T-1).
    assert pos_emb.shape == (1, 2 * T - 1, D)
    torch.testing.assert_close(rel_pos_rows(-(T - 1), T, D).flip(0), pos_emb[0], **FP32)  # measured 0


# --------------------------------------------------------------------------------------------- one conformer layer
@pytest.mark.parametrize("T", LENGTHS)
def test_rel_pos_attention(T):
    att = randomize(RelPosAttention(D, HEADS), seed=3)
    x = rand(1, T, D, seed=4)
    _, pos_emb = oracle.espnet_rel_positional_encoding(x)
    want = oracle.rel_position_multi_headed_attention(att.state_dict(), "", x, x, x, oracle_chunk_mask(x, CHUNK),
                                                      pos_emb, HEADS)
    torch.testing.assert_close(att(x, Span(0, T, CHUNK)), want, **FP32)  # measured max error <= 7.2e-7


@pytest.mark.parametrize("T", LENGTHS)
def test_feed_forward(T):
    ff = randomize(FeedForward(D, FF), seed=5)
    x = rand(1, T, D, seed=6)
    want = oracle.positionwise_feed_forward(ff.state_dict(), "", x)
    torch.testing.assert_close(ff(x), want, **FP32)  # measured max error 0


@pytest.mark.parametrize("scale", [1.0, 1e-2], ids=["unit", "small"])
@pytest.mark.parametrize("T", LENGTHS)
def test_conformer_layer_under_chunk_mask(T, scale):
    """Rel-pos attention + FF, pre-norms, residuals, chunk mask of CHUNK. A small input makes the norms' eps (1e-12,
    not 1e-5) matter and the residual branch distinguishable from the block output."""
    layer = randomize(ConformerLayer(D, HEADS, FF), seed=7)
    x = rand(1, T, D, seed=8, scale=scale)
    _, pos_emb = oracle.espnet_rel_positional_encoding(x)
    mask = oracle_chunk_mask(x, CHUNK)
    want = oracle.conformer_encoder_layer(layer.state_dict(), "", x, mask, pos_emb, HEADS)
    torch.testing.assert_close(layer(x, Span(0, T, CHUNK)), want, **FP32)  # measured max error <= 1.2e-6
    if T > CHUNK:  # the mask is exercised: full attention would give something else
        unmasked = oracle.conformer_encoder_layer(layer.state_dict(), "", x, full_mask(T), pos_emb, HEADS)
        assert (unmasked - want).abs().max() > 1e-2


# --------------------------------------------------------------------------------------------- convolutions
@pytest.mark.parametrize("T", [1, 2, 7, 23])
def test_pre_lookahead(T):
    """Including the zero padding at the end: the last 3 tokens read zeros where future tokens would be."""
    layer = randomize(PreLookahead(D, 3), seed=9)
    x = rand(1, T + 3, D, seed=10)
    want = oracle.pre_lookahead_layer(layer.state_dict(), "", x[:, :T])
    torch.testing.assert_close(layer(x[:, :T], Span(0, T, CHUNK)), want, **FP32)  # measured max error 0
    # The zeros matter: with real tokens after them, the last outputs change and the others do not.
    longer = oracle.pre_lookahead_layer(layer.state_dict(), "", x)[:, :T]
    assert (longer[:, -1] - want[:, -1]).abs().max() > 1e-2
    torch.testing.assert_close(longer[:, :max(T - 3, 0)], want[:, :max(T - 3, 0)], **FP32)  # oracle vs itself: 2.2e-6


@pytest.mark.parametrize("T", LENGTHS)
def test_upsample1d(T):
    up = randomize(Upsample1D(D, 2), seed=11)
    x = rand(1, D, T, seed=12)  # (B, C, T)
    want, lengths = oracle.upsample_1d(up.state_dict(), "", x, torch.tensor([T]))
    assert want.shape == (1, D, 2 * T) and lengths.item() == 2 * T
    torch.testing.assert_close(up(x, Span(0, 2 * T, 2 * CHUNK)), want, **FP32)  # measured max error 0


# --------------------------------------------------------------------------------------------- whole encoder
def encode(flow: Flow, tokens: torch.Tensor, left_chunks: int | None = None) -> torch.Tensor:
    """Flow.encode over a whole sequence, the way Flow.inference calls it: (T,) -> mu (80, 2T)."""
    T, r, c = tokens.shape[0], flow.cfg.token_mel_ratio, flow.cfg.encoder.static_chunk_size
    return flow.encode(tokens, Span(0, T, c, left_chunks=left_chunks), Span(0, r * T, r * c, left_chunks=left_chunks))


@pytest.fixture(scope="module")
def flow() -> Flow:
    small = small_cfg()
    cfg = FlowConfig(vocab_size=small.vocab_size, estimator=small.estimator,
                     encoder=FlowEncoderConfig(num_blocks=2, num_up_blocks=2, linear_units=FF, attention_heads=HEADS,
                                               static_chunk_size=CHUNK))
    return randomize(Flow(cfg), seed=13)


@pytest.mark.parametrize("finalize", [True, False], ids=["final", "partial"])
@pytest.mark.parametrize("T", [7, 12, 23])
def test_flow_encode(flow, T, finalize):
    """tokens -> input_embedding -> encoder -> encoder_proj; 12 is a whole number of chunks, 7 and 23 are not.
    Not finalized, upstream drops the last lookahead * ratio frames (Flow.inference slices mu the same way)."""
    tokens = torch.randint(0, flow.cfg.vocab_size, (T,), generator=torch.Generator().manual_seed(T))
    tokens[T // 2] = -1  # upstream clamps ids at 0 before the embedding
    want = oracle.flow_encode(flow.state_dict(), tokens[None], flow.cfg, finalize)[0].T  # (80, L)
    got = encode(flow, tokens)
    L = want.shape[1]
    assert L == (2 * T if finalize else 2 * T - 6) and got.shape == (80, 2 * T)
    torch.testing.assert_close(got[:, :L], want, **FP32)  # measured max error <= 1.2e-6


def test_flow_encode_left_chunks(flow):
    """Flow.inference(left_chunks=k) is upstream's num_decoding_left_chunks=k on both chunk masks."""
    tokens = torch.randint(0, flow.cfg.vocab_size, (23,), generator=torch.Generator().manual_seed(14))
    want = oracle.flow_encode(flow.state_dict(), tokens[None], flow.cfg, num_decoding_left_chunks=1)[0].T
    torch.testing.assert_close(encode(flow, tokens, left_chunks=1), want, **FP32)  # measured max error 8.3e-7


def test_after_norm(flow):
    """The encoder's final LayerNorm on a small-variance input: in the whole encoder its input carries the x sqrt(D)
    scale (variance ~1e2..1e3), where eps 1e-5 vs 1e-12 is below fp32 rounding, so only this test sees it."""
    x = rand(1, 7, D, seed=17, scale=1e-3)
    want = oracle.after_norm(flow.encoder.state_dict(), "", x)
    torch.testing.assert_close(flow.encoder.after_norm(x), want, **FP32)  # measured max error 0


def test_flow_encode_production_shape():
    """The released encoder's shape: 6 + 4 layers, 8 heads, FFN 2048, chunk 50 tokens / 100 frames (LLaMA-Omni2's
    override). 57 tokens: one whole chunk and a partial one, in both halves of the encoder."""
    cfg = FlowConfig(vocab_size=300, estimator=small_cfg().estimator)
    assert cfg.encoder.static_chunk_size == 2 * cfg.input_frame_rate == 50
    flow = randomize(Flow(cfg), seed=15)
    tokens = torch.randint(0, cfg.vocab_size, (57,), generator=torch.Generator().manual_seed(16))
    want = oracle.flow_encode(flow.state_dict(), tokens[None], cfg)[0].T  # (80, 114)
    torch.testing.assert_close(encode(flow, tokens), want, **FP32)  # measured max error 1.1e-6
