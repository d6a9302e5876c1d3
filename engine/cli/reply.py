"""A whole reply as `generate` and `chat` report it: the WAV, reply.json and one line on stderr. No torch here:
`chat` is a client."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omni2.engine.audio import write_wav


@dataclass
class Reply:
    text: str
    token_ids: list[int]
    units: list[int]
    pcm: np.ndarray
    sample_rate: int
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"text": self.text, "token_ids": self.token_ids, "units": self.units,
                "finish_reason": self.finish_reason, "sample_rate": self.sample_rate,
                "samples": int(self.pcm.size), "timings": self.timings}

    def save(self, out, json_path=None, first_audio: str = "") -> None:
        """Write the reply WAV (and reply.json), and say what was written; shared by `generate` and `chat`."""
        write_wav(out, self.pcm if self.pcm.size else np.zeros(1, np.float32), self.sample_rate)
        if not first_audio:
            first_audio = f"{self.timings.get('first_audio', float('nan')) * 1e3:.0f} ms"
        print(f"wrote {out}: {self.pcm.size / self.sample_rate:.2f} s of audio, {len(self.units)} units, "
              f"{len(self.token_ids)} text tokens ({self.finish_reason}); first audio after {first_audio}",
              file=sys.stderr)
        if json_path:
            Path(json_path).write_text(json.dumps(self.to_json(), indent=1))
