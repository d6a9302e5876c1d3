"""Short steps of a Qwen2LM — one token per row, or a few (a TTS chunk's text) — on fixed shapes, replayed as
CUDA graphs.

A decode step of the thinker or the TTS LM is a few hundred small kernels whose launches cost more host time than
the GPU spends running them (bench/results/gpu-h200-20261204: a 0.5b TTS step, 56 ms of wall time for 12 ms of
kernels). A CUDA graph launches them all at once, but replays exactly the shapes and addresses it was captured with.
So the step is rebuilt on fixed shapes:

* the batch is padded to a bucket of rows (powers of two up to `max_batch`) and each row to a bucket of tokens
  (`tokens`, e.g. 1 for decode steps and 8 for chunk prefills); padding rows and padding tokens write their keys
  into a spare cache slot that no session owns, so they never touch a session's keys;
* keys are read up to a bucket of positions (powers of two from `MIN_KEYS`, capped at the cache length) instead of
  the batch's longest row; the causal mask hides the rest, as it hides stale positions today;
* every index a layer reads (slots, positions, where each token is written) lives in a preallocated buffer that
  each step overwrites in place, and the mask and rotary tables are computed inside the step from those buffers.

One graph is captured per (rows, tokens, keys) bucket, all in one memory pool: every bucket by `warm()` (what a
stage does when it loads on a GPU, so that no reply waits for a capture), or each the first time it is needed.
Without CUDA (or with `capture=False`) the same fixed-shape step runs eagerly: that is how its equality with the
dynamic step (`layers.forward_rows`) is tested on a CPU.
"""
from __future__ import annotations

import logging
import time
from contextlib import contextmanager

import torch

from omni2.stages.layers import Qwen2LM, SlotKVCache

log = logging.getLogger(__name__)

MIN_KEYS = 64  # smallest key bucket: below it, the buckets would only add graphs


def buckets(smallest: int, largest: int) -> list[int]:
    """smallest, 2 * smallest, 4 * smallest ... below largest, then largest (all capped at largest)."""
    out = [min(smallest, largest)]
    while out[-1] < largest:
        out.append(min(2 * out[-1], largest))
    return out


def bucket(n: int, smallest: int, largest: int) -> int:
    """The smallest power of two >= n (and >= smallest), capped at largest."""
    return next((b for b in buckets(smallest, largest) if b >= n), largest)


def in_parts(call, size: int, *columns) -> list:
    """`call` over `size` rows at a time, every column sliced alike (a None column stays None): each part's result,
    in order. A fixed-shape call wider than its largest row bucket runs so."""
    n = len(next(c for c in columns if c is not None))
    return [call(*(c if c is None else c[i:i + size] for c in columns)) for i in range(0, n, size)]


def slot_cache(lm: Qwen2LM, sessions: int, max_len: int, device, dtype, graphs: bool, tokens: tuple[int, ...] = (1,),
               head: bool = True) -> tuple[SlotKVCache, DecodeGraphs | None]:
    """A stage's KV cache for `sessions` slots of `max_len` positions and, with `graphs`, its fixed-shape steps: the
    cache then has one slot more (the padding's), and on CUDA every bucket is captured now, as the stage loads, so
    that no reply waits for a capture."""
    cache = SlotKVCache(lm.cfg, sessions + (1 if graphs else 0), max_len, device, dtype)
    if not graphs:
        return cache, None
    steps = DecodeGraphs(lm, cache, sessions, tokens, head)
    if steps.capture:
        steps.warm()
    return cache, steps


def capturing(device: torch.device, capture: bool | None, what: str) -> tuple[bool, object]:
    """A family's (capture, memory pool) on `device`: it captures by default on CUDA (`capture` None), never where
    `capture` is False, and all its graphs share one pool."""
    capture = device.type == "cuda" if capture is None else capture
    if capture and device.type != "cuda":
        raise ValueError(f"CUDA graphs need {what} on a CUDA device")
    return capture, torch.cuda.graph_pool_handle() if capture else None


