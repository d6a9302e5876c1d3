"""A daemon killed with -9 cannot clean up: its workers notice and go, but the shared-memory segment and the ipc
sockets of its engine stay. The next daemon's start removes them, and it leaves alone those of an engine that runs."""
from __future__ import annotations

import os
import socket
import subprocess
import tempfile
import time

from omni2.engine.cli.generate import session_options
from omni2.engine.config import EngineConfig, Limits
from omni2.engine.runtime import Engine
from omni2.engine.runtime.topology import EDGES
from omni2.engine.wire import shm
from omni2.engine.wire.protocol import TurnDone
from tests.engine.serve.daemon_harness import EXE, Daemon, alive, env, speech


def files_of(engine: Engine) -> tuple[list[str], list[str]]:
    """(its segments, its ipc sockets)"""
    return sorted(n for n in os.listdir(shm.SHM_DIR) if n.startswith(engine.prefix)), sorted(os.listdir(engine.ipc_dir))


def test_a_killed_daemons_leftovers_go_when_the_next_one_starts(tiny_ckpt, tiny_vocoder, tmp_path):
    args = ["--model-dir", str(tiny_ckpt), "--vocoder-dir", str(tiny_vocoder), "--max-new-tokens", "6"]
    first = Daemon(args, tmp_path / "first.log")
    live = Engine(EngineConfig(str(tiny_ckpt), str(tiny_vocoder), limits=Limits(max_sessions=2, max_new_tokens=6),
                               threads=1, hang_s=5.0))
    try:
        live.start()  # while the first daemon loads
        workers = first.worker_pids()
        # Any engine that starts after the kill may sweep them (a parallel test's, here): what counts is that they
        # existed when it died and are gone once the next daemon runs.
        left = first.leftovers()
        assert any(p.startswith(shm.SHM_DIR) for p in left) and any(os.path.isdir(p) for p in left), left
        first.proc.kill()
        first.proc.wait()
        deadline = time.monotonic() + 30
        while any(alive(p) for p in workers):  # orphans: they see it at their next heartbeat
            assert time.monotonic() < deadline, [p for p in workers if alive(p)]
            time.sleep(0.05)
        ours = files_of(live)
        assert [len(names) for names in ours] == [len(EDGES), 2 * len(EDGES) + 1]  # per ring a segment, 2 sockets

        second = Daemon(args, tmp_path / "second.log")
        try:
            with second.client() as c:
                s = c.open(greedy=True, max_new_tokens=6)
                reply = s.reply(speech(1.0, seed=1), 16000, timeout=120)
                assert reply.finish_reason in ("stop", "length") and reply.audio.size > 0
                s.close()
            assert first.leftovers() == []
            assert files_of(live) == ours  # a running engine's names are not the sweep's
            assert os.stat(live.ipc_dir).st_mode & 0o777 == 0o700
            live.open("s", session_options(seed=1, greedy=True))
            assert isinstance(list(live.turn("s", speech(1.0, seed=2), timeout=60))[-1], TurnDone)
            live.close("s")
        finally:
            assert second.stop() == 0
        assert second.leftovers() == []
    finally:
        live.stop()
        first.stop()


def test_a_port_in_use_leaves_nothing(tiny_ckpt, tiny_vocoder):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        p = subprocess.Popen([EXE, "serve", "--bind", f"tcp://127.0.0.1:{port}", "--model-dir", str(tiny_ckpt),
                              "--vocoder-dir", str(tiny_vocoder)], stderr=subprocess.PIPE, text=True, env=env())
        _, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "cannot bind" in err, err
    prefix = f"omni2-{p.pid}-"
    assert not [n for d in (shm.SHM_DIR, tempfile.gettempdir()) for n in os.listdir(d) if n.startswith(prefix)]
