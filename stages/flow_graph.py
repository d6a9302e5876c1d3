"""A windowed flow stream's encoder pass and Euler steps on fixed shapes, replayed as CUDA graphs.

A live vocoder write runs the flow encoder once (10 conformer layers at two time resolutions) and the estimator 10
times (Euler steps), each through 56 attention layers and 31 causal convs of the CosyVoice2 dims, over a few dozen
open positions: ~100,000 small ops, whose launches cost more host time than the GPU spends running them
(bench/results/gpu-h200-20261204: a 0.5b live write, 540 ms of wall time for 82 ms of kernels), and for the encoder
a count that grows with the sessions in the batch (each stream's keys and masks are assembled on their own). A CUDA
graph launches them at once, but replays exactly the shapes and addresses it was captured with, while a
FlowStream's caches grow, shift and are cloned on every call. So for streams with a window of k left chunks (the
serving default), the state of both layer stacks moves into pools of fixed shape:

* per stateful layer (and for the estimator per Euler step), one tensor over (slots + 1, copies, ...), where copies
  are the rows a stream owns (the estimator's 2 CFG rows; 1 in the encoder): for an attention layer the keys and
  values of the last k chunks of committed positions (k * chunk, oldest first, the rest stale), for a causal conv
  its inputs left of the open span; the last slot belongs to no stream (padding's);
* a call's open positions are right-padded to a bucket of widths (powers of two between a smallest and a widest
  captured) and its streams to a bucket of rows (powers of two up to max_batch); padding rows read and write the
  spare slot;
* the chunk mask, the keys each layer keeps (the last k chunks of its cached and newly committed keys), each conv's
  new tail and, for the encoder's relative positions, each query-key distance are gathered inside the step from
  five numbers per stream (slot, start, length, cached keys, commit), overwritten in place by one host-to-device
  copy per call; the encoder's projected position rows are a table per layer, built once with the pool.

The mu and mel equal FlowStream's windowed encoder and estimator to float rounding (the same layers see the same
keys, in another order and on padded shapes). Without CUDA the same fixed-shape passes run eagerly: that is how
they are tested on a CPU. HiFT's chunks have fixed shapes of their own (stages/hift_graph.py).
"""
from __future__ import annotations

import torch
from torch import nn

from omni2.stages.decode_graph import GraphedRun, bucket, buckets, capturing, in_parts, load_index, logged_captures
from omni2.stages.flow import Flow, solve_euler_batch
from omni2.stages.flow_cache import additive
from omni2.stages.flow_encoder import PreLookahead, RelPosAttention, Upsample1D
from omni2.stages.flow_estimator import Attention, CausalConv1d

MIN_FRAMES = 32  # narrowest estimator width: a live write of 10 units opens at least 14 frames
MAX_FRAMES = 256  # widest captured: a live write opens at most a chunk + 2 * (W + 3) frames; wider calls run eagerly
MIN_TOKENS = 16  # the encoder's widths, in tokens: a live write opens at least W + 3
MAX_TOKENS = 128  # at most an encoder chunk + W + 2
REPLAY = "flow_graph.replay"  # the profiler label of a replay (bench/profile_step.py counts its ops)


def _state(layer: nn.Module) -> tuple[str, int, int]:
    """What a stateful layer keeps per stream: ("kv", heads, head_dim) or ("tail", channels, inputs)."""
    if isinstance(layer, Attention):
        return "kv", layer.heads, layer.head_dim
    if isinstance(layer, RelPosAttention):
        return "kv", layer.h, layer.d_k
    if isinstance(layer, CausalConv1d):
        return "tail", layer.in_channels, layer.kernel_size[0] - 1
    if isinstance(layer, PreLookahead):
        return "tail", layer.conv2.in_channels, layer.conv2.kernel_size[0] - 1
    if isinstance(layer, Upsample1D):
        return "tail", layer.conv.in_channels, 2 * layer.stride
    raise TypeError(f"no fixed-shape state for a {type(layer).__name__}")


