"""Hostile input at the daemon's front door: 2,000 malformed frames (bench/fuzz_daemon.py) each get an error reply and
the daemon still serves; tokens on a non-loopback bind; oversized requests."""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import numpy as np
import pytest
import zmq

from omni2.engine.client import RemoteError
from omni2.engine.wire import protocol as P
from tests.engine.serve.daemon_harness import EXE, Daemon, env, free_port, speech

TOKEN = "s3cret-token-for-the-test"
_spec = importlib.util.spec_from_file_location("fuzz_daemon", Path(__file__).parents[3] / "bench" / "fuzz_daemon.py")
fuzz_daemon = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz_daemon)


@pytest.fixture(scope="module")
def daemon(tiny_ckpt, tiny_vocoder, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-fuzz")
    (tmp / "token").write_text(TOKEN + "\n")
    # Reachable from other machines (0.0.0.0), so the token is mandatory; the test connects through 127.0.0.1.
    d = Daemon(["--model-dir", str(tiny_ckpt), "--vocoder-dir", str(tiny_vocoder), "--token-file",
                str(tmp / "token")], tmp / "serve.log", host="0.0.0.0", token=TOKEN)
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def test_a_non_loopback_bind_needs_a_token():
    r = subprocess.run([EXE, "serve", "--bind", f"tcp://0.0.0.0:{free_port()}"], capture_output=True, text=True,
                       env=env(), timeout=120)
    assert r.returncode == 2 and "refusing to bind" in r.stderr and "--token-file" in r.stderr


def test_a_wrong_token_is_refused(daemon):
    for token in ("", "wrong", TOKEN + "x", TOKEN[:-1]):
        with daemon.client(token=token) as c:
            with pytest.raises(RemoteError) as e:
                c.open()
            assert e.value.code == "unauthorized"
            with pytest.raises(RemoteError) as e:
                c.status()
            assert e.value.code == "unauthorized"
    with daemon.client() as c:
        c.open().close()
        assert c.status()["sessions"] == 0


def test_two_thousand_malformed_frames_then_a_normal_session(daemon):
    out = fuzz_daemon.fuzz(daemon.address, 2000, TOKEN, seed=1, log=print)
    assert out["sent"] == 2000
    assert set(out["categories"]) >= {"random", "many_frames", "kind", "types", "arity", "huge", "tensor",
                                      "unknown_session", "values", "out_of_order", "ping"}
    assert {"bad_message", "unknown_session", "unauthorized", "bad_value", "bad_audio"} <= set(out["codes"])
    with daemon.client() as c:
        s = c.open(greedy=True, max_new_tokens=6)
        r = s.reply(speech(1.0, seed=3), 16000)
        assert r.finish_reason in ("stop", "length") and r.token_ids
        s.close()
        st = c.status()
    assert st["sessions"] == 0 and st["server"]["errors"] >= 2000 - 40


def test_oversized_requests(daemon):
    with daemon.client() as c:
        s = c.open()
        big = np.zeros(1_200_000, np.float32)  # 4.8 MB in one audio.append: over the 4 MiB limit
        c.send(P.AudioAppend(s.id, big, 16000))
        err = c.next_event(s.id, 10)
        assert isinstance(err, P.ServerError) and (err.code, err.in_reply_to) == ("too_large", "audio.append"), err
        s.append(big, 48000)  # the client chunks a long utterance itself: accepted
        s.close()
    # far over the limit: ZMQ drops the connection unread (no reply), and the daemon goes on
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(daemon.address)
    sock.send_multipart([b"\x61", b"\x00" * (9 << 20)])
    assert not sock.poll(1000)
    sock.close()
    with daemon.client() as c:
        assert c.ping() < 5
