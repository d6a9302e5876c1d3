import numpy as np
import pytest
import torch

from omni2.engine.audio import N_SAMPLES, SAMPLE_RATE, AudioError, prepare_audio, read_wav, write_wav


def _sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    t = np.arange(int(sr * seconds)) / sr
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def _peak_hz(x: np.ndarray, sr: int) -> float:
    spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / sr)[spectrum.argmax()])


# --- accepted input -------------------------------------------------------------------------------------------

def test_float32_16k_passes_through_untouched_as_a_copy():
    x = np.random.default_rng(0).uniform(-1, 1, 16000).astype(np.float32)
    y = prepare_audio(x, 16000)
    assert y.dtype == np.float32 and y.shape == x.shape and y.flags.c_contiguous
    np.testing.assert_array_equal(y, x)
    assert not np.shares_memory(x, y)


def test_float64_becomes_float32():
    x = np.linspace(-1, 1, 1000)
    y = prepare_audio(x, SAMPLE_RATE)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, x, atol=1e-7)


def test_int16_scaling_matches_whisper_load_audio():
    x = np.array([-32768, -16384, 0, 1, 16384, 32767], dtype=np.int16)
    y = prepare_audio(x, SAMPLE_RATE)
    np.testing.assert_array_equal(y, np.array([-1.0, -0.5, 0.0, 1 / 32768, 0.5, 32767 / 32768], np.float32))


def test_raw_bytes_pcm16_and_f32_little_endian():
    pcm = np.array([0, 16384, -32768, 32767], dtype="<i2")
    np.testing.assert_array_equal(prepare_audio(pcm.tobytes(), 16000, fmt="pcm16"), pcm.astype(np.float32) / 32768)
    f = np.array([0.25, -0.5, 1.0], dtype="<f4")
    np.testing.assert_array_equal(prepare_audio(bytearray(f.tobytes()), 16000, fmt="f32"), f)


def test_stereo_channels_last_is_downmixed_by_mean():
    left = np.full(800, 0.5, np.float32)
    right = np.full(800, -0.1, np.float32)
    y = prepare_audio(np.stack([left, right], axis=1), SAMPLE_RATE)  # (n, 2)
    assert y.shape == (800,)
    np.testing.assert_allclose(y, 0.2, atol=1e-7)
    stereo16 = np.stack([np.full(10, 16384, np.int16), np.zeros(10, np.int16)], axis=1)
    np.testing.assert_allclose(prepare_audio(stereo16, SAMPLE_RATE), 0.25)


def test_single_channel_2d_and_torch_tensor():
    x = np.random.default_rng(1).uniform(-1, 1, (500, 1)).astype(np.float32)
    np.testing.assert_array_equal(prepare_audio(x, SAMPLE_RATE), x[:, 0])
    np.testing.assert_array_equal(prepare_audio(torch.from_numpy(x[:, 0]), SAMPLE_RATE), x[:, 0])


@pytest.mark.parametrize("sr, freq", [(44100, 1000.0), (8000, 440.0), (48000, 3000.0), (22050, 2500.0)])
def test_resampling_keeps_length_and_frequency(sr, freq):
    seconds = 2.0
    y = prepare_audio(_sine(freq, sr, seconds), sr)
    assert abs(len(y) - seconds * SAMPLE_RATE) <= 2
    assert abs(_peak_hz(y, SAMPLE_RATE) - freq) <= 1.0  # 0.5 Hz bins over 2 s
    assert 0.45 < np.abs(y[1000:-1000]).max() < 0.55  # amplitude kept, no gain change


def test_exactly_max_seconds_is_accepted_at_any_rate():
    for sr in (16000, 44100, 8000):
        y = prepare_audio(np.zeros(30 * sr, np.int16), sr)
        assert len(y) == N_SAMPLES


def test_shorter_limit():
    prepare_audio(np.zeros(16000 * 5, np.float32), SAMPLE_RATE, max_seconds=5.0)
    with pytest.raises(AudioError, match="5 s limit"):
        prepare_audio(np.zeros(16000 * 5 + 1, np.float32), SAMPLE_RATE, max_seconds=5.0)


# --- refused input --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("samples", [np.zeros(0, np.float32), np.zeros(0, np.int16), np.zeros((0, 2), np.float32),
                                     b""])
def test_empty(samples):
    with pytest.raises(AudioError, match="empty"):
        prepare_audio(samples, SAMPLE_RATE, fmt="pcm16" if isinstance(samples, bytes) else None)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite(bad):
    x = np.zeros(100, np.float32)
    x[17] = bad
    with pytest.raises(AudioError, match="NaN or infinite"):
        prepare_audio(x, SAMPLE_RATE)
    with pytest.raises(AudioError, match="NaN or infinite"):
        prepare_audio(x.tobytes(), SAMPLE_RATE, fmt="f32")


