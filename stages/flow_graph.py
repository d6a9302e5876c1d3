"""The flow estimator's Euler steps over windowed streams, on fixed shapes, replayed as CUDA graphs.

A live vocoder write runs the estimator 10 times (Euler steps), each through 56 attention layers and 31 causal
convs of the CosyVoice2 dims, over a few dozen open frames: ~100,000 small ops, whose launches cost more host time
than the GPU spends running them (bench/results/gpu-h200-20261204: a 0.5b live write, 540 ms of wall time for 82 ms
of kernels). A CUDA graph launches them at once, but replays exactly the shapes and addresses it was captured with,
while a FlowStream's caches grow, shift and are cloned on every call. So for streams with a window of k left chunks
(the serving default), the estimator's state moves into a pool of fixed shape:

* per Euler step and stateful layer, one tensor over (slots + 1, 2 CFG rows, ...): for an attention layer the keys
  and values of the last k chunks of committed frames (k * chunk positions, oldest first, the rest stale), for a
  causal conv its kernel - 1 inputs left of the open span; the last slot belongs to no stream (padding's);
* a call's open frames are right-padded to a bucket of widths (powers of two from MIN_FRAMES to MAX_FRAMES) and its
  streams to a bucket of rows (powers of two up to max_batch); padding rows read and write the spare slot;
* the chunk mask, the keys each layer keeps (the last k chunks of its cached and newly committed keys) and each
  conv's new tail are gathered inside the step from five numbers per stream (slot, start, length, cached keys,
  commit), overwritten in place by one host-to-device copy per call.

The frames equal FlowStream's windowed estimator to float rounding (the same layers see the same keys, in another
order and on padded shapes). Without CUDA the same fixed-shape steps run eagerly: that is how they are tested on a
CPU. The flow encoder and HiFT stay dynamic (~6% of a write's host ops).
"""
from __future__ import annotations

import torch

from omni2.engine.config import CFMConfig
from omni2.stages.decode_graph import GraphedRun, bucket, buckets
from omni2.stages.flow import Flow, solve_euler_batch
from omni2.stages.flow_cache import additive
from omni2.stages.flow_estimator import Attention, CausalConv1d, FlowEstimator

MIN_FRAMES = 32  # narrowest width bucket: a live write of 10 units opens at least 14 frames
MAX_FRAMES = 256  # widest captured: a live write opens at most a chunk + 2 * (W + 3) frames; wider calls run eagerly
REPLAY = "flow_graph.replay"  # the profiler label of a replay (bench/profile_step.py counts its ops)


class WindowPool:
    """Every windowed stream's estimator state, one slot per stream, at fixed addresses (see the module docstring);
    slot `slots` is the padding's."""

    def __init__(self, estimator: FlowEstimator, steps: int, slots: int, window: int):
        self.slots, self.spare, self.window = slots, slots, window
        w = estimator.final_proj.weight
        self.device, self.dtype = device, dtype = w.device, w.dtype
        # By the layer's slot (flow_cache.assign_slots): K, V (steps, slots + 1, 2, H, window, D) of an attention
        # layer; the tail (steps, slots + 1, 2, C, kernel - 1) of a causal conv.
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tails: dict[int, torch.Tensor] = {}
        for layer in estimator.modules():
            if isinstance(layer, Attention):
                shape = (steps, slots + 1, 2, layer.heads, window, layer.head_dim)
                self.kv[layer.slot] = (torch.zeros(shape, device=device, dtype=dtype),
                                       torch.zeros(shape, device=device, dtype=dtype))
            elif isinstance(layer, CausalConv1d):
                shape = (steps, slots + 1, 2, layer.in_channels, layer.kernel_size[0] - 1)
                self.tails[layer.slot] = torch.zeros(shape, device=device, dtype=dtype)
        self.pads = sorted({t.shape[-1] for t in self.tails.values()})

    def reset(self, slot: int) -> None:
        """A new stream in `slot`: its convs start from the official zero padding (its keys count as none cached)."""
        for tail in self.tails.values():
            tail[:, slot].zero_()

    def slot_bytes(self, tails: bool = True) -> int:
        """Bytes one stream's slot holds: keys and values, and with `tails` the conv tails."""
        per = lambda t: t[:, 0].numel() * t.element_size()  # noqa: E731
        return sum(2 * per(k) for k, _ in self.kv.values()) + (sum(per(t) for t in self.tails.values()) if tails else 0)


