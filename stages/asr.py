"""ASR stage: 16 kHz audio of a user turn -> log-mel -> Whisper encoder -> frame-concat projector -> speech embeddings.

MODEL_SPEC §1.5-1.6. Module and attribute names mirror openai-whisper's `AudioEncoder` and LLaMA-Omni2's
`EncoderProjectorConcat`, so the checkpoint's `model.speech_encoder.*` / `model.speech_projector.*` tensors load
without renaming. Every turn is padded to 30 s, so every turn yields exactly 300 embeddings, silence included.
"""
from __future__ import annotations

import functools
from collections.abc import Hashable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers.audio_utils import mel_filter_bank

from omni2.engine.audio import N_SAMPLES, SAMPLE_RATE, AudioError
from omni2.engine.checkpoints.model_dir import PREFIX_ENCODER, PREFIX_PROJECTOR, ModelDir
from omni2.engine.config import ProjectorConfig, WhisperEncoderConfig

# hard-coded STFT hyperparameters of Whisper's front end (whisper/audio.py)
N_FFT = 400  # 25 ms window
HOP_LENGTH = 160  # 10 ms hop: 100 mel frames per second
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 frames in a mel spectrogram input
MEL_FMAX = 8000.0  # Nyquist of 16 kHz audio


@functools.lru_cache(maxsize=None)
def mel_filters(device: torch.device, n_mels: int = 128) -> torch.Tensor:
    """The Slaney-normalised, Slaney-scale mel filterbank `(n_mels, N_FFT // 2 + 1)` that whisper ships in
    `mel_filters.npz` (librosa's), built by transformers instead of loaded from a copied table."""
    fb = mel_filter_bank(num_frequency_bins=N_FFT // 2 + 1, num_mel_filters=n_mels, min_frequency=0.0,
                         max_frequency=MEL_FMAX, sampling_rate=SAMPLE_RATE, norm="slaney", mel_scale="slaney")
    return torch.from_numpy(fb.T.astype(np.float32)).to(device)  # (n_mels, 201)


@functools.lru_cache(maxsize=None)
def _hann_window(device: torch.device) -> torch.Tensor:
    return torch.hann_window(N_FFT, periodic=True, device=device)


