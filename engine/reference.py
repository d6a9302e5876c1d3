"""The four stages composed in one process, sequentially: the ground truth for the multi-process engine.

A turn runs as LLaMA-Omni2's own loop does — ASR, then the thinker token by token; every R tokens (or the
last) the TTS LM writes a chunk of units before the thinker goes on; the vocoder turns units into PCM as
soon as its schedule allows — and yields each text delta, unit chunk and PCM chunk the moment it exists,
with a timestamp. `baseline=True` swaps in the official cost model (TTS re-prefill every chunk, flow
recomputed from the first token every vocoder call) for benchmarks; its outputs are the same.
"""
from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from omni2.engine.audio import prepare_audio
from omni2.engine.checkpoints.model_dir import ModelDir
from omni2.engine.config import Limits, SessionOptions, TTSOptions, VocoderOptions
from omni2.engine.wire.protocol import AudioDelta, Event, TextDelta, TurnDone, UnitChunk
from omni2.stages.asr import ASRStage
from omni2.stages.device import check_device
from omni2.stages.llm import LLMStage, LLMTurn
from omni2.stages.tts import TTSInput, TTSStage, UnitPieces, tts_context
from omni2.stages.vocoder import VocoderInput, VocoderStage


class ReferencePipeline:
    def __init__(self, model_dir: str | Path | ModelDir, vocoder_dir: str | Path, *, device="cpu",
                 dtype=torch.float32, limits: Limits = Limits(), tts_options: TTSOptions = TTSOptions(),
                 vocoder_options: VocoderOptions = VocoderOptions(), baseline: bool = False,
                 cuda_graphs: bool = False):
        device = check_device(str(device))
        md = model_dir if isinstance(model_dir, ModelDir) else ModelDir(model_dir)
        if baseline:
            tts_options = replace(tts_options, reprefill=True)
            vocoder_options = replace(vocoder_options, mode="recompute")
        self.limits = limits
        # What would refuse the TTS stage, refused before minutes of loading the ASR and the thinker.
        tts_context(limits, tts_options, md.config.generator.stream, md.config.generator.lm)
        self.asr = ASRStage.from_checkpoint(md, device=device, dtype=dtype)
        self.llm = LLMStage.from_checkpoint(md, limits, device=device, dtype=dtype, cuda_graphs=cuda_graphs)
        self.tts = TTSStage.from_checkpoint(md, limits, tts_options, device=device, dtype=dtype,
                                            cuda_graphs=cuda_graphs)
        self.vocoder = VocoderStage.from_checkpoint(vocoder_dir, limits, vocoder_options, device=device, dtype=dtype,
                                                    cuda_graphs=cuda_graphs, write=md.config.generator.stream.write)
        self.read = self.tts.stream.read
        self.im_end_id = md.special_ids().im_end_id
        self.sessions: dict[str, SessionOptions] = {}

    @property
    def sample_rate(self) -> int:
        return self.vocoder.sample_rate

    def open(self, session_id: str, options: SessionOptions = SessionOptions()) -> None:
        llm_sampling, tts_sampling = options.seeded()
        self.vocoder.open(session_id, options.voice, seed=options.vocoder_seed,  # checks the voice first
                          schedule=options.vocoder_schedule)
        self.asr.open(session_id)
        self.llm.open(session_id, llm_sampling)
        self.tts.open(session_id, tts_sampling)
        self.sessions[session_id] = options

    def close(self, session_id: str) -> None:
        for stage in (self.asr, self.llm, self.tts, self.vocoder):
            stage.close(session_id)
        self.sessions.pop(session_id, None)

    def turn(self, session_id: str, audio: np.ndarray, sample_rate: int = 16000) -> Iterator[Event]:
        """One user turn: audio in, events out (text deltas, unit chunks, audio deltas, then TurnDone)."""
        opts = self.sessions.get(session_id)
        if opts is None:
            raise KeyError(f"unknown session {session_id!r}")
        audio = prepare_audio(audio, sample_rate, max_seconds=self.limits.max_audio_seconds)
        clock = _Clock()
        mark = clock.mark

        (_, speech), = self.asr.step([(session_id, audio)])
        mark("t_asr")
        token_ids: list[int] = []
        units: list[int] = []
        text: list[str] = []
        reason = "stop"
        pieces = UnitPieces(self.tts.stream.write)
        pending = self.llm.step([LLMTurn(session_id, speech, opts.max_new_tokens)])
        while pending:
            tok = pending[0]
            token_ids.append(tok.token_id)
            text.append(tok.text)
            if tok.text:
                yield TextDelta(session_id, tok.text, tok.token_id, time.perf_counter())
            if len(token_ids) == self.read or tok.finished:
                mark("t_llm")
            yield from self._speak(session_id, TTSInput(session_id, [tok.token_id], tok.hidden[None], tok.finished),
                                   units, pieces, mark, stopped=tok.token_id == self.im_end_id)
            if tok.finished:
                reason = tok.finish_reason
                break
            pending = self.llm.step()
        mark("total")
        yield TurnDone(session_id, "".join(text), token_ids, units, reason, clock.timings, time.perf_counter())

    def _speak(self, session_id: str, text_in: TTSInput, units: list[int], pieces: UnitPieces,
               mark, stopped: bool) -> Iterator[Event]:
        """Let the TTS LM write every chunk this token completes, and the vocoder voice it by its schedule: the
        "live" one each piece as it is cut (runtime/runners.TtsRunner cuts identically), the others whole writes.
        `stopped`: this token is `<|im_end|>` (VocoderInput.stopped, for the reply's last input)."""
        live = self.vocoder.schedule(session_id) == "live"
        out = self.tts.step([text_in])
        while out:
            for t in out:
                cut = pieces.push(t)
                if cut is None:
                    continue
                piece, write = cut
                units.extend(piece)
                if write is not None:
                    yield UnitChunk(session_id, write, t.done, time.perf_counter())
                if live:
                    yield from self._voice(session_id, piece, t.done, mark, stopped)
                elif write is not None:
                    yield from self._voice(session_id, write, t.done, mark, stopped)
            out = self.tts.step()

    def _voice(self, session_id: str, units: list[int], final: bool, mark, stopped: bool) -> Iterator[Event]:
        before = time.perf_counter()
        for o in self.vocoder.step([VocoderInput(session_id, units, final, stopped)]):
            if o.pcm.size:
                mark("t_tts", before)  # the units that made this audio were complete when the vocoder began
                mark("first_audio")
            if o.pcm.size or o.final:
                yield AudioDelta(session_id, o.pcm, self.sample_rate, o.final, time.perf_counter())


class _Clock:
    """Seconds since the turn was submitted, recorded once per key."""

    def __init__(self):
        self.t0, self.timings = time.perf_counter(), {}

    def mark(self, key: str, at: float | None = None) -> None:
        self.timings.setdefault(key, (time.perf_counter() if at is None else at) - self.t0)