class WindowPool:
    """Every windowed stream's state in one layer stack, one slot per stream, at fixed addresses (see the module
    docstring); slot `slots` is the padding's.

    stacks: (module, window, distances) for each part of the stack: every stateful layer under `module` (numbered
    by flow_cache.assign_slots), whose attention keeps `window` keys; a relative-position attention's projected
    rows cover `distances` (lo, hi)."""

    def __init__(self, stacks: list[tuple[nn.Module, int, tuple[int, int] | None]], steps: int, copies: int,
                 slots: int, device, dtype):
        self.slots, self.spare, self.steps, self.copies = slots, slots, steps, copies
        self.device, self.dtype = device, dtype
        # By the layer's slot: K, V (steps, slots + 1, copies, H, window, D) of an attention layer; the tail
        # (steps, slots + 1, copies, C, inputs) of a causal conv; (lo, rows (hi - lo, d)) of a rel-pos attention.
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tails: dict[int, torch.Tensor] = {}
        self.rel: dict[int, tuple[int, torch.Tensor]] = {}
        for module, window, distances in stacks:
            for layer in module.modules():
                if not hasattr(layer, "new_cache"):
                    continue
                kind, a, b = _state(layer)
                if kind == "kv":
                    shape = (steps, slots + 1, copies, a, window, b)
                    self.kv[layer.slot] = (torch.zeros(shape, device=device, dtype=dtype),
                                           torch.zeros(shape, device=device, dtype=dtype))
                else:
                    self.tails[layer.slot] = torch.zeros((steps, slots + 1, copies, a, b), device=device, dtype=dtype)
                if isinstance(layer, RelPosAttention):
                    self.rel[layer.slot] = (distances[0], layer.project_rows(*distances))
        self.pads = sorted({t.shape[-1] for t in self.tails.values()})

    def reset(self, slot: int) -> None:
        """A new stream in `slot`: its convs start from the official zero padding (its keys count as none cached)."""
        for tail in self.tails.values():
            tail[:, slot].zero_()

    def slot_bytes(self, tails: bool = True) -> int:
        """Bytes one stream's slot holds: keys and values, and with `tails` the conv tails."""
        per = lambda t: t[:, 0].numel() * t.element_size()  # noqa: E731
        return sum(2 * per(k) for k, _ in self.kv.values()) + (sum(per(t) for t in self.tails.values()) if tails else 0)

    def rel_rows(self, layer: RelPosAttention, lo: int, hi: int) -> torch.Tensor:
        """The projected rows of distances [lo, hi): a view of the layer's table, or (for a call wider than any
        bucket) rows computed for that call alone, so that the table a graph reads never moves."""
        first, rows = self.rel[layer.slot]
        if first <= lo and hi <= first + rows.shape[0]:
            return rows[lo - first:hi - first]
        return layer.project_rows(lo, hi)