def log_mel(audio: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """Whisper's log-mel spectrogram of 16 kHz audio `(B, n)` -> `(B, n_mels, 3000)` (or `(n,)` -> `(n_mels, 3000)`).

    Audio is zero-padded (or cut, like whisper's `pad_or_trim`) to 30 s first. Computed in float32 whatever the
    input dtype. NOTE(asr): the `max - 8` floor is per example; whisper takes `log_spec.max()` over whatever
    tensor it is given, which only agrees with this for a batch of one - the only way the official code calls it.
    """
    audio = audio.float()[..., :N_SAMPLES]
    audio = F.pad(audio, (0, N_SAMPLES - audio.shape[-1]))  # (B, 480000)
    stft = torch.stft(audio, N_FFT, HOP_LENGTH, window=_hann_window(audio.device), center=True,
                      pad_mode="reflect", return_complex=True)  # (B, 201, 3001)
    power = stft[..., :-1].abs() ** 2  # (B, 201, 3000): whisper drops the frame centred past the end
    mel = mel_filters(audio.device, n_mels) @ power  # (B, n_mels, 3000)
    log_spec = torch.clamp(mel, min=1e-10).log10()
    floor = log_spec.amax(dim=(-2, -1), keepdim=True) - 8.0  # 80 dB of dynamic range below each example's peak
    log_spec = torch.maximum(log_spec, floor)
    return (log_spec + 4.0) / 4.0  # roughly into [-1, 1]


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed sinusoidal positions `(length, channels)`: sin half then cos half. Checkpoints store the
    table, so this only fills freshly built (random or meta) encoders."""
    assert channels % 2 == 0, channels
    log_timescale_increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-log_timescale_increment * torch.arange(channels // 2, dtype=torch.float32))
    scaled_time = torch.arange(length, dtype=torch.float32)[:, None] * inv_timescales[None, :]  # (length, C/2)
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)


class MultiHeadAttention(nn.Module):
    """Non-causal self-attention. Whisper scales q and k by d^-0.25 each; SDPA's single 1/sqrt(d) is the same."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)  # a key bias would shift every score of a row equally
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))  # (B, nh, T, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # (B, nh, T, hd)
        return self.out(y.transpose(1, 2).reshape(B, T, C))


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block. LLaMA-Omni2 replaces whisper's fp32-upcasting LayerNorm with plain nn.LayerNorm."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = MultiHeadAttention(n_state, n_head)
        self.attn_ln = nn.LayerNorm(n_state)
        n_mlp = 4 * n_state
        self.mlp = nn.Sequential(nn.Linear(n_state, n_mlp), nn.GELU(), nn.Linear(n_mlp, n_state))  # keys mlp.0, mlp.2
        self.mlp_ln = nn.LayerNorm(n_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x))
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """openai-whisper's AudioEncoder: log-mel `(B, n_mels, 2*n_ctx)` -> hidden states `(B, n_ctx, n_state)`."""

    def __init__(self, cfg: WhisperEncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.conv1 = nn.Conv1d(cfg.n_mels, cfg.n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(cfg.n_state, cfg.n_state, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(cfg.n_ctx, cfg.n_state))  # in the checkpoint
        self.blocks = nn.ModuleList([ResidualAttentionBlock(cfg.n_state, cfg.n_head) for _ in range(cfg.n_layer)])
        self.ln_post = nn.LayerNorm(cfg.n_state)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        n_ctx, n_state = self.positional_embedding.shape
        if mel.ndim != 3 or mel.shape[1] != self.cfg.n_mels or mel.shape[2] != 2 * n_ctx:
            raise ValueError(f"Whisper encoder expects log-mel (B, {self.cfg.n_mels}, {2 * n_ctx}), i.e. exactly "
                             f"30 s of padded audio, got {tuple(mel.shape)}")
        x = F.gelu(self.conv1(mel))  # (B, C, 2*n_ctx)
        x = F.gelu(self.conv2(x))  # (B, C, n_ctx)
        x = x.permute(0, 2, 1)  # (B, n_ctx, C)
        x = (x + self.positional_embedding).to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.ln_post(x)


class Projector(nn.Module):
    """LLaMA-Omni2's EncoderProjectorConcat: concat k consecutive encoder frames, Linear -> ReLU -> Linear."""

    def __init__(self, cfg: ProjectorConfig):
        super().__init__()
        self.k = cfg.ds_rate
        self.linear1 = nn.Linear(cfg.encoder_dim * cfg.ds_rate, cfg.hidden)
        self.linear2 = nn.Linear(cfg.hidden, cfg.out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, E = x.shape
        T = T - T % self.k  # trailing frames that do not fill a group are dropped, as upstream does
        # contiguous() as upstream: a strided view would send Linear down another matmul path (not bit-equal)
        x = x[:, :T].contiguous().view(B, T // self.k, E * self.k)  # (B, T/k, E*k): frames t..t+k-1 side by side
        return self.linear2(F.relu(self.linear1(x)))  # (B, T/k, H)


class ASRStage:
    """Batched ASR over sessions: `step([(session, audio_16k), ...]) -> [(session, embeddings (300, H)), ...]`.

    Audio is what `omni2.engine.audio.prepare_audio` returns: float32 mono 16 kHz, at most 30 s. The stage holds
    no per-session state beyond the set of open sessions; outputs live on the stage's device in its dtype.
    """

    def __init__(self, encoder: WhisperEncoder, projector: Projector, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        self.device = torch.device(device)
        self.dtype = dtype
        self.encoder = encoder.to(self.device, dtype).eval()
        self.projector = projector.to(self.device, dtype).eval()
        if projector.linear1.in_features != encoder.cfg.n_state * projector.k:
            raise ValueError(f"projector expects {projector.linear1.in_features // projector.k}-wide encoder "
                             f"frames, the encoder gives {encoder.cfg.n_state}")
        self.sessions: set[Hashable] = set()

    @classmethod
    def from_modules(cls, encoder: WhisperEncoder, projector: Projector, device: str | torch.device = "cpu",
                     dtype: torch.dtype = torch.float32) -> ASRStage:
        return cls(encoder, projector, device, dtype)

    @classmethod
    def from_checkpoint(cls, model_dir, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> ASRStage:
        """Load `model.speech_encoder.*` and `model.speech_projector.*` from an official model directory
        (a path or an opened `ModelDir`)."""
        md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
        with torch.device("meta"):  # no RAM spent on random weights that are overwritten at once
            encoder = WhisperEncoder(md.config.encoder)
            projector = Projector(md.config.projector)
        md.load_module(encoder, PREFIX_ENCODER, device=device, dtype=dtype)
        md.load_module(projector, PREFIX_PROJECTOR, device=device, dtype=dtype)
        return cls(encoder, projector, device, dtype)

    @property
    def out_dim(self) -> int:
        return self.projector.linear2.out_features

    @property
    def n_out(self) -> int:
        """Embeddings per turn: 30 s of audio -> n_ctx encoder frames -> n_ctx // k (300 for Whisper)."""
        return self.encoder.cfg.n_ctx // self.projector.k

    def open(self, session_id: Hashable) -> None:
        if session_id in self.sessions:
            raise ValueError(f"ASR: session {session_id!r} is already open")
        self.sessions.add(session_id)

    def close(self, session_id: Hashable) -> None:
        self.sessions.discard(session_id)  # closing twice is harmless, so cleanup paths need no bookkeeping

    @torch.inference_mode()
    def step(self, batch: list[tuple[Hashable, np.ndarray]]) -> list[tuple[Hashable, torch.Tensor]]:
        """One batched forward over every turn in `batch`; returns `(session, (n_out, H))` in the same order."""
        if not batch:
            return []
        ids = [sid for sid, _ in batch]
        unknown = [sid for sid in ids if sid not in self.sessions]
        if unknown:
            raise KeyError(f"ASR: sessions {unknown!r} were not opened")
        if len(set(ids)) != len(ids):
            raise ValueError(f"ASR: a batch carries one turn per session, got {ids!r}")

        audio = torch.zeros(len(batch), N_SAMPLES, dtype=torch.float32)  # (B, 480000): zeros are whisper's padding
        for i, (sid, samples) in enumerate(batch):
            if not isinstance(samples, np.ndarray) or samples.ndim != 1 or samples.dtype != np.float32:
                raise AudioError(f"ASR: session {sid!r}: expected float32 (n,) audio from prepare_audio, got "
                                 f"{type(samples).__name__} {getattr(samples, 'dtype', '')} "
                                 f"{getattr(samples, 'shape', '')}")
            if samples.shape[0] > N_SAMPLES:
                raise AudioError(f"ASR: session {sid!r}: {samples.shape[0]} samples is more than 30 s at 16 kHz")
            audio[i, : samples.shape[0]] = torch.from_numpy(samples)
        if self.device.type == "cuda":
            audio = audio.pin_memory()
        audio = audio.to(self.device, non_blocking=True)

        mel = log_mel(audio, self.encoder.cfg.n_mels).to(self.dtype)  # (B, n_mels, 3000)
        emb = self.projector(self.encoder(mel))  # (B, n_out, H)
        return [(sid, emb[i]) for i, sid in enumerate(ids)]
