"""Users for bench/latency.py: who speaks when, what a listener hears, and the official server under the same load.

A "cell" of the sweep is N sessions arriving by a Poisson process (or evenly staggered) at `rate` per second. Each
session speaks `turns` questions; its next question ends once it has heard the reply out (as played, stalls
included) plus `gap_s` of thought plus the question itself. Session k follows script k % len(seeds): its seed and
its questions, so the single-process systems need to answer each script only once and every engine reply has a
reference to equal.

Every time is seconds after the end of the user's speech (the commit). The engine is measured through the client
(`drive`): first audio and end are when the first PCM and response.done reached this process; t_asr, t_llm and
t_tts are the engine's own (runtime/turns.py), measured from its commit, which the client's commit precedes.
The single-process systems run one request at a time, so under load `fifo` replays their measured turns through
one queue: what the official one-model server would give the same arrivals.
"""
from __future__ import annotations

import asyncio
import hashlib
import heapq
import time
from dataclasses import dataclass, field

import numpy as np

from omni2.engine.client import AsyncClient
from omni2.engine.wire import protocol as P

QUESTION_RATE = 16000  # Hz, what Whisper hears
STATUS_EVERY_S = 0.25  # status polls; workers beat every 0.2 s, so a faster poll only repeats itself
FINAL_POLL_S = 0.5  # the last poll waits two beats past the last answer
AUDIBLE_GAP_S = 0.01  # shorter gaps vanish in a sound card's buffer; a listener would not hear them
TERMS = ("t_asr", "t_llm", "t_tts", "first_audio", "end")


@dataclass(frozen=True)
class Load:
    concurrency: int
    turns: int
    seeds: tuple[int, ...]
    question_s: float
    arrivals: str = "poisson"  # or "staggered"
    rate: float = 2.0  # sessions arriving per second
    gap_s: float = 0.5  # thinking time between hearing a reply out and starting the next question
    listen: bool = True  # False: the next question follows response.done, not the end of playback
    timeout_s: float = 600.0
    max_new_tokens: int | None = None  # the cap each session asks for (None: the daemon's own limit)

    def seed_of(self, session: int) -> int:
        return self.seeds[session % len(self.seeds)]


def question(seconds: float, seed: int) -> np.ndarray:
    """A voiced-sounding utterance: harmonics of a random pitch under a syllable-rate envelope (float32, 16 kHz).
    Random weights make any input babble; this one at least has the energy profile of speech for the mel."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * QUESTION_RATE)) / QUESTION_RATE
    f0 = 100 + 80 * rng.random()
    x = sum(np.sin(2 * np.pi * f0 * k * t + rng.random() * 6.28) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * (2 + 2 * rng.random()) * t) ** 2
    return (0.1 * x * envelope).astype(np.float32)


def question_seed(script_seed: int, turn: int) -> int:
    return script_seed * 100 + turn


def arrival_times(n: int, kind: str, rate: float, seed: int = 0) -> list[float]:
    """Seconds after the cell starts at which each session's first question ends; the first arrives at 0."""
    if kind == "staggered":
        return [k / rate for k in range(n)]
    if kind != "poisson":
        raise ValueError(f"arrivals must be poisson or staggered, got {kind!r}")
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return [0.0] + np.cumsum(gaps[1:]).tolist()


def listen(chunks: list[tuple[float, float]]) -> tuple[int, float, float]:
    """Play the reply as it arrives: (stalls, seconds of silence inside the reply, when playback ends).

    chunks are (arrival, seconds of audio). Playback starts with the first chunk; whenever the next chunk arrives
    after what was buffered has played out, the listener hears a gap."""
    if not chunks:
        return 0, 0.0, 0.0
    stalls, silent = 0, 0.0
    played_to = chunks[0][0] + chunks[0][1]
    for arrival, seconds in chunks[1:]:
        if arrival > played_to + AUDIBLE_GAP_S:
            stalls += 1
            silent += arrival - played_to
        played_to = max(played_to, arrival) + seconds
    return stalls, silent, played_to


def reply_digest(token_ids: list[int], units: list[int]) -> str:
    """A short fingerprint of a reply: equal replies, equal digests (the JSON stays small at 64 sessions)."""
    return hashlib.sha1(np.asarray(token_ids + [-1] + units, np.int64).tobytes()).hexdigest()[:16]


def turn_record(timings: dict, chunks: list[tuple[float, float]], end: float, token_ids: list[int],
                units: list[int], finish_reason: str, first_audio: float | None = None) -> dict:
    """One turn as the JSON keeps it. `first_audio` is the client's when there is a wire; else the pipeline's."""
    audio_s = sum(s for _, s in chunks)
    stalls, silent, played = listen(chunks)
    fa = timings.get("first_audio", end) if first_audio is None else first_audio
    rec = {k: float(timings.get(k, fa)) for k in ("t_asr", "t_llm", "t_tts")}
    rec.update(first_audio=fa, end=end, engine_first_audio=float(timings.get("first_audio", fa)),
               audio_s=audio_s, rtf=(end - fa) / audio_s if audio_s else None, stalls=stalls, stall_s=silent,
               played_s=played, n_tokens=len(token_ids), n_units=len(units), finish_reason=finish_reason,
               reply=reply_digest(list(token_ids), list(units)))
    return rec


# ----------------------------------------------------------------------------------------- the engine, via client


