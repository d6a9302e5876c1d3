"""CosyVoice2 flow (`CausalMaskedDiffWithXvec` as LLaMA-Omni2 runs it): speech tokens -> 80-bin mel at 50 Hz.

tokens (T,) -> embedding -> FlowEncoder -> encoder_proj: mu (80, 2T); x-vector -> normalise -> affine: spks (80,);
then conditional flow matching: 10 Euler steps from fixed noise, each running the estimator on a CFG batch of 2.

Two ways to run it, equal to fp32 rounding:
* `Flow.inference`: the official algorithm, recomputed from token 0 on every call (what token2wav does).
* `Flow.new_stream` -> `FlowStream`: incremental. Each call recomputes only the open chunks and keeps, for the
  completed ones, the K/V and conv tails of every layer (for the estimator: of every Euler step and both CFG rows),
  so its cost does not grow with the utterance (attention over the kept left context aside). docs/ARCHITECTURE.md argues
  why the frames it emits are exactly the recompute's.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from omni2.engine.config import CFMConfig, FlowConfig
from omni2.stages.flow_cache import Span, SpanBatch, StreamKVCache, batch_of
from omni2.stages.flow_encoder import FlowEncoder
from omni2.stages.flow_estimator import FlowEstimator


def make_noise(cfg: FlowConfig) -> torch.Tensor:
    """The CFM's fixed noise (1, 80, noise_frames), drawn on CPU like CosyVoice's `torch.randn` after seeding 0.
    Frame j always gets column j, which is what makes recomputing from the start reproduce earlier frames."""
    g = torch.Generator().manual_seed(cfg.cfm.noise_seed)
    return torch.randn([1, cfg.output_size, cfg.cfm.noise_frames], generator=g)


def kv_bytes_per_second(cfg: FlowConfig, bytes_per_value: int = 4) -> float:
    """K/V bytes an exact stream (left_chunks=None) keeps per second of audio: encoder layers per token and
    up-encoder layers per frame, and every estimator attention layer per frame x Euler steps x 2 CFG rows."""
    frames_per_s = cfg.input_frame_rate * cfg.token_mel_ratio
    e, est = cfg.encoder, cfg.estimator
    enc = 2 * e.output_size * (e.num_blocks * cfg.input_frame_rate + e.num_up_blocks * frames_per_s)
    layers = est.n_blocks * (2 + est.num_mid_blocks)
    dec = 2 * est.num_heads * est.attention_head_dim * layers * cfg.cfm.n_timesteps * 2 * frames_per_s
    return float((enc + dec) * bytes_per_value)


def state_bytes_bound(cfg: FlowConfig, units: int, left_chunks: int | None, recompute: bool,
                      bytes_per_value: int = 4, call_units: int | None = None) -> int:
    """The most flow state one session can hold over a reply of `units` units, whose calls each add at most
    `call_units` (None: any number up to `units`). The exact stream's K/V grow with the reply (kv_bytes_per_second)
    and x1.5, as its buffers grow by half when full (StreamKVCache); a window of k left chunks holds k chunks plus
    one call's open positions -- the rest of the open chunk, the call's units and the lookahead -- and no slack
    past that; a recompute keeps nothing between calls."""
    if recompute:
        return 0
    rate = cfg.input_frame_rate
    chunk_s = max(cfg.encoder.static_chunk_size / rate, cfg.estimator.static_chunk_size / (rate * cfg.token_mel_ratio))
    seconds = units / rate
    per_s = kv_bytes_per_second(cfg, bytes_per_value)
    if left_chunks is not None:
        call = units if call_units is None else min(call_units, units)
        window_s = (left_chunks + 1) * chunk_s + (call + cfg.pre_lookahead_len) / rate
        return int(per_s * min(1.5 * seconds, window_s))
    return int(1.5 * per_s * seconds)


class CFM(nn.Module):
    """`flow.decoder`: CausalConditionalCFM. Only the estimator has weights; the noise is passed in."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.estimator = FlowEstimator(cfg.estimator)


