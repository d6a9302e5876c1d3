"""ZMQ CURVE on a non-loopback bind: only clients whose public key the daemon lists get in (no token needed);
everyone else fails the handshake and never reaches the daemon."""
from __future__ import annotations

import subprocess

import pytest

from omni2.engine.cli import main as cli
from omni2.engine.client import Client, DaemonUnavailable
from tests.engine.serve.daemon_harness import EXE, Daemon, env, free_port, speech


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("curve")
    for name in ("server", "alice", "mallory"):
        assert cli.main(["curve-keys", name, "--out", str(d / "keys")]) == 0
    (d / "clients").mkdir()
    (d / "clients" / "alice.key").write_bytes((d / "keys" / "alice.key").read_bytes())  # alice only
    return d


@pytest.fixture(scope="module")
def daemon(tiny_ckpt, tiny_vocoder, keys):
    alice = dict(curve_server_key=str(keys / "keys" / "server.key"),
                 curve_secret_file=str(keys / "keys" / "alice.key_secret"))
    d = Daemon(["--model-dir", str(tiny_ckpt), "--vocoder-dir", str(tiny_vocoder),
                "--curve-secret-file", str(keys / "keys" / "server.key_secret"), "--curve-clients",
                str(keys / "clients")], keys / "serve.log", host="0.0.0.0", client_kw=alice)
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def test_curve_without_a_client_list_is_not_enough_off_loopback(keys):
    r = subprocess.run([EXE, "serve", "--bind", f"tcp://0.0.0.0:{free_port()}", "--curve-secret-file",
                        str(keys / "keys" / "server.key_secret")], capture_output=True, text=True, env=env(),
                       timeout=120)
    assert r.returncode == 2 and "refusing to bind" in r.stderr


def test_a_listed_client_talks(daemon, keys):
    with daemon.client() as c:
        s = c.open(greedy=True, max_new_tokens=6)
        r = s.reply(speech(1.0, seed=11), 16000)
        assert r.token_ids and r.finish_reason in ("stop", "length")
        s.close()
    rc = cli.main(["status", "--connect", daemon.address, "--curve-server-key", str(keys / "keys" / "server.key"),
                   "--curve-secret-file", str(keys / "keys" / "alice.key_secret")])
    assert rc == 0


@pytest.mark.parametrize("who", ["mallory", "anonymous", "plain"])
def test_others_never_get_an_answer(daemon, keys, who):
    kw = {"plain": {}, "anonymous": dict(curve_server_key=str(keys / "keys" / "server.key")),
          "mallory": dict(curve_server_key=str(keys / "keys" / "server.key"),
                          curve_secret_file=str(keys / "keys" / "mallory.key_secret"))}[who]
    with Client(daemon.address, connect_timeout=1.0, **kw) as c:
        with pytest.raises(DaemonUnavailable):
            c.ping()
        with pytest.raises(DaemonUnavailable):
            c.open()
    with daemon.client() as c:  # and the daemon is fine
        assert c.ping() < 5
