"""The one-token decode step of a Qwen2LM with fixed shapes, replayed as CUDA graphs.

A decode step of the thinker or the TTS LM is a few hundred small kernels whose launches cost more host time than
the GPU spends running them (bench/results/gpu-h200-20261204: a 0.5b TTS step, 56 ms of wall time for 12 ms of
kernels). A CUDA graph launches them all at once, but replays exactly the shapes and addresses it was captured with.
So the step is rebuilt on fixed shapes:

* the batch is padded to a bucket of rows (powers of two up to `max_batch`); padding rows decode into a spare cache
  slot that no session owns, at position 0, so they never touch a session's keys;
* keys are read up to a bucket of positions (powers of two from `MIN_KEYS`, capped at the cache length) instead of
  the batch's longest row; the causal mask hides the rest, as it hides stale positions today;
* every index a layer reads (slots, positions, token ids) lives in a preallocated buffer that each step overwrites
  in place, and the mask and rotary tables are computed inside the step from those buffers.

One graph is captured per (rows, keys) bucket, all in one memory pool: every bucket by `warm()` (what a stage does
when it loads on a GPU, so that no reply waits for a capture), or each the first time it is needed. Without CUDA (or
with `capture=False`) the same fixed-shape step runs eagerly: that is how its equality with the dynamic step
(`layers.forward_rows`) is tested on a CPU.
"""
from __future__ import annotations

import torch

from omni2.stages.layers import Qwen2LM, SlotKVCache

MIN_KEYS = 64  # smallest key bucket: below it, the buckets would only add graphs


def bucket(n: int, smallest: int, largest: int) -> int:
    """The smallest power of two >= n (and >= smallest), capped at largest."""
    b = smallest
    while b < n:
        b *= 2
    return min(b, largest)


class StaticBatch:
    """What the layers read from a `layers.Batch` for one token per row, as fixed buffers a graph reads in place.

    The write targets alias the slots and start buffers (one token per row, written at the row's start), and
    `positions` is a view of the starts: overwriting `slots`, `starts` and `ids` is all a new step needs."""

    def __init__(self, rows: int, kv_len: int, device):
        self.slots = torch.zeros(rows, dtype=torch.long, device=device)
        self.starts = torch.zeros(rows, dtype=torch.long, device=device)
        self.ids = torch.zeros(rows, 1, dtype=torch.long, device=device)
        self.lengths = torch.ones(rows, dtype=torch.long, device=device)
        self.rows = torch.arange(rows, device=device)
        self.cols = torch.zeros(rows, dtype=torch.long, device=device)
        self.write_slots, self.write_positions = self.slots, self.starts
        self.positions = self.starts[:, None]  # (B, 1)
        self.kv_len = kv_len
        self.lone_slot = None  # always gather: which slots a replay reads is data, not shape
        self.keys = torch.arange(kv_len, device=device)
        self.mask = torch.zeros(rows, 1, kv_len, dtype=torch.bool, device=device)

    def refresh_mask(self) -> None:
        torch.le(self.keys[None, None, :], self.positions[:, :, None], out=self.mask)  # (B, 1, L) causal