def solve_euler(estimator: FlowEstimator, cfm: CFMConfig, z: torch.Tensor, mu: torch.Tensor, spks: torch.Tensor,
                cond: torch.Tensor, spans: list[Span]) -> torch.Tensor:
    """CausalConditionalCFM.solve_euler for one utterance: z, mu, cond (80, T), spks (80,) -> mel (80, T) fp32.

    spans[s] says where the T frames sit and holds step s's caches (None for a one-shot recompute)."""
    return solve_euler_batch(estimator, cfm, z[None], mu[None], spks[None], cond[None], spans)[0]


def solve_euler_batch(estimator: FlowEstimator, cfm: CFMConfig, z: torch.Tensor, mu: torch.Tensor,
                      spks: torch.Tensor, cond: torch.Tensor, spans: list[Span | SpanBatch]) -> torch.Tensor:
    """solve_euler for B streams at once: z, mu, cond (B, 80, T), spks (B, 80) -> mel (B, 80, T) fp32; spans[s]
    holds the B streams' spans (and caches) of Euler step s. Every stream takes the same time steps."""
    n, B = cfm.n_timesteps, z.shape[0]
    t_span = torch.linspace(0, 1, n + 1, device=mu.device, dtype=mu.dtype)
    if cfm.t_scheduler == "cosine":
        t_span = 1 - torch.cos(t_span * 0.5 * torch.pi)
    # CFG batch: each stream's rows 2b (conditioned) and 2b + 1 (mu, spks and cond zeroed; same x, same t).
    cfg_rows = lambda a, b: torch.stack([a, b], dim=1).flatten(0, 1)  # noqa: E731
    mu2, spks2, cond2 = (cfg_rows(a, torch.zeros_like(a)) for a in (mu, spks, cond))
    # NOTE: t advances by accumulating dt and each dt is t_span[s+1] - t, as upstream does (not t_span[s]).
    x, t, dt = z, t_span[0], t_span[1] - t_span[0]
    for step in range(1, n + 1):
        v = estimator(cfg_rows(x, x), mu2, t.expand(2 * B), spks2, cond2, spans[step - 1]).unflatten(0, (B, 2))
        v = (1.0 + cfm.inference_cfg_rate) * v[:, 0] - cfm.inference_cfg_rate * v[:, 1]
        x = x + dt * v
        t = t + dt
        if step < n:
            dt = t_span[step + 1] - t
    return x.float()


