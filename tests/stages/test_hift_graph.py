"""HiFT on fixed shapes (stages/hift_graph.py) against the dynamic HiFT.inference on the same rows and generators.

On a CPU the buckets run eagerly: the code a CUDA graph captures, so equality here is what makes a replay right;
the replay itself is compared with the eager bucket on CUDA (gpu.sh runs the tests naming cuda)."""
from __future__ import annotations

import pytest
import torch

from omni2.stages.hift import HiFT
from omni2.stages.hift_graph import HiFTGraphs
from tests.stages.recorded_graphs import record_captures
from tests.stages.test_hift import random_hift, random_mel

CACHE = 8 * 480  # the source samples a cached chunk re-reads (mel_cache_len frames)
FRAMES = [(14, False), (28, True)]  # a live stream's first chunk and every later one (W = 10)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()  # tiny convs on 2 cores: see tests/stages/test_hift.py
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def generators(seeds: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("recorded", [False, True], ids=["eager", "recorded"])
@pytest.mark.parametrize("rows", [1, 3, 6])  # one; three in a bucket of four; six as four + two (max_batch 4)
@pytest.mark.parametrize("frames,cached", FRAMES)
def test_a_bucket_voices_as_the_dynamic_call(rows, frames, cached, recorded, monkeypatch):
    """The same speech and source as HiFT.inference on the same rows (measured max 0 on one thread; fp32 rounding if a
    padded batch picks another conv kernel), the same draws from each session's generator (their states after the
    call are equal), and padding rows that change nothing. Recorded: each bucket captured when first needed and
    replayed as a CUDA graph would be (tests/stages/recorded_graphs.py)."""
    if recorded:
        record_captures(monkeypatch)
    h = random_hift()
    graphs = HiFTGraphs(h, 4, FRAMES, CACHE)
    mel = random_mel(rows, frames, seed=rows)
    cache = 0.05 * torch.randn(rows, 1, CACHE, generator=torch.Generator().manual_seed(1)) if cached else None
    seeds = list(range(10, 10 + rows))
    g_fixed, g_dynamic = generators(seeds), generators(seeds)
    speech, source = graphs.inference(mel, cache, g_fixed)
    want, want_source = h.inference(mel, cache, g_dynamic)
    assert speech.shape == want.shape == (rows, 480 * frames) and source.shape == want_source.shape
    assert (speech - want).abs().max().item() < 1e-5, (speech - want).abs().max().item()
    assert torch.equal(source, want_source)
    for a, b in zip(g_fixed, g_dynamic):
        assert torch.equal(a.get_state(), b.get_state())
    assert set(graphs.voices) == {(r, frames, cached) for r in {1: [1], 3: [4], 6: [4, 2]}[rows]}
    assert all((v.graph is not None) == recorded for v in graphs.voices.values())


def test_other_lengths_and_caches_run_the_dynamic_call():
    h = random_hift()
    graphs = HiFTGraphs(h, 4, FRAMES, CACHE)
    mel = random_mel(2, 20)
    speech, _ = graphs.inference(mel, None, generators([1, 2]))
    assert torch.equal(speech, h.inference(mel, None, generators([1, 2]))[0])
    mel = random_mel(2, 28)
    short = torch.zeros(2, 1, CACHE // 2)  # a cache of another length: not a bucket's
    assert torch.equal(graphs.inference(mel, short, generators([1, 2]))[0],
                       h.inference(mel, short, generators([1, 2]))[0])
    assert graphs.voices == {}


def test_warming_prepares_every_bucket():
    graphs = HiFTGraphs(random_hift(), 3, FRAMES, CACHE)
    assert graphs.warm() == 3 * 2  # rows 1, 2, 3 x the two lengths
    assert sorted(graphs.voices) == [(r, T, c) for r in (1, 2, 3) for T, c in sorted(FRAMES)]
    with pytest.raises(ValueError, match="CUDA device"):
        HiFTGraphs(random_hift(), 3, FRAMES, CACHE, capture=True)


def test_every_bucket_runs_on_tensors_without_values():
    """As the flow's buckets (tests/stages/test_flow_graph.py): each body runs on the meta device, so a capture
    meets no host read of a device value and no host tensor."""
    with torch.device("meta"):
        h = HiFT(random_hift().cfg)
    h.init_non_persistent("meta")
    graphs = HiFTGraphs(h.eval().fold_weight_norm(), 2, FRAMES, CACHE, capture=False)
    assert graphs.warm() == 2 * 2
    assert {v.spectrum.device.type for v in graphs.voices.values()} == {"meta"}
    assert graphs.voices[2, 28, True].source.shape == (2, 1, 28 * 480)


def test_deterministic_rows_draw_nothing():
    h = random_hift()
    graphs = HiFTGraphs(h, 2, FRAMES, CACHE)
    g = generators([5])
    state = g[0].get_state()
    speech, _ = graphs.inference(random_mel(1, 14), None, g, deterministic=True)
    assert torch.equal(g[0].get_state(), state)
    assert (speech - h.inference(random_mel(1, 14), None, None, deterministic=True)[0]).abs().max().item() < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_the_eager_bucket():
    h = random_hift().cuda()
    replayed, eager = HiFTGraphs(h, 4, FRAMES, CACHE), HiFTGraphs(h, 4, FRAMES, CACHE, capture=False)
    replayed.warm()
    assert all(v.graph is not None for v in replayed.voices.values())  # every capture taken, none left eager
    mel = random_mel(3, 28).cuda()
    cache = 0.05 * torch.randn(3, 1, CACHE, device="cuda")
    a = replayed.inference(mel, cache, [torch.Generator("cuda").manual_seed(s) for s in (1, 2, 3)])
    b = eager.inference(mel, cache, [torch.Generator("cuda").manual_seed(s) for s in (1, 2, 3)])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
