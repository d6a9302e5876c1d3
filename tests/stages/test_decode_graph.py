"""The fixed-shape steps (stages/decode_graph.py) against the dynamic one (layers.forward_rows) on the same weights
and caches: same tokens, logits to fp32 rounding, whatever rows take part in a step and however many tokens each
appends; padding never touches a session's keys. On CUDA, the captured graphs replay what the eager fixed-shape
step computes."""
import re

import pytest
import torch

from omni2.stages import decode_graph
from omni2.stages.decode_graph import MIN_KEYS, DecodeGraphs, bucket
from omni2.stages.layers import Qwen2LM, SlotKVCache, forward_rows, pad_rows
from tests.stages.recorded_graphs import record_captures
from tests.stages.test_layers import CFG, random_qwen2

SLOTS, MAX_LEN = 9, 160  # slot 8 is the spare


def model(seed: int = 0, device="cpu") -> Qwen2LM:
    return random_qwen2(seed).to(device)


def prefilled(lm: Qwen2LM, slots: list[int], lengths: list[int], device="cpu") -> SlotKVCache:
    cache = SlotKVCache(CFG, SLOTS, MAX_LEN, device, torch.float32)
    g = torch.Generator().manual_seed(5)
    rows = [lm.embed(torch.randint(0, CFG.vocab_size, (n,), generator=g).to(device)) for n in lengths]
    forward_rows(lm, cache, slots, [0] * len(slots), rows)
    return cache


def copy(cache: SlotKVCache) -> SlotKVCache:
    out = SlotKVCache(CFG, cache.slots, cache.max_len, cache.k[0].device, cache.k[0].dtype)
    for a, b in zip(out.k + out.v, cache.k + cache.v):
        a.copy_(b)
    return out


def schedule(step: int, slots: list[int]) -> list[int]:
    """Which rows take part in a step: all, then subsets (rows come and go as sessions read text or finish)."""
    if step % 7 == 3:
        return slots[:1]
    if step % 5 == 1 and len(slots) > 1:
        return slots[1::2]
    return slots


def decode_both(lm, slots, lengths, steps, device="cpu", capture=False, chunk_every=0):
    """Greedy decode of the same sessions through both paths; per step, each path's (tokens, logits). Every
    `chunk_every` steps, each row appends 2..8 tokens at once (a TTS chunk's text) instead of one."""
    with torch.inference_mode():
        dyn_cache = prefilled(lm, slots, lengths, device)
        fix_cache = copy(dyn_cache)
        graphs = DecodeGraphs(lm, fix_cache, max_batch=8, tokens=(1, 8), capture=capture)
        pos = dict(zip(slots, lengths))
        last = {s: (7 * s) % CFG.vocab_size for s in slots}
        out = []
        for i in range(steps):
            part = schedule(i, slots)
            n = [2 + (i + s) % 7 if chunk_every and i % chunk_every == 0 else 1 for s in part]
            ids = [[(last[s] + 31 * t) % CFG.vocab_size for t in range(k)] for s, k in zip(part, n)]
            rows = [lm.embed(torch.tensor(x, device=device)) for x in ids]
            starts = [pos[s] for s in part]
            _, dyn = forward_rows(lm, dyn_cache, part, starts, rows)
            _, fix = graphs.step(part, starts, n, pad_rows(rows)[0])
            out.append((part, dyn.clone(), fix.clone()))
            for s, k, t in zip(part, n, dyn.argmax(-1).tolist()):
                pos[s] += k
                last[s] = t
        return out, dyn_cache, fix_cache, graphs


def test_buckets_are_powers_of_two_within_their_bounds():
    assert [bucket(n, 1, 8) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 4, 8, 8, 8]
    assert [bucket(n, MIN_KEYS, 160) for n in (1, 64, 65, 129, 160)] == [64, 64, 128, 160, 160]
    graphs = DecodeGraphs(model(), SlotKVCache(CFG, SLOTS, MAX_LEN, "cpu", torch.float32), 6, tokens=(8, 1))
    assert graphs.shape(3, 1, 70) == (4, 1, 128) and graphs.shape(5, 2, 10) == (6, 8, 64)


def test_in_parts_slices_every_column_alike_and_passes_none_through():
    calls = []
    parts = decode_graph.in_parts(lambda a, b, c: calls.append((a, b, c)) or len(a), 2, [1, 2, 3, 4, 5], None,
                                  torch.arange(5))
    assert parts == [2, 2, 1]
    assert [(a, b, c.tolist()) for a, b, c in calls] == [([1, 2], None, [0, 1]), ([3, 4], None, [2, 3]),
                                                        ([5], None, [4])]


