"""Bounded rings between stage workers: a shared-memory segment of N fixed-size slots per edge, a ZMQ PUSH/PULL
doorbell carrying each message's header, and a second PUSH/PULL carrying credits (freed slots) back.

    producer                                   consumer
    slot = acquire()       (waits: no credit)
    send(msg, slot)  --[kind, body, SlotRef]-->  msg, slot = recv()     (tensors are views into the slot)
                     <------ SlotCredit -------  release(slot)          (after the views are no longer used)

At most N messages are in flight per edge, so memory is bounded by N x slot_bytes and a stalled consumer stalls
its producer instead of growing a queue. The producer binds both sockets and owns the segment; segment names
start with a per-engine prefix (`shm.new_prefix()`) so `shm.sweep(prefix)` can remove what a killed engine left
behind.
A Producer is used from one thread. A Consumer's recv() from one thread, its release() from any (it never waits
behind a blocked recv). `close()` may come from any thread and wakes a waiting call with RingClosed.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import os
import secrets
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from multiprocessing.shared_memory import SharedMemory

import zmq

from omni2.engine.wire import codec, protocol, shm
from omni2.engine.wire.codec import ProtocolError
from omni2.engine.wire.protocol import SlotCredit, SlotRef

log = logging.getLogger(__name__)

ALIGN = 64  # each tensor starts on a cache line inside its slot
Held = tuple[int, int]  # what a consumer hands back to release a message: (slot, the producer's generation)
_IPC_MAX = 6 + 107  # "ipc://" + sun_path (108 bytes on Linux, with its NUL)


class RingError(RuntimeError):
    """Misuse of a ring (sending a tensor without a slot, releasing a slot not held)."""


class RingClosed(RingError):
    """The ring was closed, possibly by another thread while this call waited."""


class RingTimeout(RingError, TimeoutError):
    """No credit (producer) or no message (consumer) within the timeout."""


class PayloadTooLarge(RingError, ValueError):
    """A message's tensors do not fit one slot. Never truncated."""


@dataclass(frozen=True, slots=True)
class RingSpec:
    """What a consumer needs to attach; plain values, so it can travel in msgpack or as a spawn argument."""

    edge: str
    n_slots: int
    slot_bytes: int
    data_addr: str
    credit_addr: str
    shm_prefix: str  # segment names start with this; "" = no shared memory, tensor bytes ride as frames

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RingSpec:
        return cls(**d)


@dataclass(slots=True)
class RingStats:
    edge: str
    n_slots: int
    slot_bytes: int
    in_use: int  # producer: slots acquired or not yet credited back; consumer: slots held
    high_water: int
    messages: int
    waits: int = 0  # producer: acquires that found no credit
    wait_s: float = 0.0


@dataclass
class _Resources:
    """Everything an endpoint must give back; closed by close() or, as a backstop, by weakref.finalize."""

    sockets: list
    fds: list[int]
    segment: SharedMemory | None = None  # producer only: the creator unlinks
    paths: list[str] = dataclasses.field(default_factory=list)  # ipc socket files the producer bound

    def close(self) -> None:
        for s in self.sockets:
            s.close(linger=0)
        for fd in self.fds:
            os.close(fd)
        for path in self.paths:  # libzmq leaves them when the context outlives the socket
            shm.unlink(path)
        if self.segment is not None:
            try:
                self.segment.close()
            except BufferError:
                pass  # a view of it is still alive; the mapping goes with it, the name goes now
            shm.unlink(self.segment.name)


