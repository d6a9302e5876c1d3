"""The official LLaMA-Omni2 checkpoint layout (MODEL_SPEC §1.2-1.3): component key prefixes, every tensor's name
and shape, and the config.json of the random-checkpoint presets.

Shared by the reader (`ModelDir` in checkpoint.py, which uses the prefixes) and the random writer (which walks
`tensor_plan`). Dimensions the official code fixes rather than config.json (the projector's 2048 hidden units,
Whisper's 4x MLP) are mirrored here, so random checkpoints also load in the official code.
"""
from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .config import PROJECTOR_HIDDEN, ModelConfig, Qwen2Config, StreamParams, WhisperEncoderConfig
from .vocab import N_QWEN_SPECIAL, N_UNITS

# Key prefixes of the components inside the one official checkpoint (MODEL_SPEC §1.3).
PREFIX_THINKER = ""
PREFIX_ENCODER = "model.speech_encoder."
PREFIX_PROJECTOR = "model.speech_projector."
PREFIX_GENERATOR = "speech_generator."  # input_proj + gate; load with exclude=GENERATOR_EXCLUDE
PREFIX_TTS_LM = "speech_generator.model."
THINKER_EXCLUDE = (PREFIX_ENCODER, PREFIX_PROJECTOR, PREFIX_GENERATOR)
GENERATOR_EXCLUDE = (PREFIX_TTS_LM,)

INIT_STD = 0.02  # initializer_range of Qwen2; the random writer draws N(0, INIT_STD)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Preset:
    """Dimensions of a random checkpoint. Token ids follow from `text_vocab_size` (see engine/vocab.py)."""

    text_vocab_size: int
    thinker: Qwen2Config
    encoder: WhisperEncoderConfig
    tts: Qwen2Config
    dtype: torch.dtype


def _qwen(hidden: int, layers: int, heads: int, kv: int, inter: int, vocab: int, bos: int, eos: int) -> Qwen2Config:
    return Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv, bos_token_id=bos, eos_token_id=eos)


def _preset(v0: int, thinker: tuple[int, ...], thinker_vocab: int, enc: WhisperEncoderConfig, tts: tuple[int, ...],
            dtype: torch.dtype) -> Preset:
    endoftext, im_end = v0, v0 + 2
    tts_vocab = v0 + N_QWEN_SPECIAL + 1 + N_UNITS  # text + specials + <sep> + units
    return Preset(v0, _qwen(*thinker, thinker_vocab, endoftext, im_end), enc,
                  _qwen(*tts, tts_vocab, endoftext, endoftext), dtype)


_QWEN_05B = (896, 24, 14, 2, 4864)
_LARGE_V3 = WhisperEncoderConfig(n_state=1280, n_layer=32)
PRESETS: dict[str, Preset] = {
    # thinker vocab: tokenizer length (512 + 22 specials + <speech>) rounded up to 64, as Qwen pads its tables
    "tiny": _preset(512, (64, 2, 4, 2, 128), 576, WhisperEncoderConfig(n_state=128, n_layer=2), (64, 2, 4, 2, 128),
                    torch.float32),
    "0.5b": _preset(151643, _QWEN_05B, 151936, _LARGE_V3, _QWEN_05B, torch.bfloat16),
    "7b": _preset(151643, (3584, 28, 28, 4, 18944), 152064, _LARGE_V3, _QWEN_05B, torch.bfloat16),
}


def _qwen_dict(c: Qwen2Config, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "attention_dropout": 0.0,
        "bos_token_id": c.bos_token_id, "eos_token_id": c.eos_token_id, "hidden_act": c.hidden_act,
        "hidden_size": c.hidden_size, "initializer_range": INIT_STD, "intermediate_size": c.intermediate_size,
        "max_position_embeddings": c.max_position_embeddings, "max_window_layers": c.num_hidden_layers,
        "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
        "num_key_value_heads": c.num_key_value_heads, "rms_norm_eps": c.rms_norm_eps,
        "rope_theta": c.rope_theta, "sliding_window": c.max_position_embeddings, "tie_word_embeddings": False,
        "torch_dtype": _DTYPE_NAMES[dtype], "use_cache": True, "use_sliding_window": False,
        "vocab_size": c.vocab_size,
    }


def preset_config(p: Preset, dtype: torch.dtype | None = None) -> dict[str, Any]:
    """The official config.json (MODEL_SPEC §1.2) of a preset. Both heads are untied (see DESIGN.md)."""
    dtype = dtype or p.dtype
    d = _qwen_dict(p.thinker, dtype)
    d.update({
        "architectures": ["Omni2Speech2SQwen2ForCausalLM"], "model_type": "omni2_speech2s_qwen2",
        "speech_encoder": "models/speech_encoder/large-v3.pt", "speech_encoder_type": "whisper",
        "speech_encoder_ds_rate": 5, "speech_encoder_hidden_size": p.encoder.n_state,
        "speech_projector_type": "linear", "speech_generator": _qwen_dict(p.tts, dtype),
        "stream_params": StreamParams(3, 10).to_str(), "unit_vocab_size": N_UNITS,
        "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right", "transformers_version": "4.43.4",
    })
    return d


