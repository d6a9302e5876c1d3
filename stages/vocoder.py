"""Vocoder stage: CosyVoice2 token2wav as LLaMA-Omni2 streams it (MODEL_SPEC §2.6), units -> 24 kHz PCM.

Every call is the official token2wav: the flow turns units [0, n) into mel, the frames from 2*offset on are voiced,
and HiFT re-reads the previous call's last 8 mel frames and source samples, cross-fades its first 3840 samples with
the tail it withheld last time (Hamming window), and withholds its own last 3840 samples until the next call.
When the calls come (per session, VocoderOptions.schedule unless its open() says otherwise):
  live / official-live  the official live server's `process_unit_chunk`: one call per input (a TTS write), n = all
                        units so far, then offset = n - pre_lookahead; the final input finalizes. The first audio
                        comes from the first write (10 units: 14 mel frames, 2880 samples out, 3840 withheld).
                        official-live also ends a reply as that server does: a final call only with new units,
                        finalizing only a reply whose text ended with `<|im_end|>` (VocoderInput.stopped).
  hop                   the offline `run_cosy2_decoder.py --stream`: once `hop + pre_lookahead` units past the offset
                        exist, units [0, offset + hop + 3) are voiced from 2*offset, offset += hop; the end of the
                        reply finalizes the rest.

Two flow modes, same frames: `incremental` keeps the completed chunks' layer state (flat cost per call) and
`recompute` reruns the flow from unit 0 every call (the official cost, for baselines).

A step voices the calls of many sessions together: one flow pass over all their open chunks (Flow.stream_step),
then HiFT once per group of equal mel length (in a steady stream of W-unit writes, all of them), each session
drawing its source randomness from its own generator. The PCM equals voicing each alone to float32 rounding;
`max_batch=1` voices them one by one, bit for bit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from omni2.engine.checkpoints.vocoder_dir import VocoderDir
from omni2.engine.config import (
    VOCODER_SCHEDULES,
    ConfigError,
    Limits,
    StreamParams,
    VocoderConfig,
    VocoderOptions,
)
from omni2.stages.flow import Flow, FlowStream
from omni2.stages.flow_graph import WindowGraphs
from omni2.stages.hift import HiFT
from omni2.stages.hift_graph import HiFTGraphs
from omni2.stages.layers import SlotPool, prefer_planless_attention


class VocoderError(RuntimeError):
    pass


@dataclass(slots=True)
class VocoderInput:
    session_id: str
    units: list[int]
    final: bool = False  # no more units for this reply: voice everything
    # On `final`, under "official-live": the reply's text ended with `<|im_end|>`. The official server finalizes
    # only then (a reply cut at max_new_tokens ends on a non-final call, its last units and withheld tail never
    # voiced), and makes no call for a last message without new units (an empty final flush: the same).
    stopped: bool = True


@dataclass(slots=True)
class VocoderOutput:
    session_id: str
    pcm: np.ndarray  # float32 mono at the vocoder's sample rate; may be empty
    final: bool


def load_flow(vd: VocoderDir, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> Flow:
    """The flow built on the meta device and loaded strictly from vd's flow.pt."""
    with torch.device("meta"):
        model = Flow(vd.config.flow)
    return vd.load_into(model, "flow", device, dtype).eval().requires_grad_(False)


