"""The receiving end of a ring (see engine/ring.py for the whole picture): PULL headers, map the producer's
segment, hand out zero-copy views, PUSH credits back on release().
"""
from __future__ import annotations

import zmq

from omni2.engine import protocol, serial, shm
from omni2.engine.protocol import ProtocolError, SlotCredit, SlotRef
from omni2.engine.ring import RingError, RingSpec, RingStats, _deadline, _Endpoint, log


class Consumer(_Endpoint):
    """The receiving end of an edge: connects to a RingSpec's sockets, maps the producer's segment."""

    def __init__(self, spec: RingSpec, *, ctx: zmq.Context | None = None):
        super().__init__(spec.edge, ctx)
        self.spec = spec
        self._inline = not spec.shm_prefix
        self._held: dict[int, int] = {}  # slot -> generation it arrived with
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

    def recv(self, timeout: float | None = None, copy: bool = False) -> tuple[object, int | None]:
        """The next message and the slot its tensors live in (None = no slot). The tensors are views into the
        slot: copy what you keep, then release(slot). copy=True copies first and releases at once.
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

    def release(self, slot: int | None) -> None:
        """Give `slot` back to the producer. Its tensors must no longer be used: the producer will overwrite it."""
        if slot is None:
            return
        with self._credit_lock:
            self._release(slot)

    def stats(self) -> RingStats:
        """Slots this consumer holds (received, not yet released). Takes no lock."""
        return RingStats(self.edge, self.spec.n_slots, self.spec.slot_bytes, len(self._held), self._high,
                         self._messages)

    def _release(self, slot: int) -> None:
        self._check_open()
        gen = self._held.pop(slot, None)
        if gen is None:
            raise RingError(f"ring {self.edge!r}: slot {slot} is not held (released twice?)")
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
            with self._credit_lock:  # held before decoding, so a bad message still returns its credit
                self._held[slot] = ref.gen
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
                bufs = [bytearray(serial.as_view(b)) for b in bufs]
            msg = protocol.decode(frames[:2], bufs)
        except ProtocolError:
            if slot != -1:
                with self._credit_lock:
                    self._release(slot)
            raise
        if copy and slot != -1:
            with self._credit_lock:
                self._release(slot)
            slot = -1
        return msg, (None if slot == -1 else slot)

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