class WindowBatch:
    """One bucket's index (`index`: slot, start, length, cached keys, commit per row, overwritten by each call) and
    what `refresh()` derives from it inside the step: the slots, the boolean and additive chunk masks, which
    columns are real, the gather indices of kept keys and tails and, with `rel`, each query-key distance."""

    def __init__(self, rows: int, width: int, chunk: int, left_chunks: int, pads: list[int], copies: int,
                 device, dtype, rel: bool = False):
        self.rows, self.width, self.chunk, self.left_chunks = rows, width, chunk, left_chunks
        self.window, self.pads, self.copies, self.dtype, self.rel = chunk * left_chunks, pads, copies, dtype, rel
        self.index = torch.zeros(5, rows, dtype=torch.long, device=device)  # slot, start, length, cached, commit
        self.index[2] = 1
        self._cols = torch.arange(width, device=device)
        self._keys = torch.arange(self.window, device=device)
        # Distances that can be visible lie in [1 - chunk, window + width): a key is never past its query's chunk.
        self.lo, self.hi = 1 - chunk, self.window + width
        self.slots = self.visible = self.bias = self.valid = self.kv_index = self.distance = None
        self.tail_index: dict[int, torch.Tensor] = {}

    def refresh(self) -> None:
        slot, start, length, cached, commit = self.index.unbind(0)  # (B,) each
        K, c, cols, keys, n = self.window, self.chunk, self._cols, self._keys, self.copies
        self.slots = slot
        # Queries at positions start + t; keys: the cached ones at start - cached + m, then the open ones.
        q = start[:, None] + cols  # (B, T)
        q_chunk = torch.div(q, c, rounding_mode="floor")
        hi = torch.minimum((q_chunk + 1) * c, (start + length)[:, None])
        lo = (q_chunk - self.left_chunks) * c
        k_pos = torch.cat([(start - cached)[:, None] + keys, q], dim=1)  # (B, K + T)
        valid = cols < length[:, None]
        real = torch.cat([keys < cached[:, None], valid], dim=1)
        visible = real[:, None, :] & (k_pos[:, None, :] < hi[:, :, None]) & (k_pos[:, None, :] >= lo[:, :, None])
        visible[:, :, K] |= ~valid  # a padding query reads one key: no fully masked row
        self.visible = visible.repeat_interleave(n, dim=0)[:, None]  # (nB, 1, T, K + T): every copy
        self.bias = additive(self.visible, self.dtype)
        self.valid = valid  # (B, T)
        if self.rel:
            self.distance = (q[:, :, None] - k_pos[:, None, :]).clamp(self.lo, self.hi - 1) - self.lo  # (B, T, K + T)
        # Kept keys: the last min(cached + commit, K) of [cached..., the commit's open ones...]; the rest is stale.
        kept = torch.clamp(cached + commit, max=K)
        i = (cached + commit - kept)[:, None] + keys  # (B, K): index into that sequence
        src = torch.where(i < cached[:, None], i, K + i - cached[:, None]).clamp(max=K + self.width - 1)
        self.kv_index = src.repeat_interleave(n, dim=0)[:, None, :, None]  # (nB, 1, K, 1)
        # A conv keeps the `pad` inputs left of start + commit: columns [commit, commit + pad) of its padded input.
        self.tail_index = {p: (commit[:, None] + torch.arange(p, device=commit.device)).repeat_interleave(
            n, dim=0)[:, None, :] for p in self.pads}


class WindowSpan:
    """What one pass's layers (one Euler step's, or the encoder's at one resolution) read and keep, in place of a
    Span: flow_cache.causal_pad / visible_keys and RelPosAttention.rel_scores hand it their work."""

    ragged = True  # padded columns: the pre-lookahead conv zeroes them, as each stream's own end

    def __init__(self, batch: WindowBatch, pool: WindowPool, step: int = 0):
        self.batch, self.pool, self.step = batch, pool, step

    def valid(self, device) -> torch.Tensor:
        """(streams, width) bool, as SpanBatch.valid: made in the step, on the pool's device."""
        return self.batch.valid

    def causal_pad(self, x: torch.Tensor, pad: int, layer) -> torch.Tensor:
        tail = self.pool.tails[layer.slot][self.step]  # (slots + 1, copies, C, pad)
        b = self.batch
        x = torch.cat([tail.index_select(0, b.slots).flatten(0, 1), x], dim=-1)
        keep = x.gather(2, b.tail_index[pad].expand(-1, x.shape[1], -1))
        tail.index_copy_(0, b.slots, keep.unflatten(0, (-1, b.copies)))
        return x

    def visible_keys(self, k: torch.Tensor, v: torch.Tensor, layer, bias: bool):
        K, V = (t[self.step] for t in self.pool.kv[layer.slot])  # (slots + 1, copies, H, window, D)
        b = self.batch
        keys = torch.cat([K.index_select(0, b.slots).flatten(0, 1), k], dim=2)  # (nB, H, window + T, D)
        values = torch.cat([V.index_select(0, b.slots).flatten(0, 1), v], dim=2)
        idx = b.kv_index.expand(-1, k.shape[1], -1, k.shape[3])
        K.index_copy_(0, b.slots, keys.gather(2, idx).unflatten(0, (-1, b.copies)))
        V.index_copy_(0, b.slots, values.gather(2, idx).unflatten(0, (-1, b.copies)))
        return keys, values, b.bias if bias else b.visible, None

    def rel_positions(self, layer: RelPosAttention) -> tuple[torch.Tensor, torch.Tensor]:
        """The projected rows of distances [lo, hi) and each (stream, query, key)'s row among them."""
        b = self.batch
        return self.pool.rel_rows(layer, b.lo, b.hi), b.distance


