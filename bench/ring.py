"""Ring (shared-memory slot + msgpack header) vs plain ZMQ (payload as a frame) between two processes.

    .venv/bin/python bench/ring.py                       # 16 KiB and 2 MiB, a table
    .venv/bin/python bench/ring.py --seconds 3 --read --json ring.json

Each message is a VocoderToEngine with one float32 PCM payload, encoded by engine/wire/protocol.py on both paths.
Latency: one message in flight at a time (the consumer acks each), measured from just before the producer
encodes/writes to the consumer holding a decoded array (perf_counter is CLOCK_MONOTONIC, shared by processes).
Throughput: the producer sends flat out for --seconds; the consumer counts. Both paths are bounded to 8
messages in flight (ring: 8 slots; ZMQ: SNDHWM = RCVHWM = 8) so neither buys speed with unbounded memory.
The consumer touches one sample per message by default (ring reads are zero-copy, so the bytes are never
read); --read makes it sum the whole payload on both paths.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time

import numpy as np
import zmq

from omni2.engine.wire import protocol as P
from omni2.engine.wire import ring, shm

HWM = 8
WARMUP = 20  # the first message also waits for the consumer process to start
TIMEOUT = 30.0


def _message(payload: np.ndarray) -> P.VocoderToEngine:
    return P.VocoderToEngine(["s"], [0], [payload], [False], 24000, time.perf_counter())


def _consumer(mode: str, where: dict | str, ack_addr: str, read: bool) -> None:
    ctx = zmq.Context()
    ack = ctx.socket(zmq.PUSH)
    ack.connect(ack_addr)
    if mode == "ring":
        cons = ring.Consumer(ring.RingSpec.from_dict(where), ctx=ctx)

        def recv():
            return cons.recv(timeout=TIMEOUT)

        release = cons.release
    else:
        pull = ctx.socket(zmq.PULL)
        pull.setsockopt(zmq.RCVHWM, HWM)
        pull.setsockopt(zmq.RCVTIMEO, int(TIMEOUT * 1000))
        pull.connect(where)

        def recv():
            return P.decode(pull.recv_multipart(copy=False)), None

        def release(slot):
            pass

    def touch(msg) -> float:
        x = msg.pcm[0]
        return float(x.sum()) if read else float(x[-1])

    lat = []
    while True:  # 1. latency, ping-pong (the producer's first WARMUP messages are not counted)
        msg, slot = recv()
        if isinstance(msg, P.Shutdown):
            break
        touch(msg)
        lat.append(time.perf_counter() - msg.t)
        release(slot)
        ack.send(b"")
    n, nbytes, t0, t1 = 0, 0, None, None
    while True:  # 2. throughput, flat out
        msg, slot = recv()
        if isinstance(msg, P.Shutdown):
            break
        touch(msg)
        t1 = time.perf_counter()
        t0 = t0 or t1
        n += 1
        nbytes += msg.pcm[0].nbytes
        release(slot)
    # the first message opens the clock, so n - 1 messages were received in t1 - t0
    ack.send(json.dumps({"lat": lat, "n": n - 1, "bytes": nbytes * (n - 1) / max(n, 1), "s": t1 - t0}).encode())
    if mode == "ring":
        cons.close()
    ctx.destroy(linger=0)


def run_pair(mode: str, size: int, seconds: float, read: bool, ipc_dir: str) -> dict:
    prefix = shm.new_prefix("o2bench")
    ctx = zmq.Context.instance()
    ack = ctx.socket(zmq.PULL)
    ack.setsockopt(zmq.LINGER, 0)
    ack.setsockopt(zmq.RCVTIMEO, int(TIMEOUT * 1000))
    ack_addr = f"ipc://{ipc_dir}/{prefix}ack"
    ack.bind(ack_addr)
    payload = np.random.default_rng(0).standard_normal(size // 4).astype(np.float32)
    prod = push = None
    if mode == "ring":
        prod = ring.Producer("bench", prefix, n_slots=HWM, slot_bytes=size + 4096, ipc_dir=ipc_dir, ctx=ctx)
        where = prod.spec.to_dict()

        def send(msg):
            prod.put(msg, timeout=TIMEOUT)

        def stop():
            prod.send(P.Shutdown("phase"), timeout=TIMEOUT)
    else:
        push = ctx.socket(zmq.PUSH)
        push.setsockopt(zmq.LINGER, 0)
        push.setsockopt(zmq.SNDHWM, HWM)
        push.setsockopt(zmq.SNDTIMEO, int(TIMEOUT * 1000))
        where = f"ipc://{ipc_dir}/{prefix}plain"
        push.bind(where)

        def send(msg):
            push.send_multipart(P.encode(msg), copy=False)  # large frames go zero-copy into libzmq

        def stop():
            push.send_multipart(P.encode(P.Shutdown("phase")))
    child = mp.get_context("spawn").Process(target=_consumer, args=(mode, where, ack_addr, read), daemon=True)
    child.start()
    try:
        t_end = time.monotonic() + seconds / 2
        n_lat = 0
        while (time.monotonic() < t_end or n_lat < WARMUP + 50) and n_lat < 20000:
            send(_message(payload))
            ack.recv()
            n_lat += 1
        stop()
        t_end = time.monotonic() + seconds
        while time.monotonic() < t_end:
            send(_message(payload))
        stop()
        res = json.loads(ack.recv())
        child.join(TIMEOUT)
    finally:
        if child.is_alive():
            child.kill()
            child.join(TIMEOUT)
        if prod is not None:
            prod.close()
        if push is not None:
            push.close()
        ack.close()
        shm.sweep(prefix, ipc_dir)
    lat_us = np.array(res["lat"][WARMUP:]) * 1e6
    return {"payload_bytes": size, "path": mode, "p50_us": float(np.percentile(lat_us, 50)),
            "p99_us": float(np.percentile(lat_us, 99)), "latency_samples": len(lat_us),
            "msgs_per_s": res["n"] / res["s"], "GB_per_s": res["n"] * size / res["s"] / 1e9, "read": read}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[16 << 10, 2 << 20], help="payload bytes")
    ap.add_argument("--seconds", type=float, default=2.0, help="throughput phase per run (latency: half)")
    ap.add_argument("--read", action="store_true", help="consumer sums every payload (reads all bytes)")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    ipc_dir = tempfile.mkdtemp(prefix="o2b")
    rows = []
    try:
        for size in args.sizes:
            for mode in ("ring", "zmq"):
                rows.append(run_pair(mode, size, args.seconds, args.read, ipc_dir))
    finally:
        os.rmdir(ipc_dir)
    print(f"{'payload':>9} {'path':>5} {'p50 us':>9} {'p99 us':>9} {'msgs/s':>10} {'GB/s':>7}")
    for r in rows:
        kib = r["payload_bytes"] / 1024
        label = f"{kib:.0f} KiB" if kib < 1024 else f"{kib / 1024:.0f} MiB"
        print(f"{label:>9} {r['path']:>5} {r['p50_us']:9.1f} {r['p99_us']:9.1f} {r['msgs_per_s']:10.0f} "
              f"{r['GB_per_s']:7.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cpus": os.cpu_count(), "python": sys.version.split()[0], "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