class _Endpoint:
    def __init__(self, edge: str, ctx: zmq.Context | None):
        self.edge = edge
        self._ctx = ctx or zmq.Context.instance()
        self._lock = threading.Lock()  # the doorbell side; a Producer's credit side too
        self._credit_lock = threading.Lock()  # a Consumer's credits: release() must not wait behind a recv()
        self._close_lock = threading.Lock()
        self._closed = False
        # close() from another thread writes here; every wait polls it beside its socket.
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._res = _Resources([], [self._wake_r, self._wake_w])
        self._finalizer = weakref.finalize(self, self._res.close)

    def _socket(self, kind: int) -> zmq.Socket:
        s = self._ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        self._res.sockets.append(s)
        return s

    def _poller(self, sock: zmq.Socket, flag: int) -> zmq.Poller:
        p = zmq.Poller()
        p.register(sock, flag)
        p.register(self._wake_r, zmq.POLLIN)
        return p

    def _wait(self, poller: zmq.Poller, deadline: float | None, what: str) -> None:
        # pyzmq retries poll on EINTR itself; a signal handler that raises (SIGTERM -> SystemExit) propagates.
        remaining = None if deadline is None else deadline - time.monotonic()
        if remaining is not None and remaining <= 0:
            raise RingTimeout(f"ring {self.edge!r}: timed out waiting for {what}")
        poller.poll(None if remaining is None else max(1, math.ceil(remaining * 1000)))
        self._check_open()

    def _check_open(self) -> None:
        if self._closed:
            raise RingClosed(f"ring {self.edge!r} is closed")

    def close(self) -> None:
        """Release sockets and memory (the producer also unlinks its segment). Wakes a call waiting in another
        thread, which raises RingClosed. Idempotent."""
        with self._close_lock:  # one wake-up write, never into a closed (and maybe reused) fd number
            if self._closed:
                return
            self._closed = True
            os.write(self._wake_w, b"x")
        with self._lock, self._credit_lock:  # always taken in this order
            self._finalizer()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def ipc_spec(edge: str, prefix: str, *, n_slots: int = 8, slot_bytes: int = 1 << 20, ipc_dir: str | None = None,
             use_shm: bool = True) -> RingSpec:
    """The spec a Producer with these arguments and transport="ipc" will have. The supervisor can hand it to
    both workers up front (connect before bind is fine in ZMQ) and reuse it when either side restarts."""
    base = os.path.join(ipc_dir or tempfile.gettempdir(), f"{prefix}{edge}")
    return RingSpec(edge, n_slots, _align(slot_bytes), f"ipc://{base}.data", f"ipc://{base}.credit",
                    f"{prefix}{edge}." if use_shm else "")


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


