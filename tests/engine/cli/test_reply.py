"""cli/reply.py: the reply's WAV and JSON are written together or not at all, and through a device or a
symlink rather than over it."""
import json
import os
import stat

import numpy as np
import pytest

from omni2.engine.audio import read_wav
from omni2.engine.cli.reply import OutputError, Reply, check_writable


def reply() -> Reply:
    pcm = np.sin(np.arange(2400, dtype=np.float32) / 7) * 0.5
    return Reply("hi", [1, 2], [3, 4, 5], pcm, 24000, "stop", {"first_audio": 0.25})


def test_both_files_are_written(tmp_path, capsys):
    reply().save(tmp_path / "r.wav", tmp_path / "r.json")
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["units"] == [3, 4, 5] and doc["samples"] == 2400 and doc["timings"] == {"first_audio": 0.25}
    pcm, rate = read_wav(tmp_path / "r.wav")
    assert rate == 24000 and pcm.size == 2400
    assert np.abs(pcm - reply().pcm).max() <= 1 / 32768  # 16-bit PCM: within one step of the reply's samples
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.wav"]
    assert "first audio after 250 ms" in capsys.readouterr().err


def test_a_json_that_cannot_be_written_leaves_no_wav(tmp_path):
    """The directory went away while the reply was computed: neither file, no temporary left behind."""
    (tmp_path / "gone").mkdir()
    with pytest.raises(OutputError, match="cannot write"):
        reply().save(tmp_path / "gone" / "r.wav", tmp_path / "nodir" / "r.json")
    assert list((tmp_path / "gone").iterdir()) == []


def test_a_device_or_a_symlink_is_written_through_not_replaced(tmp_path):
    """--out /dev/null (as root, in a container) used to rename a WAV over the null device; a symlink became a
    file and its target stayed empty."""
    check_writable(out="/dev/null")
    reply().save("/dev/null")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    real, link = tmp_path / "real.wav", tmp_path / "link.wav"
    real.touch()
    link.symlink_to(real)
    reply().save(link)
    assert link.is_symlink() and read_wav(real)[0].size == 2400
