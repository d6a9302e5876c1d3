"""TTS stage: LLaMA-Omni2's speech generator, Read-R-Write-W over a KV cache that is never re-prefilled.

Per reply (MODEL_SPEC §1.8) the TTS LM's input is
    [x1 x2 x3][u1 .. u10][x4 x5 x6][u11 .. u20] ... [x_.. x_last][<sep>][u .. until EOS or 1024]
where x = gate fusion of input_proj(thinker hidden) and the TTS embedding of the thinker token, and u are the
sampled TTS tokens fed back as plain embeddings. The official code re-runs the whole sequence through a fresh
`generate` each chunk; here each chunk appends only its new positions to the session's cache slot:
[previous chunk's last sampled token] + fused text (+ <sep>) as one prefill, then one decode per unit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from omni2.engine.checkpoints.model_dir import GENERATOR_EXCLUDE, PREFIX_GENERATOR, PREFIX_TTS_LM, ModelDir
from omni2.engine.config import (
    OFFICIAL_SAMPLING,
    ConfigError,
    Limits,
    Qwen2Config,
    SamplingParams,
    StreamParams,
    TTSOptions,
)
from omni2.kernels.fsq_decode import fsq_decode
from omni2.kernels.gate_fusion import gate_fusion
from omni2.stages.decode_graph import slot_cache
from omni2.stages.layers import Qwen2LM, SlotPool, forward_rows, pad_rows, prefer_planless_attention

FINAL_MAX_UNITS = 1024  # max_new_tokens of the call that follows <sep>


def reply_positions(tokens: int, stream: StreamParams) -> int:
    """The most TTS positions a reply of `tokens` thinker tokens can take: every token once, W units for each of
    at most tokens // R written chunks (each one's last unit enters as the next chunk's first row), and the final
    chunk's <sep> plus the FINAL_MAX_UNITS - 1 units fed back after it."""
    return tokens + tokens // stream.read * stream.write + FINAL_MAX_UNITS


def tts_context(limits: Limits, options: TTSOptions, stream: StreamParams, lm: Qwen2Config) -> int:
    """The positions of each session's TTS cache slot: `options.max_context`, or all that a reply of
    `limits.max_new_tokens` can take; refused when past what the TTS LM was built for."""
    n = options.max_context or reply_positions(limits.max_new_tokens, stream)
    if n > lm.max_position_embeddings:
        raise ConfigError(f"a reply of {limits.max_new_tokens} tokens can take {n} TTS positions, more than the TTS "
                          f"LM's {lm.max_position_embeddings}: lower --max-new-tokens")
    return n


class TTSError(RuntimeError):
    """A step refused; `sessions` names the sessions at fault when the others could go on without them."""

    def __init__(self, message: str, sessions: list[str] | None = None):
        super().__init__(message)
        self.sessions = sessions or []


class SpeechGenerator(nn.Module):
    """`speech_generator.input_proj` and `.gate` (the TTS LM itself is a separate Qwen2LM)."""

    def __init__(self, thinker_hidden: int, tts_hidden: int):
        super().__init__()
        self.input_proj = nn.Sequential(nn.Linear(thinker_hidden, 2 * thinker_hidden), nn.ReLU(),
                                        nn.Linear(2 * thinker_hidden, tts_hidden))
        self.gate = nn.Sequential(nn.Linear(2 * tts_hidden, tts_hidden), nn.Sigmoid())

    def fuse(self, hidden: torch.Tensor, text_emb: torch.Tensor, gate_override: float | None = None):
        """(n, H_thinker), (n, T) -> (n, T)."""
        return gate_fusion(self.input_proj(hidden), text_emb, self.gate[0].weight, self.gate[0].bias, gate_override)


@dataclass(slots=True)
class TTSInput:
    """Thinker tokens for a session, in order, with the hidden states that predicted them (LLMToken pairs)."""

    session_id: str
    token_ids: list[int]
    hidden: torch.Tensor  # (n, H_thinker)
    final: bool = False  # the last of these tokens ends the reply


