"""Audio input for one user turn: whatever the caller hands us becomes float32 mono 16 kHz, or a clear error.

Whisper (MODEL_SPEC §1.5) reads `whisper.load_audio`'s output: ffmpeg-decoded int16 PCM divided by 32768, mono, 16 kHz.
`prepare_audio` produces the same from numpy arrays, torch tensors or raw little-endian bytes, resampling with soxr.

Layout convention: a 1-D array is mono `(n,)`; a 2-D array is channels-last `(n, channels)`, as soundfile reads and
writes it. Channels are downmixed by their mean (ffmpeg's `-ac 1` does the same for stereo).

NOTE(audio): the official code silently truncates turns longer than 30 s (`pad_or_trim`), so the model never hears
the end of a long turn. We refuse them instead (`AudioError`); callers that want the official behaviour cut first.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

from omni2.engine.config import Limits

# hard-coded audio hyperparameters of Whisper's front end
SAMPLE_RATE = 16000
CHUNK_LENGTH = 30  # seconds: Whisper's encoder sees exactly this much audio per turn
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in a 30-second chunk

MAX_SAMPLE_RATE = 384000  # the highest rate common audio hardware offers; anything above is a caller's mistake
MAX_CHANNELS = 8  # more "channels" than 7.1 almost surely means a channels-first (channels, n) array
# Resampled or processed float audio may overshoot 1.0 a little (inter-sample peaks); far beyond that it is
# integer PCM that was cast to float without scaling, which Whisper would hear as clipped noise.
MAX_FLOAT_AMPLITUDE = 1.5
RAW_FORMATS = {"pcm16": np.dtype("<i2"), "f32": np.dtype("<f4")}  # little-endian, as WAV and the wire carry them


class AudioError(ValueError):
    """Audio the engine cannot turn into a Whisper input; the message says what is wrong with it."""


def prepare_audio(samples: Any, sample_rate: int, *, fmt: str | None = None,
                  max_seconds: float = Limits.max_audio_seconds) -> np.ndarray:
    """Turn one user turn's audio into a contiguous float32 mono 16 kHz array `(n,)` (a new array, never a view).

    `samples`: int16 PCM (scaled by 1/32768), float32/float64 in [-1, 1], shaped `(n,)` or `(n, channels)`, as a
    numpy array or torch tensor; or raw little-endian `bytes` with `fmt="pcm16"` or `fmt="f32"`.
    Any sample rate is resampled with soxr (HQ); 16 kHz input passes through unchanged.
    Raises `AudioError` for empty, non-finite, unscaled, oddly typed or longer than `max_seconds` audio.
    """
    if not 0 < max_seconds <= CHUNK_LENGTH:
        raise AudioError(f"max_seconds must be in (0, {CHUNK_LENGTH}] (Whisper hears {CHUNK_LENGTH} s), "
                         f"got {max_seconds}")
    sr = _check_rate(sample_rate)
    x = _to_array(samples, fmt)  # (n,) or (n, channels), float32 or float64
    if x.ndim == 2:
        x = x.mean(axis=1, dtype=np.float64) if x.shape[1] > 1 else x[:, 0]
    x = np.array(x, dtype=np.float32, order="C", copy=True)  # (n,)

    seconds = x.shape[0] / sr
    if seconds > max_seconds:
        raise AudioError(f"audio is {seconds:.2f} s long, more than the {max_seconds:g} s limit: Whisper hears "
                         f"{CHUNK_LENGTH} s per turn (the official code would cut the rest silently); split the turn")
    if sr != SAMPLE_RATE:
        x = soxr.resample(x, sr, SAMPLE_RATE, quality="HQ")
        if x.shape[0] == 0:
            raise AudioError(f"audio too short: nothing is left after resampling {sr} Hz to {SAMPLE_RATE} Hz")
        x = np.ascontiguousarray(x, dtype=np.float32)
    return x


def _check_rate(sample_rate: Any) -> float:
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, (int, float, np.integer, np.floating)):
        raise AudioError(f"sample_rate must be a number of Hz, got {sample_rate!r}")
    if not math.isfinite(sample_rate) or not 0 < sample_rate <= MAX_SAMPLE_RATE:
        raise AudioError(f"sample_rate {sample_rate} Hz is not in (0, {MAX_SAMPLE_RATE}]")
    return float(sample_rate)


def _to_array(samples: Any, fmt: str | None) -> np.ndarray:
    """Decode `samples` into a float array `(n,)` or `(n, channels)`, checked for emptiness, finiteness and scale."""
    if isinstance(samples, (bytes, bytearray, memoryview)):
        if fmt not in RAW_FORMATS:
            raise AudioError(f"raw bytes need fmt= one of {sorted(RAW_FORMATS)}, got fmt={fmt!r}")
        width = RAW_FORMATS[fmt].itemsize
        if len(samples) % width:
            raise AudioError(f"{fmt} audio must be a whole number of {width}-byte samples, got {len(samples)} bytes")
        x = np.frombuffer(samples, dtype=RAW_FORMATS[fmt])
    else:
        if fmt is not None:
            raise AudioError("fmt= describes raw bytes only; arrays carry their own dtype")
        try:
            torch = sys.modules.get("torch")  # not imported here: clients embed this module without torch
            if torch is not None and isinstance(samples, torch.Tensor):
                samples = samples.detach().cpu().numpy()
            x = np.asarray(samples)
        except (TypeError, ValueError) as e:
            raise AudioError(f"cannot read audio samples from {type(samples).__name__}: {e}") from e

    if x.ndim not in (1, 2):
        raise AudioError(f"audio must be (n,) or (n, channels), got shape {x.shape}")
    if x.size == 0:
        raise AudioError(f"audio is empty (shape {x.shape})")
    if x.ndim == 2 and x.shape[1] > MAX_CHANNELS:
        raise AudioError(f"audio of shape {x.shape} has {x.shape[1]} channels; arrays are (n, channels) - "
                         f"pass a channels-first array transposed")

    if x.dtype == np.int16:
        return x.astype(np.float32) / 32768.0  # whisper.load_audio's scaling: -32768 -> -1.0, 32767 -> 0.99997
    if x.dtype not in (np.float32, np.float64):
        raise AudioError(f"audio dtype {x.dtype} is not supported: use int16 PCM or float32/float64 in [-1, 1]")
    if not np.isfinite(x).all():
        raise AudioError("audio contains NaN or infinite samples")
    peak = float(np.abs(x).max())
    if peak > MAX_FLOAT_AMPLITUDE:
        raise AudioError(f"float audio peaks at {peak:g}, far outside [-1, 1]: it looks like unscaled integer PCM "
                         f"(divide int16 samples by 32768, or pass them as int16)")
    return x


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """Read an audio file (WAV, FLAC, OGG: whatever libsndfile reads) as float32 `(n,)` or `(n, channels)` and its
    sample rate; feed both to `prepare_audio`."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"no audio file at {path}")
    try:
        samples, sr = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"cannot read audio file {path}: {e}") from e
    return samples, int(sr)


def write_wav(path: str | Path, samples: np.ndarray, sample_rate: int, subtype: str = "PCM_16") -> None:
    """Write float samples in [-1, 1] (or int16) shaped `(n,)` or `(n, channels)` as a WAV file (16-bit by default)."""
    samples = np.asarray(samples)
    if samples.ndim not in (1, 2) or samples.size == 0:
        raise AudioError(f"cannot write audio of shape {samples.shape}: expected non-empty (n,) or (n, channels)")
    if samples.dtype not in (np.int16, np.float32, np.float64):
        raise AudioError(f"cannot write audio of dtype {samples.dtype}: use int16 or float32/float64")
    sr = _check_rate(sample_rate)
    if sr != int(sr):
        raise AudioError(f"WAV files need an integer sample rate, got {sample_rate}")
    sf.write(str(path), samples, int(sr), subtype=subtype, format="WAV")
