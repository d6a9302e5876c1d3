"""LLM stage: the Qwen2.5 thinker of LLaMA-Omni2, continuously batched over sessions.

Per user turn the prompt is the checkpoint's chat template over the whole conversation (user turns are the
single token `<speech>`, assistant turns the text already answered), with each `<speech>` replaced by that
turn's 300 projected speech embeddings (MODEL_SPEC §1.4). The KV cache of a session keeps what it already
holds: a new turn prefills only past the longest common prefix with the cached sequence, which gives the same
numbers as the official full re-prefill.

Each generated token y_k is emitted with h_k, the final-norm hidden state at the position whose logits
produced it (MODEL_SPEC §1.7-1.8): the pair the speech generator reads.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from omni2.engine.checkpoints.model_dir import THINKER_EXCLUDE, ModelDir
from omni2.engine.config import Limits, SamplingParams
from omni2.stages.decode_graph import slot_cache
from omni2.stages.layers import Qwen2LM, SlotPool, forward_rows, prefer_planless_attention
from omni2.stages.sampling import sample

log = logging.getLogger("omni2.llm")


class LLMError(RuntimeError):
    """A request the LLM stage refuses: unknown session, a full engine, a prompt over the context limit."""


@dataclass(slots=True)
class LLMTurn:
    """A user turn for a session: its projected speech embeddings (n, H), e.g. the ASR stage's output.

    uid: the turn's id in the conversation (None: the next one); ids only grow and are never reused.
    history: the uids of the earlier turns the conversation holds (None: every finished turn). A turn left out —
    one that was cancelled or failed — is dropped from the prompt with its answer, so what the thinker reads is
    decided by whoever names the history (the engine), never by when a cancel arrived.
    cuts: earlier turns whose answer the prompt holds only in part, {uid: answer tokens kept}: what the user
    heard of a reply before talking over it (conversation.truncate)."""

    session_id: str
    speech: torch.Tensor
    max_new_tokens: int | None = None
    uid: int | None = None
    history: list[int] | None = None
    cuts: dict[int, int] | None = None


@dataclass(slots=True)
class LLMToken:
    """One generated thinker token with the hidden state that predicted it."""

    session_id: str
    token_id: int
    hidden: torch.Tensor  # (H,), final-norm last-layer state
    text: str  # newly completed text (may be "" while a multi-byte character is incomplete)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (an eos id), "length" (max_new_tokens), "context" (cache full)


@dataclass
class _Session:
    slot: int
    sampling: SamplingParams
    speech: list[torch.Tensor] = field(default_factory=list)  # one (n, H) per user turn
    # Speech positions are cached as (turn uid, row): a uid is never reused, so a cancelled turn's rows can
    # never be mistaken for the rows of the turn that replaces it.
    uids: list[int] = field(default_factory=list)
    next_uid: int = 0
    answers: list[list[int]] = field(default_factory=list)  # answer ids of finished turns (answers[i]: uids[i])
    counters: list[int] = field(default_factory=list)  # the sampler's counter when answers[i] was finished
    cached: list = field(default_factory=list)  # items whose K/V sit at positions 0.. of the slot
    pending: list | None = None  # items still to prefill for the current turn
    generated: list[int] = field(default_factory=list)
    max_new: int = 0
    counter: int = 0  # sampling step counter, carried from the conversation's last turn
    detok: _Detokenizer | None = None


class _Detokenizer:
    """Incremental text of a growing id list; holds back a trailing incomplete UTF-8 character."""

    def __init__(self, tokenizer):
        self.tok, self.ids, self.prefix, self.read = tokenizer, [], 0, 0

    def push(self, token_id: int, last: bool = False) -> str:
        """The text `token_id` completes; with `last`, also whatever was held back (as U+FFFD if invalid)."""
        self.ids.append(token_id)
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        after = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not last):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return after[len(before):]


class LLMStage:
    """The thinker with a static KV cache of `limits.max_sessions` slots x `limits.max_context` positions.

    cuda_graphs: one-token steps run on fixed shapes (stages/decode_graph.py), replayed as CUDA graphs on a CUDA
    device; on a CPU the same fixed-shape steps run eagerly (what tests them here)."""

    def __init__(self, lm: Qwen2LM, tokenizer, speech_token_id: int, eos_ids: tuple[int, ...],
                 limits: Limits = Limits(), device="cpu", dtype=torch.float32, cuda_graphs: bool = False):
        prefer_planless_attention(device)
        self.lm = lm.to(device=device, dtype=dtype).eval()
        self.tok, self.speech_id, self.eos_ids = tokenizer, speech_token_id, frozenset(eos_ids)
        self.specials = [t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values()]
        self.limits, self.device, self.dtype = limits, torch.device(device), dtype
        self.cache, self.graphs = slot_cache(self.lm, limits.max_sessions, limits.max_context, self.device, dtype,
                                             cuda_graphs)
        self.sessions: dict[str, _Session] = {}
        self.slots = SlotPool(limits.max_sessions, "LLM", LLMError)

    @classmethod
    def from_checkpoint(cls, model_dir, limits: Limits = Limits(), device="cpu", dtype=torch.float32,
                        cuda_graphs: bool = False) -> LLMStage:
        md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
        with torch.device("meta"):
            lm = Qwen2LM(md.config.thinker)
        md.load_module(lm, "", exclude=THINKER_EXCLUDE, device=device, dtype=dtype)
        ignored = md.ignored_generation_settings()
        if ignored:
            log.warning("%s/generation_config.json sets %s, which the official decoding applies and this engine does "
                        "not (the sampling options are per session: --greedy, --seed, top_k/top_p/temperature); "
                        "replies may differ from the official ones", md.path,
                        ", ".join(f"{k}={v}" for k, v in ignored.items()))
        ids = md.special_ids()
        return cls(lm, md.tokenizer(), ids.speech_token_id, ids.thinker_eos_ids, limits, device, dtype, cuda_graphs)

    # -- session lifecycle -------------------------------------------------------------------------------
    def open(self, session_id: str, sampling: SamplingParams = SamplingParams()) -> None:
        self.sessions[session_id] = _Session(self.slots.take(session_id, self.sessions), sampling)

    def close(self, session_id: str) -> None:
        s = self.sessions.pop(session_id, None)
        if s is not None:
            self.slots.give(s.slot)

    def cancel(self, session_id: str) -> None:
        """Stop the current turn (barge-in); the cut-off answer is not kept in the history. (A turn that had
        already finished is dropped by the next turn's `history`, which leaves it out.)"""
        s = self._get(session_id)
        if s.pending is not None or s.detok is not None:
            s.speech.pop()
            s.uids.pop()
        s.pending, s.detok, s.generated = None, None, []

    def restore(self, session_id: str, uids: list[int], speech: list[torch.Tensor], answers: list[list[int]],
                counters: list[int]) -> None:
        """Give a session the conversation another LLMStage held (what `finished_turn` gave of each turn), e.g. when
        a restarted worker takes over: the next turn answers as that stage would have. The K/V cache is rebuilt by
        the next turn's prefill."""
        s = self._get(session_id)
        if s.pending is not None or s.detok is not None:
            raise LLMError(f"session {session_id!r} is answering a turn; a conversation cannot be restored under it")
        if not len(uids) == len(speech) == len(answers) == len(counters) or list(uids) != sorted(set(uids)):
            raise LLMError("a restored conversation needs one speech, answer and counter per turn, turns in order")
        H = self.lm.cfg.hidden_size
        if any(x.ndim != 2 or x.shape[1] != H for x in speech):
            raise LLMError(f"restored speech embeddings must be (n, {H})")
        s.speech, s.uids = [x.to(self.device, self.dtype) for x in speech], list(uids)
        s.answers, s.counters = [list(a) for a in answers], list(counters)
        s.next_uid = max(s.next_uid, uids[-1] + 1) if uids else s.next_uid
        s.counter = counters[-1] if counters else 0
        s.cached = []

    def finished_turn(self, session_id: str) -> tuple[int, torch.Tensor, list[int], int]:
        """The last finished turn as the conversation holds it: (uid, speech (n, H), answer ids, counter)."""
        s = self._get(session_id)
        if not s.answers or s.pending is not None or s.detok is not None:
            raise LLMError(f"session {session_id!r} has no finished turn to give")
        return s.uids[-1], s.speech[-1], s.answers[-1], s.counters[-1]

    def busy(self) -> bool:
        return any(s.pending is not None or s.detok is not None for s in self.sessions.values())

    # -- the batched step -----------------------------------------------------------------------------
    def step(self, turns: list[LLMTurn] = ()) -> list[LLMToken]:
        """Admit new turns, then run one prefill forward (new turns) and one decode forward (the rest)."""
        for t in turns:
            self.admit(t)
        out: list[LLMToken] = []
        prefill = [(sid, s) for sid, s in self.sessions.items() if s.pending is not None]
        decode = [(sid, s) for sid, s in self.sessions.items() if s.pending is None and s.detok is not None]
        if prefill:
            out += self._forward(prefill, [s.pending for _, s in prefill])
        if decode:
            out += self._forward(decode, [[s.generated[-1]] for _, s in decode])
        return out

    def _get(self, session_id: str) -> _Session:
        s = self.sessions.get(session_id)
        if s is None:
            raise LLMError(f"unknown session {session_id!r}")
        return s

    def admit(self, turn: LLMTurn) -> None:
        """Queue a turn for the next step's prefill; LLMError (nothing changed) if it cannot be taken."""
        s = self._get(turn.session_id)
        if s.pending is not None or s.detok is not None:
            raise LLMError(f"session {turn.session_id!r} is still answering its previous turn")
        H = self.lm.cfg.hidden_size
        if turn.speech.ndim != 2 or turn.speech.shape[1] != H or turn.speech.shape[0] == 0:
            raise LLMError(f"speech embeddings must be (n>0, {H}), got {tuple(turn.speech.shape)}")
        uid = s.next_uid if turn.uid is None else turn.uid
        if uid < s.next_uid:
            raise LLMError(f"turn id {uid} of session {turn.session_id!r} is not new (next is {s.next_uid})")
        wanted = set(s.uids if turn.history is None else turn.history)
        if not wanted <= set(s.uids):
            missing = sorted(wanted - set(s.uids))
            raise LLMError(f"the conversation of session {turn.session_id!r} names turns {missing} "
                           "this stage does not hold (a restarted worker that was not given the conversation)")
        kept = [i for i, u in enumerate(s.uids) if u in wanted]
        speech, uids, answers = [s.speech[i] for i in kept], [s.uids[i] for i in kept], [s.answers[i] for i in kept]
        counters = [s.counters[i] for i in kept]
        cuts = turn.cuts or {}
        texts = [self.tok.decode(a[:cuts.get(u, len(a))], skip_special_tokens=True) for u, a in zip(uids, answers)]
        items = self._prompt_items([x.shape[0] for x in speech] + [turn.speech.shape[0]], uids + [uid], texts)
        if len(items) >= self.limits.max_context:
            raise LLMError(f"prompt of {len(items)} positions does not fit the context limit "
                           f"{self.limits.max_context} (close the session or raise --max-context)")
        s.speech, s.answers, s.counters = speech + [turn.speech.to(self.device, self.dtype)], answers, counters
        # A turn left out never happened, for the sampler too: the next draws follow the last turn kept.
        s.counter = counters[-1] if counters else 0
        s.uids, s.next_uid = uids + [uid], uid + 1
        keep = 0
        while keep < min(len(items), len(s.cached)) and _same(items[keep], s.cached[keep]):
            keep += 1
        keep = min(keep, len(items) - 1)  # always prefill at least one position: it yields the logits
        s.cached, s.pending = items[:keep], items[keep:]
        s.max_new = min(turn.max_new_tokens or self.limits.max_new_tokens, self.limits.max_new_tokens)
        s.generated, s.detok = [], _Detokenizer(self.tok)

    def _prompt_items(self, n_rows: list[int], uids: list[int], answers: list[str]) -> list:
        """Token ids of the chat prompt with every `<speech>` expanded into (turn uid, row) items."""
        messages = []
        for i in range(len(n_rows)):
            messages.append({"role": "user", "content": "<speech>"})
            if i < len(answers):
                messages.append({"role": "assistant", "content": answers[i]})
        items, turn = [], 0
        for t in self._chat_ids(messages):
            if t == self.speech_id:
                if turn >= len(n_rows):
                    raise LLMError("the chat template produced more <speech> slots than user turns")
                items.extend((uids[turn], j) for j in range(n_rows[turn]))
                turn += 1
            else:
                items.append(int(t))
        if turn != len(n_rows):
            raise LLMError(f"the chat template kept {turn} of {len(n_rows)} <speech> placeholders")
        return items

    def _chat_ids(self, messages: list[dict]) -> list[int]:
        """The chat template over `messages`, tokenized, as the official code does it. Except for an answer whose
        text spells an added token (the thinker wrote `<`, `speech`, `>`): read as that token, it would add a
        speech slot (the official code then fails, and so would every later turn of the session) or end a message
        early (`<|im_end|>`), so such an answer is tokenized as the plain text it is."""
        def spelled(m: dict) -> bool:
            return m["role"] == "assistant" and any(x in m["content"] for x in self.specials)

        if not any(spelled(m) for m in messages):
            ids = self.tok.apply_chat_template(messages, add_generation_prompt=True)
            return list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        # The template writes each answer verbatim: render it with markers in their place, then tokenize the
        # template's text around them as usual and the answers with added tokens split.
        answers = [m["content"] for m in messages if spelled(m)]
        mark = "\x00"
        while any(mark in m["content"] for m in messages):
            mark += "\x00"
        marked, k = [], 0
        for m in messages:
            if spelled(m):
                m, k = {**m, "content": f"{mark}{k}{mark}"}, k + 1
            marked.append(m)
        text = self.tok.apply_chat_template(marked, add_generation_prompt=True, tokenize=False)
        pieces = text.split(mark)  # template, answer index, template, ...
        ids = []
        for i, piece in enumerate(pieces):
            if i % 2:
                ids += self.tok(answers[int(piece)], add_special_tokens=False, split_special_tokens=True).input_ids
            elif piece:
                ids += self.tok(piece, add_special_tokens=False).input_ids
        return ids

    def _embed(self, s: _Session, items: list) -> torch.Tensor:
        """(len(items), H): token embeddings, with speech rows taken from the stored turn embeddings."""
        out = torch.empty(len(items), self.lm.cfg.hidden_size, device=self.device, dtype=self.dtype)
        tok_pos = [i for i, x in enumerate(items) if isinstance(x, int)]
        if tok_pos:
            ids = torch.tensor([items[i] for i in tok_pos], device=self.device)
            out[tok_pos] = self.lm.embed(ids)
        sp_pos = [i for i, x in enumerate(items) if not isinstance(x, int)]
        if sp_pos:
            by_uid = dict(zip(s.uids, s.speech))
            out[sp_pos] = torch.stack([by_uid[items[i][0]][items[i][1]] for i in sp_pos])
        return out

    @torch.inference_mode()
    def _forward(self, group: list[tuple[str, _Session]], new_items: list[list]) -> list[LLMToken]:
        slots, starts = [s.slot for _, s in group], [len(s.cached) for _, s in group]
        if self.graphs is not None and all(len(items) == 1 and isinstance(items[0], int) for items in new_items):
            ids = torch.tensor([items[0] for items in new_items], device=self.device)
            last, logits = self.graphs.step(slots, starts, [1] * len(group), self.lm.embed(ids)[:, None])
        else:
            rows = [self._embed(s, items) for (_, s), items in zip(group, new_items)]
            last, logits = forward_rows(self.lm, self.cache, slots, starts, rows)  # (B, H), (B, V)
        ids = sample(logits, [s.sampling for _, s in group], [s.counter for _, s in group]).tolist()

        out = []
        for b, ((sid, s), items) in enumerate(zip(group, new_items)):
            s.cached.extend(items)
            s.pending = None
            s.counter += 1
            tok = ids[b]
            s.generated.append(tok)
            reason = None
            if tok in self.eos_ids:
                reason = "stop"
            elif len(s.generated) >= s.max_new:
                reason = "length"
            elif len(s.cached) >= self.limits.max_context:
                reason = "context"  # no position left to feed this token back
            text = s.detok.push(tok, last=reason is not None)
            out.append(LLMToken(sid, tok, last[b], text, reason is not None, reason))
            if reason is not None:
                s.answers.append([t for t in s.generated if t not in self.eos_ids])
                s.counters.append(s.counter)
                s.generated, s.detok = [], None
        return out


def _same(a, b) -> bool:
    return a == b if type(a) is type(b) else False