def load_hift(vd: VocoderDir, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> HiFT:
    """HiFT built on the meta device and loaded strictly from vd's hift.pt (weight norm folded for inference)."""
    with torch.device("meta"):
        model = HiFT(vd.config.hift)
    vd.load_into(model, "hift", device, dtype)
    model.init_non_persistent(device)
    return model.eval().requires_grad_(False).fold_weight_norm()


@dataclass
class _Session:
    spk: torch.Tensor  # (192,) x-vector
    generator: torch.Generator  # HiFT's source randomness
    schedule: str  # VOCODER_SCHEDULES
    slot: int  # its flow stream's slot in the fixed-shape steps' pool (when the stage has them)
    units: list[int] = field(default_factory=list)
    offset: int = 0  # units whose mel has been voiced
    pushed: int = 0  # units given to the flow stream
    stream: FlowStream | None = None
    cache: dict | None = None  # HiFT overlap: last mel frames, source and speech samples


def _fade_in_out(new: torch.Tensor, old_tail: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Cross-fade the first half-window of `new` with the withheld tail of the previous call."""
    half = window.shape[0] // 2
    new = new.clone()
    new[..., :half] = new[..., :half] * window[:half] + old_tail[..., -half:] * window[half:]
    return new


class VocoderStage:
    def __init__(self, flow: Flow, hift, cfg: VocoderConfig, noise: torch.Tensor, voices, limits: Limits = Limits(),
                 options: VocoderOptions = VocoderOptions(), device="cpu", dtype=torch.float32,
                 cuda_graphs: bool = False, write: int | None = None):
        prefer_planless_attention(device)
        self.flow = flow.to(device=device, dtype=dtype).eval()
        # cuda_graphs: a windowed incremental flow runs its encoder pass and Euler steps on fixed shapes over pools
        # of one slot per session (stages/flow_graph.py), replayed as CUDA graphs on a CUDA device. The exact flow
        # (no window) and the recompute mode have no fixed flow shape: their flow stays dynamic.
        self.graphs = None
        if cuda_graphs and options.mode == "incremental" and options.left_chunks is not None:
            self.graphs = WindowGraphs.for_flow(self.flow, limits.max_sessions, options.left_chunks, options.max_batch)
        self.hift = hift.to(device=device, dtype=dtype).eval()
        self.cfg, self.opts, self.limits = cfg, options, limits
        self.noise = noise.to(device=device, dtype=dtype)
        self.voices = voices  # name -> (192,) tensor; a VocoderDir or any object with .voice(name)
        self.device, self.dtype = torch.device(device), dtype
        self.hop = options.token_hop or cfg.token_hop
        if options.schedule == "hop" and not self._hop_fits(cfg):
            raise ConfigError(self._hop_error(cfg))
        self.look = cfg.flow.pre_lookahead_len
        self.ratio = cfg.flow.token_mel_ratio
        # cuda_graphs: HiFT on fixed shapes too (stages/hift_graph.py), for the chunk lengths of a steady stream
        # under the write schedules (`write`: the model's W units per TTS write, None: the paper's) and under hop.
        self.hift_graphs = None
        if cuda_graphs:
            W, r, held = write or StreamParams().write, self.ratio, cfg.mel_cache_len
            frames = [(r * (W - self.look), False), (r * W + held, True), (r * self.hop, False),
                      (r * self.hop + held, True)]
            self.hift_graphs = HiFTGraphs(self.hift, options.max_batch, [f for f in frames if f[0] > 0],
                                          cfg.source_cache_len)
            if self.hift_graphs.capture:
                self.hift_graphs.warm()
        # np.hamming(2 * 3840) as upstream, kept in float64 then cast like its torch.from_numpy use.
        self.window = torch.from_numpy(np.hamming(2 * cfg.source_cache_len)).to(device=device, dtype=dtype)
        self.sessions: dict[str, _Session] = {}
        self.slots = SlotPool(limits.max_sessions, "vocoder", VocoderError)

    @classmethod
    def from_checkpoint(cls, vocoder_dir, limits: Limits = Limits(), options: VocoderOptions = VocoderOptions(),
                        device="cpu", dtype=torch.float32, voices_dir: str | Path | None = None,
                        cuda_graphs: bool = False, write: int | None = None) -> VocoderStage:
        vd = vocoder_dir if isinstance(vocoder_dir, VocoderDir) else VocoderDir(vocoder_dir, voices_dir)
        return cls(load_flow(vd, device, dtype), load_hift(vd, device, dtype), vd.config, vd.noise(), vd, limits,
                   options, device, dtype, cuda_graphs, write)

    def _hop_fits(self, cfg: VocoderConfig) -> bool:
        return self.hop * cfg.flow.token_mel_ratio >= cfg.mel_cache_len

    def _hop_error(self, cfg: VocoderConfig) -> str:
        return (f"token_hop {self.hop} is too small: each call must make at least the {cfg.mel_cache_len} mel "
                "frames HiFT overlaps")

    @property
    def sample_rate(self) -> int:
        return self.cfg.sample_rate

    def open(self, session_id: str, voice: str = "default", seed: int = 0, schedule: str | None = None) -> None:
        """`schedule`: this session's (VOCODER_SCHEDULES); None = the stage's."""
        schedule = schedule or self.opts.schedule
        if session_id in self.sessions:
            raise VocoderError(f"session {session_id!r} is already open")
        if len(self.sessions) >= self.limits.max_sessions:
            raise VocoderError(f"all {self.limits.max_sessions} vocoder sessions are in use")
        if schedule not in VOCODER_SCHEDULES:
            raise VocoderError(f"vocoder schedule {schedule!r} is not one of {', '.join(VOCODER_SCHEDULES)}")
        if schedule == "hop" and not self._hop_fits(self.cfg):
            raise VocoderError(self._hop_error(self.cfg))
        spk = self.voices.voice(voice).to(self.device, self.dtype)  # unknown voice -> CheckpointError
        self.sessions[session_id] = _Session(spk, torch.Generator(device=self.device).manual_seed(seed), schedule,
                                             self.slots.take(session_id, self.sessions))

    def schedule(self, session_id: str) -> str:
        return self.sessions[session_id].schedule

    def close(self, session_id: str) -> None:
        s = self.sessions.pop(session_id, None)
        if s is not None:
            self.slots.give(s.slot)

    def cancel(self, session_id: str) -> None:
        """Drop the reply in progress (barge-in); the voice and seed stream stay."""
        s = self.sessions.get(session_id)
        if s is not None:
            self.sessions[session_id] = _Session(s.spk, s.generator, s.schedule, s.slot)

    def rng_state(self, session_id: str) -> torch.Tensor:
        """The state of the session's random generator: with it, `restore` carries the session on elsewhere."""
        return self.sessions[session_id].generator.get_state()

    def restore(self, session_id: str, rng: torch.Tensor) -> None:
        self.sessions[session_id].generator.set_state(rng)

    def synthesize(self, units: list[int], voice: str = "default", seed: int = 0) -> np.ndarray:
        """Whole-utterance token2wav through the same streaming schedule (a one-off session)."""
        if not units:
            raise VocoderError("no units to synthesize")
        sid = f"_synth{id(units)}"
        self.open(sid, voice, seed)
        try:
            return self.step([VocoderInput(sid, list(units), final=True)])[0].pcm
        finally:
            self.close(sid)

    def step(self, inputs: list[VocoderInput]) -> list[VocoderOutput]:
        """Take each session's new units and voice them: under the "hop" schedule every hop they complete
        (everything, on `final`); under the write schedules ("live", "official-live") each input in one call, as
        `process_unit_chunk` voices one TTS write (the caller decides what one input holds). The calls of all
        sessions run batched, up to `max_batch` sessions at a time (a session's second hop waits for the round
        after its first)."""
        seen: set[str] = set()
        for i, x in enumerate(inputs):  # a session's second input continues what its first leaves
            if x.session_id in seen:
                return self.step(inputs[:i]) + self.step(inputs[i:])
            seen.add(x.session_id)
        calls: list[list[tuple[_Session, int, bool]]] = []  # per input: its token2wav calls (units, finalize)
        for x in inputs:
            s = self.sessions.get(x.session_id)
            if s is None:
                raise VocoderError(f"unknown session {x.session_id!r}")
            bad = [u for u in x.units if not 0 <= u < self.cfg.flow.vocab_size]
            if bad:
                raise VocoderError(f"unit ids out of range [0, {self.cfg.flow.vocab_size}): {bad[:5]}")
            if len(s.units) + len(x.units) > self.noise.shape[2] // self.ratio:
                raise VocoderError(f"{len(s.units) + len(x.units)} units exceed the "
                                   f"{self.noise.shape[2] // self.ratio}-unit limit of the flow's fixed noise (300 s)")
        for x in inputs:
            s = self.sessions[x.session_id]
            mine = []
            if x.final and not s.units and not x.units:  # the TTS LM said nothing: a silent reply
                calls.append(mine)
                continue
            s.units.extend(int(u) for u in x.units)
            if s.schedule == "hop":
                end = s.offset
                while len(s.units) - end >= self.hop + self.look:
                    mine.append((s, end + self.hop + self.look, False))
                    end += self.hop
                if x.final:
                    mine.append((s, len(s.units), True))
            elif x.final and s.schedule == "official-live" and not (x.stopped and x.units):
                if x.units:
                    mine.append((s, len(s.units), False))  # and never a finalizing call
            elif x.final:
                mine.append((s, len(s.units), True))
            elif x.units and self._long_enough(s):
                # The mel of the last `look` units changes with the units that follow: voiced by the next call.
                mine.append((s, len(s.units), False))
            calls.append(mine)
        pieces: list[list[torch.Tensor]] = [[] for _ in inputs]
        for r in range(max((len(c) for c in calls), default=0)):
            todo = [(i, c[r]) for i, c in enumerate(calls) if r < len(c)]
            for k in range(0, len(todo), self.opts.max_batch):
                part = todo[k:k + self.opts.max_batch]
                for (i, _), pcm in zip(part, self._voice([call for _, call in part])):
                    pieces[i].append(pcm)
        # Every session's PCM comes to the host in one copy (on a GPU, one wait for the step's kernels).
        flat = [t for p in pieces for t in p]
        pcm = torch.cat(flat).float().cpu().numpy() if flat else np.zeros(0, np.float32)
        ends = np.cumsum([sum(t.shape[-1] for t in p) for p in pieces])
        out = []
        for x, begin, end in zip(inputs, [0, *ends[:-1]], ends):
            out.append(VocoderOutput(x.session_id, pcm[begin:end], x.final))
            if x.final:
                self.cancel(x.session_id)
        return out

    def _long_enough(self, s: _Session) -> bool:
        """Would a non-final call now give HiFT at least the 8 mel frames it keeps for the next call's overlap?
        A first write of fewer than 7 units would not (the official server then fails on a shape mismatch in its
        cross-fade): it waits, and the next write voices it with its own units."""
        new_frames = self.ratio * (len(s.units) - self.look - s.offset)
        held = 0 if s.cache is None else self.cfg.mel_cache_len
        return held + new_frames >= self.cfg.mel_cache_len

    @torch.inference_mode()
    def _voice(self, calls: list[tuple[_Session, int, bool]]) -> list[torch.Tensor]:
        """token2wav for several sessions (one call each) on units [0, n): new mel frames from 2*offset, then HiFT
        with the overlap caches; the offset then moves as the schedule says."""
        if self.opts.mode == "recompute":  # the official cost model: one session at a time, as upstream
            mels = []
            for s, n, finalize in calls:
                tokens = torch.tensor(s.units[:n], device=self.device)
                mel = self.flow.inference(tokens, s.spk, self.noise, finalize, self.opts.left_chunks)
                mels.append(mel[:, s.offset * self.ratio:])
        else:
            for s, n, _ in calls:
                if s.stream is None:
                    s.stream = self.flow.new_stream(s.spk, self.noise, self.opts.left_chunks, self.graphs,
                                                    s.slot if self.graphs is not None else None)
                s.stream.push(torch.tensor(s.units[s.pushed:n], device=self.device))
                s.pushed = n
            mels = self.flow.stream_step([s.stream for s, _, _ in calls], [f for _, _, f in calls])
        # HiFT, batched over the sessions whose mel (with the overlap frames it re-reads) has the same length:
        # every one in a steady stream of W-unit writes.
        mels = [mel[None] if s.cache is None else torch.cat([s.cache["mel"], mel[None]], dim=2)
                for (s, _, _), mel in zip(calls, mels)]
        speech: list[torch.Tensor | None] = [None] * len(calls)
        groups: dict[tuple[int, bool], list[int]] = {}
        for i, ((s, _, _), mel) in enumerate(zip(calls, mels)):
            if mel.shape[2] == 0:
                speech[i] = torch.zeros(0, device=self.device)
            else:
                groups.setdefault((mel.shape[2], s.cache is not None), []).append(i)
        for (_, cached), idx in groups.items():
            sessions = [calls[i][0] for i in idx]
            cache_source = torch.cat([s.cache["source"] for s in sessions]) if cached else None
            wav, source = (self.hift_graphs or self.hift).inference(
                torch.cat([mels[i] for i in idx]), cache_source, [s.generator for s in sessions],
                self.opts.deterministic)
            if cached:  # cross-fade every row with the tail its previous call withheld, at once
                wav = _fade_in_out(wav, torch.cat([s.cache["speech"] for s in sessions]), self.window)
            for row, i in enumerate(idx):
                speech[i] = self._withhold(calls[i][0], mels[i], wav[row:row + 1], source[row:row + 1],
                                           calls[i][2])
        for s, n, finalize in calls:
            if s.schedule == "hop":
                s.offset = n - self.look if not finalize else n
            elif not finalize:
                s.offset = max(s.offset, n - self.look)
        return speech

    def _withhold(self, s: _Session, mel: torch.Tensor, speech: torch.Tensor, source: torch.Tensor,
                  finalize: bool) -> torch.Tensor:
        """Withhold this call's (cross-faded) tail and keep what the next call overlaps, unless it is the last."""
        if not finalize:
            keep = self.cfg.source_cache_len
            s.cache = {"mel": mel[:, :, -self.cfg.mel_cache_len:], "source": source[:, :, -keep:],
                       "speech": speech[:, -keep:]}
            speech = speech[:, :-keep]
        return speech[0]
