"""Random-weight model directories in exactly the official LLaMA-Omni2 layout (MODEL_SPEC §1.2-1.3): every
tensor's name and shape (`tensor_plan`), the config.json of the presets, and the writer (`write_checkpoint`).

Dimensions the official code fixes rather than config.json (the projector's 2048 hidden units, Whisper's 4x MLP)
are mirrored here, so random checkpoints also load in the official code. The reader is model_dir.py.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from omni2.engine.checkpoints.model_dir import (
    INDEX_FILE,
    PREFIX_ENCODER,
    PREFIX_GENERATOR,
    PREFIX_PROJECTOR,
    PREFIX_TTS_LM,
)
from omni2.engine.checkpoints.vocab import N_QWEN_SPECIAL, N_UNITS, build_tokenizers
from omni2.engine.config import PROJECTOR_HIDDEN, ModelConfig, Qwen2Config, StreamParams, WhisperEncoderConfig

INIT_STD = 0.02  # initializer_range of Qwen2; the random writer draws N(0, INIT_STD)
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Preset:
    """Dimensions of a random checkpoint. Token ids follow from `text_vocab_size` (see vocab.py)."""

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


# -- random checkpoints in the official layout -------------------------------------------------------------------
# A random TTS head rarely ranks EOS first among 6561 units; a wider EOS row ends replies after tens of units
# instead of running to the 1024-unit cap.
TTS_EOS_ROW_GAIN = 2.0
DEFAULT_SHARD_BYTES = 2 << 30
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def tensor_seed(seed: int, name: str) -> int:
    """A seed for one named tensor of a random checkpoint (the vocoder writer draws its tensors the same way)."""
    # Stable across processes and Python versions (unlike hash()), independent of write order and sharding.
    return int.from_bytes(hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest(), "little") >> 1


def _make_tensor(name: str, shape: tuple[int, ...], kind: str, seed: int, p: Preset) -> torch.Tensor:
    if kind == "sinusoids":
        return whisper_sinusoids(*shape)
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    t = torch.randn(shape, generator=g).mul_(INIT_STD)
    v0 = p.text_vocab_size
    if kind == "norm":
        t += 1.0
    elif kind == "thinker_head":
        t[v0 + N_QWEN_SPECIAL:] = 0  # `<speech>` and the padding rows: ids a reply never holds
    elif kind == "tts_head":
        unit0, eos = v0 + N_QWEN_SPECIAL + 1, v0
        keep = torch.zeros(shape[0], dtype=torch.bool)
        keep[unit0:unit0 + N_UNITS] = True
        keep[eos] = True
        t[~keep] = 0  # a trained TTS LM prefers units too; text rows stay random in embed_tokens (the gate reads them)
        t[eos] *= TTS_EOS_ROW_GAIN
    return t


def _shards(plan: list[tuple[str, tuple[int, ...], str]], itemsize: int, shard_bytes: int) -> list[list[int]]:
    sizes = [math.prod(shape) * itemsize for _, shape, _ in plan]
    # Always at least two shards, so every checkpoint exercises the index path.
    limit = min(shard_bytes, -(-sum(sizes) // 2))
    shards: list[list[int]] = [[]]
    used = 0
    for i, n in enumerate(sizes):
        if shards[-1] and used + n > limit:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += n
    return shards


def write_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0, dtype: torch.dtype | str | None = None,
                     shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a random-weight model directory `out_dir/omni2-<preset>/` in the official layout; return its path.

    Holds config.json, generation_config.json, sharded safetensors + index and both tokenizers. Deterministic:
    the same (preset, seed, dtype) writes identical bytes. Tensors are generated one at a time and flushed shard by
    shard, so memory stays near `shard_bytes` even for 7b. The vocoder (`out_dir/cosy2_decoder/`) is written
    separately by the vocoder's own writer.
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r} (presets: {', '.join(PRESETS)})")
    p = PRESETS[preset]
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"unknown dtype {dtype!r} (choose from {', '.join(_DTYPES)})")
        dtype = _DTYPES[dtype]
    dtype = dtype or p.dtype
    out_dir = Path(out_dir)
    final, tmp = out_dir / f"omni2-{preset}", out_dir / f".omni2-{preset}.partial"
    if final.exists() and not (final / "config.json").is_file() and any(final.iterdir()):
        raise FileExistsError(f"{final} exists and is not a model directory; not overwriting it")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)

    config = preset_config(p, dtype)
    cfg = ModelConfig.from_dict(config, encoder_layers=p.encoder.n_layer)
    build_tokenizers(tmp, p.text_vocab_size)
    plan = tensor_plan(cfg)
    itemsize = torch.empty((), dtype=dtype).element_size()
    shards = _shards(plan, itemsize, shard_bytes)
    total = sum(math.prod(shape) for _, shape, _ in plan) * itemsize
    weight_map: dict[str, str] = {}
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"omni2-{preset}", disable=None) as bar:
        for s, idx in enumerate(shards):
            fname = f"model-{s + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for i in idx:
                name, shape, kind = plan[i]
                tensors[name] = _make_tensor(name, shape, kind, seed, p).to(dtype).contiguous()
                weight_map[name] = fname
                bar.update(tensors[name].numel() * itemsize)
            save_file(tensors, str(tmp / fname), metadata={"format": "pt"})
            del tensors

    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    gen = {"bos_token_id": p.text_vocab_size, "eos_token_id": [p.thinker.eos_token_id, p.text_vocab_size],
           "pad_token_id": p.text_vocab_size, "transformers_version": "4.43.4"}
    for fname, obj in ((INDEX_FILE, index), ("config.json", config), ("generation_config.json", gen)):
        (tmp / fname).write_text(json.dumps(obj, indent=2) + "\n")
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final