class WindowBatch:
    """One (rows, width) bucket's buffers: the inputs a call overwrites (`index`, `z`, `mu`, `spks`) and what
    `refresh()` derives from `index` inside the step (slots, the additive chunk mask, the gather indices)."""

    def __init__(self, rows: int, width: int, chunk: int, left_chunks: int, pads: list[int], channels: int,
                 device, dtype):
        self.rows, self.width, self.chunk, self.left_chunks = rows, width, chunk, left_chunks
        self.window, self.pads, self.dtype = chunk * left_chunks, pads, dtype
        self.index = torch.zeros(5, rows, dtype=torch.long, device=device)  # slot, start, length, cached, commit
        self.index[2] = 1
        self.z = torch.zeros(rows, channels, width, device=device, dtype=dtype)
        self.mu = torch.zeros(rows, channels, width, device=device, dtype=dtype)
        self.cond = torch.zeros(rows, channels, width, device=device, dtype=dtype)
        self.spks = torch.zeros(rows, channels, device=device, dtype=dtype)
        self._cols = torch.arange(width, device=device)
        self._keys = torch.arange(self.window, device=device)
        self.slots = self.visible = self.bias = self.kv_index = None
        self.tail_index: dict[int, torch.Tensor] = {}

    def refresh(self) -> None:
        slot, start, length, cached, commit = self.index.unbind(0)  # (B,) each
        K, c, cols, keys = self.window, self.chunk, self._cols, self._keys
        self.slots = slot
        # Queries at positions start + t; keys: the cached ones at start - cached + m, then the open ones.
        q = start[:, None] + cols  # (B, T)
        q_chunk = torch.div(q, c, rounding_mode="floor")
        hi = torch.minimum((q_chunk + 1) * c, (start + length)[:, None])
        lo = (q_chunk - self.left_chunks) * c
        k_pos = torch.cat([(start - cached)[:, None] + keys, q], dim=1)  # (B, K + T)
        real = torch.cat([keys < cached[:, None], cols < length[:, None]], dim=1)
        visible = real[:, None, :] & (k_pos[:, None, :] < hi[:, :, None]) & (k_pos[:, None, :] >= lo[:, :, None])
        visible[:, :, K] |= cols[None, :] >= length[:, None]  # a padding query reads one key: no fully masked row
        self.visible = visible.repeat_interleave(2, dim=0)[:, None]  # (2B, 1, T, K + T): both CFG rows
        self.bias = additive(self.visible, self.dtype)
        # Kept keys: the last min(cached + commit, K) of [cached..., the commit's open ones...]; the rest is stale.
        kept = torch.clamp(cached + commit, max=K)
        i = (cached + commit - kept)[:, None] + keys  # (B, K): index into that sequence
        src = torch.where(i < cached[:, None], i, K + i - cached[:, None]).clamp(max=K + self.width - 1)
        self.kv_index = src.repeat_interleave(2, dim=0)[:, None, :, None]  # (2B, 1, K, 1)
        # A conv keeps the `pad` inputs left of start + commit: columns [commit, commit + pad) of its padded input.
        self.tail_index = {p: (commit[:, None] + torch.arange(p, device=commit.device)).repeat_interleave(
            2, dim=0)[:, None, :] for p in self.pads}