@dataclass(slots=True)
class TTSToken:
    """One sampled TTS token. `unit` is its speech unit, or None for EOS / a non-unit id."""

    session_id: str
    token_id: int
    unit: int | None
    chunk_end: bool  # the chunk's write budget is spent or EOS was sampled
    done: bool  # the reply's speech is complete (end of the final chunk)


class UnitPieces:
    """Cuts one session's TTS tokens into the pieces the vocoder is given: a piece ends with its write (a chunk of
    Read-R-Write-W) or after W units, whichever comes first, so a long write (the final flush after <sep>, up to
    1024 units) arrives in W-unit pieces and its tail streams too. A function of the tokens alone: the engine and
    the reference pipeline cut a reply identically. It also keeps the write being cut, which is what clients get as
    one unit chunk and `official-live` voices in one call."""

    def __init__(self, write: int):
        self.write, self.units, self.whole = write, [], []

    def push(self, t: TTSToken) -> tuple[list[int], list[int] | None] | None:
        """The piece `t` completes, as (its units, the whole write when the piece ends it, else None), or None."""
        if t.unit is not None:
            self.units.append(t.unit)
        if not (t.chunk_end or len(self.units) >= self.write):
            return None
        piece, self.units = self.units, []
        self.whole += piece
        if not t.chunk_end:
            return piece, None
        whole, self.whole = self.whole, []
        return piece, whole


@dataclass
class _Session:
    slot: int
    sampling: SamplingParams
    text_ids: list[int] = field(default_factory=list)  # read but not yet written for
    text_h: list[torch.Tensor] = field(default_factory=list)
    final_seen: bool = False
    pending: torch.Tensor | None = None  # rows to prefill for the chunk being started
    budget: int = 0  # units still to write in the current chunk; 0 = waiting for text
    final_chunk: bool = False
    last: int | None = None  # last sampled token, not yet fed back
    pos: int = 0  # positions held in the cache slot
    history: list[torch.Tensor] = field(default_factory=list)  # all input rows (reprefill mode only)
    counter: int = 0


