"""Stage runners: what a worker process drives. Each one wraps a stage object (stages/*.py) and translates the
wire messages of wire/protocol.py into its calls and back, so the stage itself never sees a process or a socket.

A runner keeps, per session, the turn it is working on. Data of a turn that was cancelled (or of a session
that is gone) is dropped on arrival, and the first data of a newer turn ends whatever the session was still
doing — so a CancelSession overtaken by data, or data overtaken by a CancelSession, both come out right.
Failures that concern one session are collected in `failures` (the worker reports them as StageError); an
exception out of `step` concerns every session in `active()`. When a turn ends in a stage, what a replacement
worker would need to go on with the session is collected in `states` (the worker sends them to the engine, which
gives them back to the replacement as a RestoreSession).
"""
from __future__ import annotations

import collections
import time
from dataclasses import dataclass

import numpy as np
import torch

from omni2.engine.checkpoints.model_dir import ModelDir
from omni2.engine.config import STAGES, Limits, SamplingParams, SessionOptions, TTSOptions, VocoderOptions
from omni2.engine.runtime.topology import MAX_PCM_ROW
from omni2.engine.wire.protocol import (
    AsrToLlm,
    EngineToAsr,
    LlmToEngine,
    LlmToTts,
    OpenSession,
    RestoreSession,
    SessionState,
    TtsToEngine,
    TtsToVocoder,
    VocoderToEngine,
)
from omni2.stages.asr import ASRStage
from omni2.stages.llm import LLMError, LLMStage, LLMTurn
from omni2.stages.tts import TTSError, TTSInput, TTSStage, UnitPieces
from omni2.stages.vocoder import VocoderInput, VocoderStage


def to_wire(session_id: str, o: SessionOptions) -> OpenSession:
    a, b = o.sampling, o.tts_sampling
    return OpenSession(session_id, o.voice, o.seed, a.temperature, a.top_k, a.top_p, b.temperature, b.top_k,
                       b.top_p, o.max_new_tokens, o.vocoder_schedule or "")


def from_wire(m: OpenSession) -> SessionOptions:
    return SessionOptions(m.voice, m.seed, SamplingParams(m.temperature, m.top_k, m.top_p),
                          SamplingParams(m.tts_temperature, m.tts_top_k, m.tts_top_p), m.max_new_tokens,
                          m.vocoder_schedule or None)


_EMPTY = torch.empty(0)


def _state(stage: str, session_id: str, turn: int, counter: int = 0, rng: torch.Tensor = _EMPTY,
           speech: torch.Tensor = _EMPTY, answer: list[int] = ()) -> SessionState:
    # .cpu() blocks: a control message is sent without waiting on the stage's stream, unlike the rings' rows.
    return SessionState(stage, session_id, turn, counter, rng.detach().cpu(), speech.detach().cpu(), list(answer))


def _host(x: torch.Tensor) -> torch.Tensor:
    # On a GPU the copy is queued on the stage's stream into pinned memory; the worker's sender waits on an event
    # recorded after the step before it reads the bytes, so compute of the next step overlaps the transfer.
    return x.detach().to("cpu", non_blocking=x.is_cuda)


@dataclass
class Failure:
    session_id: str
    turn: int
    code: str
    message: str


