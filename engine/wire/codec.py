"""The wire codec: a dataclass's fields as a positional msgpack array, each tensor as a `[dtype, shape, buffer
index]` descriptor in that array with its bytes beside it (vLLM serial_utils' idea, written afresh).

The bytes travel as an extra ZMQ frame or in a ring slot (ring.py); either way the receiver gets a `memoryview`
and wraps it without copying (`np.frombuffer`, `torch.from_numpy`). numpy has no bfloat16, so a bf16 tensor
travels as its uint16 bit pattern with "bfloat16" in the descriptor and is viewed back as bf16 in torch. Nothing
here allocates from a declared size: every shape is checked against the bytes that arrived.

torch is never imported here: clients speak this wire without it. A torch tensor can only be encoded by a process
that has torch already, and a `torch.Tensor` field is decoded by importing torch then (the stage workers).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import sys
import types
import typing

import msgpack
import numpy as np


class ProtocolError(ValueError):
    """A message that cannot be encoded, or frames that are not a valid message. Never anything else."""


# dtype name on the wire (also the name of the torch dtype of the values) -> numpy dtype of the bytes. Only these
# names are legal.
DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "float64": np.dtype(np.float64),
    "int64": np.dtype(np.int64),
    "int32": np.dtype(np.int32),
    "int16": np.dtype(np.int16),
    "int8": np.dtype(np.int8),
    "uint8": np.dtype(np.uint8),
    "bool": np.dtype(np.bool_),
}
_NAME_OF_NP = {np_dt: name for name, np_dt in DTYPES.items() if name != "bfloat16"}


class TorchTensor:
    """What a `torch.Tensor` annotation of a message field resolves to here (see `field_specs`), so that message
    modules can name torch in their annotations without anyone importing it."""


def _torch():
    """torch, if this process has imported it; a torch tensor cannot exist in a process that has not."""
    return sys.modules.get("torch")

MAX_BODY = 64 << 20  # a body this large is a bug or an attack; tensors travel as buffers, not in the body
MAX_NDIM = 8
MAX_DIM = 1 << 40  # no real tensor is near this; it only stops absurd descriptors early with a clear message


def to_buffer(x) -> tuple[str, list[int], memoryview]:
    """A tensor as (dtype name, shape, its bytes as a flat uint8 memoryview).

    Zero-copy for C-contiguous CPU tensors; others are made contiguous (and brought to host) first, which copies.
    The view aliases the tensor: do not write to the tensor until the bytes have been consumed.
    """
    torch = _torch()
    if torch is not None and isinstance(x, torch.Tensor):
        name = str(x.dtype).removeprefix("torch.")
        if name not in DTYPES:
            raise ProtocolError(f"torch dtype {x.dtype} cannot travel; use one of {sorted(DTYPES)}")
        t = x.detach()
        if t.device.type != "cpu":
            t = t.cpu()  # NOTE: workers stage device tensors in pinned host buffers; this is the slow fallback
        t = t.contiguous()
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)  # same bits; numpy cannot hold bf16
        arr = t.numpy()
    elif isinstance(x, np.ndarray):
        name = _NAME_OF_NP.get(x.dtype)
        if name is None:
            raise ProtocolError(f"numpy dtype {x.dtype} cannot travel; use one of {sorted(_NAME_OF_NP.values())}")
        arr = np.asarray(x, order="C")  # not ascontiguousarray: it makes a 0-d array 1-d
    else:
        raise ProtocolError(f"expected a numpy array or torch tensor, got {type(x).__name__}")
    return name, list(arr.shape), memoryview(arr.reshape(-1).view(np.uint8))


def check_descriptor(desc: object, n_buffers: int) -> tuple[str, tuple[int, ...], int]:
    """Validate a decoded `[dtype, shape, index]` descriptor; return it as (dtype, shape, index)."""
    if not isinstance(desc, list) or len(desc) != 3:
        raise ProtocolError(f"tensor descriptor must be [dtype, shape, index], got {_short(desc)}")
    name, shape, index = desc
    if not isinstance(name, str) or name not in DTYPES:
        raise ProtocolError(f"unknown tensor dtype {_short(name)}; expected one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise ProtocolError(f"tensor shape must be a list of at most {MAX_NDIM} dims, got {_short(shape)}")
    for d in shape:
        if not _is_int(d) or not 0 <= d <= MAX_DIM:
            raise ProtocolError(f"tensor shape {_short(shape)} has a dim that is not an int in [0, 2**40]")
    if math.prod(d for d in shape if d) > MAX_DIM:  # an empty tensor too: numpy refuses such a shape
        raise ProtocolError(f"tensor shape {_short(shape)} has more than 2**40 elements (zero dims aside)")
    if not _is_int(index) or not 0 <= index < n_buffers:
        raise ProtocolError(f"tensor buffer index {_short(index)} is not in [0, {n_buffers})")
    return name, tuple(shape), index


def nbytes_of(name: str, shape: tuple[int, ...]) -> int:
    n = DTYPES[name].itemsize
    for d in shape:
        n *= d  # python ints: no overflow, so a lying shape is caught by the size comparison, not wrapped
    return n


def from_buffer(name: str, shape: tuple[int, ...], buf: memoryview, as_torch: bool):
    """View `buf` as a tensor of dtype `name` and `shape`; the byte count must match exactly. Zero-copy when the
    buffer is writable (ZMQ frames received with copy=False and ring slots are); read-only bytes are copied
    once for torch, which warns on read-only memory."""
    expected = nbytes_of(name, shape)
    if buf.nbytes != expected:
        raise ProtocolError(f"tensor {name}{list(shape)} needs {expected} bytes, its buffer has {buf.nbytes}")
    if not as_torch:
        if name == "bfloat16":
            raise ProtocolError("a bfloat16 tensor arrived for a numpy field; numpy has no bfloat16")
        return _view(buf, name, shape)
    try:
        import torch
    except ImportError:
        raise ProtocolError("a torch tensor arrived, but torch is not installed here") from None
    if buf.readonly:
        buf = memoryview(bytearray(buf))
    t = torch.from_numpy(_view(buf, name, shape))
    return t.view(torch.bfloat16) if name == "bfloat16" else t


def _view(buf: memoryview, name: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        return np.frombuffer(buf, dtype=DTYPES[name]).reshape(shape)
    except ValueError as e:  # a shape numpy cannot make (an empty one of absurd dims): still a bad message
        raise ProtocolError(f"tensor {name}{list(shape)}: {e}") from None


def pack_fields(msg: object, specs: list[tuple[str, Spec]], buffers: list[memoryview]) -> bytes:
    """msg's fields as a msgpack array in `specs` order; tensors become descriptors, their bytes go to `buffers`."""
    cls = type(msg)
    values = [_enc(spec, getattr(msg, name), buffers, cls, name) for name, spec in specs]
    try:
        return msgpack.packb(values, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ProtocolError(f"{cls.__name__}: cannot encode: {e}") from None


def unpack_fields(cls: type, specs: list[tuple[str, Spec]], body: object, buffers: list[memoryview],
                  max_body: int = MAX_BODY) -> object:
    """Validate a msgpack array against `specs` and build a `cls`; every buffer must be used by one tensor. A body
    over `max_body` bytes is refused before it is unpacked (msgpack objects take ~70x the bytes they came in)."""
    body = as_view(body)
    if body.nbytes > max_body:
        raise ProtocolError(f"{cls.__name__}: body of {body.nbytes} bytes exceeds {max_body}")
    try:
        values = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True, ext_hook=_no_ext)
    except ProtocolError:
        raise
    except Exception as e:  # msgpack raises many types (ValueError, ExtraData, StackError, UnicodeDecodeError...)
        raise ProtocolError(f"{cls.__name__}: body is not valid msgpack: {type(e).__name__}: {e}") from None
    if not isinstance(values, list) or len(values) != len(specs):
        n = len(values) if isinstance(values, list) else type(values).__name__
        raise ProtocolError(f"{cls.__name__}: body must be an array of {len(specs)} fields, got {n}")
    used = [False] * len(buffers)
    out = [_dec(s, v, buffers, used, cls, name) for (name, s), v in zip(specs, values)]
    if not all(used):
        raise ProtocolError(f"{cls.__name__}: {used.count(False)} of {len(buffers)} buffers are not referenced")
    return cls(*out)