def _qwen_plan(prefix: str, c: Qwen2Config, head_kind: str) -> Iterable[tuple[str, tuple[int, ...], str]]:
    H, I, D = c.hidden_size, c.intermediate_size, c.head_dim
    yield f"{prefix}model.embed_tokens.weight", (c.vocab_size, H), "w"
    for i in range(c.num_hidden_layers):
        p = f"{prefix}model.layers.{i}."
        for proj, rows in (("q", c.num_attention_heads * D), ("k", c.num_key_value_heads * D),
                           ("v", c.num_key_value_heads * D)):
            yield f"{p}self_attn.{proj}_proj.weight", (rows, H), "w"
            yield f"{p}self_attn.{proj}_proj.bias", (rows,), "w"
        yield f"{p}self_attn.o_proj.weight", (H, c.num_attention_heads * D), "w"
        yield f"{p}mlp.gate_proj.weight", (I, H), "w"
        yield f"{p}mlp.up_proj.weight", (I, H), "w"
        yield f"{p}mlp.down_proj.weight", (H, I), "w"
        yield f"{p}input_layernorm.weight", (H,), "norm"
        yield f"{p}post_attention_layernorm.weight", (H,), "norm"
    yield f"{prefix}model.norm.weight", (H,), "norm"
    yield f"{prefix}lm_head.weight", (c.vocab_size, H), head_kind


def _whisper_plan(prefix: str, e: WhisperEncoderConfig) -> Iterable[tuple[str, tuple[int, ...], str]]:
    E = e.n_state
    yield f"{prefix}conv1.weight", (E, e.n_mels, 3), "w"
    yield f"{prefix}conv1.bias", (E,), "w"
    yield f"{prefix}conv2.weight", (E, E, 3), "w"
    yield f"{prefix}conv2.bias", (E,), "w"
    yield f"{prefix}positional_embedding", (e.n_ctx, E), "sinusoids"
    for i in range(e.n_layer):
        p = f"{prefix}blocks.{i}."
        for lin in ("query", "key", "value", "out"):
            yield f"{p}attn.{lin}.weight", (E, E), "w"
            if lin != "key":  # whisper's key projection has no bias
                yield f"{p}attn.{lin}.bias", (E,), "w"
        yield f"{p}attn_ln.weight", (E,), "norm"
        yield f"{p}attn_ln.bias", (E,), "w"
        yield f"{p}mlp.0.weight", (4 * E, E), "w"
        yield f"{p}mlp.0.bias", (4 * E,), "w"
        yield f"{p}mlp.2.weight", (E, 4 * E), "w"
        yield f"{p}mlp.2.bias", (E,), "w"
        yield f"{p}mlp_ln.weight", (E,), "norm"
        yield f"{p}mlp_ln.bias", (E,), "w"
    yield f"{prefix}ln_post.weight", (E,), "norm"
    yield f"{prefix}ln_post.bias", (E,), "w"


def tensor_plan(cfg: ModelConfig) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, init kind) of every tensor of the official layout, in write order."""
    H, T, E, k = cfg.thinker.hidden_size, cfg.generator.lm.hidden_size, cfg.encoder.n_state, cfg.projector.ds_rate
    plan = list(_qwen_plan("", cfg.thinker, "thinker_head"))
    plan += _whisper_plan(PREFIX_ENCODER, cfg.encoder)
    plan += [(f"{PREFIX_PROJECTOR}linear1.weight", (PROJECTOR_HIDDEN, E * k), "w"),
             (f"{PREFIX_PROJECTOR}linear1.bias", (PROJECTOR_HIDDEN,), "w"),
             (f"{PREFIX_PROJECTOR}linear2.weight", (H, PROJECTOR_HIDDEN), "w"),
             (f"{PREFIX_PROJECTOR}linear2.bias", (H,), "w")]
    plan += [(f"{PREFIX_GENERATOR}input_proj.0.weight", (2 * H, H), "w"),
             (f"{PREFIX_GENERATOR}input_proj.0.bias", (2 * H,), "w"),
             (f"{PREFIX_GENERATOR}input_proj.2.weight", (T, 2 * H), "w"),
             (f"{PREFIX_GENERATOR}input_proj.2.bias", (T,), "w"),
             (f"{PREFIX_GENERATOR}gate.0.weight", (T, 2 * T), "w"),
             (f"{PREFIX_GENERATOR}gate.0.bias", (T,), "w")]
    plan += _qwen_plan(PREFIX_TTS_LM, cfg.generator.lm, "tts_head")
    return plan


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional table (length, channels): sines of all timescales, then cosines."""
    n = channels // 2
    inv = torch.exp(-math.log(max_timescale) / (n - 1) * torch.arange(n))  # fp32, as whisper computes it
    t = torch.arange(length)[:, None] * inv[None, :]
    return torch.cat([torch.sin(t), torch.cos(t)], dim=1)

