"""A whole reply as `generate` and `chat` report it: the WAV, reply.json and one line on stderr. No torch here:
`chat` is a client."""
from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from omni2.engine.audio import write_wav


class OutputError(ValueError):
    """An output file that cannot be written (one line for the user, as any bad argument)."""


def check_writable(**paths) -> None:
    """Before the work: each given output (flag name -> path, None = not asked for) can be created where it is
    asked for, so that a reply computed for minutes is not lost to a typo in a directory name."""
    for flag, path in paths.items():
        if path is None:
            continue
        p = Path(path)
        if p.is_dir():
            raise OutputError(f"--{flag} {path} is a directory; give a file name")
        parent = p.parent if str(p.parent) else Path(".")
        if not parent.is_dir():
            raise OutputError(f"--{flag} {path}: there is no directory {parent}")
        # A plain file is written beside itself and renamed (Reply.save): its directory must be writable; anything
        # else (/dev/null, a pipe, a symlink) is written through.
        if not os.access(p if p.exists() and not _plain(p) else parent, os.W_OK) or (
                p.exists() and not os.access(p, os.W_OK)):
            raise OutputError(f"--{flag} {path}: not writable")


def _plain(p: Path) -> bool:
    """Missing, or a regular file that is no symlink: what may be replaced by a rename."""
    return not p.exists() and not p.is_symlink() or p.is_file() and not p.is_symlink()


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
        """Write the reply WAV (and reply.json), and say what was written; shared by `generate` and `chat`. Each
        is written beside its target under a temporary name, and both are renamed into place once both are
        written: a failure leaves no half-written file, and no WAV without the JSON asked for."""
        targets = [Path(out)] + ([Path(json_path)] if json_path else [])
        # A device, a pipe or a symlink is written through, never renamed over (--out /dev/null as root would
        # replace the null device).
        temps = [t.with_name(f".{t.name}.{os.getpid()}.part") if _plain(t) else t for t in targets]
        try:
            write_wav(temps[0], self.pcm if self.pcm.size else np.zeros(1, np.float32), self.sample_rate)
            if json_path:
                temps[1].write_text(json.dumps(self.to_json(), indent=1))
            for tmp, target in zip(temps, targets):
                if tmp != target:
                    tmp.replace(target)
        except (OSError, RuntimeError) as e:  # RuntimeError: soundfile's own error type
            raise OutputError(f"cannot write {', '.join(map(str, targets))}: {e}") from e
        finally:
            for tmp, target in zip(temps, targets):
                if tmp != target:
                    tmp.unlink(missing_ok=True)
        if not first_audio:
            first_audio = f"{self.timings.get('first_audio', float('nan')) * 1e3:.0f} ms"
        print(f"wrote {out}: {self.pcm.size / self.sample_rate:.2f} s of audio, {len(self.units)} units, "
              f"{len(self.token_ids)} text tokens ({self.finish_reason}); first audio after {first_audio}",
              file=sys.stderr)