@pytest.mark.parametrize("recorded", [False, True], ids=["eager", "recorded"])
@pytest.mark.parametrize("slots,chunk_every", [([3, 0, 6, 1, 4], 0), ([3, 0, 6, 1, 4], 4), ([2], 3)])
def test_fixed_shape_steps_equal_the_dynamic_step(slots, chunk_every, recorded, monkeypatch):
    """Eagerly, and captured as recorded graphs (a CUDA graph's replay on a CPU: tests/stages/recorded_graphs.py),
    each bucket captured the first time a step needs it, while sessions hold their slots."""
    if recorded:
        record_captures(monkeypatch)
    lm = model()
    lengths = [5, 58, 1, 31, 60][: len(slots)]
    steps, dyn_cache, fix_cache, graphs = decode_both(lm, slots, lengths, 40, capture=recorded,
                                                      chunk_every=chunk_every)
    assert all((s.graph is not None) == recorded for s in graphs.steps.values())
    tokens = []
    for part, dyn, fix in steps:
        assert dyn.argmax(-1).tolist() == fix.argmax(-1).tolist(), part
        assert (dyn - fix).abs().max().item() < 1e-5, part
        tokens += dyn.argmax(-1).tolist()
    assert len(set(tokens)) > 10  # varied tokens, not one repeated id
    if len(slots) > 1:  # rows 5 -> 8, 2 -> 2, 1 -> 1; keys crossed 64 -> 128 (and 160 with chunks)
        assert {r for r, _, _ in graphs.steps} == {8, 2, 1} and {64, 128} <= {k for _, _, k in graphs.steps}
    assert {t for _, t, _ in graphs.steps} == ({1, 8} if chunk_every else {1})
    # Every session's keys equal the dynamic path's, and no other slot was written (the spare is padding's).
    used = torch.tensor(slots)
    others = torch.tensor([s for s in range(SLOTS - 1) if s not in slots])
    for a, b in zip(dyn_cache.k + dyn_cache.v, fix_cache.k + fix_cache.v):
        assert (a[used] - b[used]).abs().max().item() < 1e-5
        assert torch.equal(b[others], torch.zeros_like(b[others]))


def warm_and_step(device: str, capture: bool):
    """Warm every bucket over a cache two sessions hold, then step them: (session keys before, after warming, the
    step's logits, the graphs)."""
    lm = model(device=device)
    with torch.inference_mode():
        cache = prefilled(lm, [0, 5], [7, 30], device)
        before = [t[:SLOTS - 1].clone() for t in cache.k + cache.v]
        graphs = DecodeGraphs(lm, cache, max_batch=6, tokens=(1, 4), capture=capture)
        assert graphs.warm() == 4 * 2 * 3  # rows 1, 2, 4, 6 x tokens 1, 4 x keys 64, 128, 160
        after = [t[:SLOTS - 1].clone() for t in cache.k + cache.v]
        _, logits = graphs.step([0, 5], [7, 30], [1, 3], lm.embed(torch.tensor([[11, 0, 0], [12, 13, 14]],
                                                                                 device=device)))
    return before, after, logits, graphs


