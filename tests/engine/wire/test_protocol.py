"""Wire format: every message kind round-trips exactly; malformed frames raise ProtocolError and nothing else."""
from __future__ import annotations

import dataclasses
import random
import tracemalloc

import msgpack
import numpy as np
import pytest
import torch

from omni2.engine.wire import codec as serial
from omni2.engine.wire import protocol as P
from omni2.engine.wire.codec import ProtocolError


def _t(*shape, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype)


def examples() -> list:
    """One instance of every wire message, with awkward values where a field allows them."""
    return [
        P.WorkerReady("llm", 4242, "cuda:0", 1.5),
        P.Heartbeat("tts", 7, 2**40, 3, True, 0.25),
        P.Heartbeat("llm", 7, 1, 8, False, 0.5, 1.25, 3.5, 8, 2, 1000, {"llm_tts": 3, "llm_out": 0}),
        P.SessionAck("vocoder", "s1", "", 1.0),
        P.SessionAck("vocoder", "s1", "unknown voice 'x'", 1.0),
        P.RingReset("llm_tts"),
        P.Barrier("asr", 2**40),
        P.Shutdown("bye ✓"),
        P.StageError("vocoder", ["a", "b"], "oom", "ran out of memory 💥", True, 2.0),
        P.SlotCredit(2**31 - 1, 3),
        P.OpenSession("s1", "default", 7, 0.7, 50, 0.9, 1.0, 50, 1.0, None, ""),
        P.OpenSession("s2", "v", 0, 0.0, 0, 1.0, 0.0, 0, 1.0, 9, "official-live"),
        P.CloseSession("s1"),
        P.CancelSession("s1", 3),
        P.SessionState("llm", "s1", 4, 17, torch.empty(0), _t(300, 64, dtype=torch.bfloat16), [5, 151643, 9]),
        P.SessionState("vocoder", "s1", 4, 0, torch.Generator().manual_seed(3).get_state(), torch.empty(0), []),
        P.RestoreSession("s1", [0, 2], [9, 17], torch.empty(0), [_t(300, 8), _t(300, 8, seed=1)], [[1, 2], []]),
        P.RestoreSession("s1", [2], [17], torch.empty(0, dtype=torch.uint8), [], []),
        P.EngineToAsr(["s1", "s2"], [0, 1], [np.linspace(-1, 1, 1600, dtype=np.float32), np.zeros(0, np.float32)],
                      [True, False], 16000, 3.0),
        P.AsrToLlm(["s1"], [0], [_t(300, 64, dtype=torch.bfloat16)], [None], 4.0),
        P.AsrToLlm(["s1", "s2"], [0, 5], [_t(3, 8, dtype=torch.float16), _t(0, 8)], [12, None], 4.0),
        P.AsrToLlm(["s1"], [3], [_t(2, 8)], [None], 4.0, [[0, 2]], [[2, 6]]),  # a history with a cut answer
        P.LlmToTts(["s1", "s2"], [0, 0], [151643, 9], _t(2, 64, dtype=torch.bfloat16), [False, True], 5.0),
        P.LlmToTts([], [], [], torch.zeros(0, 64), [], 5.0),
        P.LlmToEngine(["s1", "s2"], [0, 0], [1, 2], ["héllo ", "世界"], [None, "stop"], 6.0),
        P.LlmToEngine(["s1"], [0], [1], ["a"], [None], 6.0, [5.5]),
        P.TtsToVocoder(["s1"], [2], [[0, 6560, 17]], [True], 7.0),
        P.TtsToEngine(["s1", "s2"], [2, 2], [[], [5]], [False, True], 7.0),
        P.VocoderToEngine(["s1"], [2], [np.sin(np.arange(4800, dtype=np.float32))], [True], 24000, 8.0),
        P.VocoderToEngine(["s1"], [2], [np.zeros(0, np.float32)], [False], 24000, 8.0, [7.5]),
        P.TextDelta("s1", "¿qué? 🙂", 42, 9.0),
        P.UnitChunk("s1", list(range(25)), False, 9.5),
        P.AudioDelta("s1", np.ones(480, np.float32), 24000, True, 10.0),
        P.TurnDone("s1", "hi", [1, 2], [3, 4], "stop", {"t_asr": 0.1, "first_audio": 0.5}, 11.0),
        P.ErrorEvent("s1", "cancelled", "the user barged in", 12.0),
        # client wire (the daemon's front door)
        P.SessionOpen("s1", "tok", "default", 2**62, 0.0, 0, 1.0, 1.0, 50, 0.9, None, "streaming", "pcm16", "", ""),
        P.SessionOpen("ü", "", "v", 0, 0.7, 5, 0.5, 0.0, 0, 1.0, 12, "offline", "float32", "(3,10)", "hop"),
        P.AudioAppend("s1", np.arange(-5, 5, dtype=np.int16), 16000),
        P.AudioAppend("s1", np.linspace(-1, 1, 480, dtype=np.float32), 44100),
        P.AudioCommit("s1"), P.ResponseCancel("s1"), P.SessionClose("s1"), P.Ping(-1), P.StatusRequest(7, ""),
        P.ConversationTruncate("s1", 0, 6), P.ConversationTruncated("s1", 0, 6),
        P.SessionOpened("s1", 24000, "default", "streaming", "pcm16", "(3,10)", 30.0),
        P.AudioCommitted("s1", 0, 1.5),
        P.ResponseTextDelta("s1", 3, "¿qué? 🙂", 42, 9.0),
        P.ResponseUnitsDelta("s1", 3, [0, 6560], True, 9.5),
        P.ResponseAudioDelta("s1", 3, np.array([-32767, 0, 32767], np.int16), 24000, False, 10.0),
        P.ResponseAudioDelta("s1", 3, np.zeros(0, np.float32), 24000, True, 10.0),
        P.ResponseTiming("s1", 3, {"t_asr": 0.1, "total": 2.0}),
        P.ResponseDone("s1", 3, "hi", [1, 2], [3], "cancelled", {}),
        P.ServerError("", "bad_message", "frame 0 must be the 1-byte kind", "", -1),
        P.SessionClosed("s1", "reclaimed"), P.Pong(5, 1.0e9), P.StatusReply(7, '{"sessions": 0}'),
    ]