class Runner:
    """Per-session turn bookkeeping shared by the four runners."""

    stage = ""

    def __init__(self):
        self.options: dict[str, SessionOptions] = {}
        self.turn: dict[str, int] = {}  # the turn each session is on (-1 = none yet)
        self.dropped: dict[str, int] = {}  # highest cancelled turn per session
        self.failures: list[Failure] = []
        self.states: list[SessionState] = []

    # -- lifecycle (called by the worker between steps) ----------------------------------------------------
    def open(self, m: OpenSession) -> None:
        opts = from_wire(m)
        self._open(m.session_id, opts)
        self.options[m.session_id] = opts
        self.turn[m.session_id], self.dropped[m.session_id] = -1, -1

    def close(self, session_id: str) -> None:
        if self.options.pop(session_id, None) is not None:
            self._close(session_id)
        self.turn.pop(session_id, None)
        self.dropped.pop(session_id, None)

    def cancel(self, session_id: str, turn: int) -> None:
        if session_id not in self.options:
            return
        self.dropped[session_id] = max(self.dropped[session_id], turn)
        if self.turn[session_id] <= turn:
            self._cancel(session_id)

    def restore(self, m: RestoreSession) -> None:
        if m.session_id in self.options:
            self._restore(m)

    def accept(self, session_id: str, turn: int) -> bool:
        """Should data of (session, turn) be used? Starts the turn if it is new."""
        if session_id not in self.options or turn <= self.dropped[session_id]:
            return False
        if turn > self.turn[session_id]:
            if self.turn[session_id] >= 0:
                self._cancel(session_id)  # a newer turn means the old one is over, whatever is left of it
            self.turn[session_id] = turn
        return turn == self.turn[session_id]

    def fail(self, session_id: str, code: str, message: str) -> None:
        self.failures.append(Failure(session_id, self.turn.get(session_id, -1), code, message))
        self.cancel(session_id, self.turn.get(session_id, -1))

    # -- what subclasses provide ---------------------------------------------------------------------------
    def _open(self, session_id: str, options: SessionOptions) -> None: ...
    def _close(self, session_id: str) -> None: ...
    def _cancel(self, session_id: str) -> None: ...
    def _restore(self, m: RestoreSession) -> None: ...
    def feed(self, msg: object) -> None: raise NotImplementedError
    def ready(self) -> bool: raise NotImplementedError
    def step(self) -> list[tuple[str, object]]: raise NotImplementedError
    def active(self) -> list[str]: return list(self.options)


@dataclass(slots=True)
class _AsrTurn:
    session_id: str
    turn: int
    audio: np.ndarray
    history: list[int] | None
    cuts: list[int]  # as EngineToAsr.cuts


class AsrRunner(Runner):
    stage = "asr"

    def __init__(self, asr, limits: Limits, max_batch: int = 4):
        super().__init__()
        self.asr, self.limits, self.max_batch = asr, limits, max_batch
        self.parts: dict[str, list] = {}  # audio of a turn not yet complete
        self.queue: list[_AsrTurn] = []  # complete turns, in arrival order

    def _open(self, sid, options):
        self.asr.open(sid)

    def _close(self, sid):
        self._cancel(sid)
        self.asr.close(sid)

    def _cancel(self, sid):
        self.parts.pop(sid, None)
        self.queue = [q for q in self.queue if q.session_id != sid]

    def feed(self, msg: EngineToAsr) -> None:
        for i, (sid, turn, audio, end) in enumerate(zip(msg.session_ids, msg.turns, msg.audio, msg.ends)):
            if not self.accept(sid, turn):
                continue
            self.parts.setdefault(sid, []).append(np.array(audio, dtype=np.float32))
            if end:
                history = msg.histories[i] if msg.histories else None
                cuts = msg.cuts[i] if msg.cuts else []
                self.queue.append(_AsrTurn(sid, turn, np.concatenate(self.parts.pop(sid)), history, cuts))

    def ready(self) -> bool:
        return bool(self.queue)

    def active(self) -> list[str]:
        return [q.session_id for q in self.queue[: self.max_batch]]

    def step(self):
        batch, rest = [], []
        for q in self.queue:  # one turn per session per step, oldest first
            taken = q.session_id in (b.session_id for b in batch) or len(batch) == self.max_batch
            (rest if taken else batch).append(q)
        self.queue = rest
        out = self.asr.step([(q.session_id, q.audio) for q in batch])
        histories = [q.history for q in batch]
        cuts = [q.cuts for q in batch]
        return [("asr_llm", AsrToLlm([q.session_id for q in batch], [q.turn for q in batch],
                                     [_host(emb) for _, emb in out],
                                     [self.options[q.session_id].max_new_tokens for q in batch], time.perf_counter(),
                                     [] if None in histories else histories, cuts if any(cuts) else []))]