class _Solve(GraphedRun):
    """One (rows, width) bucket of the Euler steps: its inputs (`z`, `mu`, `spks`, overwritten by a call), its
    index and its output."""

    def __init__(self, graphs: WindowGraphs, rows: int, width: int):
        self.graphs = graphs
        p, channels = graphs.pool, graphs.channels
        self.batch = WindowBatch(rows, width, graphs.chunk, graphs.left_chunks, p.pads, 2, p.device, p.dtype)
        self.z = torch.zeros(rows, channels, width, device=p.device, dtype=p.dtype)
        self.mu = torch.zeros(rows, channels, width, device=p.device, dtype=p.dtype)
        self.cond = torch.zeros(rows, channels, width, device=p.device, dtype=p.dtype)
        self.spks = torch.zeros(rows, channels, device=p.device, dtype=p.dtype)
        self.spans = [WindowSpan(self.batch, p, s) for s in range(p.steps)]
        self.mel: torch.Tensor | None = None

    def run(self) -> None:
        self.batch.refresh()
        self.mel = solve_euler_batch(self.graphs.estimator, self.graphs.cfm, self.z, self.mu, self.spks, self.cond,
                                     self.spans)


class _Encode(GraphedRun):
    """One (rows, width in tokens) bucket of the encoder pass: its tokens (overwritten by a call), the index of
    its token positions (the frames' is the same times the token-to-frame ratio) and its output mu."""

    def __init__(self, graphs: WindowGraphs, rows: int, width: int):
        self.graphs = graphs
        p, cfg, k = graphs.enc_pool, graphs.flow.cfg, graphs.left_chunks
        r, chunk = cfg.token_mel_ratio, cfg.encoder.static_chunk_size
        self.tokens = torch.zeros(rows, width, dtype=torch.long, device=p.device)
        self.batch = WindowBatch(rows, width, chunk, k, p.pads, 1, p.device, p.dtype, rel=True)
        self.by_frame = WindowBatch(rows, r * width, r * chunk, k, p.pads, 1, p.device, p.dtype, rel=True)
        self.scale = torch.tensor([1, r, r, r, r], device=p.device)[:, None]  # slot stays, positions scale
        self.spans = WindowSpan(self.batch, p), WindowSpan(self.by_frame, p)
        self.mu: torch.Tensor | None = None

    def run(self) -> None:
        self.batch.refresh()
        torch.mul(self.batch.index, self.scale, out=self.by_frame.index)
        self.by_frame.refresh()
        self.mu = self.graphs.flow.encode_batch(self.tokens, *self.spans)


