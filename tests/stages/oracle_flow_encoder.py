"""Test oracle for the CosyVoice2 flow encoder: a plain-torch, functional transcription of the upstream algorithm.

Transcribed from the code LLaMA-Omni2 actually runs, its vendored CosyVoice (ictnlp/LLaMA-Omni2 @ c8afa906), checked
against FunAudioLLM/CosyVoice @ ace7c47f (the same layers; differences noted below):
* cosyvoice/flow/flow.py                  CausalMaskedDiffWithXvec.inference: embedding, encoder, trim, encoder_proj
* cosyvoice/transformer/upsample_encoder.py  UpsampleConformerEncoder.forward, PreLookaheadLayer, Upsample1D
* cosyvoice/transformer/subsampling.py    LinearNoSubsampling (input_layer 'linear')
* cosyvoice/transformer/embedding.py      EspnetRelPositionalEncoding (pos_enc_layer_type 'rel_pos_espnet')
* cosyvoice/transformer/encoder_layer.py  ConformerEncoderLayer (normalize_before, no macaron FF, no conv module)
* cosyvoice/transformer/attention.py      RelPositionMultiHeadedAttention (+ rel_shift), forward_attention
* cosyvoice/transformer/positionwise_feed_forward.py  PositionwiseFeedForward, activation 'swish' (nn.SiLU)
* cosyvoice/utils/mask.py                 make_pad_mask, subsequent_chunk_mask (the loop), add_optional_chunk_mask

Independent of omni2.stages by construction: whole sequences only (no spans, no caches), relative positions through
the official (1, 2T-1, D) table and rel_shift (not indexed by distance), F.interpolate for the upsampling, masks from
the official loops. Weights are read from a state dict with flow.pt's key names (`prefix` + the module path). Inference
only: every dropout is the identity and is left out.

NOTE: the vendored encoder builds its attention mask with add_optional_chunk_mask(use_dynamic_chunk=False, ...,
static_chunk_size) on every call, and LLaMA-Omni2's SpeechDecoder sets static_chunk_size = 2 * input_frame_rate = 50
tokens (100 frames after the upsampling). Newer CosyVoice passes 0 (full attention) unless called with streaming=True
and adds a `context` input to PreLookaheadLayer; neither is on LLaMA-Omni2's path.
"""
from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from omni2.engine.config import FlowConfig

StateDict = Mapping[str, torch.Tensor]

# Hard-coded in UpsampleConformerEncoder.__init__, not taken from the flow's config: PreLookaheadLayer(channels=512,
# pre_lookahead_len=3) and Upsample1D(512, 512, stride=2). Checked against the conv kernel sizes in the state dict.
ENCODER_PRE_LOOKAHEAD_LEN = 3
ENCODER_UP_STRIDE = 2
POS_ENC_MAX_LEN = 5000  # EspnetRelPositionalEncoding(max_len=5000): the table it builds at construction
CONFORMER_NORM_EPS = 1e-12  # norm_mha / norm_ff in ConformerEncoderLayer
EMBED_NORM_EPS = 1e-5  # LinearNoSubsampling's LayerNorm and the encoder's after_norm


def _linear(sd: StateDict, name: str, x: torch.Tensor) -> torch.Tensor:
    return F.linear(x, sd[f"{name}.weight"], sd.get(f"{name}.bias"))


def _layer_norm(sd: StateDict, name: str, x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps)


def _num_layers(sd: StateDict, prefix: str) -> int:
    """How many `prefix{i}.` layers the state dict holds. A strict load pins it to the constructor's count (yaml
    num_blocks; up_encoders are `range(4)` in the code), so small test configs run through the same code."""
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in sd if k.startswith(prefix)}
    assert idx == set(range(len(idx))), f"non-contiguous layers under {prefix}: {sorted(idx)}"
    return len(idx)


# --------------------------------------------------------------------------------------------- cosyvoice/utils/mask.py
def make_pad_mask(lengths: torch.Tensor, max_len: int = 0) -> torch.Tensor:
    """(B,) lengths -> (B, max_len) bool, True at padded positions."""
    max_len = max_len if max_len > 0 else int(lengths.max().item())
    seq = torch.arange(0, max_len, dtype=torch.int64, device=lengths.device)
    return seq.unsqueeze(0).expand(lengths.size(0), max_len) >= lengths.unsqueeze(-1)