class LlmRunner(Runner):
    stage = "llm"

    def __init__(self, llm):
        super().__init__()
        self.llm = llm
        self.new: list = []  # LLMTurns admitted since the last step
        self.asr_t: dict[str, float] = {}  # when the turn's speech left the ASR, until its first token is out

    def _open(self, sid, options):
        sampling, _ = options.seeded()
        self.llm.open(sid, sampling)

    def _close(self, sid):
        self.llm.close(sid)
        self.asr_t.pop(sid, None)

    def _restore(self, m):
        self.llm.restore(m.session_id, m.turns, m.speech, m.answers, m.counters)

    def _cancel(self, sid):
        self.llm.cancel(sid)
        self.asr_t.pop(sid, None)

    def feed(self, msg: AsrToLlm) -> None:
        for i, (sid, turn, speech, max_new) in enumerate(zip(msg.session_ids, msg.turns, msg.speech,
                                                              msg.max_new_tokens)):
            if not self.accept(sid, turn):
                continue
            history = msg.histories[i] if msg.histories else None
            pairs = msg.cuts[i] if msg.cuts else []
            cuts = dict(zip(pairs[::2], pairs[1::2])) or None
            try:
                self.llm.admit(LLMTurn(sid, speech.clone(), max_new, uid=turn, history=history, cuts=cuts))
            except LLMError as e:
                self.fail(sid, "llm_refused", str(e))
                continue
            self.asr_t[sid] = msg.t

    def ready(self) -> bool:
        return self.llm.busy()

    def active(self) -> list[str]:
        return [sid for sid, s in self.llm.sessions.items() if s.pending is not None or s.detok is not None]

    def step(self):
        toks = self.llm.step()
        if not toks:
            return []
        now = time.perf_counter()
        sids = [t.session_id for t in toks]
        turns = [self.turn[s] for s in sids]
        asr_t = [self.asr_t.pop(s, 0.0) for s in sids]
        ids = [t.token_id for t in toks]
        hidden = _host(torch.stack([t.hidden for t in toks]))
        finished = [t.finished for t in toks]
        for t, turn in zip(toks, turns):
            if t.finished:
                _, speech, answer, counter = self.llm.finished_turn(t.session_id)
                self.states.append(_state(self.stage, t.session_id, turn, counter, speech=speech, answer=answer))
        # Text first: a client sees the words no later than the units made from them.
        return [("llm_out", LlmToEngine(sids, turns, ids, [t.text for t in toks], [t.finish_reason for t in toks],
                                        now, asr_t)),
                ("llm_tts", LlmToTts(sids, turns, ids, hidden, finished, now))]