class Producer(_Endpoint):
    """The sending end of an edge; creates the segment and binds both sockets (ipc:// or tcp://)."""

    def __init__(self, edge: str, prefix: str, *, n_slots: int = 8, slot_bytes: int = 1 << 20,
                 transport: str = "ipc", ipc_dir: str | None = None, host: str = "127.0.0.1", use_shm: bool = True,
                 ctx: zmq.Context | None = None):
        if not shm.NAME.fullmatch(prefix + edge):
            raise ValueError(f"ring prefix + edge must be a plain name, got {prefix + edge!r}")
        if n_slots < 1 or slot_bytes < 1:
            raise ValueError(f"ring {edge!r}: n_slots and slot_bytes must be >= 1, got {n_slots}, {slot_bytes}")
        super().__init__(edge, ctx)
        try:
            self._setup(prefix, n_slots, _align(slot_bytes), transport, ipc_dir, host, use_shm)
        except BaseException:
            self.close()
            raise

    def _setup(self, prefix, n_slots, slot_bytes, transport, ipc_dir, host, use_shm) -> None:
        self.n_slots, self.slot_bytes = n_slots, slot_bytes
        self._gen = secrets.randbits(31)
        self._free = collections.deque(range(n_slots))
        self._out: set[int] = set()  # not free: acquired, or sent and not yet credited
        self._owned: set[int] = set()  # acquired and not yet sent
        self._high = self._messages = self._waits = 0
        self._wait_s = 0.0
        self._shm_name = ""
        if use_shm:
            self._shm_name = f"{prefix}{self.edge}.{secrets.token_hex(4)}"
            self._res.segment = shm.create(self._shm_name, n_slots * slot_bytes)
            self._buf = self._res.segment.buf
        self._data = self._socket(zmq.PUSH)
        self._credit = self._socket(zmq.PULL)
        if transport == "ipc":
            self.spec = ipc_spec(self.edge, prefix, n_slots=n_slots, slot_bytes=slot_bytes, ipc_dir=ipc_dir,
                                 use_shm=use_shm)
            for sock, addr in ((self._data, self.spec.data_addr), (self._credit, self.spec.credit_addr)):
                if len(addr) > _IPC_MAX:
                    raise ValueError(f"ring {self.edge!r}: ipc address {addr!r} is longer than {_IPC_MAX} bytes")
                sock.bind(addr)
                self._res.paths.append(addr[len("ipc://"):])
        elif transport == "tcp":
            ports = []
            for sock in (self._data, self._credit):
                sock.bind(f"tcp://{host}:*")  # the OS picks a free port
                ports.append(sock.getsockopt_string(zmq.LAST_ENDPOINT))
            self.spec = RingSpec(self.edge, n_slots, slot_bytes, *ports, f"{prefix}{self.edge}." if use_shm else "")
        else:
            raise ValueError(f"ring {self.edge!r}: transport must be 'ipc' or 'tcp', got {transport!r}")
        self._in = self._poller(self._credit, zmq.POLLIN)
        self._outp = self._poller(self._data, zmq.POLLOUT)

    def acquire(self, timeout: float | None = None) -> int:
        """A free slot, waiting up to `timeout` s (None = until one frees or the ring closes) for a credit."""
        with self._lock:
            return self._acquire(_deadline(timeout))

    def send(self, msg: object, slot: int | None = None, timeout: float | None = None) -> None:
        """Write `msg`'s tensors into `slot` and ring the doorbell. The slot passes to the consumer; if sending
        fails it is freed. `slot=None` sends a message without tensors in band, without a credit (e.g. a
        CancelSession that must not wait behind a stalled consumer's slots, but must stay in order)."""
        with self._lock:
            self._send(msg, slot, _deadline(timeout))

    def put(self, msg: object, timeout: float | None = None) -> int:
        """acquire + send under one deadline; returns the slot used."""
        with self._lock:
            deadline = _deadline(timeout)
            slot = self._acquire(deadline)
            self._send(msg, slot, deadline)
            return slot

    def reclaim(self) -> None:
        """Free every slot the consumer holds: call once the consumer is known dead (its replacement never saw
        them). Credits still in flight from the old consumer carry the old generation and are ignored."""
        with self._lock:
            self._gen = (self._gen + 1) % (1 << 31)
            for slot in sorted(self._out - self._owned):
                self._out.discard(slot)
                self._free.append(slot)

    def stats(self, refresh: bool = False) -> RingStats:
        """Occupancy as last seen by the sending thread (credits not yet read count as in use). Never waits for a
        lock, so a status or heartbeat thread can call it while the producer waits; refresh=True first reads the
        credits that arrived, unless the sending thread is inside a call right now."""
        if refresh and self._lock.acquire(blocking=False):
            try:
                if not self._closed:
                    self._drain()
            finally:
                self._lock.release()
        return RingStats(self.edge, self.n_slots, self.slot_bytes, len(self._out), self._high,
                         self._messages, self._waits, self._wait_s)

    def _acquire(self, deadline: float | None) -> int:
        t0 = None
        try:
            while True:
                self._check_open()
                self._drain()
                if self._free:
                    slot = self._free.popleft()
                    self._out.add(slot)
                    self._owned.add(slot)
                    self._high = max(self._high, len(self._out))
                    return slot
                if t0 is None:
                    t0 = time.monotonic()
                    self._waits += 1
                self._wait(self._in, deadline, f"a free slot ({len(self._out)}/{self.n_slots} in use)")
        finally:
            if t0 is not None:
                self._wait_s += time.monotonic() - t0

    def _drain(self) -> None:
        while self._credit.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # cheaper than a raised zmq.Again per call
            frames = self._credit.recv_multipart(zmq.NOBLOCK)
            try:
                c = protocol.decode(frames)
            except ProtocolError as e:
                log.warning("ring %r: bad credit dropped: %s", self.edge, e)
                continue
            if not isinstance(c, SlotCredit) or c.gen != self._gen or c.slot not in self._out \
                    or c.slot in self._owned:
                log.debug("ring %r: stale credit %r dropped", self.edge, c)
                continue
            self._out.discard(c.slot)
            self._free.append(c.slot)

    def _send(self, msg: object, slot: int | None, deadline: float | None) -> None:
        self._check_open()
        if slot is not None and slot not in self._owned:
            raise RingError(f"ring {self.edge!r}: slot {slot} was not acquired (or was already sent)")
        try:
            frames = self._frames(msg, slot)
            while True:
                try:
                    self._data.send_multipart(frames, zmq.NOBLOCK)
                    break
                except zmq.Again:  # no consumer connected yet (or its queue is full)
                    self._wait(self._outp, deadline, "the consumer to accept a message")
        except BaseException:
            if slot is not None:
                self._owned.discard(slot)
                self._out.discard(slot)
                self._free.append(slot)
            raise
        if slot is not None:
            self._owned.discard(slot)
        self._messages += 1

    def _frames(self, msg: object, slot: int | None) -> list:
        kind, body, *bufs = protocol.encode(msg)
        if slot is None:
            if bufs:
                raise RingError(f"ring {self.edge!r}: {type(msg).__name__} carries {len(bufs)} tensor(s) and "
                                "needs a slot (use put)")
            return [kind, body, protocol.pack_body(SlotRef("", self._gen, -1, []), [])]
        spans, end = [], 0
        for b in bufs:
            start = _align(end)
            spans.append([start, b.nbytes])
            end = start + b.nbytes
        if end > self.slot_bytes:
            raise PayloadTooLarge(f"ring {self.edge!r}: a {type(msg).__name__} needs {end} bytes but its slots "
                                  f"hold {self.slot_bytes} bytes")
        if not self._shm_name:
            return [kind, body, protocol.pack_body(SlotRef("", self._gen, slot, []), []), *bufs]
        base = slot * self.slot_bytes
        for (start, n), b in zip(spans, bufs):
            self._buf[base + start: base + start + n] = b
        return [kind, body, protocol.pack_body(SlotRef(self._shm_name, self._gen, slot, spans), [])]