class WindowGraphs:
    """A windowed flow's encoder pass and Euler steps for streams in `slots` slots, on fixed shapes; CUDA graphs
    on a CUDA device unless `capture=False` (then `warm()` runs each bucket once, as a check)."""

    def __init__(self, flow: Flow, slots: int, left_chunks: int, max_batch: int, capture: bool | None = None):
        if left_chunks < 1:
            raise ValueError(f"fixed-shape flow steps need a window of at least 1 chunk, got {left_chunks}")
        cfg = flow.cfg
        self.flow, self.estimator, self.cfm = flow, flow.decoder.estimator, cfg.cfm
        self.chunk, self.left_chunks, self.max_batch = cfg.estimator.static_chunk_size, left_chunks, max_batch
        w = self.estimator.final_proj.weight
        device, dtype, self.channels = w.device, w.dtype, w.shape[0]
        self.capture, self.graph_pool = capturing(device, capture, "the flow")
        self.pool = WindowPool([(self.estimator, self.chunk * left_chunks, None)], cfg.cfm.n_timesteps, 2, slots,
                               device, dtype)
        enc, r, ce = flow.encoder, cfg.token_mel_ratio, cfg.encoder.static_chunk_size
        kt, kf = ce * left_chunks, r * ce * left_chunks
        self.enc_pool = WindowPool([(enc.pre_lookahead_layer, 0, None),
                                    (enc.encoders, kt, (1 - ce, kt + MAX_TOKENS)),
                                    (enc.up_layer, 0, None),
                                    (enc.up_encoders, kf, (1 - r * ce, kf + r * MAX_TOKENS))], 1, 1, slots,
                                   device, dtype)
        self.solves: dict[tuple[int, int], _Solve] = {}
        self.encodes: dict[tuple[int, int], _Encode] = {}

    @classmethod
    def for_flow(cls, flow: Flow, slots: int, left_chunks: int, max_batch: int, capture: bool | None = None
                 ) -> WindowGraphs:
        """The pools of `slots` streams for `flow` and, on CUDA, every bucket captured now (as the stage loads, so
        that no reply waits for a capture)."""
        graphs = cls(flow, slots, left_chunks, max_batch, capture)
        if graphs.capture:
            graphs.warm()
        return graphs

    @property
    def slots(self) -> int:
        return self.pool.slots

    def reset(self, slot: int) -> None:
        """A new stream in `slot` (see WindowPool.reset)."""
        self.pool.reset(slot)
        self.enc_pool.reset(slot)

    def slot_bytes(self, tails: bool = True) -> int:
        return self.pool.slot_bytes(tails) + self.enc_pool.slot_bytes(tails)

    def shape(self, n_rows: int, width: int, smallest: int = MIN_FRAMES, widest: int = MAX_FRAMES
              ) -> tuple[int, int]:
        """The (rows, width) bucket of a call over n_rows streams whose longest has `width` open positions; wider
        than `widest`, the exact width (run eagerly, never captured)."""
        return bucket(n_rows, 1, self.max_batch), bucket(width, smallest, widest) if width <= widest else width

    def shapes(self) -> list[tuple[int, int]]:
        """Every (rows, frames) bucket of the Euler steps; the encoder's are the same rows by tokens."""
        return [(r, w) for r in buckets(1, self.max_batch) for w in buckets(MIN_FRAMES, MAX_FRAMES)]

    def encoder_shapes(self) -> list[tuple[int, int]]:
        return [(r, w) for r in buckets(1, self.max_batch) for w in buckets(MIN_TOKENS, MAX_TOKENS)]

    @torch.inference_mode()
    def warm(self) -> int:
        """Prepare every bucket now: on CUDA capture its graph, elsewhere run it once. Returns how many there are.
        These runs hold only padding rows, which read and write the spare slot alone."""
        for table, shapes, make, what in ((self.solves, self.shapes(), _Solve, "flow Euler steps"),
                                          (self.encodes, self.encoder_shapes(), _Encode, "flow encoder")):
            with logged_captures(what, table, self.capture):
                for shape in shapes:
                    run = self._prepare(table, shape, make)
                    if not self.capture:
                        self._load(run.batch, [], [], [], [])
                        run.run()
        return len(self.solves) + len(self.encodes)

    def _prepare(self, table: dict, shape: tuple[int, int], make, keep: bool = True):
        run = table.get(shape)
        if run is None:
            run = make(self, *shape)
            if not keep:
                return run  # a rare wide call: run once, kept nowhere
            table[shape] = run
            if self.capture:
                self._load(run.batch, [], [], [], [])
                run.capture(self.graph_pool)
        return run

    def _check(self, slots: list[int], starts: list[int], lengths: list[int], commits: list[int], chunk: int
               ) -> None:
        if not slots:
            raise ValueError("a step takes at least one stream")
        if len(set(slots)) < len(slots) or not all(0 <= s < self.pool.slots for s in slots):
            raise ValueError(f"slots must be distinct and in [0, {self.pool.slots}), got {slots}")
        for s, m, c in zip(starts, lengths, commits):
            if s % chunk or not 0 <= c <= m or m < 1 or (s + c) % chunk and c:
                raise ValueError(f"open span [{s}, {s + m}) committing {c}: spans start and commits end on chunk "
                                 f"boundaries ({chunk} positions)")

    @torch.inference_mode()
    def encode(self, slots: list[int], starts: list[int], commits: list[int], tokens: list[torch.Tensor]
               ) -> list[torch.Tensor]:
        """Stream b (in slot slots[b]) encodes its open tokens[b] at token positions [starts[b], ...) and keeps
        the encoder state of the first commits[b] of them. Returns each stream's mu (80, ratio * len(tokens[b]))
        (copies). More than max_batch streams run max_batch at a time."""
        if len(slots) > self.max_batch:
            return [mu for part in in_parts(self.encode, self.max_batch, slots, starts, commits, tokens) for mu in part]
        lengths = [len(t) for t in tokens]
        self._check(slots, starts, lengths, commits, self.flow.cfg.encoder.static_chunk_size)
        shape = self.shape(len(slots), max(lengths), MIN_TOKENS, MAX_TOKENS)
        run = self._prepare(self.encodes, shape, _Encode, shape[1] <= MAX_TOKENS)
        for i, t in enumerate(tokens):  # the padding keeps earlier tokens: its columns are masked
            run.tokens[i, :len(t)].copy_(t)
        self._load(run.batch, slots, starts, lengths, commits)
        with torch.profiler.record_function(REPLAY):
            run.replay()
        r = self.flow.cfg.token_mel_ratio
        return [run.mu[i, :, :r * n].clone() for i, n in enumerate(lengths)]

    @torch.inference_mode()
    def solve(self, slots: list[int], starts: list[int], lengths: list[int], commits: list[int],
              z: list[torch.Tensor], mu: list[torch.Tensor], spks: torch.Tensor) -> list[torch.Tensor]:
        """Stream b (in slot slots[b]) runs the Euler steps over its open frames [starts[b], starts[b] +
        lengths[b]) from noise z[b] and mu[b] (80, lengths[b]) with speaker spks[b], and keeps its estimator state
        of the first commits[b] of them. Returns each stream's mel (80, lengths[b]) fp32 (copies). More than
        max_batch streams run max_batch at a time."""
        if len(slots) > self.max_batch:
            parts = in_parts(self.solve, self.max_batch, slots, starts, lengths, commits, z, mu, spks)
            return [mel for part in parts for mel in part]
        self._check(slots, starts, lengths, commits, self.chunk)
        shape = self.shape(len(slots), max(lengths))
        run = self._prepare(self.solves, shape, _Solve, shape[1] <= MAX_FRAMES)
        for i, (zi, mi) in enumerate(zip(z, mu)):  # the padding keeps earlier (finite) values
            run.z[i, :, :zi.shape[1]].copy_(zi)
            run.mu[i, :, :mi.shape[1]].copy_(mi)
        run.spks[:len(slots)].copy_(spks)
        self._load(run.batch, slots, starts, lengths, commits)
        with torch.profiler.record_function(REPLAY):  # what a graph replays, as profilers count it
            run.replay()
        return [run.mel[i, :, :n].clone() for i, n in enumerate(lengths)]

    def _load(self, batch: WindowBatch, slots: list[int], starts: list[int], lengths: list[int], commits: list[int]
              ) -> None:
        """Overwrite a bucket's index; rows past len(slots) pad (the spare slot, one open position at 0)."""
        cached = [min(s, batch.window) for s in starts]
        load_index(batch.index, [(slots, self.pool.spare), (starts, 0), (lengths, 1), (cached, 0), (commits, 0)])