class Flow(nn.Module):
    """Weights and state_dict keys of the official `flow.pt`."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = FlowEncoder(cfg)
        self.encoder_proj = nn.Linear(cfg.encoder.output_size, cfg.output_size)
        self.decoder = CFM(cfg)

    @property
    def lookahead_frames(self) -> int:
        return self.cfg.pre_lookahead_len * self.cfg.token_mel_ratio  # 6: withheld until finalize

    def speaker(self, spk_embedding: torch.Tensor) -> torch.Tensor:
        """x-vector (192,) -> spks (80,)."""
        return self.spk_embed_affine_layer(F.normalize(spk_embedding[None], dim=1))[0]

    def encode(self, tokens: torch.Tensor, tok: Span, frm: Span) -> torch.Tensor:
        """tokens (T,) at positions tok.start.. -> mu (80, ratio*T)."""
        return self.encode_batch(tokens[None], tok, frm)[0]

    def encode_batch(self, tokens: torch.Tensor, tok: Span | SpanBatch, frm: Span | SpanBatch) -> torch.Tensor:
        """tokens (B, T), each row at its stream's positions (right-padded) -> mu (B, 80, ratio*T)."""
        x = self.input_embedding(torch.clamp(tokens, min=0))  # (B, T, 512)
        return self.encoder_proj(self.encoder(x, tok, frm)).transpose(1, 2)

    def _spans(self, start_tok: int, n_tok: int, commit_tok: int, left_chunks: int | None,
               caches: list | None) -> tuple[Span, Span]:
        r, c = self.cfg.token_mel_ratio, self.cfg.encoder.static_chunk_size
        return (Span(start_tok, n_tok, c, commit_tok, left_chunks, caches),
                Span(r * start_tok, r * n_tok, r * c, r * commit_tok, left_chunks, caches))

    @torch.inference_mode()
    def inference(self, tokens: torch.Tensor, spk_embedding: torch.Tensor, noise: torch.Tensor, finalize: bool,
                  left_chunks: int | None = None) -> torch.Tensor:
        """The official CausalMaskedDiffWithXvec.inference with LLaMA-Omni2's empty prompt: tokens (T,) -> mel
        (80, L), L = 2T if finalize else 2T - 6. `left_chunks` limits every attention to that many chunks to the
        left (not official; the reference for windowed streams)."""
        device = self.input_embedding.weight.device
        tokens = tokens.to(device)
        n, r = tokens.shape[0], self.cfg.token_mel_ratio
        L = r * n if finalize else max(r * n - self.lookahead_frames, 0)
        if L == 0:  # the official code would fail on an empty mel; there is simply nothing to emit yet
            return torch.zeros(self.cfg.output_size, 0, device=device)
        mu = self.encode(tokens, *self._spans(0, n, 0, left_chunks, None))[:, :L]
        z = noise[0, :, :L].to(device) * self.cfg.cfm.temperature
        if z.shape[1] < L:
            raise ValueError(f"{L} mel frames exceed the {noise.shape[2]} noise frames")
        span = Span(0, L, self.cfg.estimator.static_chunk_size, left_chunks=left_chunks)
        return solve_euler(self.decoder.estimator, self.cfg.cfm, z, mu, self.speaker(spk_embedding.to(device)),
                           torch.zeros_like(mu), [span] * self.cfg.cfm.n_timesteps)

    def new_stream(self, spk_embedding: torch.Tensor, noise: torch.Tensor, left_chunks: int | None = None,
                   graphs=None, slot: int | None = None) -> FlowStream:
        """`graphs` (a flow_graph.WindowGraphs over this flow) and `slot`: the stream keeps its encoder and estimator
        state in that slot of the graphs' pools and runs its encoder pass and Euler steps on their fixed shapes."""
        return FlowStream(self, spk_embedding, noise, left_chunks, graphs, slot)

    @torch.inference_mode()
    def stream_step(self, streams: list[FlowStream], finalize: list[bool]) -> list[torch.Tensor]:
        """Advance several sessions at once: each returns its new mel frames (80, k), the frames it would give
        alone. The encoder runs once over every stream's open tokens, then the 10 Euler steps once over every
        stream's open frames (x 2 CFG rows), right-padded to the longest (SpanBatch)."""
        plans = [s._plan(f) for s, f in zip(streams, finalize, strict=True)]
        work = [(s, p) for s, p in zip(streams, plans) if p is not None]
        if work:
            cfg, device = self.cfg, self.input_embedding.weight.device
            graphs = {id(s.graphs): s.graphs for s, _ in work}
            if len(graphs) > 1:
                raise ValueError("one step cannot mix streams with and without fixed-shape flow steps")
            (graphs,) = graphs.values()
            # 1. Encoder over the open tokens [enc_done, n) of each stream.
            if graphs is not None:
                mu_new = graphs.encode([s.slot for s, _ in work], [s.enc_done for s, _ in work],
                                       [p.done - s.enc_done for s, p in work], [s.tokens for s, _ in work])
            else:
                width = max(len(s.tokens) for s, _ in work)
                tokens = torch.stack([F.pad(s.tokens, (0, width - len(s.tokens))) for s, _ in work])
                mu_new = self.encode_batch(tokens, batch_of([p.tok for _, p in work]),
                                           batch_of([p.frm for _, p in work]))
            # 2. Estimator over the open frames [est_done, L) of each stream.
            mus, zs = [], []
            for b, (s, p) in enumerate(work):
                mu = torch.cat([s.mu_pending, mu_new[b][:, :cfg.token_mel_ratio * len(s.tokens)]], dim=1)
                p.mu = mu  # frames [est_done, r*n)
                mus.append(mu[:, :p.frames])
                zs.append(s.noise[0, :, p.start:p.start + p.frames].to(device) * cfg.cfm.temperature)
            spks = torch.stack([s.spks for s, _ in work])
            if graphs is not None:
                mels = graphs.solve([s.slot for s, _ in work], [p.start for _, p in work],
                                    [p.frames for _, p in work], [p.est_new - p.start for _, p in work], zs, mus, spks)
                for mel, (_, p) in zip(mels, work):
                    p.mel = mel
            else:
                width = max(p.frames for _, p in work)
                pad = lambda xs: torch.stack([F.pad(x, (0, width - x.shape[1])) for x in xs])  # noqa: E731
                mu = pad(mus)
                spans = [batch_of([p.est[step] for _, p in work]) for step in range(cfg.cfm.n_timesteps)]
                mel = solve_euler_batch(self.decoder.estimator, cfg.cfm, pad(zs), mu, spks, torch.zeros_like(mu),
                                        spans)
                for b, (_, p) in enumerate(work):
                    p.mel = mel[b, :, :p.frames]
        # 3. Move each stream's commit points.
        return [s._commit(p) for s, p in zip(streams, plans)]