class WindowSpan:
    """What one Euler step's layers read and keep, in place of a Span (flow_cache.causal_pad / visible_keys hand
    it their work)."""

    def __init__(self, batch: WindowBatch, pool: WindowPool, step: int):
        self.batch, self.pool, self.step = batch, pool, step

    def causal_pad(self, x: torch.Tensor, pad: int, layer) -> torch.Tensor:
        tail = self.pool.tails[layer.slot][self.step]  # (slots + 1, 2, C, pad)
        b = self.batch
        x = torch.cat([tail.index_select(0, b.slots).flatten(0, 1), x], dim=-1)
        keep = x.gather(2, b.tail_index[pad].expand(-1, x.shape[1], -1))
        tail.index_copy_(0, b.slots, keep.unflatten(0, (-1, 2)))
        return x

    def visible_keys(self, k: torch.Tensor, v: torch.Tensor, layer, bias: bool):
        K, V = (t[self.step] for t in self.pool.kv[layer.slot])  # (slots + 1, 2, H, window, D)
        b = self.batch
        keys = torch.cat([K.index_select(0, b.slots).flatten(0, 1), k], dim=2)  # (2B, H, window + T, D)
        values = torch.cat([V.index_select(0, b.slots).flatten(0, 1), v], dim=2)
        idx = b.kv_index.expand(-1, k.shape[1], -1, k.shape[3])
        K.index_copy_(0, b.slots, keys.gather(2, idx).unflatten(0, (-1, 2)))
        V.index_copy_(0, b.slots, values.gather(2, idx).unflatten(0, (-1, 2)))
        return keys, values, b.bias if bias else b.visible, None


class _Solve(GraphedRun):
    """One (rows, width) bucket: its buffers and its output."""

    def __init__(self, graphs: WindowGraphs, rows: int, width: int):
        self.graphs = graphs
        p = graphs.pool
        self.batch = WindowBatch(rows, width, graphs.chunk, graphs.left_chunks, p.pads, graphs.channels,
                                 graphs.device, graphs.dtype)
        self.spans = [WindowSpan(self.batch, p, s) for s in range(graphs.cfm.n_timesteps)]
        self.mel: torch.Tensor | None = None

    def run(self) -> None:
        b = self.batch
        b.refresh()
        self.mel = solve_euler_batch(self.graphs.estimator, self.graphs.cfm, b.z, b.mu, b.spks, b.cond, self.spans)


