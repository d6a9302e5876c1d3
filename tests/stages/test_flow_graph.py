"""The flow's encoder pass and Euler steps on fixed shapes (stages/flow_graph.py) against FlowStream's windowed flow.

On a CPU the fixed-shape steps run eagerly: the same code a CUDA graph captures, so equality here is what makes a
replay right; the replay itself is compared with the eager step on CUDA (gpu.sh runs the tests naming cuda)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from omni2.stages import flow_graph
from omni2.stages.flow import Flow, make_noise
from omni2.stages.flow_graph import WindowGraphs
from tests.stages.recorded_graphs import record_captures
from tests.stages.test_flow import CD, CE, T_REPLY, bursts, randomize, replies, small_cfg

SLOTS = 6


@pytest.fixture(scope="module")
def flow() -> Flow:
    return randomize(Flow(small_cfg()))


@pytest.fixture(autouse=True)
def _inference():
    with torch.inference_mode():
        yield


def pool_state(graphs: WindowGraphs) -> list[torch.Tensor]:
    """Every tensor of both pools, (steps, slots + 1, ...) each."""
    return [t.clone() for pool in (graphs.pool, graphs.enc_pool) for t in (
        *[t for k, v in pool.kv.values() for t in (k, v)], *pool.tails.values())]


def drive(flow: Flow, left: int, graphs: WindowGraphs | None, slots: list[int]) -> list[list[torch.Tensor]]:
    """Five sessions advanced together, each at its own point of its reply (different starts and write sizes, some
    idle in a step, finalizing at different steps): each session's mel per call."""
    tokens, spk = replies(flow.cfg)
    noise = make_noise(flow.cfg)
    rng = np.random.default_rng(3)
    calls = [[None] * (i % 3) + bursts(T_REPLY - 4 * i, rng.choice([1, 5, 10, 13], size=3).tolist())
             for i in range(5)]
    streams = [flow.new_stream(spk * (1 + 0.1 * i), noise, left, graphs, slot) for i, slot in enumerate(slots)]
    have, out = [0] * 5, [[] for _ in range(5)]
    toks = [tokens.roll(3 * i) for i in range(5)]
    for r in range(max(len(c) for c in calls)):
        now = [(i, calls[i][r]) for i in range(5) if r < len(calls[i]) and calls[i][r] is not None]
        for i, (n, _) in now:
            streams[i].push(toks[i][have[i]:n])
            have[i] = n
        mels = flow.stream_step([streams[i] for i, _ in now], [f for _, (_, f) in now])
        for (i, _), mel in zip(now, mels):
            out[i].append(mel)
    return out


@pytest.mark.parametrize("left,recorded", [(1, False), (2, False), (1, True)], ids=["1", "2", "1-recorded"])
def test_fixed_shape_steps_equal_the_windowed_stream(flow, left, recorded, monkeypatch):
    """Every call's mel of every session equals the dynamic windowed stream's to fp32 rounding (measured max
    2.4e-6), and no slot but the sessions' and the padding's is written, in either pool. Recorded: every bucket
    captured as the family is made, and replayed as a CUDA graph would be (tests/stages/recorded_graphs.py)."""
    if recorded:
        record_captures(monkeypatch)
        # Recording is slow (Python per op): buckets up to what these calls use (64 frames, 32 tokens), not 256.
        monkeypatch.setattr(flow_graph, "MAX_FRAMES", 64)
        monkeypatch.setattr(flow_graph, "MAX_TOKENS", 32)
    graphs = WindowGraphs.for_flow(flow, SLOTS, left, max_batch=4)
    runs = [*graphs.solves.values(), *graphs.encodes.values()]
    assert len(runs) == (12 if recorded else 0) and all(r.graph is not None for r in runs)
    before = pool_state(graphs)
    slots = [4, 0, 2, 1, 3]  # five sessions: one step of 5 takes two calls (max_batch 4)
    fixed = drive(flow, left, graphs, slots)
    dynamic = drive(flow, left, None, [None] * 5)
    frames = 0
    for a, b in zip(fixed, dynamic):
        assert [m.shape for m in a] == [m.shape for m in b]
        for x, y in zip(a, b):
            if x.numel():
                assert (x - y).abs().max().item() < 1e-5, (x - y).abs().max().item()
        frames += sum(m.shape[1] for m in a)
    assert frames == 2 * sum(T_REPLY - 4 * i for i in range(5))
    # The buckets used: rows 1, 2, 4 (five sessions come as 4 + 1) and widths 32 and 64.
    assert {r for r, _ in graphs.solves} >= {1, 4} and {w for _, w in graphs.solves} >= {32}
    assert {r for r, _ in graphs.encodes} >= {1, 4} and {w for _, w in graphs.encodes} >= {16}
    after = pool_state(graphs)
    for a, b in zip(before, after):
        assert torch.equal(a[:, 5], b[:, 5])  # slot 5: nobody's
        assert not torch.equal(a[:, :5], b[:, :5])  # the sessions' slots changed