def field_specs(cls: type) -> list[tuple[str, Spec]]:
    """(name, spec) per dataclass field, in declaration order: the positional wire layout of `cls`.

    The annotations are strings (`from __future__ import annotations`); "torch.Tensor" resolves to TorchTensor
    without importing torch."""
    hints = typing.get_type_hints(cls, localns={"torch": _TorchNames})
    return [(f.name, _spec_of(hints[f.name])) for f in dataclasses.fields(cls)]


class _TorchNames:
    Tensor = TorchTensor


# A field's type as a small tree, compiled once from the annotations: "str" | "int" | "float" | "bool" |
# "nd" (numpy array) | "pt" (torch tensor) | ("opt", t) | ("list", t) | ("dict", t) (str keys).
Spec = typing.Union[str, tuple]
_PRIMS = {str: "str", int: "int", float: "float", bool: "bool", np.ndarray: "nd", TorchTensor: "pt"}


def _spec_of(tp) -> Spec:
    if tp in _PRIMS:
        return _PRIMS[tp]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (types.UnionType, typing.Union) and len(args) == 2 and type(None) in args:
        return ("opt", _spec_of(args[0] if args[1] is type(None) else args[1]))
    if origin is list and len(args) == 1:
        return ("list", _spec_of(args[0]))
    if origin is dict and len(args) == 2 and args[0] is str:
        return ("dict", _spec_of(args[1]))
    raise TypeError(f"no wire form for {tp!r}")


