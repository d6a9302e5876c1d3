"""The recorded graphs that stand for CUDA graphs in the CPU tests (tests/stages/recorded_graphs.py) replay what a
CUDA graph replays, and so get wrong what a graph would get wrong: otherwise the fixed-shape tests that use them
would prove nothing about a capture."""
from __future__ import annotations

import pytest
import torch

from omni2.stages.decode_graph import GraphedRun
from tests.stages.recorded_graphs import record_graph


class Doubler(GraphedRun):
    """A well-formed body: reads its input buffer, writes one output tensor."""

    def __init__(self):
        self.x = torch.zeros(4)
        self.y: torch.Tensor | None = None
        self.calls = 0

    def run(self) -> None:
        self.calls += 1
        self.y = (self.x * 2).cumsum(0)


def test_a_replay_reads_the_buffers_anew_and_writes_where_the_capture_did():
    body = Doubler()
    graph = record_graph(body.run, None)
    assert body.calls == 2  # a warm-up and the recorded run
    captured_y = body.y
    body.x.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    graph.replay()
    assert body.calls == 2  # no Python of the body ran
    assert body.y is captured_y
    assert body.y.tolist() == [2.0, 6.0, 12.0, 20.0]


def test_a_host_value_baked_in_at_capture_stays_what_it_was():
    class Baked(Doubler):
        scale = 2.0

        def run(self) -> None:
            self.y = self.x * self.scale  # a Python number: the graph keeps the capture's

    body = Baked()
    graph = record_graph(body.run, None)
    body.x.fill_(1.0)
    body.scale = 5.0
    graph.replay()
    assert body.y.tolist() == [2.0] * 4  # eagerly it would be 5.0: a fixed-shape test would catch the difference
    body.run()
    assert body.y.tolist() == [5.0] * 4


def test_a_slice_length_taken_from_the_data_stays_the_captures():
    class DataShaped(Doubler):
        def run(self) -> None:
            n = int((self.x > 0).sum())  # a host read: a capture refuses it
            self.y = self.x[:n] * 2

    with pytest.raises(RuntimeError, match="reads a device value on the host"):
        record_graph(DataShaped().run, None)


def test_host_data_made_into_a_tensor_is_refused_but_a_scalar_is_not():
    class HostData(Doubler):
        def run(self) -> None:
            self.y = self.x + torch.tensor([1.0, 2.0, 3.0, 4.0])  # on a GPU: a pageable copy inside the capture

    with pytest.raises(RuntimeError, match="tensor made from host data"):
        record_graph(HostData().run, None)

    class Scalar(Doubler):
        def run(self) -> None:
            y = self.x * 2
            y[0] = 0  # a 0-dim scalar the kernel takes as an argument
            self.y = y

    body = Scalar()
    graph = record_graph(body.run, None)
    body.x.fill_(3.0)
    graph.replay()
    assert body.y.tolist() == [0.0, 6.0, 6.0, 6.0]


def test_a_refused_record_leaves_the_bucket_eager(monkeypatch):
    from omni2.stages import decode_graph

    class HostRead(Doubler):
        def run(self) -> None:
            self.y = self.x * float(self.x.sum())

    monkeypatch.setattr(decode_graph, "capture_graph", record_graph)
    body = HostRead()
    assert body.capture(None) is False and body.graph is None


def test_in_place_writes_and_views_replay_into_the_same_memory():
    class InPlace(Doubler):
        def __init__(self):
            super().__init__()
            self.out = torch.zeros(2, 4)

        def run(self) -> None:
            row = self.out[1]  # a view: the replay writes through it as the capture did
            torch.add(self.x, 1, out=row)
            self.out[0].copy_(self.x.flip(0))

    body = InPlace()
    graph = record_graph(body.run, None)
    body.x.copy_(torch.arange(4.0))
    body.out.zero_()
    graph.replay()
    assert body.out.tolist() == [[3.0, 2.0, 1.0, 0.0], [1.0, 2.0, 3.0, 4.0]]