def assert_same(a, b) -> None:
    assert type(a) is type(b)
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if isinstance(x, list) and x and isinstance(x[0], (np.ndarray, torch.Tensor)):
            assert len(x) == len(y)
            for u, v in zip(x, y):
                assert_tensor_same(u, v)
        elif isinstance(x, (np.ndarray, torch.Tensor)):
            assert_tensor_same(x, y)
        else:
            assert x == y and type(x) is type(y), f.name


def assert_tensor_same(x, y) -> None:
    assert type(x) is type(y) and x.dtype == y.dtype and tuple(x.shape) == tuple(y.shape)
    if isinstance(x, torch.Tensor):
        assert torch.equal(x.view(torch.int16) if x.dtype == torch.bfloat16 else x,
                           y.view(torch.int16) if y.dtype == torch.bfloat16 else y)
    else:
        assert np.array_equal(x, y)


def test_every_kind_has_an_example():
    assert {type(m) for m in examples()} == set(P.KINDS)


@pytest.mark.parametrize("msg", examples(), ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frames = P.encode(msg)
    assert bytes(frames[0]) == bytes((P.KINDS[type(msg)],))
    assert_same(msg, P.decode(frames))
    # as a receiver sees them: each frame its own (writable, like zmq copy=False) buffer
    assert_same(msg, P.decode([bytearray(f) for f in frames]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64, torch.int64,
                                   torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool])
@pytest.mark.parametrize("shape", [(), (0,), (5,), (3, 0, 2), (2, 3, 4)])
def test_tensor_dtypes_and_shapes(dtype, shape):
    x = (torch.randn(shape) * 100).to(dtype)
    back = P.decode(P.encode(P.LlmToTts(["s"], [0], [1], x, [False], 0.0))).hidden
    assert_tensor_same(x, back)


def test_numpy_and_noncontiguous_inputs():
    x = torch.arange(24, dtype=torch.float32).view(4, 6).t()  # not contiguous: copied once on encode
    assert_tensor_same(x.contiguous(), P.decode(P.encode(P.LlmToTts(["s"], [0], [1], x, [False], 0.0))).hidden)
    a = np.arange(20, dtype=np.float32)[::2]
    out = P.decode(P.encode(P.AudioDelta("s", a, 24000, False, 0.0))).pcm
    assert np.array_equal(out, a) and out.dtype == np.float32
    # a torch tensor where a numpy field is declared travels (and arrives as numpy)
    out = P.decode(P.encode(P.AudioDelta("s", torch.ones(3), 24000, False, 0.0))).pcm
    assert isinstance(out, np.ndarray) and np.array_equal(out, np.ones(3, np.float32))


def test_decode_is_zero_copy():
    frames = [bytearray(f) for f in P.encode(P.AudioDelta("s", np.zeros(4, np.float32), 24000, False, 0.0))]
    pcm = P.decode(frames).pcm
    frames[2][:4] = np.float32(7).tobytes()
    assert pcm[0] == 7  # a view of the frame, not a copy


def test_encode_rejects_bad_messages():
    with pytest.raises(ProtocolError, match="not a wire message"):
        P.encode(object())
    with pytest.raises(ProtocolError, match="TextDelta.token_id"):
        P.encode(P.TextDelta("s", "x", "not an int", 0.0))
    with pytest.raises(ProtocolError, match="TextDelta.token_id"):
        P.encode(P.TextDelta("s", "x", True, 0.0))  # bool is not an int on the wire
    with pytest.raises(ProtocolError, match="dtype"):
        P.encode(P.AudioDelta("s", np.zeros(3, np.complex64), 24000, False, 0.0))
    with pytest.raises(ProtocolError, match="dtype"):
        P.encode(P.LlmToTts(["s"], [0], [1], torch.zeros(2, dtype=torch.complex64), [False], 0.0))
    # numpy scalars are accepted and become plain ints/floats
    m = P.decode(P.encode(P.TextDelta("s", "x", np.int64(5), np.float32(0.5))))
    assert m.token_id == 5 and type(m.token_id) is int and m.t == 0.5


def test_bf16_into_numpy_field_is_refused():
    frames = P.encode(P.AudioDelta("s", torch.zeros(3, dtype=torch.bfloat16), 24000, False, 0.0))
    with pytest.raises(ProtocolError, match="bfloat16"):
        P.decode(frames)


# ---------------------------------------------------------------------------------------------------- malformed


def _body(frames) -> list:
    return msgpack.unpackb(bytes(frames[1]), raw=False)


def _pack(kind: bytes, values, bufs) -> list:
    return [kind, msgpack.packb(values, use_bin_type=True), *bufs]


_WRONG_VALUES = [None, True, 1.5, -1, 2**63, "x", b"\x00", [], [1, "a"], {"k": 1}, {1: 2}, [[[]]]]


def _descriptor_paths(values, path=()):
    # where the tensor descriptors sit inside a body: [dtype, shape, index] lists with a str first
    if isinstance(values, list):
        if len(values) == 3 and isinstance(values[0], str) and isinstance(values[1], list) \
                and isinstance(values[2], int) and values[0] in serial.DTYPES:
            yield path
            return
        for i, v in enumerate(values):
            yield from _descriptor_paths(v, path + (i,))


def _set(values, path, new):
    values = msgpack.unpackb(msgpack.packb(values), raw=False)  # deep copy
    cur = values
    for i in path[:-1]:
        cur = cur[i]
    cur[path[-1]] = new
    return values


def malformed_cases(rng: random.Random):
    """Yield (label, frames) that are each invalid by construction."""
    ex = examples()
    unknown = sorted(set(range(256)) - set(P.KINDS.values()))
    for _ in range(300):  # random bytes
        yield "random", [rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(0, 5))]
    kinds = [bytes((k,)) for k in P.KINDS.values()]
    for _ in range(300):  # a valid kind and random bytes after it (skipping the odd one that happens to parse)
        frames = [rng.choice(kinds), *[rng.randbytes(rng.randrange(0, 40)) for _ in range(rng.randrange(1, 4))]]
        if not _legal(frames):
            yield "random", frames
    for m in ex:
        frames = P.encode(m)
        kind, bufs, values = bytes(frames[0]), [bytes(b) for b in frames[2:]], _body(frames)
        yield "frames", [kind]
        yield "frames", [kind, frames[1], 5] if not bufs else [kind, frames[1], *bufs[:-1], 5]
        for k in rng.sample(unknown, 5):
            yield "kind", [bytes((k,)), frames[1], *bufs]
        yield "kind", [b"", frames[1], *bufs]
        yield "kind", [kind + kind, frames[1], *bufs]
        yield "arity", _pack(kind, values[:-1], bufs)
        yield "arity", _pack(kind, values + [0], bufs)
        yield "arity", _pack(kind, [], bufs)
        yield "arity", _pack(kind, {"a": 1}, bufs)
        yield "arity", _pack(kind, 7, bufs)
        specs = serial.field_specs(type(m))
        for i in range(len(values)):
            for w in _WRONG_VALUES:
                if not _allows(specs[i][1], w):  # skip a "wrong" value the field allows (None if optional...)
                    yield "type", _pack(kind, _set(values, (i,), w), bufs)
        for i, v in enumerate(values):  # wrong element type inside a list (no list field holds maps)
            if isinstance(v, list) and v:
                yield "type", _pack(kind, _set(values, (i, 0), {"x": 1.0}), bufs)
        yield "body", [kind, frames[1][: max(0, len(frames[1]) - rng.randrange(1, 4))], *bufs]
        yield "body", [kind, bytes(frames[1]) + b"\x00", *bufs]
        yield "body", [kind, b"\xc1", *bufs]  # never-used msgpack byte
        yield "body", [kind, msgpack.packb(msgpack.ExtType(1, b"x")), *bufs]
        for path in _descriptor_paths(values):
            dtype, shape, idx = _get(values, path)
            for bad in (["float128", shape, idx], ["object", shape, idx], [5, shape, idx], [dtype, shape],
                        [dtype, shape, idx, 0], [dtype, [2**40, 2**40, 2**40], idx], [dtype, [-1], idx],
                        [dtype, [1] * 9, idx], [dtype, [1.5], idx], [dtype, [True], idx], [dtype, "3", idx],
                        [dtype, [2**62], idx], [dtype, shape, idx + 1000], [dtype, shape, -1],
                        [dtype, shape, "0"], [dtype, [*shape, 2], idx]):
                if bad[1] == [*shape, 2] and 0 in shape:
                    continue
                yield "tensor", _pack(kind, _set(values, path, bad), bufs)
            b = bufs[idx]
            if len(b):
                yield "buffer", [kind, frames[1], *_replace(bufs, idx, b[: rng.randrange(len(b))])]
            yield "buffer", [kind, frames[1], *_replace(bufs, idx, b + b"\x00" * rng.randrange(1, 9))]
            yield "buffer", [kind, frames[1], *bufs, b"extra"]  # unreferenced
            yield "buffer", [kind, frames[1]]  # missing
        paths = list(_descriptor_paths(values))
        if len(paths) >= 2:  # two tensors naming the same buffer
            d0 = _get(values, paths[0])
            yield "buffer", _pack(kind, _set(values, paths[1], [d0[0], d0[1], d0[2]]), bufs)
    for k in rng.sample(unknown, 20):
        yield "kind", [bytes((k,)), b"\x90"]


