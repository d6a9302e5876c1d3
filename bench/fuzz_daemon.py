"""Fuzz `omni2-engine serve`'s front door: malformed frames in, one `error` reply each out, and the daemon still
serves a normal session afterwards.

    .venv/bin/python bench/fuzz_daemon.py --frames 10000                      # starts its own daemon (demo model)
    .venv/bin/python bench/fuzz_daemon.py --frames 10000 --connect tcp://127.0.0.1:5555 [--token-file F]

Frame kinds: random bytes; thousands of frames in one message; kinds that are not requests (server events, the
engine's internal messages, unknown bytes); valid requests with one field of the wrong type, or too few / too many
fields; huge declared sizes (msgpack headers claiming 4 GiB, tensor shapes of 2**40, deep nesting); requests for
session ids that do not exist; values out of range; and, on sessions of its own (with the token), requests out of
order (commit with no audio, cancel with no reply, a second open, bad audio). The daemon handles one connection's
requests in order, so reply i answers frame i: every frame must get exactly one reply, an `error` (a `pong` for
the valid pings mixed in). tests/engine/serve/test_fuzz.py runs 2,000 of these against a test daemon.
"""
from __future__ import annotations

import argparse
import random
import sys
import time

import msgpack
import numpy as np
import zmq

from omni2.engine.wire import protocol as P

WRONG = [None, 0, -1, 2**64 - 1, -(2**63), 1.5, float("nan"), "", "x" * 300, b"\x00\xff", [], [1, "a"], {}, {"a": 1},
         True, False]
HUGE = [b"\xdd\xff\xff\xff\xff", b"\xdb\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff",
        b"\xdc\xff\xff", b"\x91" * 200_000 + b"\x00", b"\xc7\xff\x05" + b"\x00" * 10]  # arrays, str, bin, map, ext
REQUEST_KINDS = {P.KINDS[c] for c in P.CLIENT_REQUESTS}


def _pack(values) -> bytes:
    return msgpack.packb(values, use_bin_type=True)


def _sid(rng: random.Random) -> str:
    return "nope-" + "".join(rng.choice("abcdef0123456789") for _ in range(12))


def valid_request(rng: random.Random, sid: str, token: str = "wrong", opens: bool = True) -> object:
    """A well-formed request that must still fail: an unknown session, or (opens) a session.open with a wrong token."""
    audio = np.zeros(rng.randint(1, 800), np.int16 if rng.random() < 0.5 else np.float32)
    return rng.choice([
        *([P.SessionOpen(sid, token, "default", 0, 0.0, 0, 1.0, 1.0, 50, 1.0, 8, "streaming", "pcm16", "", "")]
          * opens),
        P.AudioAppend(sid, audio, 16000), P.AudioCommit(sid), P.ResponseCancel(sid), P.SessionClose(sid),
        P.StatusRequest(rng.randint(0, 10**6), token)])


