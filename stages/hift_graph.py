"""HiFT over a vocoder step's chunks on fixed shapes, replayed as CUDA graphs.

A vocoder step runs HiFT once per group of sessions whose mel chunks (with the overlap frames they re-read) have the
same length: ~3,300-4,800 small ops (the f0 predictor, the sine source, the source's STFT, 3 upsampling stages of
resblocks with Snake activations), whose launches cost a GPU more host time than its kernels. Unlike the flow, the
shapes are already fixed in a steady stream: under the live schedule every chunk after the first is 2 W + 8 frames
and every first one 2 W - 6, so no padding of frames is needed and a replay computes exactly what the dynamic call
does on the same rows. Only the rows are padded, to a power of two up to max_batch (padding rows voice silence
and are dropped).

What stays outside a graph: the randomness (each session's phases and noise are drawn from its own generator, in
upstream's order, into the bucket's buffers) and the iSTFT head (torch.istft checks its window envelope on the
host). A chunk length that was not warmed runs the dynamic call.
"""
from __future__ import annotations

import torch

from omni2.stages.decode_graph import GraphedRun, bucket, buckets, capturing, in_parts, logged_captures
from omni2.stages.hift import HiFT

REPLAY = "hift_graph.replay"  # the profiler label of a replay (bench/profile_step.py counts its ops)


class _Voice(GraphedRun):
    """One (rows, frames, cached) bucket: its inputs (mel, the drawn phases and noise, the cached source tail),
    overwritten by a call, and its outputs (the iSTFT head's input and the source)."""

    def __init__(self, hift: HiFT, rows: int, frames: int, cache_samples: int):
        c, w = hift.cfg, hift.conv_pre.weight_v
        H1, L = c.nb_harmonics + 1, frames * c.samples_per_frame
        self.hift = hift
        self.mel = torch.zeros(rows, c.in_channels, frames, device=w.device)
        self.phases = torch.zeros(rows, H1, 1, device=w.device)
        self.noise = torch.zeros(rows, H1, L, device=w.device)
        self.cache_source = torch.zeros(rows, 1, cache_samples, device=w.device, dtype=w.dtype) if cache_samples \
            else None
        self.spectrum: torch.Tensor | None = None
        self.source: torch.Tensor | None = None

    def run(self) -> None:
        self.spectrum, self.source = self.hift.excited_spectrum(self.mel, self.phases, self.noise, self.cache_source)


class HiFTGraphs:
    """`hift.inference` over a batch of sessions' chunks on fixed shapes: one bucket per row count (powers of two up
    to max_batch) and chunk length in `frames` ((frames, cached) pairs: a cached chunk's first `cache_samples`
    source samples come from the previous one); CUDA graphs on a CUDA device unless `capture=False`."""

    def __init__(self, hift: HiFT, max_batch: int, frames: list[tuple[int, bool]], cache_samples: int,
                 capture: bool | None = None):
        device = hift.conv_pre.weight_v.device
        self.hift, self.max_batch, self.cache_samples = hift, max_batch, cache_samples
        self.frames = sorted(set(frames))
        self.capture, self.graph_pool = capturing(device, capture, "HiFT")
        self.voices: dict[tuple[int, int, bool], _Voice] = {}

    def shapes(self) -> list[tuple[int, int, bool]]:
        return [(r, T, cached) for r in buckets(1, self.max_batch) for T, cached in self.frames]

    @torch.inference_mode()
    def warm(self) -> int:
        """Prepare every bucket now (capture its graph, on CUDA; elsewhere run it once). Returns how many."""
        with logged_captures("HiFT", self.voices, self.capture):
            for shape in self.shapes():
                voice = self._prepare(shape)
                if not self.capture:
                    voice.run()
        return len(self.voices)

    def _prepare(self, shape: tuple[int, int, bool]) -> _Voice:
        voice = self.voices.get(shape)
        if voice is None:
            rows, frames, cached = shape
            voice = self.voices[shape] = _Voice(self.hift, rows, frames, self.cache_samples if cached else 0)
            if self.capture:
                voice.capture(self.graph_pool)
        return voice

    @torch.inference_mode()
    def inference(self, mel: torch.Tensor, cache_source: torch.Tensor | None, generators: list[torch.Generator],
                  deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """`HiFT.inference(mel, cache_source, generators, deterministic)`: the same draws from each generator and
        the same speech and source, from a bucket when its length has one (else the dynamic call)."""
        B, _, T = mel.shape
        cached = cache_source is not None and cache_source.shape[-1] > 0
        if cached and cache_source.shape[-1] != self.cache_samples or (T, cached) not in self.frames:
            return self.hift.inference(mel, cache_source, generators, deterministic)
        if B > self.max_batch:
            parts = in_parts(lambda *rows: self.inference(*rows, deterministic), self.max_batch, mel, cache_source,
                             generators)
            return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        voice = self._prepare((bucket(B, 1, self.max_batch), T, cached))
        phases, noise = self.hift.draw(mel, generators, deterministic)
        voice.mel[:B].copy_(mel)
        voice.phases[:B].copy_(phases)
        voice.noise[:B].copy_(noise)
        if cached:
            voice.cache_source[:B].copy_(cache_source)
        with torch.profiler.record_function(REPLAY):
            voice.replay()
        return self.hift.istft_head(voice.spectrum[:B]), voice.source[:B].clone()