def test_warming_prepares_every_bucket():
    before, after, logits, graphs = warm_and_step("cpu", capture=False)
    assert sorted(graphs.steps) == [(r, t, k) for r in (1, 2, 4, 6) for t in (1, 4) for k in (64, 128, 160)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    with torch.inference_mode():  # a warmed bucket steps as a fresh one does
        lm = model()
        fresh = DecodeGraphs(lm, prefilled(lm, [0, 5], [7, 30]), max_batch=6, tokens=(1, 4))
        _, want = fresh.step([0, 5], [7, 30], [1, 3], lm.embed(torch.tensor([[11, 0, 0], [12, 13, 14]])))
    assert torch.equal(logits, want)


def test_every_bucket_runs_on_tensors_without_values():
    """What a CPU can check of a capture: each bucket's step runs on the meta device (shapes, no values), so it
    reads no device value on the host and mixes in no host tensor, either of which a CUDA capture refuses."""
    with torch.device("meta"):
        lm = Qwen2LM(CFG).eval()
    graphs = DecodeGraphs(lm, SlotKVCache(CFG, SLOTS, MAX_LEN, "meta", torch.float32), max_batch=2, tokens=(1, 4),
                          capture=False)
    assert graphs.warm() == 2 * 2 * 3
    for (rows, _, _), step in graphs.steps.items():
        with torch.inference_mode():
            step.run()
        assert step.logits.device.type == "meta" and step.logits.shape == (rows, CFG.vocab_size)


def test_bad_steps_are_clear_errors():
    lm = model()
    graphs = DecodeGraphs(lm, SlotKVCache(CFG, SLOTS, MAX_LEN, "cpu", torch.float32), max_batch=4, tokens=(1, 2))
    x = torch.zeros(5, 3, CFG.hidden_size)
    with pytest.raises(ValueError, match="belongs to no session"):
        graphs.step([0, 8], [1, 1], [1, 1], x[:2, :1])
    with pytest.raises(ValueError, match="1..4 rows"):
        graphs.step(list(range(5)), [1] * 5, [1] * 5, x[:, :1])
    with pytest.raises(ValueError, match="rows of 1..2 tokens"):
        graphs.step([0], [1], [3], x[:1])
    with pytest.raises(ValueError, match="past the cache"):
        graphs.step([0], [MAX_LEN - 1], [2], x[:1, :2])
    with pytest.raises(ValueError, match="CUDA device"):
        DecodeGraphs(lm, SlotKVCache(CFG, SLOTS, MAX_LEN, "cpu", torch.float32), max_batch=4, capture=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_replays_equal_the_eager_fixed_shape_step():
    lm = model(device="cuda")
    slots, lengths = [3, 0, 6, 1, 4], [5, 58, 1, 31, 60]
    eager, *_ = decode_both(lm, slots, lengths, 40, "cuda", capture=False, chunk_every=4)
    graphed, _, _, graphs = decode_both(lm, slots, lengths, 40, "cuda", capture=True, chunk_every=4)
    assert all(s.graph is not None for s in graphs.steps.values())
    for (part, dyn, fix_eager), (_, _, fix_graph) in zip(eager, graphed):
        assert torch.equal(fix_eager, fix_graph), part  # the same kernels on the same shapes
        assert dyn.argmax(-1).tolist() == fix_graph.argmax(-1).tolist(), part


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_capture_of_every_bucket_writes_no_session_slot(caplog):
    """A capture runs the step twice for real first (torch.cuda.graphs' warm-up): on padding rows only. The log
    says what the captures took, memory included."""
    with caplog.at_level("INFO", logger="omni2.stages.decode_graph"):
        before, after, graphed, graphs = warm_and_step("cuda", capture=True)
    assert re.search(r"decode steps: 24 of 24 buckets captured as CUDA graphs in \d+\.\d s \(\+\d+ MB reserved\)",
                     caplog.text), caplog.text
    assert all(s.graph is not None for s in graphs.steps.values())
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    _, _, eager, _ = warm_and_step("cuda", capture=False)
    assert torch.equal(graphed, eager)


def test_a_refused_capture_leaves_the_bucket_eager(monkeypatch, caplog):
    """A capture the device refuses (here: any) is logged and the bucket's replays run it eagerly, instead of the
    stage failing to load."""
    def refuse(run, pool):
        raise RuntimeError("operation not permitted when stream is capturing")

    class Count(decode_graph.GraphedRun):
        calls = 0

        def run(self) -> None:
            self.calls += 1

    monkeypatch.setattr(decode_graph, "capture_graph", refuse)
    bucket = Count()
    with caplog.at_level("WARNING"):
        assert bucket.capture(None) is False
    assert bucket.graph is None and "capture failed" in caplog.text and "not permitted" in caplog.text
    bucket.replay()
    bucket.replay()
    assert bucket.calls == 2


def test_a_familys_captures_are_counted_in_the_log(monkeypatch, caplog):
    """warm() on a GPU says how many buckets of a family were captured and in how long: the start-up a serving
    engineer reads in the worker's log, and a refused capture shows as one bucket fewer."""
    outcomes = iter([object(), RuntimeError("operation not permitted when stream is capturing"), object()])

    def capture(run, pool):
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    monkeypatch.setattr(decode_graph, "capture_graph", capture)
    runs: dict[int, decode_graph.GraphedRun] = {}
    with caplog.at_level("INFO", logger="omni2.stages.decode_graph"):
        with decode_graph.logged_captures("flow Euler steps", runs, capture=True):
            for shape in range(3):
                runs[shape] = decode_graph.GraphedRun()
                runs[shape].capture(None)
        assert [r.graph is not None for r in runs.values()] == [True, False, True]
        with decode_graph.logged_captures("HiFT", {}, capture=False):  # an eager warm-up logs nothing
            pass
    assert "HiFT" not in caplog.text
    assert re.search(r"flow Euler steps: 2 of 3 buckets captured as CUDA graphs in \d+\.\d s", caplog.text)