class Consumer(_Endpoint):
    """The receiving end of an edge: connects to a RingSpec's sockets, maps the producer's segment."""

    def __init__(self, spec: RingSpec, *, ctx: zmq.Context | None = None):
        super().__init__(spec.edge, ctx)
        self.spec = spec
        self._inline = not spec.shm_prefix
        # (slot, generation) of each message received and not yet released: a restarted producer numbers its
        # slots afresh under a new generation while messages of the old one may still be held.
        self._held: set[Held] = set()
        self._high = self._messages = 0
        self._segment = ""
        self._view: memoryview | None = None
        self._data = self._socket(zmq.PULL)
        self._credit = self._socket(zmq.PUSH)
        self._credit.setsockopt(zmq.SNDHWM, max(1000, 4 * spec.n_slots))  # credits never block a consumer
        self._data.connect(spec.data_addr)
        self._credit.connect(spec.credit_addr)
        self._in = self._poller(self._data, zmq.POLLIN)

    @property
    def socket(self) -> zmq.Socket:
        """The doorbell, for a caller's own zmq.Poller across several rings; then recv(timeout=0)."""
        return self._data

    def recv(self, timeout: float | None = None, copy: bool = False) -> tuple[object, Held | None]:
        """The next message and the slot its tensors live in (None = no slot), as a handle for release. The tensors
        are views into the slot: copy what you keep, then release(slot). copy=True copies first and releases at once.
        Malformed input raises ProtocolError (its slot, if any, already released)."""
        with self._lock:
            deadline = _deadline(timeout)
            self._check_open()
            while not self._data.getsockopt(zmq.EVENTS) & zmq.POLLIN:  # no raised zmq.Again per message
                self._wait(self._in, deadline, "a message")
            # Header frames are tiny: bytes are cheaper than zmq.Frame objects. Only a credit-only ring carries
            # tensor bytes as frames, and those are worth keeping zero-copy.
            frames = self._data.recv_multipart(zmq.NOBLOCK, copy=not self._inline)
            msg, slot = self._open(frames, copy)
            self._messages += 1
            return msg, slot

    def release(self, slot: Held | None) -> None:
        """Give `slot` back to the producer. Its tensors must no longer be used: the producer will overwrite it."""
        if slot is None:
            return
        with self._credit_lock:
            self._release(slot)

    def stats(self) -> RingStats:
        """Slots this consumer holds (received, not yet released). Takes no lock."""
        return RingStats(self.edge, self.spec.n_slots, self.spec.slot_bytes, len(self._held), self._high,
                         self._messages)

    def _release(self, held: Held) -> None:
        self._check_open()
        if held not in self._held:
            raise RingError(f"ring {self.edge!r}: slot {held[0]} is not held (released twice?)")
        self._held.remove(held)
        slot, gen = held
        try:
            self._credit.send_multipart(protocol.encode(SlotCredit(gen, slot)), zmq.NOBLOCK)
        except zmq.Again:  # the producer is gone or wedged; the supervisor reclaims on restart
            log.warning("ring %r: credit for slot %d dropped", self.edge, slot)

    def _open(self, frames: list, copy: bool) -> tuple[object, int | None]:
        if len(frames) < 3:
            raise ProtocolError(f"ring {self.edge!r}: a ring message has >= 3 frames, got {len(frames)}")
        ref = protocol.unpack_body(SlotRef, frames[2], [])
        slot = ref.slot
        if slot != -1:
            if not 0 <= slot < self.spec.n_slots:
                raise ProtocolError(f"ring {self.edge!r}: slot {slot} is not in [0, {self.spec.n_slots})")
            held = (slot, ref.gen)
            with self._credit_lock:  # held before decoding, so a bad message still returns its credit
                self._held.add(held)
                self._high = max(self._high, len(self._held))
        try:
            if ref.segment:
                if slot == -1 or len(frames) != 3:
                    raise ProtocolError(f"ring {self.edge!r}: a slot message needs a slot and exactly 3 frames")
                bufs = self._slot_views(ref)
            else:
                if ref.spans:
                    raise ProtocolError(f"ring {self.edge!r}: spans given without a segment")
                bufs = frames[3:]
            if copy:
                bufs = [bytearray(codec.as_view(b)) for b in bufs]
            msg = protocol.decode(frames[:2], bufs)
        except ProtocolError:
            if slot != -1:
                with self._credit_lock:
                    self._release(held)
            raise
        if copy and slot != -1:
            with self._credit_lock:
                self._release(held)
            slot = -1
        return msg, (None if slot == -1 else held)

    def _slot_views(self, ref: SlotRef) -> list[memoryview]:
        n, size = self.spec.n_slots, self.spec.slot_bytes
        if ref.segment != self._segment:
            self._attach(ref.segment, n * size)
        base = ref.slot * size
        views = []
        for span in ref.spans:
            if len(span) != 2 or span[0] < 0 or span[1] < 0 or span[0] + span[1] > size:
                raise ProtocolError(f"ring {self.edge!r}: span {span} does not lie inside a {size}-byte slot")
            views.append(self._view[base + span[0]: base + span[0] + span[1]])
        return views

    def _attach(self, name: str, size: int) -> None:
        # A new name = the producer restarted. The old map is not closed: views a caller still holds keep it
        # alive, and it is unmapped when the last of them goes.
        prefix = self.spec.shm_prefix
        if not prefix or not name.startswith(prefix) or not shm.NAME.fullmatch(name) or len(name) > 200:
            raise ProtocolError(f"ring {self.edge!r}: segment {name[:80]!r} is not one of this edge's")
        try:
            self._view = shm.attach(name, size)
        except (OSError, ValueError) as e:
            raise ProtocolError(f"ring {self.edge!r}: cannot map segment {name!r}: {e}") from None
        self._segment = name