class WindowGraphs:
    """The estimator's Euler steps for windowed streams in the slots of `pool`, on fixed shapes; CUDA graphs on a
    CUDA device unless `capture=False`."""

    def __init__(self, estimator: FlowEstimator, cfm: CFMConfig, pool: WindowPool, chunk: int, left_chunks: int,
                 max_batch: int, capture: bool | None = None):
        if left_chunks < 1:
            raise ValueError(f"fixed-shape flow steps need a window of at least 1 chunk, got {left_chunks}")
        if pool.window != chunk * left_chunks:
            raise ValueError(f"the pool keeps {pool.window} keys, a window of {left_chunks} x {chunk} needs "
                             f"{chunk * left_chunks}")
        self.estimator, self.cfm, self.pool = estimator, cfm, pool
        self.chunk, self.left_chunks, self.max_batch = chunk, left_chunks, max_batch
        self.device, self.dtype, self.channels = pool.device, pool.dtype, estimator.final_proj.out_channels
        self.capture = self.device.type == "cuda" if capture is None else capture
        if self.capture and self.device.type != "cuda":
            raise ValueError("CUDA graphs need the estimator on a CUDA device")
        self.graph_pool = torch.cuda.graph_pool_handle() if self.capture else None
        self.solves: dict[tuple[int, int], _Solve] = {}

    @classmethod
    def for_flow(cls, flow: Flow, slots: int, left_chunks: int, max_batch: int, capture: bool | None = None
                 ) -> WindowGraphs:
        """A pool of `slots` streams for `flow`'s estimator, and on CUDA every bucket captured now (as the stage
        loads, so that no reply waits for a capture)."""
        est, cfg = flow.decoder.estimator, flow.cfg
        chunk = cfg.estimator.static_chunk_size
        pool = WindowPool(est, cfg.cfm.n_timesteps, slots, chunk * left_chunks)
        graphs = cls(est, cfg.cfm, pool, chunk, left_chunks, max_batch, capture)
        if graphs.capture:
            graphs.warm()
        return graphs

    def shape(self, n_rows: int, frames: int) -> tuple[int, int]:
        """The (rows, width) bucket of a call over n_rows streams whose longest has `frames` open frames; wider
        than MAX_FRAMES, the exact width (run eagerly, never captured)."""
        width = bucket(frames, MIN_FRAMES, MAX_FRAMES) if frames <= MAX_FRAMES else frames
        return bucket(n_rows, 1, self.max_batch), width

    def shapes(self) -> list[tuple[int, int]]:
        return [(r, w) for r in buckets(1, self.max_batch) for w in buckets(MIN_FRAMES, MAX_FRAMES)]

    @torch.inference_mode()
    def warm(self) -> int:
        """Prepare every bucket now: on CUDA capture its graph, elsewhere run it once. Returns how many there are.
        These runs hold only padding rows, which read and write the spare slot alone."""
        for shape in self.shapes():
            solve = self._prepare(shape)
            if not self.capture:
                self._load(solve, [], [], [], [])
                solve.run()
        return len(self.solves)

    def _prepare(self, shape: tuple[int, int]) -> _Solve:
        solve = self.solves.get(shape)
        if solve is None:
            solve = _Solve(self, *shape)
            if shape[1] > MAX_FRAMES:
                return solve  # a rare wide call: run once, kept nowhere
            self.solves[shape] = solve
            if self.capture:
                self._load(solve, [], [], [], [])
                solve.capture(self.graph_pool)
        return solve

    @torch.inference_mode()
    def solve(self, slots: list[int], starts: list[int], lengths: list[int], commits: list[int],
              z: list[torch.Tensor], mu: list[torch.Tensor], spks: torch.Tensor) -> list[torch.Tensor]:
        """Stream b (in slot slots[b]) runs the Euler steps over its open frames [starts[b], starts[b] +
        lengths[b]) from noise z[b] and mu[b] (80, lengths[b]) with speaker spks[b], and keeps its estimator state
        of the first commits[b] of them. Returns each stream's mel (80, lengths[b]) fp32 (copies). More than
        max_batch streams run max_batch at a time."""
        n = len(slots)
        if n > self.max_batch:
            m = self.max_batch
            return [mel for i in range(0, n, m) for mel in self.solve(
                slots[i:i + m], starts[i:i + m], lengths[i:i + m], commits[i:i + m], z[i:i + m], mu[i:i + m],
                spks[i:i + m])]
        if n == 0:
            raise ValueError("a step takes at least one stream")
        if len(set(slots)) < n or not all(0 <= s < self.pool.slots for s in slots):
            raise ValueError(f"slots must be distinct and in [0, {self.pool.slots}), got {slots}")
        for s, m, c in zip(starts, lengths, commits):
            if s % self.chunk or not 0 <= c <= m or m < 1 or (s + c) % self.chunk and c:
                raise ValueError(f"open span [{s}, {s + m}) committing {c}: spans start and commits end on chunk "
                                 f"boundaries ({self.chunk} frames)")
        solve = self._prepare(self.shape(n, max(lengths)))
        b = solve.batch
        for i, (zi, mi) in enumerate(zip(z, mu)):  # the padding keeps earlier (finite) values
            b.z[i, :, :zi.shape[1]].copy_(zi)
            b.mu[i, :, :mi.shape[1]].copy_(mi)
        b.spks[:n].copy_(spks)
        self._load(solve, slots, starts, lengths, commits)
        with torch.profiler.record_function(REPLAY):  # what a graph replays, as profilers count it
            solve.replay()
        return [solve.mel[i, :, :m].clone() for i, m in enumerate(lengths)]

    def _load(self, solve: _Solve, slots: list[int], starts: list[int], lengths: list[int], commits: list[int]
              ) -> None:
        """Overwrite the bucket's index in place, with one host-to-device copy; rows past len(slots) pad."""
        pad = solve.batch.rows - len(slots)
        cached = [min(s, self.pool.window) for s in starts]
        rows = [[*slots, *[self.pool.spare] * pad], [*starts, *[0] * pad], [*lengths, *[1] * pad],
                [*cached, *[0] * pad], [*commits, *[0] * pad]]
        packed = torch.tensor(rows, dtype=torch.long)
        if self.device.type == "cuda":
            packed = packed.pin_memory()
        solve.batch.index.copy_(packed.to(self.device, non_blocking=True))