class TtsRunner(Runner):
    stage = "tts"

    def __init__(self, tts, im_end_id: int):
        super().__init__()
        self.tts = tts
        self.im_end_id = im_end_id
        self.stopped: dict[str, bool] = {}  # per session whose reply's text has ended: did it end on <|im_end|>
        self.inputs: list = []
        self.pieces: dict[str, UnitPieces] = {}  # per session: the piece of its write being cut

    def _open(self, sid, options):
        _, sampling = options.seeded()
        self.tts.open(sid, sampling)

    def _close(self, sid):
        self.tts.close(sid)
        self._drop(sid)

    def _cancel(self, sid):
        self.tts.cancel(sid)
        self._drop(sid)

    def _restore(self, m):
        if m.counters:
            self.tts.restore(m.session_id, m.counters[-1])

    def _drop(self, sid):
        self.pieces.pop(sid, None)
        self.stopped.pop(sid, None)
        self.inputs = [x for x in self.inputs if x.session_id != sid]

    def feed(self, msg: LlmToTts) -> None:
        for b, (sid, turn, tok, fin) in enumerate(zip(msg.session_ids, msg.turns, msg.token_ids, msg.finished)):
            if self.accept(sid, turn):
                self.inputs.append(TTSInput(sid, [tok], msg.hidden[b: b + 1].clone(), fin))
                if fin:
                    self.stopped[sid] = tok == self.im_end_id

    def ready(self) -> bool:
        return bool(self.inputs) or self.tts.ready()

    def active(self) -> list[str]:
        writing = {sid for sid, s in self.tts.sessions.items() if s.budget}
        return sorted({x.session_id for x in self.inputs} | writing)

    def step(self):
        inputs, self.inputs = self.inputs, []
        done_sids, units, finals, ends, stopped = [], [], [], [], []  # the vocoder's rows: a piece each
        chunk_sids, chunks, chunk_finals = [], [], []  # the engine's rows: a whole write each, as the reference
        try:
            written = self.tts.step(inputs)
        except TTSError as e:
            if not e.sessions:
                raise
            for sid in e.sessions:  # their turns end with an error; their batch-mates' go on
                self.fail(sid, "tts_context", str(e))
            written = self.tts.step([])  # the inputs are in already
        for t in written:
            pieces = self.pieces.setdefault(t.session_id, UnitPieces(self.tts.stream.write))
            piece = pieces.push(t)
            if piece is not None:  # a write, or a W-unit piece of a long one: the vocoder can start on it
                done_sids.append(t.session_id)
                units.append(piece[0])
                finals.append(t.done)  # never set before the write's end
                ends.append(piece[1] is not None)
                stopped.append(self.stopped.get(t.session_id, True))
                if piece[1] is not None:
                    chunk_sids.append(t.session_id)
                    chunks.append(piece[1])
                    chunk_finals.append(t.done)
            if t.done:
                self.stopped.pop(t.session_id, None)
                self.states.append(_state(self.stage, t.session_id, self.turn[t.session_id],
                                          self.tts.counter(t.session_id)))
        if not done_sids:
            return []
        now, turns = time.perf_counter(), [self.turn[s] for s in done_sids]
        out = [("tts_voc", TtsToVocoder(done_sids, turns, units, finals, now, ends, stopped))]
        if chunk_sids:
            out.insert(0, ("tts_out", TtsToEngine(chunk_sids, [self.turn[s] for s in chunk_sids], chunks,
                                                  chunk_finals, now)))
        return out


@dataclass(slots=True)
class _VocoderCall:
    """Units waiting to be voiced in one call of the vocoder stage, for one session."""

    units: list[int]
    final: bool
    t: float  # when the newest of them left the TTS
    complete: bool  # every row of the call has arrived (a write schedule voices only complete calls)
    stopped: bool = True  # VocoderInput.stopped


