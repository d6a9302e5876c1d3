"""A CUDA graph's semantics on a CPU, for the fixed-shape families (stages/decode_graph.py, flow_graph.py,
hift_graph.py).

A capture here records the aten ops that a bucket's `run` dispatches — its tensors by identity, every other argument
by value — and a replay runs that record again, writing each op's result into the tensor the capture got, without
running `run`'s Python. That is what a CUDA graph does: it replays the kernels and addresses of its capture. So a body
that bakes in a value the host computed at capture time (a Python number taken from this call's data, a slice
length), or a caller that hands a bucket its input in a new tensor instead of writing into the bucket's buffer,
gives the same wrong answer here as on a GPU; and a host read of a device value (`.item()`) or a tensor made from
host data (`torch.tensor(list)`) is refused, as a capture refuses it. The meta-device tests check the other half:
no host tensor mixed into device math.

Not modelled: the memory pool the families' graphs share (on a GPU one graph's replay may overwrite what another
left in the pool; every family copies its outputs out right after a replay for that reason), and streams.
"""
from __future__ import annotations

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from omni2.stages import decode_graph, flow_graph, hift_graph

HOST_READS = {torch.ops.aten._local_scalar_dense.default}
# torch.tensor(data) / as_tensor inside a body: on a GPU, a copy from pageable host memory, which a capture refuses
# (and whose data a replay would not read again). A 0-dim one (what `x[i] = 0` lifts) is a scalar a kernel takes
# as an argument: no copy.
HOST_DATA = {torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default}


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: list = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_READS:
            raise RuntimeError(f"{func} reads a device value on the host: a CUDA graph capture refuses it")
        if func in HOST_DATA and args[0].dim() > 0:
            raise RuntimeError(f"{func}: a tensor made from host data inside the body, a pageable copy that a CUDA "
                               "graph capture refuses")
        out = func(*args, **kwargs)
        self.ops.append((func, args, kwargs, out))
        return out


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


class RecordedGraph:
    """The ops of one captured `run`, replayed in order into the tensors they first produced."""

    def __init__(self, ops: list):
        self.ops = ops
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1
        for func, args, kwargs, out in self.ops:
            fresh = func(*args, **kwargs)
            pairs = [(out, fresh)] if isinstance(out, torch.Tensor) else zip(tree_flatten(out)[0],
                                                                              tree_flatten(fresh)[0])
            for old, new in pairs:
                # An in-place op or a view gives back the captured tensor's memory itself; anything else is a
                # result the graph writes where its capture put it.
                if isinstance(old, torch.Tensor) and not _same_view(old, new):
                    old.copy_(new)


def record_graph(run, pool) -> RecordedGraph:
    """decode_graph.capture_graph's stand-in: `run` once, as a warm-up builds what a body makes lazily on its first
    call (a table it then keeps), then recorded."""
    run()
    with _Recorder() as recorder:
        run()
    return RecordedGraph(recorder.ops)


def _decide_captures(monkeypatch, capturing) -> None:
    for module in (decode_graph, flow_graph, hift_graph):  # each imports decode_graph.capturing by name
        monkeypatch.setattr(module, "capturing", capturing)


def record_captures(monkeypatch) -> None:
    """Every fixed-shape family made on a CPU from now on (until `monkeypatch` undoes it) captures by default, as on
    CUDA, into RecordedGraphs instead of CUDA graphs."""
    monkeypatch.setattr(decode_graph, "capture_graph", record_graph)
    _decide_captures(monkeypatch, lambda device, capture, what: (capture is not False, None))


def eager_fixed_shapes(monkeypatch) -> None:
    """Every fixed-shape family made from now on runs its buckets eagerly, on CUDA too: the twin a replay is
    compared with."""
    _decide_captures(monkeypatch, lambda device, capture, what: (False, None))


def stage_device(device: str, monkeypatch) -> str:
    """A stage test's device parameter: "recorded" is the CPU with record_captures."""
    if device != "recorded":
        return device
    record_captures(monkeypatch)
    return "cpu"