def _allows(spec, v) -> bool:
    """Whether a field of wire type `spec` (codec's tree: "int", ("opt", "str"), ...) may hold the msgpack value
    `v`, by the protocol's rules as docs/PROTOCOL.md states them, not by asking the decoder under test: bool is
    not a number, an int is a float, None only where optional, tensors only as descriptors."""
    if isinstance(spec, tuple):
        kind, inner = spec
        if kind == "opt":
            return v is None or _allows(inner, v)
        if kind == "list":
            return isinstance(v, list) and all(_allows(inner, x) for x in v)
        return isinstance(v, dict) and all(isinstance(k, str) and _allows(inner, x) for k, x in v.items())
    if spec in ("nd", "pt"):
        return False  # none of _WRONG_VALUES is a descriptor of an existing buffer
    return {"str": type(v) is str, "bool": type(v) is bool, "int": type(v) is int,
            "float": type(v) in (int, float)}[spec]


def _legal(frames) -> bool:
    try:
        P.decode(frames)
        return True
    except ProtocolError:
        return False


def _get(values, path):
    for i in path:
        values = values[i]
    return values


def _replace(bufs, i, b):
    return [*bufs[:i], b, *bufs[i + 1:]]


def test_malformed_frames_raise_protocol_error_only():
    rng = random.Random(0)
    counts: dict[str, int] = {}
    tracemalloc.start()  # numpy reports its buffers to tracemalloc: an allocation from a declared size would show
    try:
        for label, frames in malformed_cases(rng):
            with pytest.raises(ProtocolError):
                P.decode(frames)
            counts[label] = counts.get(label, 0) + 1
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sum(counts.values()) >= 2000, counts
    assert all(counts[k] >= 20 for k in ("random", "kind", "arity", "type", "tensor", "buffer", "body")), counts
    # no declared size was believed: the peak of this loop's allocations is far below any absurd shape's size
    assert peak < 16 << 20, peak


