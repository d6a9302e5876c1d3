"""The pipeline's shape: which stage feeds which over which ring, and how large each ring's slots are.

    engine --asr_in--> asr --asr_llm--> llm --llm_tts--> tts --tts_voc--> vocoder
      ^                                  |                |                  |
      +------------- llm_out ------------+--- tts_out ----+----- voc_out ----+

"engine" is the engine process (runtime/engine.py): it feeds the first stage and reads what the user sees. The
supervisor, the workers and the engine all derive their sockets and segments from this one table.
"""
from __future__ import annotations

from omni2.engine.config import DTYPE_BYTES, STAGES, EngineConfig, ModelConfig

ENGINE = "engine"
EDGES: dict[str, tuple[str, str]] = {  # edge -> (producer, consumer)
    "asr_in": (ENGINE, "asr"), "asr_llm": ("asr", "llm"), "llm_tts": ("llm", "tts"), "llm_out": ("llm", ENGINE),
    "tts_voc": ("tts", "vocoder"), "tts_out": ("tts", ENGINE), "voc_out": ("vocoder", ENGINE),
}
assert {p for p, _ in EDGES.values()} | {c for _, c in EDGES.values()} == {ENGINE, *STAGES}

SMALL_SLOT = 64  # edges whose messages carry no tensors: the slot is only a credit
VOC_OUT_SLOT = 1 << 20
MAX_PCM_ROW = 96000  # samples per VocoderToEngine row (4 s at 24 kHz, 384 KB): well inside a voc_out slot


def inputs_of(stage: str) -> list[str]:
    return [e for e, (_, c) in EDGES.items() if c == stage]


def outputs_of(stage: str) -> list[str]:
    return [e for e, (p, _) in EDGES.items() if p == stage]


def ring_sizes(cfg: EngineConfig, model: ModelConfig) -> dict[str, tuple[int, int]]:
    """edge -> (slots, bytes per slot), from the checkpoint's dimensions and the engine's limits: one slot holds
    the largest message its producer sends in one step (a larger one is split by rows, never truncated)."""
    n, isz, H = cfg.ring_slots, DTYPE_BYTES[cfg.dtype], model.thinker.hidden_size
    n_speech = model.encoder.n_ctx // model.projector.ds_rate  # embeddings per turn (300 for 30 s)
    return {"asr_in": (4, int(cfg.limits.max_audio_seconds * 16000) * 4 + 4096),
            "asr_llm": (4, cfg.asr_batch * (n_speech * H * isz + 64)),
            "llm_tts": (n, cfg.limits.max_sessions * H * isz + 4096),
            "llm_out": (n, SMALL_SLOT), "tts_out": (n, SMALL_SLOT), "tts_voc": (n, SMALL_SLOT),
            "voc_out": (n, VOC_OUT_SLOT)}