def test_calls_wider_than_the_widest_bucket_run_on_their_own_shape(flow, monkeypatch):
    """A call whose open span passes MAX_FRAMES (an official-live final flush) runs eagerly at its own width on the
    same pool, equal to the stream, and leaves no bucket behind."""
    monkeypatch.setattr(flow_graph, "MAX_FRAMES", 32)
    monkeypatch.setattr(flow_graph, "MAX_TOKENS", 16)  # the encoder's position tables then stop at 16 tokens too
    graphs = WindowGraphs.for_flow(flow, SLOTS, 1, max_batch=2)
    tokens, spk = replies(flow.cfg)
    noise = make_noise(flow.cfg)
    fixed, dynamic = flow.new_stream(spk, noise, 1, graphs, 3), flow.new_stream(spk, noise, 1)
    for n, final in [(12, False), (T_REPLY, True)]:  # the final call opens 2 * 40 - 16 = 64 frames
        for s in (fixed, dynamic):
            s.push(tokens[n - 12 if n == 12 else 12:n])
        a, b = fixed.mel(final), dynamic.mel(final)
        assert a.shape == b.shape and (a - b).abs().max().item() < 1e-5
    assert max(w for _, w in graphs.solves) == 32 and max(w for _, w in graphs.encodes) == 16


def test_a_new_stream_in_a_used_slot_starts_fresh(flow):
    """A slot's next reply (a cancel, or the session's next turn) voices as a fresh stream: its conv tails are
    zeroed, and its cached keys count as none."""
    graphs = WindowGraphs.for_flow(flow, SLOTS, 1, max_batch=2)
    tokens, spk = replies(flow.cfg)
    noise = make_noise(flow.cfg)
    first = flow.new_stream(spk * 2, noise, 1, graphs, 0)
    first.push(tokens[5:35])
    first.mel(False)  # abandoned mid-reply
    again, fresh = flow.new_stream(spk, noise, 1, graphs, 0), flow.new_stream(spk, noise, 1, graphs, 1)
    for s in (again, fresh):
        s.push(tokens[:20])
    a, b = flow.stream_step([again, fresh], [False, False])
    assert a.shape[1] > 0 and torch.equal(a, b)


def test_warming_prepares_every_bucket_and_writes_no_session(flow):
    graphs = WindowGraphs.for_flow(flow, SLOTS, 1, max_batch=3)
    before = pool_state(graphs)
    assert graphs.warm() == 2 * 3 * 4  # rows 1, 2, 3 x frames 32, 64, 128, 256, and x tokens 16, 32, 64, 128
    assert sorted(graphs.solves) == [(r, w) for r in (1, 2, 3) for w in (32, 64, 128, 256)]
    assert sorted(graphs.encodes) == [(r, w) for r in (1, 2, 3) for w in (16, 32, 64, 128)]
    for a, b in zip(before, pool_state(graphs)):
        assert torch.equal(a[:, :SLOTS], b[:, :SLOTS])


