"""Where one step's time goes: a TTS LM decode step and a live vocoder write, each dynamic and on fixed shapes
replayed as CUDA graphs, under torch.profiler.

    .venv/bin/python bench/profile_step.py --preset tiny
    python3 bench/profile_step.py --preset 0.5b --device cuda --root /tmp/ck   # on a GPU machine

For each: the wall time of a step (median of --iters, synchronised), the device time its kernels took, how many
kernels it launched, and the ops that cost the most host (CPU) time and device time. A step whose kernels take a
small part of its wall time is bound by the host: Python and launch overhead, which CUDA graphs remove; one whose
kernels fill it is bound by the device. On a CPU the fixed-shape steps run eagerly: what they show there is the
cost of their padding, not of graphs.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from harness import bench_dtype, preset_dirs, stage_logs, timed
from torch.profiler import ProfilerActivity, profile

from omni2.engine.checkpoints.model_dir import ModelDir
from omni2.engine.config import SERVING_LEFT_CHUNKS, Limits, SamplingParams, TTSOptions, VocoderOptions
from omni2.stages import flow_graph, hift_graph
from omni2.stages.tts import TTSInput, TTSStage
from omni2.stages.vocoder import VocoderInput, VocoderStage


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tts_step(md: ModelDir, device, dtype, sessions: int, cuda_graphs: bool = False):
    """A callable running one decode step of `sessions` sessions (each mid-chunk, EOS disabled)."""
    stage = TTSStage.from_checkpoint(md, Limits(max_sessions=sessions), TTSOptions(), device=device, dtype=dtype,
                                     cuda_graphs=cuda_graphs)
    stage.eos_id = -1
    R, H = stage.stream.read, md.config.thinker.hidden_size
    g = torch.Generator().manual_seed(0)
    for i in range(sessions):
        stage.open(f"s{i}", SamplingParams())
    stage.step([TTSInput(f"s{i}", torch.randint(0, 100, (R,), generator=g).tolist(),
                         (torch.randn(R, H, generator=g) * 0.5).to(device, dtype)) for i in range(sessions)])

    def step():
        out = stage.step()
        if out and out[-1].chunk_end:  # a chunk ended: read the next R tokens so the following step decodes
            stage.step([TTSInput(f"s{i}", torch.randint(0, 100, (R,), generator=g).tolist(),
                                 (torch.randn(R, H, generator=g) * 0.5).to(device, dtype)) for i in range(sessions)])
    return step


def vocoder_write(vocoder_dir: Path, device, dtype, sessions: int, left_chunks: int, cuda_graphs: bool = False):
    """A callable voicing one 10-unit write of each of `sessions` sessions (live schedule, window left_chunks;
    with cuda_graphs the flow's Euler steps on fixed shapes)."""
    opts = VocoderOptions(schedule="live", left_chunks=left_chunks, max_batch=max(sessions, 1))
    stage = VocoderStage.from_checkpoint(vocoder_dir, Limits(max_sessions=sessions), opts, device=device,
                                         dtype=dtype, cuda_graphs=cuda_graphs)
    rng = np.random.default_rng(0)
    for i in range(sessions):
        stage.open(f"s{i}", seed=i)

    def step():
        stage.step([VocoderInput(f"s{i}", rng.integers(0, 6561, 10).tolist()) for i in range(sessions)])
    return step


def under(event, label: str) -> bool:
    """Does a profiled op run inside a record_function(label)?"""
    parent = event.cpu_parent
    while parent is not None and parent.name != label:
        parent = parent.cpu_parent
    return parent is not None


def report(name: str, step, device: torch.device, warmup: int, iters: int, rows: int) -> None:
    wall = timed(step, device, warmup, iters)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        _sync(device)
    events = prof.key_averages()
    device_ms = sum(e.self_device_time_total for e in events) / 1e3
    kernels = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    replayed = sum(1 for e in prof.events() if e.name.startswith("aten::") and any(
        under(e, label) for label in (flow_graph.REPLAY, hift_graph.REPLAY)))
    graphed = f" ({replayed} inside what graphs replay)" if replayed else ""
    print(f"\n== {name}: wall {wall:.1f} ms per step (median of {iters}); device kernels {device_ms:.1f} ms "
          f"({100 * device_ms / wall:.0f}% of wall), {len(kernels)} kernel launches, {ops} aten ops{graphed}")
    print(events.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48))
    if device.type == "cuda":
        print(events.table(sort_by="self_device_time_total", row_limit=rows, max_name_column_width=48))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "0.5b", "7b"])
    ap.add_argument("--root", default="checkpoints", help="preset checkpoints are written (once) under ROOT/PRESET")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1], help="sessions per step")
    ap.add_argument("--left-chunks", type=int, default=SERVING_LEFT_CHUNKS,
                    help=f"the vocoder's window (default {SERVING_LEFT_CHUNKS}, the serving default)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rows", type=int, default=12, help="ops per table")
    ap.add_argument("--only", choices=["tts", "vocoder"], help="profile one stage")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    stage_logs()

    device = torch.device(args.device)
    dtype = bench_dtype(device, args.dtype)
    model_dir, vocoder_dir = preset_dirs(args.root, args.preset)
    torch.set_grad_enabled(False)
    print(f"preset {args.preset}  device {device}  dtype {str(dtype).split('.')[-1]}  "
          f"torch threads {torch.get_num_threads()}")
    fixed = "fixed shapes, CUDA graphs" if device.type == "cuda" else "fixed shapes, eager"
    for n in args.sessions:
        for graphs in (False, True):
            how = fixed if graphs else "dynamic"
            if args.only in (None, "tts"):
                report(f"TTS decode step, {n} session(s), {how}",
                       tts_step(ModelDir(model_dir), device, dtype, n, graphs), device, args.warmup, args.iters,
                       args.rows)
            if args.only in (None, "vocoder"):
                report(f"vocoder live write of 10 units, {n} session(s), window {args.left_chunks}, {how}",
                       vocoder_write(vocoder_dir, device, dtype, n, args.left_chunks, graphs), device, args.warmup,
                       args.iters, args.rows)


if __name__ == "__main__":
    main()