class _Step:
    """One (rows, keys) bucket: its buffers, its outputs, and its graph once captured."""

    def __init__(self, lm: Qwen2LM, cache: SlotKVCache, rows: int, kv_len: int, head: bool, device):
        self.lm, self.cache, self.head = lm, cache, head
        self.batch = StaticBatch(rows, kv_len, device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.hidden: torch.Tensor | None = None
        self.logits: torch.Tensor | None = None

    def run(self) -> None:
        b = self.batch
        b.refresh_mask()
        self.hidden, self.logits = self.lm(self.lm.embed(b.ids), b, self.cache, self.head)

    def capture(self, pool) -> None:
        # Lazy initialisations (cuBLAS workspaces, kernel selection) must happen before capture, on a side stream
        # as torch.cuda.graphs asks; the buffers still point every row at the spare slot, so these runs write
        # nothing a session owns.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.run()
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.run()

    def replay(self) -> None:
        if self.graph is None:
            self.run()
        else:
            self.graph.replay()


class DecodeGraphs:
    """Decode steps of `lm` over `cache` on fixed shapes; CUDA graphs on a CUDA device unless `capture=False`.

    `cache` must have a slot that no session uses (`spare_slot`, default its last): padding rows write there."""

    def __init__(self, lm: Qwen2LM, cache: SlotKVCache, max_batch: int, head: bool = True,
                 spare_slot: int | None = None, capture: bool | None = None):
        self.lm, self.cache, self.head = lm, cache, head
        self.device = cache.k[0].device
        self.max_batch = max_batch
        self.spare_slot = cache.slots - 1 if spare_slot is None else spare_slot
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the cache on a CUDA device")
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.steps: dict[tuple[int, int], _Step] = {}

    def shape(self, n_rows: int, longest: int) -> tuple[int, int]:
        """The (rows, keys) bucket of a step over n_rows rows whose longest needs `longest` keys."""
        return bucket(n_rows, 1, self.max_batch), bucket(longest, MIN_KEYS, self.cache.max_len)

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, keys) bucket a step can fall in."""
        rows = sorted({bucket(n, 1, self.max_batch) for n in range(1, self.max_batch + 1)})
        keys = sorted({bucket(n, MIN_KEYS, self.cache.max_len) for n in range(1, self.cache.max_len + 1)})
        return [(r, k) for r in rows for k in keys]

    @torch.inference_mode()
    def warm(self) -> int:
        """Prepare every bucket now (capture its graph, on CUDA); returns how many there are. Captures run only
        the padding rows, which write nothing a session owns."""
        for shape in self.shapes():
            self._prepare(shape)
        return len(self.steps)

    def _prepare(self, shape: tuple[int, int]) -> _Step:
        step = self.steps.get(shape)
        if step is None:
            step = self.steps[shape] = _Step(self.lm, self.cache, *shape, self.head, self.device)
            if self.capture:
                self._load(step, [self.spare_slot] * shape[0], [0] * shape[0], [0] * shape[0])
                step.capture(self.pool)
        return step

    @torch.inference_mode()
    def step(self, slots: list[int], starts: list[int], ids: list[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Row b feeds token ids[b] to slot slots[b] at position starts[b]. Returns the final-norm hidden (B, H)
        and logits (B, V) (None without the head), copied out of the bucket's outputs, which its next step
        overwrites."""
        n = len(slots)
        if not 0 < n <= self.max_batch:
            raise ValueError(f"a decode step takes 1..{self.max_batch} rows, got {n}")
        if self.spare_slot in slots:
            raise ValueError(f"slot {self.spare_slot} is the padding rows' and belongs to no session")
        if max(starts) >= self.cache.max_len:
            raise ValueError(f"position {max(starts)} is past the cache's {self.cache.max_len}")
        rows, kv_len = self.shape(n, max(starts) + 1)
        step = self._prepare((rows, kv_len))
        pad = rows - n
        self._load(step, [*slots, *[self.spare_slot] * pad], [*starts, *[0] * pad], [*ids, *[0] * pad])
        step.replay()
        return step.hidden[:n].clone(), None if step.logits is None else step.logits[:n].clone()

    @staticmethod
    def _load(step: _Step, slots: list[int], starts: list[int], ids: list[int]) -> None:
        """Overwrite the bucket's inputs in place, with one host-to-device copy."""
        b = step.batch
        packed = torch.tensor([*slots, *starts, *ids], dtype=torch.long)
        rows = len(slots)
        if b.slots.device.type == "cuda":
            packed = packed.pin_memory()
        staged = packed.to(b.slots.device, non_blocking=True)
        b.slots.copy_(staged[:rows])
        b.starts.copy_(staged[rows:2 * rows])
        b.ids.copy_(staged[2 * rows:, None])