def malformed(rng: random.Random, token: str | None, own: list[str]) -> tuple[str, list[bytes]]:
    """(category, frames) of one bad request. `own`: sessions the fuzzer opened with the real token."""
    cats = ["random", "many_frames", "kind", "types", "arity", "huge", "tensor", "unknown_session", "values"]
    if own:
        cats.append("out_of_order")
    cat = rng.choice(cats)
    if cat == "random":
        return cat, [rng.randbytes(rng.randint(0, 300)) for _ in range(rng.randint(1, 4))]
    if cat == "many_frames":  # a valid request followed by thousands of empty frames
        return cat, [*(bytes(f) for f in P.encode(P.Ping(1))), *[b""] * rng.randint(3, 5000)]
    if cat == "kind":
        k = rng.choice([k for k in range(256) if k not in REQUEST_KINDS])
        msg = valid_request(rng, _sid(rng))
        body = P.encode(msg)[1] if rng.random() < 0.5 else _pack([rng.choice(WRONG) for _ in range(rng.randint(0, 5))])
        return cat, [bytes((k,)), bytes(body)]
    if cat in ("types", "arity"):
        # a daemon without a token would accept a session.open whose mutation happened to stay well-formed
        msg = valid_request(rng, _sid(rng), opens=token is not None)
        frames = [bytes(f) for f in P.encode(msg)]
        values = msgpack.unpackb(frames[1])
        if cat == "types":
            values[rng.randrange(len(values))] = rng.choice(WRONG)
        elif rng.random() < 0.5 and values:
            values.pop(rng.randrange(len(values)))
        else:
            values.append(rng.choice(WRONG))
        return cat, [frames[0], _pack(values), *frames[2:]]
    if cat == "huge":
        k = bytes((rng.choice(sorted(REQUEST_KINDS)),))
        return cat, [k, rng.choice(HUGE)]
    if cat == "tensor":
        desc = rng.choice([["int16", [2**40], 0], ["float32", [2**20, 2**20], 0], ["int16", [-1], 0],
                           ["int16", [1] * 9, 0], ["complex64", [4], 0], ["int16", [4], 7], ["int16", [4], -1],
                           ["int16", [4], 0], ["bfloat16", [4], 0], ["int16", "4", 0]])
        buf = b"\x00" * rng.choice([0, 2, 6, 8])  # "int16 [4]" with 8 bytes is fine: then an extra buffer is not
        extra = [buf] if rng.random() < 0.5 else [buf, b"\x00\x00"]
        return cat, [bytes((P.KINDS[P.AudioAppend],)), _pack([_sid(rng), desc, 16000]), *extra]
    if cat == "unknown_session":
        msg = valid_request(rng, _sid(rng), token or "")
        if isinstance(msg, (P.SessionOpen, P.StatusRequest)):
            msg = P.AudioCommit(_sid(rng))
        return cat, [bytes(f) for f in P.encode(msg)]
    if cat == "values":
        bad = dict(session_id=rng.choice(["", "x" * 65, "a b", "ü", "s/1"]), seed=rng.choice([-1, 2**63 - 1]),
                   temperature=rng.choice([-1.0, float("nan"), float("inf"), 1e9]), top_k=-5,
                   top_p=rng.choice([0.0, 1.5, float("nan")]), max_new_tokens=rng.choice([0, -3, 10**9]),
                   mode="telepathy", audio_format="mp3", stream_params=rng.choice(["(9,9)", "eval('1')", "x" * 99]),
                   voice=rng.choice(["", "v" * 65]), vocoder_schedule=rng.choice(["fast", "LIVE", "x" * 99]))
        field = rng.choice(sorted(bad))
        fields = dict(session_id=_sid(rng), token=token or "wrong", voice="default", seed=0, temperature=0.0, top_k=0,
                      top_p=1.0, tts_temperature=1.0, tts_top_k=50, tts_top_p=1.0, max_new_tokens=8,
                      mode="streaming", audio_format="pcm16", stream_params="", vocoder_schedule="")
        fields[field] = bad[field]
        return cat, [bytes(f) for f in P.encode(P.SessionOpen(**fields))]
    # out_of_order, on a session that exists: nothing here may be accepted
    sid = rng.choice(own)
    msg = rng.choice([
        P.AudioCommit(sid),  # no audio appended
        P.ResponseCancel(sid),  # no reply in flight
        P.SessionOpen(sid, token, "default", 0, 0.0, 0, 1.0, 1.0, 50, 1.0, 8, "streaming", "pcm16", "", ""),
        P.AudioAppend(sid, np.zeros(4, np.int32), 16000), P.AudioAppend(sid, np.zeros((4, 2), np.int16), 16000),
        P.AudioAppend(sid, np.zeros(0, np.float32), 16000), P.AudioAppend(sid, np.zeros(4, np.int16), 10**7),
        P.AudioAppend(sid, np.zeros(4, np.float64), 16000),
        P.ResponseDone(sid, 0, "", [], [], "stop", {}), P.SessionOpened(sid, 1, "", "", "", "", 1.0)])
    return cat, [bytes(f) for f in P.encode(msg)]