def test_pcm16_bytes_of_odd_length():
    with pytest.raises(AudioError, match="2-byte samples"):
        prepare_audio(b"\x00\x01\x02", SAMPLE_RATE, fmt="pcm16")
    with pytest.raises(AudioError, match="4-byte samples"):
        prepare_audio(b"\x00" * 6, SAMPLE_RATE, fmt="f32")


def test_bytes_need_a_known_format():
    for fmt in (None, "pcm24", "s16le"):
        with pytest.raises(AudioError, match="fmt="):
            prepare_audio(b"\x00\x00", SAMPLE_RATE, fmt=fmt)
    with pytest.raises(AudioError, match="raw bytes only"):
        prepare_audio(np.zeros(4, np.int16), SAMPLE_RATE, fmt="pcm16")


@pytest.mark.parametrize("samples", [np.zeros(8, np.complex64), np.array([0.1, None], dtype=object),
                                     np.zeros(8, np.int32), np.zeros(8, np.uint8), np.zeros(8, bool),
                                     np.zeros(8, np.float16), ["a", "b"]])
def test_unsupported_dtype(samples):
    with pytest.raises(AudioError, match="not supported"):
        prepare_audio(samples, SAMPLE_RATE)


@pytest.mark.parametrize("sr", [0, -16000, 0.0, 384001, float("nan"), float("inf"), "16000", None, True])
def test_bad_sample_rate(sr):
    with pytest.raises(AudioError, match="sample_rate"):
        prepare_audio(np.zeros(100, np.float32), sr)


@pytest.mark.parametrize("sr", [16000, 44100, 8000])
def test_longer_than_30_seconds(sr):
    with pytest.raises(AudioError, match="more than the 30 s limit"):
        prepare_audio(np.zeros(30 * sr + 1, np.int16), sr)


def test_limit_above_30_seconds_is_refused():
    with pytest.raises(AudioError, match="max_seconds"):
        prepare_audio(np.zeros(10, np.float32), SAMPLE_RATE, max_seconds=31.0)


def test_unscaled_float_pcm():
    pcm_as_float = (_sine(440, SAMPLE_RATE, 0.1) * 32767).astype(np.float32)
    with pytest.raises(AudioError, match="unscaled"):
        prepare_audio(pcm_as_float, SAMPLE_RATE)
    prepare_audio(np.array([1.2, -1.2], np.float32), SAMPLE_RATE)  # a small overshoot is tolerated


def test_bad_shapes():
    with pytest.raises(AudioError, match=r"\(n, channels\)"):
        prepare_audio(np.zeros((2, 16000), np.float32), SAMPLE_RATE)  # channels-first
    with pytest.raises(AudioError, match="shape"):
        prepare_audio(np.zeros((4, 4, 2), np.float32), SAMPLE_RATE)
    with pytest.raises(AudioError, match="shape"):
        prepare_audio(np.float32(0.5), SAMPLE_RATE)


def test_too_short_to_survive_resampling():
    with pytest.raises(AudioError, match="too short"):
        prepare_audio(np.zeros(1, np.float32), 48000)


# --- files ----------------------------------------------------------------------------------------------------

def test_wav_round_trip(tmp_path):
    x = _sine(440, 24000, 0.5)
    write_wav(tmp_path / "a.wav", x, 24000)
    y, sr = read_wav(tmp_path / "a.wav")
    assert sr == 24000 and y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y, x, atol=1 / 32768 + 1e-6)  # 16-bit quantisation
    stereo = np.stack([x, -x], axis=1)
    write_wav(tmp_path / "s.wav", stereo, 24000, subtype="FLOAT")
    y, _ = read_wav(tmp_path / "s.wav")
    np.testing.assert_array_equal(y, stereo)
    np.testing.assert_allclose(prepare_audio(y, 24000), 0.0, atol=1e-6)


def test_read_wav_errors(tmp_path):
    with pytest.raises(AudioError, match="no audio file"):
        read_wav(tmp_path / "missing.wav")
    (tmp_path / "junk.wav").write_bytes(b"not a wav file at all")
    with pytest.raises(AudioError, match="cannot read"):
        read_wav(tmp_path / "junk.wav")


def test_write_wav_errors(tmp_path):
    with pytest.raises(AudioError):
        write_wav(tmp_path / "e.wav", np.zeros(0, np.float32), 16000)
    with pytest.raises(AudioError):
        write_wav(tmp_path / "e.wav", np.zeros(10, np.complex64), 16000)
    with pytest.raises(AudioError):
        write_wav(tmp_path / "e.wav", np.zeros(10, np.float32), 16000.5)