def _enc(spec: Spec, v, buffers: list, cls: type, name: str):
    if spec == "str":
        if isinstance(v, str):
            return v
    elif spec == "bool":
        if isinstance(v, (bool, np.bool_)):
            return bool(v)
    elif spec == "int":
        if _is_int(v):
            return int(v)  # numpy ints are welcome; msgpack only packs python ints
    elif spec == "float":
        if isinstance(v, (float, int, np.floating, np.integer)) and not isinstance(v, bool):
            return float(v)
    elif spec in ("nd", "pt"):
        torch = _torch()
        if isinstance(v, np.ndarray) or torch is not None and isinstance(v, torch.Tensor):
            dtype, shape, buf = to_buffer(v)
            buffers.append(buf)
            return [dtype, shape, len(buffers) - 1]
    elif spec[0] == "opt":
        return None if v is None else _enc(spec[1], v, buffers, cls, name)
    elif spec[0] == "list":
        if isinstance(v, (list, tuple)):
            return [_enc(spec[1], x, buffers, cls, name) for x in v]
    elif spec[0] == "dict":
        if isinstance(v, dict) and all(isinstance(k, str) for k in v):
            return {k: _enc(spec[1], x, buffers, cls, name) for k, x in v.items()}
    raise ProtocolError(f"{cls.__name__}.{name}: expected {_show(spec)}, got {type(v).__name__}")


def _dec(spec: Spec, v, buffers: list[memoryview], used: list[bool], cls: type, name: str):
    if spec == "str":
        if isinstance(v, str):
            return v
    elif spec == "bool":
        if isinstance(v, bool):
            return v
    elif spec == "int":
        if _is_int(v):
            return v
    elif spec == "float":
        if isinstance(v, float) or _is_int(v):
            return float(v)
    elif spec in ("nd", "pt"):
        try:
            dtype, shape, i = check_descriptor(v, len(buffers))
            if used[i]:
                raise ProtocolError(f"buffer {i} is referenced twice")
            used[i] = True
            return from_buffer(dtype, shape, buffers[i], as_torch=spec == "pt")
        except ProtocolError as e:
            raise ProtocolError(f"{cls.__name__}.{name}: {e}") from None
    elif spec[0] == "opt":
        return None if v is None else _dec(spec[1], v, buffers, used, cls, name)
    elif spec[0] == "list":
        if isinstance(v, list):
            return [_dec(spec[1], x, buffers, used, cls, name) for x in v]
    elif spec[0] == "dict":
        if isinstance(v, dict):  # strict_map_key already made every key a str or bytes
            if all(isinstance(k, str) for k in v):
                return {k: _dec(spec[1], x, buffers, used, cls, name) for k, x in v.items()}
    raise ProtocolError(f"{cls.__name__}.{name}: expected {_show(spec)}, got {_short(v, 60)}")


def _show(spec: Spec) -> str:
    if isinstance(spec, str):
        return {"nd": "a tensor descriptor", "pt": "a tensor descriptor"}.get(spec, spec)
    return f"{spec[0]}[{_show(spec[1])}]"


def as_view(f) -> memoryview:
    # zmq.Frame exposes .buffer; bytes/bytearray/memoryview are buffers already.
    try:
        return memoryview(getattr(f, "buffer", f)).cast("B")
    except TypeError:
        raise ProtocolError(f"a frame must be bytes-like, got {type(f).__name__}") from None


def _no_ext(code: int, data: bytes):
    raise ProtocolError(f"msgpack extension type {code} is not part of the protocol")


def _is_int(v: object) -> bool:
    # exact-type test first: the ABC check is ~10x slower and this runs for every int on the wire
    return type(v) is int or (isinstance(v, numbers.Integral) and not isinstance(v, bool))


def _short(v: object, n: int = 80) -> str:
    s = repr(v)
    return s if len(s) <= n else s[: n - 3] + "..."
