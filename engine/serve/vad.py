"""Server-side turn detection for the Realtime endpoint: the Silero VAD model, run with onnxruntime, and the
Realtime API's `server_vad` rules on top of it (threshold, prefix padding, silence duration).

Silero VAD (MIT) ships its ONNX graph inside the `silero-vad` wheel; we load that file and nothing else from the
package. The graph scores 512 samples of 16 kHz audio at a time (32 ms), reading the 64 samples before them as
context and a recurrent state it returns; audio at any other rate is resampled to 16 kHz first.
"""
from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

import numpy as np

VAD_RATE = 16000
FRAME = 512  # samples per score at 16 kHz: 32 ms
CONTEXT = 64  # samples of the previous frame the graph reads before each frame


def model_path() -> str:
    """The ONNX file inside the installed silero-vad package."""
    try:
        return str(resources.files("silero_vad") / "data" / "silero_vad.onnx")
    except ModuleNotFoundError:
        raise RuntimeError("server VAD needs the silero-vad package (pip install 'omni2-engine[realtime]')") from None


class SileroVAD:
    """Speech probability per 32 ms frame of one audio stream (stateful: one instance per stream)."""

    _sessions: dict[str, object] = {}  # one onnxruntime session per process, shared by every stream

    def __init__(self):
        import onnxruntime as ort

        path = model_path()
        if path not in SileroVAD._sessions:
            opts = ort.SessionOptions()
            opts.inter_op_num_threads = opts.intra_op_num_threads = 1  # a 2 MB model: threads cost more than they give
            SileroVAD._sessions[path] = ort.InferenceSession(path, sess_options=opts,
                                                             providers=["CPUExecutionProvider"])
        self.session = SileroVAD._sessions[path]
        self.reset()

    def reset(self) -> None:
        self.state = np.zeros((2, 1, 128), np.float32)
        self.context = np.zeros((1, CONTEXT), np.float32)

    def __call__(self, frame: np.ndarray) -> float:
        """The probability that this frame (512 float32 samples at 16 kHz) is speech."""
        x = np.concatenate([self.context, frame.reshape(1, FRAME).astype(np.float32)], axis=1)
        prob, self.state = self.session.run(None, {"input": x, "state": self.state,
                                                   "sr": np.array(VAD_RATE, np.int64)})
        self.context = x[:, -CONTEXT:]
        return float(prob[0, 0])


@dataclass
class VADSettings:
    """The Realtime API's server_vad parameters, with its defaults."""

    threshold: float = 0.5
    prefix_padding_ms: int = 300
    silence_duration_ms: int = 500
    create_response: bool = True  # answer a turn when its speech stops (else wait for response.create)
    interrupt_response: bool = True  # speech over a response cancels it (barge-in)

    @classmethod
    def from_json(cls, d: dict) -> VADSettings:
        s = cls()
        for name in ("threshold", "prefix_padding_ms", "silence_duration_ms"):
            if d.get(name) is not None:
                setattr(s, name, d[name])
        if not (isinstance(s.threshold, (int, float)) and 0.0 <= s.threshold <= 1.0):
            raise ValueError("turn_detection.threshold must be a number in [0, 1]")
        for name in ("prefix_padding_ms", "silence_duration_ms"):
            v = getattr(s, name)
            if not (isinstance(v, int) and 0 <= v <= 10_000):
                raise ValueError(f"turn_detection.{name} must be an integer number of ms in [0, 10000]")
        for name in ("create_response", "interrupt_response"):
            if d.get(name) is not None:
                if not isinstance(d[name], bool):
                    raise ValueError(f"turn_detection.{name} must be true or false")
                setattr(s, name, d[name])
        return s

    def to_json(self) -> dict:
        return {"type": "server_vad", "threshold": self.threshold, "prefix_padding_ms": self.prefix_padding_ms,
                "silence_duration_ms": self.silence_duration_ms, "create_response": self.create_response,
                "interrupt_response": self.interrupt_response}


@dataclass
class VADEvent:
    kind: str  # "speech_started" | "speech_stopped"
    ms: int  # audio_start_ms / audio_end_ms: position in the input buffer's stream, in ms


class TurnDetector:
    """server_vad over a stream of 16 kHz float32 audio: speech starts at the first frame scoring >= threshold
    (reported `prefix_padding_ms` earlier, never before the detector's start) and stops after
    `silence_duration_ms` of frames below it (reported at the end of the last speech frame). Positions are ms of the
    input stream: a detector started mid-stream (after a commit, a clear, a new rate) is given where, `origin_ms`."""

    def __init__(self, settings: VADSettings, vad: SileroVAD | None = None, origin_ms: int = 0):
        self.settings, self.vad = settings, vad or SileroVAD()
        self.origin_ms = origin_ms
        self.pending = np.zeros(0, np.float32)
        self.frames = 0  # frames scored since the detector began
        self.speaking = False
        self.silent_frames = 0
        self.last_speech_end_ms = origin_ms

    def feed(self, audio16k: np.ndarray) -> list[VADEvent]:
        events = []
        self.pending = np.concatenate([self.pending, audio16k.astype(np.float32)])
        n = self.pending.size // FRAME
        frame_ms = 1000 * FRAME // VAD_RATE
        for i in range(n):
            p = self.vad(self.pending[i * FRAME:(i + 1) * FRAME])
            start_ms = self.origin_ms + self.frames * frame_ms
            end_ms = start_ms + frame_ms
            self.frames += 1
            if p >= self.settings.threshold:
                self.silent_frames = 0
                self.last_speech_end_ms = end_ms
                if not self.speaking:
                    self.speaking = True
                    events.append(VADEvent("speech_started",
                                           max(self.origin_ms, start_ms - self.settings.prefix_padding_ms)))
            elif self.speaking:
                self.silent_frames += 1
                if self.silent_frames * frame_ms >= self.settings.silence_duration_ms:
                    self.speaking = False
                    events.append(VADEvent("speech_stopped", self.last_speech_end_ms))
        self.pending = self.pending[n * FRAME:]
        return events