@dataclass(eq=False)
class _Plan:
    """One stream's share of a stream_step: its spans, then (filled by the step) its mu and mel."""

    finalize: bool
    L: int  # mel frames emitted after this call
    done: int  # tokens committed after this call
    est_new: int  # frames committed after this call
    start: int  # the estimator's open frames [start, L)
    # The encoder's token and frame spans and the estimator's per Euler step; None for a stream whose state is in
    # the pools of flow_graph (its step needs only the numbers above).
    tok: Span | None
    frm: Span | None
    est: list[Span] | None
    mu: torch.Tensor | None = None
    mel: torch.Tensor | None = None

    @property
    def frames(self) -> int:
        return self.L - self.start


class FlowStream:
    """One session's incremental flow. `push` tokens as they come; `mel(finalize)` returns the frames the official
    token2wav schedule emits at that point: from the end of the previous output to 2n - 6 (n tokens so far), or to
    2n when finalizing, equal to `Flow.inference(tokens[:n], finalize)[:, previous_end:]`.

    Positions: tokens [0, enc_done) and frames [0, est_done) are committed (their layer state is cached); frames
    [est_done, 2*enc_done) have final mu not yet committed by the estimator (their chunk is not complete);
    everything after is recomputed by the next call.
    """

    def __init__(self, flow: Flow, spk_embedding: torch.Tensor, noise: torch.Tensor, left_chunks: int | None = None,
                 graphs=None, slot: int | None = None):
        cfg = flow.cfg
        device = flow.input_embedding.weight.device
        if graphs is not None:
            if graphs.flow is not flow or left_chunks != graphs.left_chunks:
                raise ValueError(f"fixed-shape steps of a {graphs.left_chunks}-chunk window over this flow "
                                 f"cannot run a stream of window {left_chunks}")
            if slot is None or not 0 <= slot < graphs.slots:
                raise ValueError(f"a stream on fixed-shape steps needs a slot in [0, {graphs.slots}), got {slot}")
            graphs.reset(slot)
        self.flow, self.noise, self.left_chunks = flow, noise, left_chunks
        self.graphs, self.slot = graphs, slot
        with torch.inference_mode():
            self.spks = flow.speaker(spk_embedding.to(device))  # (80,)
        self.tokens = torch.zeros(0, dtype=torch.long, device=device)  # tokens [enc_done, n)
        # mu of frames [est_done, 2*enc_done), in the weights' dtype (an fp32 empty one would promote a bf16 mu)
        self.mu_pending = torch.zeros(cfg.output_size, 0, device=device, dtype=flow.input_embedding.weight.dtype)
        self.n = self.enc_done = self.est_done = self.emitted = 0
        self.finished = False
        # Layer caches (the estimator's one list per Euler step); a stream on fixed-shape steps keeps this state in its
        # slot of the graphs' pools instead.
        self.enc_caches = [] if graphs is not None else flow.encoder.new_caches()
        self.est_caches = [] if graphs is not None else [flow.decoder.estimator.new_caches()
                                                         for _ in range(cfg.cfm.n_timesteps)]
        self.frames_estimated = 0  # estimator frames the last call ran (per Euler step and CFG row)
        self.tokens_encoded = 0  # encoder tokens the last call ran

    def push(self, new_tokens: torch.Tensor) -> None:
        if self.finished:
            raise RuntimeError("push after finalize")
        self.tokens = torch.cat([self.tokens, new_tokens.to(self.tokens.device, torch.long).reshape(-1)])
        self.n += new_tokens.numel()

    def mel(self, finalize: bool = False) -> torch.Tensor:
        return self.flow.stream_step([self], [finalize])[0]

    def _caches(self) -> list:
        return self.enc_caches + [c for step in self.est_caches for c in step]

    def _slot_bytes(self, kv: bool) -> int:
        """What the stream's slot of the graphs' pools holds while it runs (K/V only, or with the conv tails)."""
        if self.graphs is None or self.finished:
            return 0
        return self.graphs.slot_bytes(tails=not kv)

    def cache_bytes(self) -> int:
        """Bytes allocated for this session's left context: K/V buffers (capacity), conv tails, pending mu."""
        return (sum(c.nbytes() for c in self._caches()) + self._slot_bytes(kv=False)
                + self.mu_pending.numel() * self.mu_pending.element_size())

    def kv_allocated(self) -> int:
        """Bytes allocated for keys/values (the buffers' capacity; what state_bytes_bound bounds)."""
        return sum(c.nbytes() for c in self._caches() if isinstance(c, StreamKVCache)) + self._slot_bytes(kv=True)

    def kv_bytes(self) -> int:
        """Bytes of committed keys/values alone (what `kv_bytes_per_second` predicts)."""
        return sum(c.live_bytes() for c in self._caches() if isinstance(c, StreamKVCache))

    def _plan(self, finalize: bool) -> _Plan | None:
        """What this call computes (None: nothing new to emit, e.g. fewer than 4 tokens so far)."""
        flow, cfg = self.flow, self.flow.cfg
        if self.finished:
            raise RuntimeError("mel after finalize")
        n, r, look = self.n, cfg.token_mel_ratio, cfg.pre_lookahead_len
        L = r * n if finalize else max(r * n - flow.lookahead_frames, 0)
        self.frames_estimated = self.tokens_encoded = 0
        if L <= self.emitted:
            if finalize:
                self._close()
            return None
        if L > self.noise.shape[2]:
            raise ValueError(f"{L} mel frames exceed the {self.noise.shape[2]} noise frames")
        # Encoder over the open tokens [enc_done, n). A token chunk is final once `look` tokens follow its end (the
        # pre-lookahead conv reads them; every other layer is causal or chunk-masked). At finalize nothing needs
        # keeping.
        ce, cd = cfg.encoder.static_chunk_size, cfg.estimator.static_chunk_size
        done = self.enc_done if finalize else max(self.enc_done, (n - look) // ce * ce)
        # Estimator over the open frames [est_done, L): an estimator chunk is final once all its mu are final.
        est_new = self.est_done if finalize else max(self.est_done, r * done // cd * cd)
        start = self.est_done
        if self.graphs is not None:
            return _Plan(finalize, L, done, est_new, start, None, None, None)
        tok, frm = flow._spans(self.enc_done, n - self.enc_done, done - self.enc_done, self.left_chunks,
                               self.enc_caches)
        est = [Span(start, L - start, cd, est_new - start, self.left_chunks, caches) for caches in self.est_caches]
        return _Plan(finalize, L, done, est_new, start, tok, frm, est)

    def _commit(self, p: _Plan | None) -> torch.Tensor:
        """Take the plan's results: keep the final mu, move the commit points, return the new frames."""
        if p is None:
            return self.mu_pending.new_zeros(self.flow.cfg.output_size, 0)
        r, start = self.flow.cfg.token_mel_ratio, self.est_done
        self.tokens_encoded, self.frames_estimated = self.n - self.enc_done, p.frames
        self.mu_pending = p.mu[:, p.est_new - start:r * p.done - start].clone()
        self.tokens = self.tokens[p.done - self.enc_done:]
        self.enc_done, self.est_done = p.done, p.est_new
        out, self.emitted = p.mel[:, self.emitted - start:], p.L
        if p.finalize:
            self._close()
        return out

    def _close(self) -> None:
        """The reply is over: no more pushes, and its context is freed now rather than when the object dies."""
        self.finished = True
        self.enc_caches, self.est_caches = [], []