def fuzz(address: str, n: int, token: str | None = None, seed: int = 0, window: int = 100,
         timeout: float = 30.0, log=print) -> dict:
    """Send n malformed requests (and a ping every 50) on one connection; check reply i answers request i."""
    rng = random.Random(seed)
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(address)

    def recv() -> object:
        while True:
            if not sock.poll(int(timeout * 1000)):
                raise TimeoutError(f"no reply from {address} within {timeout} s")
            ev = P.decode(sock.recv_multipart())
            if not (isinstance(ev, P.Pong) and ev.nonce == -1):  # the daemon's idle probes
                return ev

    own = []
    if token is not None:  # sessions of our own, for the out-of-order requests
        for i in range(2):
            sock.send_multipart(P.encode(P.SessionOpen(f"fuzz{i}", token, "default", 0, 0.0, 0, 1.0, 1.0, 50, 1.0,
                                                       8, "streaming", "pcm16", "", "")))
            ev = recv()
            assert isinstance(ev, P.SessionOpened), ev
            own.append(f"fuzz{i}")
    counts: dict[str, int] = {}
    codes: dict[str, int] = {}
    sent = 0
    t0 = time.perf_counter()
    while sent < n:
        expect = []
        for _ in range(min(window, n - sent)):
            if sent % 50 == 49:
                cat, frames = "ping", [bytes(f) for f in P.encode(P.Ping(sent))]
            else:
                cat, frames = malformed(rng, token, own)
            sock.send_multipart(frames)
            expect.append((cat, frames))
            sent += 1
        for cat, frames in expect:
            ev = recv()
            counts[cat] = counts.get(cat, 0) + 1
            if cat == "ping":
                if not isinstance(ev, P.Pong):
                    raise AssertionError(f"ping answered by {ev}")
                continue
            if not isinstance(ev, P.ServerError):
                raise AssertionError(f"{cat} frames {[f[:40] for f in frames]} were answered by {ev}")
            codes[ev.code] = codes.get(ev.code, 0) + 1
    for sid in own:
        sock.send_multipart(P.encode(P.SessionClose(sid)))
        assert isinstance(recv(), P.SessionClosed)
    sock.close()
    dt = time.perf_counter() - t0
    log(f"fuzz: {sent} frames in {dt:.1f} s ({sent / dt:.0f}/s), each answered; by kind {counts}; codes {codes}")
    return {"sent": sent, "categories": counts, "codes": codes, "seconds": dt}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--frames", type=int, default=10_000)
    ap.add_argument("--connect", help="a running daemon (default: start one on the demo model)")
    ap.add_argument("--token-file", help="the daemon's token: enables the out-of-order requests on own sessions")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    token = open(args.token_file).read().strip() if args.token_file else None
    daemon = None
    address = args.connect
    if address is None:
        import os
        import secrets
        import tempfile

        from daemon_process import DaemonProcess, free_address, serve_argv

        address = free_address()
        token = secrets.token_hex(16)  # with a token the fuzz can also open sessions of its own
        token_file = os.path.join(tempfile.mkdtemp(), "token")
        with open(token_file, "w") as f:
            f.write(token)
        print(f"starting serve on {address} (demo model) ...", file=sys.stderr)
        daemon = DaemonProcess(serve_argv(address, "--token-file", token_file, "--log-level", "WARNING"), address,
                               token=token)
        daemon.start()
    from omni2.engine.client import Client

    try:
        with Client(address, token=token or "") as c:
            c.ping(timeout=5.0)  # a --connect daemon that is not there fails here, before the fuzz
            fuzz(address, args.frames, token, args.seed, log=lambda s: print(s, file=sys.stderr))
            # still serving: a normal session with a real turn
            s = c.open(greedy=True, max_new_tokens=6)
            t = np.arange(16000) / 16000
            r = s.reply((0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), 16000)
            s.close()
            print(f"after the fuzz: a normal turn gave {len(r.token_ids)} tokens, {len(r.units)} units, "
                  f"{r.audio.size} samples ({r.finish_reason})", file=sys.stderr)
    finally:
        if daemon is not None:
            daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