class VocoderRunner(Runner):
    """Calls of the vocoder stage, by each session's schedule: "live" voices each row of TtsToVocoder (a TTS write,
    or a W-unit piece of a long one), "official-live" each whole write (rows up to one with `ends`), "hop" whatever
    arrived, at most one hop per call. One call per session per step, oldest first, all sessions' calls batched in
    the stage: a long backlog streams out interleaved with other sessions instead of in one long step."""

    stage = "vocoder"

    def __init__(self, vocoder):
        super().__init__()
        self.vocoder = vocoder
        self.pending: dict[str, collections.deque[_VocoderCall]] = {}

    def _open(self, sid, options):
        self.vocoder.open(sid, options.voice, seed=options.vocoder_seed, schedule=options.vocoder_schedule)

    def _close(self, sid):
        self.vocoder.close(sid)
        self.pending.pop(sid, None)

    def _cancel(self, sid):
        self.vocoder.cancel(sid)
        self.pending.pop(sid, None)

    def _restore(self, m):
        if m.rng.numel():
            self.vocoder.restore(m.session_id, m.rng)

    def feed(self, msg: TtsToVocoder) -> None:
        for i, (sid, turn, units, final) in enumerate(zip(msg.session_ids, msg.turns, msg.units, msg.finals)):
            if not self.accept(sid, turn):
                continue
            end = msg.ends[i] if msg.ends else True
            stopped = msg.stopped[i] if msg.stopped else True
            q = self.pending.setdefault(sid, collections.deque())
            schedule = self.vocoder.schedule(sid)
            grow = q and (schedule == "hop" or (schedule == "official-live" and not q[-1].complete))
            if grow:
                c = q[-1]
                c.units.extend(units)
                c.final, c.t, c.complete = c.final or final, msg.t, c.complete or end or final
                c.stopped = stopped
            else:
                q.append(_VocoderCall(list(units), final, msg.t, end or final or schedule == "live", stopped))

    def _takeable(self, sid, q) -> bool:
        return bool(q) and (self.vocoder.schedule(sid) == "hop" or q[0].complete)

    def ready(self) -> bool:
        return any(self._takeable(sid, q) for sid, q in self.pending.items())

    def active(self) -> list[str]:
        return list(self.pending)

    def step(self):
        taken, inputs = {}, []
        for sid, q in list(self.pending.items()):
            if not self._takeable(sid, q):
                continue
            c = q[0]
            if self.vocoder.schedule(sid) == "hop" and len(c.units) > self.vocoder.hop:
                units, c.units = c.units[:self.vocoder.hop], c.units[self.vocoder.hop:]
                call = _VocoderCall(units, False, c.t, True)
            else:
                call = q.popleft()
            if not q:
                del self.pending[sid]
            inputs.append(VocoderInput(sid, call.units, call.final, call.stopped))
            taken[sid] = call
        outs = self.vocoder.step(inputs)
        sids, pcm, finals = [], [], []
        for o in outs:
            if o.final:
                self.states.append(_state(self.stage, o.session_id, self.turn[o.session_id],
                                          rng=self.vocoder.rng_state(o.session_id)))
            if not (o.pcm.size or o.final):
                continue
            # A long final flush becomes several rows, so that every row fits a ring slot on its own.
            n = max(1, -(-o.pcm.size // MAX_PCM_ROW))
            for i in range(n):
                sids.append(o.session_id)
                pcm.append(o.pcm[i * MAX_PCM_ROW: (i + 1) * MAX_PCM_ROW])
                finals.append(o.final and i == n - 1)
        if not sids:
            return []
        return [("voc_out", VocoderToEngine(sids, [self.turn[s] for s in sids], pcm, finals,
                                            self.vocoder.sample_rate, time.perf_counter(),
                                            [taken[s].t for s in sids]))]


def build(stage: str, model_dir: str, vocoder_dir: str, *, device: str, dtype: torch.dtype, limits: Limits,
          tts_options: TTSOptions = TTSOptions(), vocoder_options: VocoderOptions = VocoderOptions(),
          asr_batch: int = 4, cuda_graphs: bool = False) -> Runner:
    """Load one stage from the official directories and wrap it."""
    if stage == "vocoder":
        return VocoderRunner(VocoderStage.from_checkpoint(vocoder_dir, limits, vocoder_options, device=device,
                                                          dtype=dtype, cuda_graphs=cuda_graphs,
                                                          write=ModelDir(model_dir).config.generator.stream.write))
    md = ModelDir(model_dir)
    if stage == "asr":
        return AsrRunner(ASRStage.from_checkpoint(md, device=device, dtype=dtype), limits, asr_batch)
    if stage == "llm":
        return LlmRunner(LLMStage.from_checkpoint(md, limits, device=device, dtype=dtype, cuda_graphs=cuda_graphs))
    if stage == "tts":
        return TtsRunner(TTSStage.from_checkpoint(md, limits, tts_options, device=device, dtype=dtype,
                                                  cuda_graphs=cuda_graphs), md.special_ids().im_end_id)
    raise ValueError(f"unknown stage {stage!r}; expected one of {STAGES}")