def capture_graph(run, pool) -> torch.cuda.CUDAGraph:
    """`run` captured as a CUDA graph in memory pool `pool`. Lazy initialisations (cuBLAS workspaces, kernel
    selection) must happen before capture, on a side stream as torch.cuda.graphs asks: so `run` runs twice first,
    and must then write nothing a session owns (its buffers point every row at the spare slot)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph


@contextmanager
def logged_captures(what: str, runs: dict, capture: bool):
    """Around a family's warm-up: when it captures, say in the log how many of its buckets (`runs`, filled by the
    warm-up) were captured, in how long and, on a GPU, how much device memory the allocator reserved meanwhile (the
    family's graph pool and buffers). A stage's start-up on a GPU is mostly its captures, a refused one is a bucket
    left eager, and the pools are what a larger max_batch costs."""
    started = time.perf_counter()
    on_gpu = capture and torch.cuda.is_available()
    reserved = torch.cuda.memory_reserved() if on_gpu else 0
    yield
    if capture:
        taken = sum(r.graph is not None for r in runs.values())
        grew = f" (+{(torch.cuda.memory_reserved() - reserved) / 2**20:.0f} MB reserved)" if on_gpu else ""
        log.info("%s: %d of %d buckets captured as CUDA graphs in %.1f s%s", what, taken, len(runs),
                 time.perf_counter() - started, grew)


def load_index(index: torch.Tensor, fields: list[tuple[list[int], int]]) -> None:
    """Overwrite a bucket's (fields, rows) index in place with one host-to-device copy: each field's values, the
    rows past them (padding) filled with the field's padding value."""
    rows = index.shape[1]
    packed = torch.tensor([[*values, *[pad] * (rows - len(values))] for values, pad in fields], dtype=torch.long)
    if index.device.type == "cuda":
        packed = packed.pin_memory()
    index.copy_(packed.to(index.device, non_blocking=True))


class GraphedRun:
    """One fixed-shape bucket's computation (`run`, which a subclass defines) and its CUDA graph once captured;
    `replay` runs the graph, or the computation eagerly where none was captured."""

    graph: torch.cuda.CUDAGraph | None = None

    def run(self) -> None:
        raise NotImplementedError

    def capture(self, pool) -> bool:
        """Capture `run`; a capture the device refuses (an op that waits on the host, say) leaves this bucket to
        run eagerly, logged, rather than failing the stage that loads it."""
        try:
            self.graph = capture_graph(self.run, pool)
        except RuntimeError as e:
            log.warning("%s: CUDA graph capture failed, this bucket runs eagerly: %s", type(self).__name__, e)
            self.graph = None
        return self.graph is not None

    def replay(self) -> None:
        if self.graph is None:
            self.run()
        else:
            self.graph.replay()


class StaticBatch:
    """What the layers read from a `layers.Batch`, as buffers of fixed shape that a captured graph reads in place:
    `rows` rows of `tokens` tokens each, keys up to `kv_len`. A step overwrites `embeds` and `index` (slot, start,
    length per row); `refresh()` derives the rest from them: the write targets, the positions and the mask."""

    def __init__(self, rows: int, tokens: int, kv_len: int, hidden: int, spare_slot: int, device, dtype):
        self.embeds = torch.zeros(rows, tokens, hidden, device=device, dtype=dtype)
        self.index = torch.zeros(3, rows, dtype=torch.long, device=device)  # slot, start, length
        self.index[2] = 1
        self.slots, self.starts, self.lengths = self.index.unbind(0)  # views: each (rows,)
        self._spare = torch.tensor(spare_slot, device=device)
        # Every token of the (rows, tokens) input is written somewhere: a real one to its slot and position, a
        # padding one to the spare slot (at its column, so that no two padding tokens of a row collide).
        self.rows = torch.arange(rows, device=device).repeat_interleave(tokens)
        self.cols = torch.arange(tokens, device=device).repeat(rows)
        self.write_slots = torch.zeros(rows * tokens, dtype=torch.long, device=device)
        self.write_positions = torch.zeros(rows * tokens, dtype=torch.long, device=device)
        self.kv_len = kv_len
        self.lone_slot = None  # always gather: which slots a replay reads is data, not shape
        self._offsets = torch.arange(tokens, device=device)
        self._keys = torch.arange(kv_len, device=device)
        self.positions = torch.zeros(rows, tokens, dtype=torch.long, device=device)
        self.mask = torch.zeros(rows, tokens, kv_len, dtype=torch.bool, device=device)

    def refresh(self) -> None:
        real = self.cols < self.lengths[self.rows]
        torch.where(real, self.slots[self.rows], self._spare, out=self.write_slots)
        torch.where(real, self.starts[self.rows] + self.cols, self.cols, out=self.write_positions)
        torch.add(self.starts[:, None], self._offsets[None, :], out=self.positions)  # (B, T)
        torch.le(self._keys[None, None, :], self.positions[:, :, None], out=self.mask)  # (B, T, L) causal


class _Step(GraphedRun):
    """One (rows, tokens, keys) bucket: its buffers and its outputs."""

    def __init__(self, lm: Qwen2LM, cache: SlotKVCache, shape: tuple[int, int, int], head: bool, spare_slot: int):
        self.lm, self.cache, self.head = lm, cache, head
        self.batch = StaticBatch(*shape, lm.cfg.hidden_size, spare_slot, cache.k[0].device, cache.k[0].dtype)
        self.hidden: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def run(self) -> None:
        self.batch.refresh()
        self.hidden, self.logits = self.lm(self.batch.embeds, self.batch, self.cache, self.head)


class DecodeGraphs:
    """Short steps of `lm` over `cache` on fixed shapes; CUDA graphs on a CUDA device unless `capture=False`.

    tokens: the token buckets (a step's longest row is padded to the smallest that holds it; `max_tokens` is the
    longest row a step takes). `cache` must have a slot that no session uses (`spare_slot`, default its last):
    padding writes there."""

    def __init__(self, lm: Qwen2LM, cache: SlotKVCache, max_batch: int, tokens: tuple[int, ...] = (1,),
                 head: bool = True, spare_slot: int | None = None, capture: bool | None = None):
        self.lm, self.cache, self.head = lm, cache, head
        self.device = cache.k[0].device
        self.max_batch, self.tokens = max_batch, tuple(sorted(tokens))
        self.max_tokens = self.tokens[-1]
        self.spare_slot = cache.slots - 1 if spare_slot is None else spare_slot
        if self.max_tokens > cache.max_len:
            raise ValueError(f"rows of {self.max_tokens} tokens do not fit a cache of {cache.max_len} positions")
        self.capture, self.pool = capturing(self.device, capture, "the cache")
        self.steps: dict[tuple[int, int, int], _Step] = {}

    def shape(self, n_rows: int, n_tokens: int, longest: int) -> tuple[int, int, int]:
        """The (rows, tokens, keys) bucket of a step over n_rows rows of at most n_tokens tokens whose longest
        needs `longest` keys."""
        tokens = next(t for t in self.tokens if t >= n_tokens)
        return bucket(n_rows, 1, self.max_batch), tokens, bucket(longest, MIN_KEYS, self.cache.max_len)

    def shapes(self) -> list[tuple[int, int, int]]:
        """Every (rows, tokens, keys) bucket a step can fall in."""
        keys = buckets(MIN_KEYS, self.cache.max_len)
        return [(r, t, k) for t in self.tokens for r in buckets(1, self.max_batch) for k in keys]

    @torch.inference_mode()
    def warm(self) -> int:
        """Prepare every bucket now (capture its graph, on CUDA); returns how many there are. Captures run only
        padding, which writes nothing a session owns."""
        with logged_captures("decode steps", self.steps, self.capture):
            for shape in self.shapes():
                self._prepare(shape)
        return len(self.steps)

    def _prepare(self, shape: tuple[int, int, int]) -> _Step:
        step = self.steps.get(shape)
        if step is None:
            step = self.steps[shape] = _Step(self.lm, self.cache, shape, self.head, self.spare_slot)
            if self.capture:
                self._load(step, [], [], [])
                step.capture(self.pool)
        return step

    @torch.inference_mode()
    def step(self, slots: list[int], starts: list[int], lengths: list[int], embeds: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Row b appends embeds[b, :lengths[b]] (embeds (B, T, H), right-padded) to slot slots[b] at position
        starts[b]. Returns the final-norm hidden (B, H) and logits (B, V) (None without the head) of each row's
        last token, copied out of the bucket's outputs, which its next step overwrites."""
        n = len(slots)
        if not 0 < n <= self.max_batch:
            raise ValueError(f"a step takes 1..{self.max_batch} rows, got {n}")
        if min(lengths) < 1 or max(lengths) > self.max_tokens:
            raise ValueError(f"rows of 1..{self.max_tokens} tokens, got {lengths}")
        if self.spare_slot in slots:
            raise ValueError(f"slot {self.spare_slot} is the padding's and belongs to no session")
        longest = max(s + n_ for s, n_ in zip(starts, lengths))
        if longest > self.cache.max_len:
            raise ValueError(f"position {longest - 1} is past the cache's {self.cache.max_len}")
        step = self._prepare(self.shape(n, max(lengths), longest))
        step.batch.embeds[:n, :embeds.shape[1]].copy_(embeds)  # the rest keeps earlier (finite) values: padding
        self._load(step, slots, starts, lengths)
        step.replay()
        return step.hidden[:n].clone(), None if step.logits is None else step.logits[:n].clone()

    def _load(self, step: _Step, slots: list[int], starts: list[int], lengths: list[int]) -> None:
        """Overwrite the bucket's index; rows past len(slots) pad (the spare slot, one token at position 0)."""
        load_index(step.batch.index, [(slots, self.spare_slot), (starts, 0), (lengths, 1)])