def subsequent_chunk_mask(size: int, chunk_size: int, num_left_chunks: int = -1,
                          device: torch.device | None = None) -> torch.Tensor:
    """(size, size) bool: row i sees [start, end of its own chunk), start = 0 or num_left_chunks chunks back.
    The vendored loop version (newer CosyVoice replaced it with a vectorised one that ignores num_left_chunks)."""
    ret = torch.zeros(size, size, dtype=torch.bool, device=device)
    for i in range(size):
        start = 0 if num_left_chunks < 0 else max((i // chunk_size - num_left_chunks) * chunk_size, 0)
        ending = min((i // chunk_size + 1) * chunk_size, size)
        ret[i, start:ending] = True
    return ret


def add_optional_chunk_mask(xs: torch.Tensor, masks: torch.Tensor, use_dynamic_chunk: bool, static_chunk_size: int,
                            num_decoding_left_chunks: int = -1) -> torch.Tensor:
    """xs (B, L, D), masks (B, 1, L) -> (B, L, L) with a static chunk, else masks unchanged (B, 1, L)."""
    if use_dynamic_chunk:
        # Training-time random chunk sizes; cosyvoice2.yaml leaves use_dynamic_chunk at its default False.
        raise NotImplementedError("dynamic chunk masks are not on the inference path")
    if static_chunk_size > 0:
        chunk = subsequent_chunk_mask(xs.size(1), static_chunk_size, num_decoding_left_chunks, xs.device)  # (L, L)
        return masks & chunk.unsqueeze(0)  # (B, L, L)
    return masks


# --------------------------------------------------------------------------------------------- embedding.py
def espnet_rel_pe_table(length: int, d_model: int) -> torch.Tensor:
    """(1, 2*length - 1, d_model): EspnetRelPositionalEncoding.extend_pe. Row r is the relative position length-1-r
    (i - j for query i, key j): the positive half reversed, then the negative half without its 0."""
    pe_positive = torch.zeros(length, d_model)
    pe_negative = torch.zeros(length, d_model)
    position = torch.arange(0, length, dtype=torch.float32).unsqueeze(1)  # (length, 1)
    div_term = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * -(math.log(10000.0) / d_model))
    pe_positive[:, 0::2] = torch.sin(position * div_term)
    pe_positive[:, 1::2] = torch.cos(position * div_term)
    pe_negative[:, 0::2] = torch.sin(-1 * position * div_term)
    pe_negative[:, 1::2] = torch.cos(-1 * position * div_term)
    return torch.cat([torch.flip(pe_positive, [0]), pe_negative[1:]], dim=0).unsqueeze(0)


def espnet_rel_positional_encoding(x: torch.Tensor, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T, D) -> (x * sqrt(D), pos_emb (1, 2T-1, D)). The table is built at max_len and only grown (extend_pe),
    so pos_emb is the centred slice of a table of max(5000, T) positions; `offset` is ignored, as in the vendored
    position_encoding (it is always 0 there)."""
    T, D = x.size(1), x.size(2)
    pe = espnet_rel_pe_table(max(POS_ENC_MAX_LEN, T), D).to(dtype=x.dtype, device=x.device)
    center = pe.size(1) // 2  # row of relative position 0
    pos_emb = pe[:, center - T + 1:center + T]
    return x * math.sqrt(D), pos_emb


# --------------------------------------------------------------------------------------------- subsampling.py
def linear_no_subsampling(sd: StateDict, prefix: str, x: torch.Tensor,
                          x_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, T, idim), mask (B, 1, T) -> x (B, T, odim), pos_emb (1, 2T-1, odim), mask: `out` = Linear, LayerNorm,
    Dropout; then the positional encoding (which scales x and returns the table separately)."""
    x = _linear(sd, f"{prefix}out.0", x)
    x = _layer_norm(sd, f"{prefix}out.1", x, EMBED_NORM_EPS)
    x, pos_emb = espnet_rel_positional_encoding(x)
    return x, pos_emb, x_mask


# --------------------------------------------------------------------------------------------- attention.py
def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """(B, H, T1, 2*T1-1) -> (B, H, T1, T1): Transformer-XL shift, so column j of row i reads relative position
    i - j from the table's row T1-1-(i-j)."""
    b, h, t1, n = x.shape
    zero_pad = torch.zeros((b, h, t1, 1), device=x.device, dtype=x.dtype)
    x_padded = torch.cat([zero_pad, x], dim=-1)  # (B, H, T1, 2*T1)
    x_padded = x_padded.view(b, h, n + 1, t1)  # the same memory read as 2*T1 rows of T1
    return x_padded[:, :, 1:].reshape(b, h, t1, n)[:, :, :, :n // 2 + 1]


def forward_attention(sd: StateDict, prefix: str, value: torch.Tensor, scores: torch.Tensor,
                      mask: torch.Tensor) -> torch.Tensor:
    """value (B, H, T2, d_k), scores (B, H, T1, T2), mask (B, 1|T1, T2) -> (B, T1, H*d_k) after linear_out."""
    n_batch, h, _, d_k = value.shape
    if mask.size(2) > 0:
        blocked = mask.unsqueeze(1).eq(0)[:, :, :, :scores.size(-1)]  # (B, 1, 1|T1, T2)
        scores = scores.masked_fill(blocked, -float("inf"))
        attn = torch.softmax(scores, dim=-1).masked_fill(blocked, 0.0)
    else:
        attn = torch.softmax(scores, dim=-1)
    x = torch.matmul(attn, value)  # (B, H, T1, d_k)
    x = x.transpose(1, 2).contiguous().view(n_batch, -1, h * d_k)  # (B, T1, D)
    return _linear(sd, f"{prefix}linear_out", x)


def rel_position_multi_headed_attention(sd: StateDict, prefix: str, query: torch.Tensor, key: torch.Tensor,
                                        value: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor,
                                        n_head: int) -> torch.Tensor:
    """(B, T1, D) x (B, T2, D) -> (B, T1, D); pos_emb (1, 2*T1-1, D). score = ((q + u) k + rel_shift((q + v) p))
    / sqrt(d_k), u = pos_bias_u, v = pos_bias_v, p = linear_pos(pos_emb). No cache (whole-sequence call)."""
    n_batch, d = query.size(0), query.size(2)
    d_k = d // n_head
    assert sd[f"{prefix}pos_bias_u"].shape == (n_head, d_k), "n_head does not match the checkpoint"
    q = _linear(sd, f"{prefix}linear_q", query).view(n_batch, -1, n_head, d_k)  # (B, T1, H, d_k)
    k = _linear(sd, f"{prefix}linear_k", key).view(n_batch, -1, n_head, d_k).transpose(1, 2)  # (B, H, T2, d_k)
    v = _linear(sd, f"{prefix}linear_v", value).view(n_batch, -1, n_head, d_k).transpose(1, 2)  # (B, H, T2, d_k)

    n_batch_pos = pos_emb.size(0)
    p = _linear(sd, f"{prefix}linear_pos", pos_emb).view(n_batch_pos, -1, n_head, d_k)
    p = p.transpose(1, 2)  # (1, H, 2*T1-1, d_k)

    q_with_bias_u = (q + sd[f"{prefix}pos_bias_u"]).transpose(1, 2)  # (B, H, T1, d_k)
    q_with_bias_v = (q + sd[f"{prefix}pos_bias_v"]).transpose(1, 2)  # (B, H, T1, d_k)
    matrix_ac = torch.matmul(q_with_bias_u, k.transpose(-2, -1))  # (B, H, T1, T2)
    matrix_bd = torch.matmul(q_with_bias_v, p.transpose(-2, -1))  # (B, H, T1, 2*T1-1)
    # Upstream shifts only when the shapes differ: with T1 = 1 the table has a single row (relative position 0).
    if matrix_ac.shape != matrix_bd.shape:
        matrix_bd = rel_shift(matrix_bd)
    scores = (matrix_ac + matrix_bd) / math.sqrt(d_k)  # (B, H, T1, T2)
    return forward_attention(sd, prefix, v, scores, mask)


# --------------------------------------------------------------------------------------------- feed forward, layer
def positionwise_feed_forward(sd: StateDict, prefix: str, xs: torch.Tensor) -> torch.Tensor:
    """(B, L, D) -> (B, L, D): w_2(swish(w_1 x)); COSYVOICE_ACTIVATION_CLASSES['swish'] is nn.SiLU."""
    return _linear(sd, f"{prefix}w_2", F.silu(_linear(sd, f"{prefix}w_1", xs)))


def conformer_encoder_layer(sd: StateDict, prefix: str, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor,
                            n_head: int) -> torch.Tensor:
    """(B, T, D) -> (B, T, D), normalize_before=True. cosyvoice2.yaml sets macaron_style=False and
    use_cnn_module=False, so the layer is pre-norm MHA + pre-norm FF with ff_scale 1.0 and no norm_final."""
    unsupported = [k for k in sd if k.startswith(prefix) and k[len(prefix):].split(".")[0] in
                   ("feed_forward_macaron", "norm_ff_macaron", "conv_module", "norm_conv", "norm_final")]
    assert not unsupported, f"macaron / conv-module layers are not transcribed: {unsupported[:3]}"
    ff_scale = 1.0  # 0.5 only with a macaron FF

    residual = x
    x = _layer_norm(sd, f"{prefix}norm_mha", x, CONFORMER_NORM_EPS)
    x_att = rel_position_multi_headed_attention(sd, f"{prefix}self_attn.", x, x, x, mask, pos_emb, n_head)
    x = residual + x_att

    residual = x
    x = _layer_norm(sd, f"{prefix}norm_ff", x, CONFORMER_NORM_EPS)
    return residual + ff_scale * positionwise_feed_forward(sd, f"{prefix}feed_forward.", x)


# --------------------------------------------------------------------------------------------- upsample_encoder.py
def pre_lookahead_layer(sd: StateDict, prefix: str, inputs: torch.Tensor,
                        pre_lookahead_len: int = ENCODER_PRE_LOOKAHEAD_LEN) -> torch.Tensor:
    """(B, T, C) -> (B, T, C): conv1 (k = lookahead + 1) over x right-padded with zeros, leaky_relu, conv2 (k 3)
    left-padded by 2, residual."""
    assert sd[f"{prefix}conv1.weight"].shape[2] == pre_lookahead_len + 1
    outputs = inputs.transpose(1, 2).contiguous()  # (B, C, T)
    outputs = F.pad(outputs, (0, pre_lookahead_len), mode="constant", value=0.0)  # (B, C, T + lookahead)
    outputs = F.leaky_relu(F.conv1d(outputs, sd[f"{prefix}conv1.weight"], sd[f"{prefix}conv1.bias"]))  # (B, C, T)
    outputs = F.pad(outputs, (2, 0), mode="constant", value=0.0)  # (B, C, T + 2)
    outputs = F.conv1d(outputs, sd[f"{prefix}conv2.weight"], sd[f"{prefix}conv2.bias"])  # (B, C, T)
    return outputs.transpose(1, 2).contiguous() + inputs


def upsample_1d(sd: StateDict, prefix: str, inputs: torch.Tensor, input_lengths: torch.Tensor,
                stride: int = ENCODER_UP_STRIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, T) -> (B, C, stride*T): nearest interpolation, left zero pad 2*stride, Conv1d(k = 2*stride + 1)."""
    assert sd[f"{prefix}conv.weight"].shape[2] == 2 * stride + 1
    outputs = F.interpolate(inputs, scale_factor=float(stride), mode="nearest")  # (B, C, stride*T)
    outputs = F.pad(outputs, (stride * 2, 0), value=0.0)
    outputs = F.conv1d(outputs, sd[f"{prefix}conv.weight"], sd[f"{prefix}conv.bias"])
    return outputs, input_lengths * stride


def upsample_conformer_encoder(sd: StateDict, prefix: str, xs: torch.Tensor, xs_lens: torch.Tensor, n_head: int,
                               static_chunk_size: int, num_decoding_left_chunks: int = -1,
                               use_dynamic_chunk: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """xs (B, T, input_size), xs_lens (B,) -> (B, 2T, D) and the (B, 1, 2T) padding mask.

    embed -> chunk mask (static_chunk_size tokens) -> pre-lookahead -> encoders -> up_layer -> up_embed -> chunk
    mask (static_chunk_size * stride frames) -> up_encoders -> after_norm (normalize_before=True)."""
    T = xs.size(1)
    masks = ~make_pad_mask(xs_lens, T).unsqueeze(1)  # (B, 1, T)
    xs, pos_emb, masks = linear_no_subsampling(sd, f"{prefix}embed.", xs, masks)
    chunk_masks = add_optional_chunk_mask(xs, masks, use_dynamic_chunk, static_chunk_size,
                                          num_decoding_left_chunks)  # (B, T, T)
    xs = pre_lookahead_layer(sd, f"{prefix}pre_lookahead_layer.", xs)
    for i in range(_num_layers(sd, f"{prefix}encoders.")):
        # mask_pad would feed a conv module; there is none.
        xs = conformer_encoder_layer(sd, f"{prefix}encoders.{i}.", xs, chunk_masks, pos_emb, n_head)

    xs = xs.transpose(1, 2).contiguous()  # (B, D, T)
    xs, xs_lens = upsample_1d(sd, f"{prefix}up_layer.", xs, xs_lens)  # (B, D, 2T)
    xs = xs.transpose(1, 2).contiguous()  # (B, 2T, D)
    T = xs.size(1)
    masks = ~make_pad_mask(xs_lens, T).unsqueeze(1)  # (B, 1, 2T)
    xs, pos_emb, masks = linear_no_subsampling(sd, f"{prefix}up_embed.", xs, masks)
    chunk_masks = add_optional_chunk_mask(xs, masks, use_dynamic_chunk, static_chunk_size * ENCODER_UP_STRIDE,
                                          num_decoding_left_chunks)  # (B, 2T, 2T)
    for i in range(_num_layers(sd, f"{prefix}up_encoders.")):
        xs = conformer_encoder_layer(sd, f"{prefix}up_encoders.{i}.", xs, chunk_masks, pos_emb, n_head)

    xs = after_norm(sd, prefix, xs)
    return xs, masks


def after_norm(sd: StateDict, prefix: str, xs: torch.Tensor) -> torch.Tensor:
    """(B, T, D) -> (B, T, D): the encoder's final LayerNorm, eps 1e-5 (torch's default, unlike the layers' 1e-12)."""
    return _layer_norm(sd, f"{prefix}after_norm", xs, EMBED_NORM_EPS)


# --------------------------------------------------------------------------------------------- flow/flow.py
def flow_encode(sd: StateDict, token: torch.Tensor, cfg: FlowConfig, finalize: bool = True,
                num_decoding_left_chunks: int = -1) -> torch.Tensor:
    """token (1, T) int -> h (1, L, output_size): CausalMaskedDiffWithXvec.inference up to encoder_proj, with
    LLaMA-Omni2's empty prompt (prompt_token (1, 0)). L = ratio*T, or ratio*T - lookahead*ratio unless finalize.
    cfg.encoder.static_chunk_size is LLaMA-Omni2's override (2 * input_frame_rate), not the yaml's value."""
    assert token.shape[0] == 1
    prompt_token = token.new_zeros(1, 0)
    token_len = torch.tensor([token.shape[1]], device=token.device)
    prompt_token_len = torch.tensor([0], device=token.device)
    token, token_len = torch.concat([prompt_token, token], dim=1), prompt_token_len + token_len
    emb = sd["input_embedding.weight"]
    mask = (~make_pad_mask(token_len)).unsqueeze(-1).to(emb)  # (1, T, 1)
    x = F.embedding(torch.clamp(token, min=0), emb) * mask  # (1, T, input_size)

    h, _ = upsample_conformer_encoder(sd, "encoder.", x, token_len, cfg.encoder.attention_heads,
                                      cfg.encoder.static_chunk_size, num_decoding_left_chunks)
    if finalize is False:
        h = h[:, :-cfg.pre_lookahead_len * cfg.token_mel_ratio]
    return _linear(sd, "encoder_proj", h)  # (1, L, output_size)
