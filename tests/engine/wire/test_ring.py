"""Shared-memory rings: exact, ordered delivery; backpressure with bounded occupancy; clear errors; no leaks.

Every wait has a timeout, every child is killed in a finally, and sockets are ipc in a fresh temp dir or
tcp://127.0.0.1 on ports the OS picks.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import shutil
import signal
import tempfile
import threading
import time

import msgpack
import numpy as np
import pytest
import torch
import zmq

from omni2.engine.wire import protocol as P
from omni2.engine.wire import ring, shm
from omni2.engine.wire.codec import ProtocolError

T = 10.0  # generous bound for anything that should take milliseconds


def leftovers(prefix: str, ipc_dir: str | None = None) -> list[str]:
    names = [n for n in os.listdir(shm.SHM_DIR) if n.startswith(prefix)]
    if ipc_dir and os.path.isdir(ipc_dir):
        names += [n for n in os.listdir(ipc_dir) if n.startswith(prefix)]
    return names


@pytest.fixture
def env():
    """(prefix, ipc_dir) for one test; afterwards nothing of it may remain."""
    prefix, ipc_dir = shm.new_prefix("o2t"), tempfile.mkdtemp(prefix="o2r")
    yield prefix, ipc_dir
    left = leftovers(prefix, ipc_dir)
    shm.sweep(prefix, ipc_dir)
    shutil.rmtree(ipc_dir, ignore_errors=True)
    assert not left, f"leaked: {left}"


def step_msg(i: int, rows: int = 3, h: int = 64) -> P.LlmToTts:
    g = torch.Generator().manual_seed(i)
    hidden = torch.randn(rows, h, generator=g).to(torch.bfloat16 if i % 2 else torch.float32)
    return P.LlmToTts([f"s{r}" for r in range(rows)], [i] * rows, list(range(i, i + rows)), hidden,
                      [r == rows - 1 for r in range(rows)], float(i))


def digest(m: P.LlmToTts) -> str:
    h = m.hidden.view(torch.int16) if m.hidden.dtype == torch.bfloat16 else m.hidden
    return hashlib.sha256(h.contiguous().numpy().tobytes() + repr((m.session_ids, m.token_ids)).encode()).hexdigest()


def same(a: P.LlmToTts, b: P.LlmToTts) -> bool:
    return digest(a) == digest(b) and a.hidden.dtype == b.hidden.dtype and a.turns == b.turns


@pytest.mark.parametrize("transport,shm", [("ipc", True), ("tcp", True), ("tcp", False)])
def test_threads_round_trip_in_order(env, transport, shm):
    prefix, ipc_dir = env
    n = 300
    with ring.Producer("llm-tts", prefix, n_slots=4, slot_bytes=8192, transport=transport, ipc_dir=ipc_dir,
                       use_shm=shm) as prod, ring.Consumer(prod.spec) as cons:
        errors = []

        def produce():
            try:
                for i in range(n):
                    prod.put(step_msg(i, rows=1 + i % 5), timeout=T)
                    if i % 50 == 0:  # in-band control keeps its place between data messages
                        prod.send(P.CancelSession("s0", i), timeout=T)
            except Exception as e:  # surfaced in the main thread
                errors.append(e)

        th = threading.Thread(target=produce, daemon=True)
        th.start()
        got = []
        while len(got) < n + n // 50:
            msg, slot = cons.recv(timeout=T)
            if isinstance(msg, P.CancelSession):
                assert slot is None
                got.append(("cancel", msg.turn))
            else:
                assert same(msg, step_msg(msg.turns[0], rows=1 + msg.turns[0] % 5))
                got.append(("step", msg.turns[0]))
                cons.release(slot)
        th.join(T)
        assert not errors and not th.is_alive()
        expected = []
        for i in range(n):
            expected.append(("step", i))
            if i % 50 == 0:
                expected.append(("cancel", i))
        assert got == expected
        assert prod.stats().high_water <= 4 and cons.stats().in_use == 0


def test_tensors_are_views_into_the_slot(env):
    prefix, ipc_dir = env
    with ring.Producer("v", prefix, n_slots=2, slot_bytes=4096, ipc_dir=ipc_dir) as prod, \
            ring.Consumer(prod.spec) as cons:
        prod.put(P.AudioDelta("s", np.arange(8, dtype=np.float32), 24000, False, 0.0), timeout=T)
        msg, slot = cons.recv(timeout=T)
        assert np.array_equal(msg.pcm, np.arange(8)) and msg.pcm.ctypes.data % ring.ALIGN == 0
        assert not msg.pcm.flags.owndata  # a view of the mapped slot
        cons.release(slot)
        prod.put(P.AudioDelta("s", np.ones(4, np.float32), 24000, True, 0.0), timeout=T)
        msg, slot = cons.recv(timeout=T, copy=True)  # copied and released at once
        assert slot is None and np.array_equal(msg.pcm, np.ones(4)) and cons.stats().in_use == 0


def _consume(spec_dict: dict, n: int, results: mp.Queue, hold: bool) -> None:
    cons = ring.Consumer(ring.RingSpec.from_dict(spec_dict))
    try:
        for _ in range(n):
            msg, slot = cons.recv(timeout=T)
            results.put((msg.turns[0], digest(msg)))
            if hold:  # never releases: the parent kills this process while it holds slots
                continue
            cons.release(slot)
    finally:
        cons.close()


def _spawn(target, *args) -> mp.Process:
    p = mp.get_context("spawn").Process(target=target, args=args, daemon=True)
    p.start()
    return p


def test_cross_process_round_trip_then_kill_consumer(env):
    prefix, ipc_dir = env
    q = mp.get_context("spawn").Queue()
    with ring.Producer("tts-voc", prefix, n_slots=4, slot_bytes=1 << 16, ipc_dir=ipc_dir) as prod:
        child = _spawn(_consume, prod.spec.to_dict(), 50, q, False)
        try:
            for i in range(50):
                prod.put(step_msg(i, rows=2, h=256), timeout=30)  # first put waits for the child to start
            got = [q.get(timeout=T) for _ in range(50)]
            assert got == [(i, digest(step_msg(i, rows=2, h=256))) for i in range(50)]
            child.join(T)
            assert child.exitcode == 0
            # a consumer that dies holding slots (it owns no segment): SIGKILL it, the producer reclaims
            child = _spawn(_consume, prod.spec.to_dict(), 4, q, True)
            for i in range(4):
                prod.put(step_msg(i), timeout=30)
            for _ in range(4):
                q.get(timeout=T)
            with pytest.raises(ring.RingTimeout):
                prod.put(step_msg(99), timeout=0.2)
            os.kill(child.pid, signal.SIGKILL)
            child.join(T)
            prod.reclaim()
            assert prod.stats().in_use == 0
            consumer = ring.Consumer(prod.spec)
            prod.put(step_msg(5), timeout=T)
            msg, slot = consumer.recv(timeout=T)
            assert same(msg, step_msg(5))
            consumer.release(slot)
            consumer.close()
        finally:
            if child.is_alive():
                child.kill()
                child.join(T)
    assert leftovers(prefix, ipc_dir) == []


def test_stalled_consumer_blocks_producer_then_nothing_lost(env):
    prefix, ipc_dir = env
    n_slots, n = 4, 40
    with ring.Producer("asr-llm", prefix, n_slots=n_slots, slot_bytes=8192, ipc_dir=ipc_dir) as prod, \
            ring.Consumer(prod.spec) as cons:
        # 1. fill: the (N+1)th put has no credit and times out, occupancy stays at N
        for i in range(n_slots):
            prod.put(step_msg(i), timeout=T)
        t0 = time.monotonic()
        with pytest.raises(ring.RingTimeout, match="4/4 in use"):
            prod.put(step_msg(n_slots), timeout=0.3)
        assert time.monotonic() - t0 >= 0.29
        assert prod.stats().in_use == n_slots

        # 2. a producer thread blocks on acquire while the consumer is stalled
        sent = []

        def produce():
            for i in range(n_slots, n):
                prod.put(step_msg(i), timeout=T)
                sent.append(i)

        th = threading.Thread(target=produce, daemon=True)
        th.start()
        deadline = time.monotonic() + T
        while prod.stats().waits < 2:  # the thread found no credit: it waits (the first wait was step 1's)
            assert time.monotonic() < deadline, prod.stats()
            time.sleep(0.01)
        st = prod.stats()
        assert sent == [] and st.in_use == n_slots and st.high_water == n_slots and st.messages == n_slots
        assert th.is_alive()

        # 3. the consumer resumes: everything arrives, in order, exactly
        for i in range(n):
            msg, slot = cons.recv(timeout=T)
            assert msg.turns[0] == i and same(msg, step_msg(i))
            cons.release(slot)
        th.join(T)
        assert not th.is_alive() and sent == list(range(n_slots, n))
        st = prod.stats()
        assert st.high_water == n_slots and st.waits >= 2 and st.wait_s >= 0.29  # step 1 waited 0.3 s


def test_a_slot_reused_under_a_new_generation_is_released_apart(env):
    """The producer reclaims its slots (its consumer was replaced) while this consumer still holds a message in
    slot 0, and the next message lands in slot 0 under the new generation. Releasing the old message must not hand
    slot 0 back under the new one: the producer would overwrite a message still in use."""
    prefix, ipc_dir = env
    with ring.Producer("gen", prefix, n_slots=1, slot_bytes=8192, ipc_dir=ipc_dir) as prod, \
            ring.Consumer(prod.spec) as cons:
        prod.put(step_msg(1), timeout=T)
        _, old = cons.recv(timeout=T)
        prod.reclaim()
        prod.put(step_msg(2), timeout=T)
        new_msg, new = cons.recv(timeout=T)
        assert old[0] == new[0] == 0 and old != new
        cons.release(old)  # a credit of the old generation: ignored
        with pytest.raises(ring.RingTimeout, match="1/1 in use"):
            prod.put(step_msg(3), timeout=0.3)
        assert same(new_msg, step_msg(2))  # not overwritten
        cons.release(new)
        prod.put(step_msg(3), timeout=T)
        msg, slot = cons.recv(timeout=T)
        assert same(msg, step_msg(3))
        cons.release(slot)
        with pytest.raises(ring.RingError, match="not held"):
            cons.release(slot)


def test_payload_larger_than_slot_is_an_error(env):
    prefix, ipc_dir = env
    with ring.Producer("voc-server", prefix, n_slots=2, slot_bytes=1000, ipc_dir=ipc_dir) as prod, \
            ring.Consumer(prod.spec) as cons:
        big = P.AudioDelta("s", np.zeros(1000, np.float32), 24000, False, 0.0)
        with pytest.raises(ring.PayloadTooLarge, match=r"'voc-server'.*4000 bytes.*1024 bytes"):
            prod.put(big, timeout=T)
        assert prod.stats().in_use == 0  # the slot went back
        with pytest.raises(ring.RingError, match="needs a slot"):
            prod.send(big, timeout=T)
        prod.put(P.AudioDelta("s", np.zeros(256, np.float32), 24000, True, 0.0), timeout=T)
        msg, slot = cons.recv(timeout=T)
        assert msg.final and msg.pcm.shape == (256,)
        cons.release(slot)
        with pytest.raises(ring.RingError, match="not held"):
            cons.release(slot)


def test_close_wakes_a_waiting_producer_and_consumer(env):
    prefix, ipc_dir = env
    prod = ring.Producer("w", prefix, n_slots=1, slot_bytes=64, ipc_dir=ipc_dir)
    cons = ring.Consumer(prod.spec)
    prod.put(P.CloseSession("a"), timeout=T)
    with pytest.raises(ring.RingTimeout):
        cons.recv(timeout=0.05) and cons.recv(timeout=0.05)
    errors = queue.Queue()

    def wait(fn):
        try:
            fn()
        except Exception as e:
            errors.put(e)

    ths = [threading.Thread(target=wait, args=(prod.acquire,), daemon=True),
           threading.Thread(target=wait, args=(lambda: cons.recv(),), daemon=True)]
    for th in ths:
        th.start()
    time.sleep(0.2)
    t0 = time.monotonic()
    prod.close()
    cons.close()
    for th in ths:
        th.join(T)
    assert time.monotonic() - t0 < 2.0
    got = [errors.get(timeout=T) for _ in ths]
    assert all(isinstance(e, ring.RingClosed) for e in got), got
    with pytest.raises(ring.RingClosed):
        prod.put(P.CloseSession("a"))
    assert leftovers(prefix, ipc_dir) == []


def test_release_does_not_wait_behind_a_blocked_recv(env):
    prefix, ipc_dir = env
    with ring.Producer("rel", prefix, n_slots=1, slot_bytes=4096, ipc_dir=ipc_dir) as prod, \
            ring.Consumer(prod.spec) as cons:
        prod.put(step_msg(0), timeout=T)
        _, slot = cons.recv(timeout=T)
        got = queue.Queue()
        th = threading.Thread(target=lambda: got.put(cons.recv(timeout=T)), daemon=True)  # an IO thread
        th.start()
        time.sleep(0.1)
        t0 = time.monotonic()
        cons.release(slot)  # from the main loop, while the IO thread waits in recv
        assert time.monotonic() - t0 < 1.0
        prod.put(step_msg(1), timeout=T)  # the credit came back
        msg, slot = got.get(timeout=T)
        assert same(msg, step_msg(1))
        cons.release(slot)
        th.join(T)


def test_malformed_ring_messages_raise_and_return_their_slot(env):
    prefix, _ = env
    ctx = zmq.Context.instance()
    data, credit = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    data.setsockopt(zmq.LINGER, 0)
    credit.setsockopt(zmq.LINGER, 0)
    credit.setsockopt(zmq.RCVTIMEO, int(T * 1000))
    try:
        data.bind("tcp://127.0.0.1:*")
        credit.bind("tcp://127.0.0.1:*")
        spec = ring.RingSpec("bad", 2, 64, data.getsockopt_string(zmq.LAST_ENDPOINT),
                             credit.getsockopt_string(zmq.LAST_ENDPOINT), prefix + "bad.")
        with ring.Consumer(spec) as cons:
            kind = bytes((P.KINDS[P.TextDelta],))
            good = P.encode(P.TextDelta("s", "x", 1, 0.0))
            cases = [
                [b"x"],  # too few frames
                [*good, b"\xc1"],  # envelope is not msgpack
                [*good, msgpack.packb(["", 0, 7, []])],  # slot out of range
                [kind, b"\x93", msgpack.packb(["", 0, 1, []])],  # bad body, valid slot -> credit back
                [*good, msgpack.packb(["other.seg", 0, 0, [[0, 4]]])],  # not this edge's segment
                [*good, msgpack.packb([prefix + "bad.gone", 0, 0, [[0, 4]]])],  # no such segment
                [*good, msgpack.packb(["", 0, -1, [[0, 4]]])],  # spans without a segment
            ]
            for frames in cases:
                data.send_multipart(frames)
                with pytest.raises(ProtocolError):
                    cons.recv(timeout=T)
            returned = [P.decode(credit.recv_multipart()) for _ in range(3)]  # the cases with a valid slot
            assert sorted(c.slot for c in returned) == [0, 0, 1] and cons.stats().in_use == 0
            data.send_multipart([*good, msgpack.packb(["", 0, -1, []])])  # still serving
            assert cons.recv(timeout=T)[0] == P.TextDelta("s", "x", 1, 0.0)
    finally:
        data.close()
        credit.close()


def test_restarted_producer_is_picked_up(env):
    prefix, ipc_dir = env
    prod = ring.Producer("re", prefix, n_slots=2, slot_bytes=4096, ipc_dir=ipc_dir)
    cons = ring.Consumer(prod.spec)
    try:
        prod.put(step_msg(1), timeout=T)
        msg, slot = cons.recv(timeout=T)
        old = msg.hidden  # still readable after the producer goes: the consumer's map outlives it
        prod.close()
        prod = ring.Producer("re", prefix, n_slots=2, slot_bytes=4096, ipc_dir=ipc_dir)  # same addresses
        cons.release(slot)  # an old-generation credit: ignored by the new producer
        prod.put(step_msg(2), timeout=T)
        msg, slot = cons.recv(timeout=T)
        assert same(msg, step_msg(2)) and torch.equal(old, step_msg(1).hidden)
        cons.release(slot)
    finally:
        prod.close()
        cons.close()


def _own_segment(prefix: str, ipc_dir: str, ready: mp.Queue) -> None:
    prod = ring.Producer("orphan", prefix, n_slots=2, slot_bytes=1 << 20, ipc_dir=ipc_dir)
    ready.put(prod.spec.to_dict())
    time.sleep(60)  # killed long before


def test_sweep_removes_what_a_killed_creator_left(env):
    prefix, ipc_dir = env
    q = mp.get_context("spawn").Queue()
    child = _spawn(_own_segment, prefix, ipc_dir, q)
    try:
        spec = ring.RingSpec.from_dict(q.get(timeout=30))
        os.kill(child.pid, signal.SIGKILL)
        child.join(T)
        left = leftovers(prefix, ipc_dir)
        assert any(n.startswith(spec.shm_prefix) for n in os.listdir(shm.SHM_DIR)), left
        removed = shm.sweep(prefix, ipc_dir)
        assert sorted(removed) == sorted(left) and leftovers(prefix, ipc_dir) == []
    finally:
        if child.is_alive():
            child.kill()
            child.join(T)


def test_sweep_refuses_broad_prefixes():
    for bad in ("", "o", "a/b", "../x"):
        with pytest.raises(ValueError):
            shm.sweep(bad)


def test_spec_round_trips_as_plain_values(env):
    prefix, ipc_dir = env
    with ring.Producer("s", prefix, ipc_dir=ipc_dir, n_slots=3, slot_bytes=100) as prod:
        assert prod.spec == ring.ipc_spec("s", prefix, ipc_dir=ipc_dir, n_slots=3, slot_bytes=100)
        d = prod.spec.to_dict()
        assert ring.RingSpec.from_dict(msgpack.unpackb(msgpack.packb(d))) == prod.spec
        assert prod.spec.slot_bytes == 128  # rounded up to the alignment


def test_bad_arguments_leave_nothing_behind(env):
    prefix, ipc_dir = env
    with pytest.raises(ValueError, match="longer than"):
        ring.Producer("e", prefix, ipc_dir=os.path.join(ipc_dir, "x" * 120))  # segment made, then bind refused
    with pytest.raises(ValueError, match="transport"):
        ring.Producer("e", prefix, transport="udp")
    with pytest.raises(ValueError, match="plain name"):
        ring.Producer("../e", prefix)
    assert leftovers(prefix, ipc_dir) == []
