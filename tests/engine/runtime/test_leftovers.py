"""What an engine leaves on the machine: the sweep of dead engines' names (wire/shm.sweep_dead) removes exactly
theirs, however they died, and never a live engine's; an engine's ipc sockets live in a directory only its user can
enter; a start that fails leaves nothing behind."""
import multiprocessing
import os
import stat
import subprocess
import time

import pytest
import torch

from omni2.engine.config import ConfigError, EngineConfig, Limits
from omni2.engine.runtime import Engine, EngineError
from omni2.engine.runtime import engine as engine_module
from omni2.engine.wire import shm

TAG = "o2sweeptest"  # not the engines' tag: a sweep here never meets a real engine's names, nor theirs this test's


def ended_process() -> tuple[subprocess.Popen, int]:
    """A child that has exited (not yet reaped) and the start time it had."""
    p = subprocess.Popen(["sleep", "60"])
    start = shm.process_start(p.pid)
    p.kill()
    deadline = time.monotonic() + 10
    while shm.proc_stat(p.pid)[1][0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    return p, start


def leave(prefix: str, tmp_dir) -> list[str]:
    """What an engine with `prefix` holds: a segment in /dev/shm, an ipc dir with a socket file in it."""
    seg = shm.create(prefix + "asr_in.0123abcd", 4096)
    seg.close()
    ipc = shm.make_ipc_dir(prefix, str(tmp_dir))
    open(os.path.join(ipc, prefix + "control"), "w").close()
    return [os.path.join(shm.SHM_DIR, seg.name), ipc]


def test_the_sweep_removes_dead_engines_names_and_only_theirs(tmp_path):
    me, my_start = os.getpid(), shm.process_start(os.getpid())
    zombie, zombie_start = ended_process()
    reaped, reaped_start = ended_process()
    reaped.wait()
    try:
        live = leave(f"{TAG}-{me}-{my_start}-0000aaaa-", tmp_path)
        dead = leave(f"{TAG}-{reaped.pid}-{reaped_start}-0000bbbb-", tmp_path)
        # exited, but its parent has not reaped it yet
        dead += leave(f"{TAG}-{zombie.pid}-{zombie_start}-0000cccc-", tmp_path)
        # this process's pid with another start time: an engine that died, its pid since given to this process
        dead += leave(f"{TAG}-{me}-{my_start - 1}-0000dddd-", tmp_path)
        # names of the version before start times: only the pid can be asked
        old_live = tmp_path / f"{TAG}-{me}-0000eeee-control"
        old_dead = tmp_path / f"{TAG}-{reaped.pid}-0000ffff-control"
        unrelated = tmp_path / f"{TAG}-tiny"
        for p in (old_live, old_dead, unrelated):
            p.touch()
        removed = shm.sweep_dead(TAG, str(tmp_path))
        assert sorted(removed) == sorted(dead + [str(old_dead)])
        assert not [p for p in removed if os.path.exists(p)]
        assert all(os.path.exists(p) for p in live + [old_live, unrelated])
        assert os.listdir(live[1]) == [f"{TAG}-{me}-{my_start}-0000aaaa-control"]  # the live dir, untouched
        assert shm.sweep_dead(TAG, str(tmp_path)) == []
    finally:
        zombie.wait()
        shm.sweep(f"{TAG}-{me}-", str(tmp_path))
        for name in os.listdir(tmp_path):
            if os.path.isdir(tmp_path / name):
                shm.remove_dir(str(tmp_path / name))


def test_the_ipc_dir_is_private_and_named_for_the_sweep(tmp_path):
    prefix = shm.new_prefix(TAG)
    old = os.umask(0)  # the mode must not depend on the caller's umask
    try:
        path = shm.make_ipc_dir(prefix, str(tmp_path))
    finally:
        os.umask(old)
    assert path == str(tmp_path / f"{prefix}ipc")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
    assert prefix.startswith(f"{TAG}-{os.getpid()}-{shm.process_start(os.getpid())}-")
    assert shm.sweep_dead(TAG, str(tmp_path)) == []  # its engine (this process) runs
    shm.remove_dir(path)
    assert not os.path.exists(path)


def test_a_gpu_this_torch_cannot_use_fails_the_start_before_anything_is_made(monkeypatch, tiny_ckpt, tiny_vocoder):
    monkeypatch.setattr(torch.version, "cuda", None)  # what a CPU build says, on any machine
    eng = Engine(EngineConfig(str(tiny_ckpt), str(tiny_vocoder), placement="asr=cpu,llm=cpu,tts=cuda:1,vocoder=cpu",
                              limits=Limits(max_sessions=2, max_new_tokens=6), threads=1))
    with pytest.raises(ConfigError, match="^device 'cuda:1': this torch .* is built without CUDA"):
        eng.start()
    assert eng.prefix is None and eng.ipc_dir is None  # no name taken, no worker spawned


def test_a_start_that_fails_leaves_nothing(monkeypatch, tiny_ckpt, tiny_vocoder):
    """The ASR worker cannot load (a GPU that is not there, let past the start's device check): start() fails
    without the restart budget, stops the other workers, and removes the segments, the sockets and their
    directory."""
    monkeypatch.setattr(engine_module, "check_device", lambda device: None)
    eng = Engine(EngineConfig(str(tiny_ckpt), str(tiny_vocoder), placement="asr=cuda:99,llm=cpu,tts=cpu,vocoder=cpu",
                              limits=Limits(max_sessions=2, max_new_tokens=6), threads=1))
    before = {p.pid for p in multiprocessing.active_children()}  # another test's engine may still run
    with pytest.raises(EngineError) as e:
        eng.start()
    assert e.value.code == "start_failed" and "asr worker exited with 1" in e.value.message, e.value.message
    assert eng.prefix and eng.ipc_dir
    assert not [n for n in os.listdir(shm.SHM_DIR) if n.startswith(eng.prefix)]
    assert not os.path.exists(eng.ipc_dir)
    assert not [n for n in os.listdir(os.path.dirname(eng.ipc_dir)) if n.startswith(eng.prefix)]
    assert not [p.name for p in multiprocessing.active_children() if p.pid not in before]