def test_bit_flips_never_crash():
    """Random corruption of valid frames: either a clean ProtocolError or some well-formed message."""
    rng = random.Random(1)
    ex = [P.encode(m) for m in examples()]
    hits = {"header": 0, "tensor": 0}
    for _ in range(1500):
        frames = [bytearray(f) for f in rng.choice(ex)]
        for _ in range(rng.randrange(1, 4)):
            tensor = len(frames) > 2 and rng.random() < 0.3  # a tensor's bytes, or the kind / body frames
            f = frames[rng.randrange(2, len(frames)) if tensor else rng.randrange(2)]
            if f:
                f[rng.randrange(len(f))] ^= 1 << rng.randrange(8)
                hits["tensor" if tensor else "header"] += 1
        try:
            msg = P.decode(frames)
        except ProtocolError:
            continue
        assert type(msg) in P.KINDS
    assert hits["tensor"] >= 100 and hits["header"] >= 1000, hits  # measured: 137 and 2740


def test_non_bytes_frames():
    with pytest.raises(ProtocolError):
        P.decode([1, 2])
    with pytest.raises(ProtocolError):
        P.decode([b"\x03", None])
    with pytest.raises(ProtocolError):
        P.decode([])


@pytest.mark.parametrize("shape", [[0, 2**40, 2**40], [2**40, 2**40, 0]])
def test_an_empty_tensor_of_absurd_dims_is_a_protocol_error(shape):
    """Zero elements, so its empty buffer has the right size; numpy cannot make the shape (ValueError escaped the
    decoder: an `internal` error per frame, or a dead daemon where only ProtocolError was caught)."""
    body = msgpack.packb(["s", ["float32", shape, 0], 16000])
    with pytest.raises(ProtocolError, match="more than 2\\*\\*40 elements"):
        P.decode([bytes((P.KINDS[P.AudioAppend],)), body, b""])


def test_a_request_body_is_bounded_before_it_is_unpacked():
    """A 300 KB body of empty maps would take ~70x its size as Python objects: refused unread. Engine messages
    (batches of up to 64 sessions) keep the general bound."""
    huge = msgpack.packb([{}] * 300_000)
    with pytest.raises(ProtocolError, match=f"Ping: body of {len(huge)} bytes exceeds {P.MAX_REQUEST_BODY}"):
        P.decode([bytes((P.KINDS[P.Ping],)), huge])
    with pytest.raises(ProtocolError, match="body must be an array of 15 fields, got 300000"):  # read, then refused
        P.decode([bytes((P.KINDS[P.Heartbeat],)), huge])


def test_a_0d_array_keeps_its_shape():
    m = P.decode(P.encode(P.AudioDelta("s", np.array(0.5, np.float32), 24000, False, 0.0)))
    assert m.pcm.shape == () and m.pcm == 0.5