def test_every_bucket_runs_on_tensors_without_values():
    """What a CPU can check of a capture: each bucket's body runs on the meta device (shapes, no values), so it
    reads no device value on the host (.item(), a shape that depends on data) and mixes in no host tensor, either
    of which a CUDA capture refuses."""
    with torch.device("meta"):
        flow = Flow(small_cfg()).eval()
    graphs = WindowGraphs(flow, SLOTS, 1, max_batch=2, capture=False)
    assert graphs.warm() == 2 * 2 * 4
    outs = [run.mel for run in graphs.solves.values()] + [run.mu for run in graphs.encodes.values()]
    assert {o.device.type for o in outs} == {"meta"}
    assert graphs.solves[2, 64].mel.shape == (2, 80, 64) and graphs.encodes[2, 16].mu.shape == (2, 80, 32)


def test_bad_calls_are_clear_errors(flow):
    graphs = WindowGraphs.for_flow(flow, SLOTS, 1, max_batch=2)
    z = [torch.zeros(80, 4)]
    spks = torch.zeros(1, 80)
    with pytest.raises(ValueError, match="at least one stream"):
        graphs.solve([], [], [], [], [], [], spks[:0])
    with pytest.raises(ValueError, match="distinct and in"):
        graphs.solve([SLOTS], [0], [4], [0], z, z, spks)
    with pytest.raises(ValueError, match="distinct and in"):
        graphs.solve([1, 1], [0, 0], [4, 4], [0, 0], z * 2, z * 2, spks.repeat(2, 1))
    with pytest.raises(ValueError, match="chunk boundaries"):
        graphs.solve([0], [3], [4], [0], z, z, spks)
    with pytest.raises(ValueError, match="chunk boundaries"):
        graphs.solve([0], [0], [CD + 4], [3], [torch.zeros(80, CD + 4)] * 2, [torch.zeros(80, CD + 4)], spks)
    tokens = [torch.zeros(CE + 2, dtype=torch.long)]
    with pytest.raises(ValueError, match="at least one stream"):
        graphs.encode([], [], [], [])
    with pytest.raises(ValueError, match="distinct and in"):
        graphs.encode([-1], [0], [0], tokens)
    with pytest.raises(ValueError, match="chunk boundaries"):
        graphs.encode([0], [1], [0], tokens)
    with pytest.raises(ValueError, match="chunk boundaries"):
        graphs.encode([0], [0], [CE - 1], tokens)
    _, spk = replies(flow.cfg)
    with pytest.raises(ValueError, match="window"):
        flow.new_stream(spk, make_noise(flow.cfg), 2, graphs, 0)
    with pytest.raises(ValueError, match="needs a slot"):
        flow.new_stream(spk, make_noise(flow.cfg), 1, graphs, None)
    with pytest.raises(ValueError, match="at least 1 chunk"):
        WindowGraphs.for_flow(flow, SLOTS, 0, max_batch=2)
    with pytest.raises(ValueError, match="CUDA device"):
        WindowGraphs.for_flow(flow, SLOTS, 1, max_batch=2, capture=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_the_eager_fixed_shape_steps(flow):
    """On CUDA: the same sessions through captured graphs and through the eager fixed-shape steps, bit for bit
    (same kernels, same shapes), after warming every bucket (which must not touch the sessions' slots)."""
    cuda = randomize(Flow(small_cfg())).cuda()
    graphs = WindowGraphs.for_flow(cuda, SLOTS, 1, max_batch=4)
    assert all(r.graph is not None for r in [*graphs.solves.values(), *graphs.encodes.values()])  # none refused
    replayed = drive(cuda, 1, graphs, [4, 0, 2, 1, 3])
    eager = drive(cuda, 1, WindowGraphs.for_flow(cuda, SLOTS, 1, max_batch=4, capture=False), [4, 0, 2, 1, 3])
    for a, b in zip(replayed, eager):
        for x, y in zip(a, b):
            assert torch.equal(x, y)