@dataclass
class _StageTrace:
    """A stage's heartbeats as seen in status polls; a sample is kept only when the stage took a step since."""

    steps0: int | None = None
    steps: int = 0
    batches: list[int] = field(default_factory=list)
    step_ms: list[float] = field(default_factory=list)
    queued: list[int] = field(default_factory=list)
    max_batch: int = 0

    def add(self, st: dict) -> None:
        if self.steps0 is None:
            self.steps0 = self.steps = st["steps"]
        elif st["steps"] != self.steps:
            self.steps = st["steps"]
            self.batches.append(st["last_batch"])
            self.step_ms.append(st["last_step_ms"])
        self.queued.append(st["queued"])
        self.max_batch = st["max_batch"]

    def summary(self) -> dict:
        def pct(xs: list[float], q: float) -> float | None:
            return float(np.percentile(xs, q)) if xs else None

        return {"steps": self.steps - (self.steps0 or 0), "samples": len(self.batches),
                "batch_mean": float(np.mean(self.batches)) if self.batches else None,
                "batch_max": max(self.batches, default=None), "max_batch_since_start": self.max_batch,
                "step_ms_p50": pct(self.step_ms, 50), "step_ms_p95": pct(self.step_ms, 95),
                "queued_max": max(self.queued, default=None)}


async def _poll(c: AsyncClient, traces: dict[str, _StageTrace]) -> None:
    st = await c.status(timeout=30)
    for stage, s in st.get("stages", {}).items():
        traces.setdefault(stage, _StageTrace()).add(s)


async def _sample_status(c: AsyncClient, traces: dict[str, _StageTrace], stop: asyncio.Event) -> None:
    """Poll the daemon's status until the cell ends, then once more two heartbeats later, so that every step of the
    cell has been reported (a step's count travels in the worker's next beat)."""
    while True:
        try:
            await asyncio.wait_for(stop.wait(), STATUS_EVERY_S)
        except asyncio.TimeoutError:
            await _poll(c, traces)
            continue
        await asyncio.sleep(FINAL_POLL_S)
        await _poll(c, traces)
        return


async def _session(address: str, token: str, k: int, load: Load, due: float, records: list, on_turn) -> None:
    seed = load.seed_of(k)
    async with AsyncClient(address, token=token, timeout=load.timeout_s) as c:
        s = await c.open(f"bench-{k}", seed=seed, max_new_tokens=load.max_new_tokens)
        for turn in range(load.turns):
            await s.append(question(load.question_s, question_seed(seed, turn)), QUESTION_RATE)  # while speaking
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            t0 = time.perf_counter()
            await s.commit()
            chunks, first, done = [], None, None
            async for ev in s.events():
                now = time.perf_counter() - t0
                if isinstance(ev, P.ResponseAudioDelta) and ev.audio.size:
                    first = now if first is None else first
                    chunks.append((now, ev.audio.size / ev.sample_rate))
                elif isinstance(ev, P.ResponseDone):
                    done = ev
            end = time.perf_counter() - t0
            if done.finish_reason not in ("stop", "length"):
                raise RuntimeError(f"session {k} turn {turn} ended with {done.finish_reason!r}")
            rec = turn_record(done.timings, chunks, end, list(done.token_ids), list(done.units),
                              done.finish_reason, first_audio=first if first is not None else end)
            rec.update(session=k, seed=seed, turn=turn, committed_s=t0)
            records.append(rec)
            on_turn()
            heard = rec["played_s"] if load.listen and chunks else end
            due = t0 + heard + load.gap_s + load.question_s
        await s.close()


async def _drive(address: str, token: str, load: Load, on_turn) -> tuple[list[dict], dict]:
    arrivals = arrival_times(load.concurrency, load.arrivals, load.rate)
    records: list[dict] = []
    traces: dict[str, _StageTrace] = {}
    stop = asyncio.Event()
    async with AsyncClient(address, token=token) as c:
        await _poll(c, traces)  # the step counters' baseline, before the first question
        sampler = asyncio.create_task(_sample_status(c, traces, stop))
        start = time.perf_counter() + 0.5  # every session has opened before the first question ends
        try:
            await asyncio.gather(*(_session(address, token, k, load, start + a, records, on_turn)
                                   for k, a in enumerate(arrivals)))
        finally:
            stop.set()
            await sampler
    for r in records:
        r["committed_s"] -= start
    records.sort(key=lambda r: (r["session"], r["turn"]))
    return records, {stage: t.summary() for stage, t in traces.items()}


def drive(address: str, load: Load, token: str = "", on_turn=lambda: None) -> tuple[list[dict], dict]:
    """Run one cell against a daemon: (turn records, per-stage batch sizes and step times from its status)."""
    return asyncio.run(_drive(address, token, load, on_turn))


# ------------------------------------------------------------------------------ the single-process systems, queued


def fifo(load: Load, measured: dict[tuple[int, int], dict]) -> list[dict]:
    """The same users against a server that answers one turn at a time, in arrival order, each turn costing what
    it cost when measured alone (`measured[(seed, turn)]`, a turn_record). Waiting adds to every term; the
    reply's own pacing (stalls) is as measured."""
    arrivals = arrival_times(load.concurrency, load.arrivals, load.rate)
    pending = [(a, k, 0) for k, a in enumerate(arrivals)]
    heapq.heapify(pending)
    free, out = 0.0, []
    while pending:
        at, k, turn = heapq.heappop(pending)
        alone = measured[(load.seed_of(k), turn)]
        wait = max(0.0, free - at)
        free = at + wait + alone["end"]
        rec = dict(alone, session=k, seed=load.seed_of(k), turn=turn, committed_s=at, wait_s=wait)
        for key in TERMS:
            rec[key] = alone[key] + wait
        rec["played_s"] = alone["played_s"] + wait
        out.append(rec)
        if turn + 1 < load.turns:
            heard = rec["played_s"] if load.listen and alone["audio_s"] else rec["end"]
            heapq.heappush(pending, (at + heard + load.gap_s + load.question_s, k, turn + 1))
    out.sort(key=lambda r: (r["session"], r["turn"]))
    return out