class TTSStage:
    def __init__(self, lm: Qwen2LM, gen: SpeechGenerator, sep_id: int, eos_id: int, unit0: int, n_units: int,
                 stream: StreamParams = StreamParams(), limits: Limits = Limits(), options: TTSOptions = TTSOptions(),
                 device="cpu", dtype=torch.float32, cuda_graphs: bool = False):
        prefer_planless_attention(device)
        self.lm = lm.to(device=device, dtype=dtype).eval()
        self.gen = gen.to(device=device, dtype=dtype).eval()
        self.sep_id, self.eos_id, self.unit0, self.n_units = sep_id, eos_id, unit0, n_units
        if unit0 + n_units > lm.cfg.vocab_size:
            raise ConfigError(f"unit ids {unit0}..{unit0 + n_units - 1} exceed the TTS vocab {lm.cfg.vocab_size}")
        self.stream, self.limits, self.opts = stream, limits, options
        self.max_context = tts_context(limits, options, stream, lm.cfg)
        self.device, self.dtype = torch.device(device), dtype
        # A re-prefilling baseline has no short steps to replay. Token buckets: 1 for the unit-by-unit steps, 8 for
        # a chunk's text ([last unit] + R fused + [<sep>]).
        self.cache, self.graphs = slot_cache(self.lm, limits.max_sessions, self.max_context, self.device, dtype,
                                             cuda_graphs and not options.reprefill, tokens=(1, 8), head=False)
        self.sessions: dict[str, _Session] = {}
        self.slots = SlotPool(limits.max_sessions, "TTS", TTSError)

    @classmethod
    def from_checkpoint(cls, model_dir, limits: Limits = Limits(), options: TTSOptions = TTSOptions(),
                        device="cpu", dtype=torch.float32, cuda_graphs: bool = False) -> TTSStage:
        md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
        cfg = md.config
        with torch.device("meta"):
            lm = Qwen2LM(cfg.generator.lm)
            gen = SpeechGenerator(cfg.thinker.hidden_size, cfg.generator.lm.hidden_size)
        md.load_module(lm, PREFIX_TTS_LM, device=device, dtype=dtype)
        md.load_module(gen, PREFIX_GENERATOR, exclude=GENERATOR_EXCLUDE, device=device, dtype=dtype)
        ids = md.special_ids()
        return cls(lm, gen, ids.sep_id, ids.tts_eos_id, ids.unit0, ids.n_units, cfg.generator.stream, limits,
                   options, device, dtype, cuda_graphs)

    # -- session lifecycle -------------------------------------------------------------------------------
    def open(self, session_id: str, sampling: SamplingParams = OFFICIAL_SAMPLING) -> None:
        self.sessions[session_id] = _Session(self.slots.take(session_id, self.sessions), sampling)

    def close(self, session_id: str) -> None:
        s = self.sessions.pop(session_id, None)
        if s is not None:
            self.slots.give(s.slot)

    def cancel(self, session_id: str) -> None:
        """Drop the reply in progress; the session can take the next reply."""
        s = self._get(session_id)
        self.sessions[session_id] = _Session(s.slot, s.sampling, counter=s.counter)

    def counter(self, session_id: str) -> int:
        """The session's sampler step counter: with the seed, all a later reply's draws depend on."""
        return self._get(session_id).counter

    def restore(self, session_id: str, counter: int) -> None:
        """Carry a session on from another TTSStage's `counter` (a restarted worker taking over)."""
        self._get(session_id).counter = counter

    def busy(self) -> bool:
        return any(s.budget > 0 or s.text_ids for s in self.sessions.values())

    def ready(self) -> bool:
        """A step() without new input would do work: a chunk is being written or has all its text."""
        R = self.stream.read
        return any(s.budget > 0 or (s.text_ids and (s.final_seen or (len(s.text_ids) >= R and not self.opts.offline)))
                   for s in self.sessions.values())

    # -- the batched step -----------------------------------------------------------------------------
    def step(self, inputs: list[TTSInput] = ()) -> list[TTSToken]:
        """Read new thinker tokens, start chunks whose text is complete, then one forward for every writer."""
        for x in inputs:
            self._read(x)
        for s in self.sessions.values():
            if s.budget == 0:
                self._maybe_start_chunk(s)
        writers = [(sid, s) for sid, s in self.sessions.items() if s.budget > 0]
        if not writers:
            return []
        # Positions each writer appends: a chunk's prefill, or its last token fed back.
        sizes = [1 if s.pending is None else s.pending.shape[0] for _, s in writers]
        if self.opts.reprefill:
            for _, s in writers:
                s.history.append(s.pending if s.pending is not None
                                 else self.lm.embed(torch.tensor([s.last], device=self.device)))
            sizes = [1 if s.pending is None else sum(h.shape[0] for h in s.history) for _, s in writers]
            starts = [0 if s.pending is not None else s.pos for _, s in writers]
        else:
            starts = [s.pos for _, s in writers]
        too_long = [sid for (sid, _), st, n in zip(writers, starts, sizes) if st + n > self.max_context]
        if too_long:  # nothing was computed: the others can step again without them
            raise TTSError(f"the reply's speech would pass the TTS context of {self.max_context} positions",
                           too_long)
        with torch.inference_mode():
            hidden = self._forward([s for _, s in writers], starts)
            ids = self._decode(hidden, [s for _, s in writers]).tolist()
        out = []
        for (sid, s), st, n, tok in zip(writers, starts, sizes, ids):
            s.pos, s.pending, s.last = st + n, None, tok
            s.counter += 1
            s.budget -= 1
            end = tok == self.eos_id or s.budget == 0
            done = end and s.final_chunk
            if end:
                s.budget = 0
            unit = tok - self.unit0 if self.unit0 <= tok < self.unit0 + self.n_units else None
            out.append(TTSToken(sid, tok, unit, end, done))
            if done:
                self.sessions[sid] = _Session(s.slot, s.sampling, counter=s.counter)
        return out

    def _forward(self, writers: list[_Session], starts: list[int]) -> torch.Tensor:
        """The TTS LM over every writer's new positions -> each one's last final-norm hidden state (B, H). With
        graphs, the one-token rows take one fixed-shape step, the chunk prefills that fit a token bucket another,
        and longer ones (a final chunk's text) the dynamic forward."""
        def row(s: _Session) -> torch.Tensor:
            if self.opts.reprefill and s.pending is not None:
                return torch.cat(s.history)
            return s.pending if s.pending is not None else self.lm.embed(torch.tensor([s.last], device=self.device))

        slots = [s.slot for s in writers]
        if self.graphs is None:
            return forward_rows(self.lm, self.cache, slots, starts, [row(s) for s in writers], head=False)[0]
        one = [b for b, s in enumerate(writers) if s.pending is None]
        short = [b for b, s in enumerate(writers) if s.pending is not None and len(s.pending) <= self.graphs.max_tokens]
        long = [b for b, s in enumerate(writers) if s.pending is not None and len(s.pending) > self.graphs.max_tokens]
        hidden = torch.empty(len(writers), self.lm.cfg.hidden_size, device=self.device, dtype=self.dtype)
        if one:
            ids = torch.tensor([writers[b].last for b in one], device=self.device)
            hidden[one] = self.graphs.step([slots[b] for b in one], [starts[b] for b in one], [1] * len(one),
                                           self.lm.embed(ids)[:, None])[0]
        if short:
            embeds, lengths = pad_rows([writers[b].pending for b in short])
            hidden[short] = self.graphs.step([slots[b] for b in short], [starts[b] for b in short], lengths,
                                             embeds)[0]
        if long:
            hidden[long] = forward_rows(self.lm, self.cache, [slots[b] for b in long], [starts[b] for b in long],
                                        [row(writers[b]) for b in long], head=False)[0]
        return hidden

    def _decode(self, hidden: torch.Tensor, sessions: list[_Session]) -> torch.Tensor:
        """Head + sampling of one step (B, H) -> TTS ids (B,); without units_only over the full vocab, as official."""
        def col(values, dtype):
            return torch.tensor(values, dtype=dtype, device=self.device)

        P = [s.sampling for s in sessions]
        return fsq_decode(hidden, self.lm.lm_head.weight, self.unit0, self.n_units, self.eos_id,
                          col([p.temperature for p in P], torch.float32), col([p.top_k for p in P], torch.int64),
                          col([p.top_p for p in P], torch.float32), col([p.seed for p in P], torch.int64),
                          col([s.counter for s in sessions], torch.int64), full_vocab=not self.opts.units_only)

    def _get(self, session_id: str) -> _Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise TTSError(f"unknown session {session_id!r}")
        return s

    def _read(self, x: TTSInput) -> None:
        s = self._get(x.session_id)
        if s.final_seen:
            raise TTSError(f"session {x.session_id!r} got text after its reply's final token")
        if x.hidden.ndim != 2 or x.hidden.shape[0] != len(x.token_ids):
            raise TTSError(f"{len(x.token_ids)} token ids need hidden states (n, H), got {tuple(x.hidden.shape)}")
        s.text_ids.extend(int(t) for t in x.token_ids)
        s.text_h.extend(x.hidden.to(self.device, self.dtype).unbind(0))
        s.final_seen = x.final

    def _maybe_start_chunk(self, s: _Session) -> None:
        """Read-R: take R tokens (all of them at the end of the reply, or in offline mode) and fuse them."""
        R = self.stream.read
        if self.opts.offline and not s.final_seen:
            return
        if len(s.text_ids) >= R and not self.opts.offline:
            n = R
        elif s.final_seen and s.text_ids:
            n = len(s.text_ids)
        else:
            return
        ids, h = s.text_ids[:n], torch.stack(s.text_h[:n])
        del s.text_ids[:n], s.text_h[:n]
        s.final_chunk = s.final_seen and not s.text_ids
        with torch.inference_mode():
            x = self.gen.fuse(h, self.lm.embed(torch.tensor(ids, device=self.device)), self.opts.gate_override)
            parts = [x]
            if s.last is not None:  # the previous chunk's last token (a unit or an EOS) joins the history
                parts.insert(0, self.lm.embed(torch.tensor([s.last], device=self.device)))
            if s.final_chunk:
                parts.append(self.lm.embed(torch.tensor([self.sep_id], device=self.device)))
        s.pending = torch.cat(parts)
        s.last = None
        s.budget = FINAL_MAX_UNITS if s.final_chunk else self.stream.write
