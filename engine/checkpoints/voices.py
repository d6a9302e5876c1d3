"""Voice enrolment: a prompt wav -> the 192-d speaker x-vector the flow model conditions on (MODEL_SPEC §2.4).

Exactly CosyVoice's `_extract_spk_embedding`: 16 kHz audio in [-1, 1] -> Kaldi fbank (80 bins, dither 0, the other
torchaudio.compliance.kaldi defaults: 25 ms Povey windows every 10 ms, pre-emphasis 0.97, DC removal, power
spectrum, log) -> subtract the per-bin mean over time -> campplus.onnx on [1, T, 80] -> 192 floats.

kaldi-native-fbank and onnxruntime are optional (`pip install omni2-engine[voice]`), imported only here and only
when a voice is enrolled; stored voices (`voices/<name>.npy`) need neither.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

from omni2.engine.audio import SAMPLE_RATE, prepare_audio, read_wav
from omni2.engine.config import CheckpointError, ConfigError

N_FBANK = 80
FRAME_LENGTH = 400  # samples in one 25 ms Kaldi frame at 16 kHz; shorter audio has no frame
MAX_PROMPT_SECONDS = 30.0
VOICE_DIM = 192  # CAM++ x-vector width (the flow's spk_embed_dim)


class VoiceError(ConfigError):
    """Voice enrolment cannot run: a missing optional package or an unusable prompt."""


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise VoiceError(f"voice enrolment needs the {package} package: pip install 'omni2-engine[voice]' "
                         f"({e})") from None


def kaldi_fbank(wav: np.ndarray) -> np.ndarray:
    """Kaldi log-mel filterbank (T, 80) float32 of 16 kHz float audio (n,), with torchaudio.compliance.kaldi.fbank's
    defaults and dither 0 (snip_edges: T = 1 + (n - 400) // 160)."""
    knf = _require("kaldi_native_fbank", "kaldi-native-fbank")
    wav = np.ascontiguousarray(wav, dtype=np.float32)
    if wav.ndim != 1 or wav.shape[0] < FRAME_LENGTH:
        raise VoiceError(f"a voice prompt needs at least {FRAME_LENGTH} samples (25 ms) of mono 16 kHz audio, "
                         f"got shape {wav.shape}")
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = SAMPLE_RATE
    opts.frame_opts.dither = 0.0  # knf's default is 3e-5; CosyVoice passes dither=0
    opts.frame_opts.snip_edges = True
    opts.frame_opts.window_type = "povey"
    opts.mel_opts.num_bins = N_FBANK
    opts.mel_opts.low_freq = 20.0
    opts.mel_opts.high_freq = 0.0  # 0: the Nyquist frequency
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    fb = knf.OnlineFbank(opts)
    fb.accept_waveform(SAMPLE_RATE, wav.tolist())  # samples as given: torchaudio does not rescale to int16 either
    fb.input_finished()
    return np.stack([fb.get_frame(i) for i in range(fb.num_frames_ready)]).astype(np.float32)


@functools.lru_cache(maxsize=4)
def _session(path: str, mtime: float):
    ort = _require("onnxruntime", "onnxruntime")
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as CosyVoice's frontend
    return ort.InferenceSession(path, sess_options=opts, providers=["CPUExecutionProvider"])


def speaker_embedding(wav16k: np.ndarray, campplus: str | Path) -> np.ndarray:
    """x-vector (192,) float32 of 16 kHz mono float audio, through `campplus` (the cosy2_decoder's campplus.onnx)."""
    campplus = Path(campplus)
    if not campplus.is_file():
        raise CheckpointError(f"no speaker model at {campplus}")
    feat = kaldi_fbank(wav16k)
    feat = feat - feat.mean(axis=0, keepdims=True)  # per-bin mean over time
    sess = _session(str(campplus), campplus.stat().st_mtime)
    out = sess.run(None, {sess.get_inputs()[0].name: feat[None]})[0]
    out = np.asarray(out, dtype=np.float32).reshape(-1)
    if out.shape != (VOICE_DIM,):
        raise CheckpointError(f"{campplus} returned {out.size} values, not a {VOICE_DIM}-d x-vector")
    return out


def enroll_wav(path: str | Path, campplus: str | Path) -> np.ndarray:
    """x-vector (192,) of a prompt audio file (any rate/channels: read, downmixed, resampled to 16 kHz)."""
    from omni2.engine.audio import AudioError

    try:
        samples, sr = read_wav(path)
        wav = prepare_audio(samples, sr, max_seconds=MAX_PROMPT_SECONDS)
    except AudioError as e:
        raise VoiceError(f"voice prompt {path}: {e}") from e
    return speaker_embedding(wav, campplus)
