"""Per-chunk cost of the TTS LM and the vocoder as a reply grows: ours vs the official algorithm.

    .venv/bin/python bench/tts_vocoder.py --preset tiny --chunks 30
    .venv/bin/python bench/tts_vocoder.py --preset 0.5b --chunks 30 --device cuda

TTS: one chunk = read R thinker tokens, write W units (EOS disabled so every chunk writes all W). Ours appends
the chunk to a kept KV cache; the baseline (`TTSOptions(reprefill=True)`) re-prefills the whole history, as
LLMSpeechGenerator.generate_units does. Vocoder: one chunk = the 10 units a TTS chunk writes, voiced as the live
schedule does (one token2wav per write); ours keeps the flow's completed chunks, the baseline reruns the flow from
unit 0 (token2wav). Prints ms per chunk for chunks 1..N; ours must stay flat. With --memory it also prints the
flow state a session holds after each second of audio, exact and windowed (`--left-chunks K`). With
--sessions 1 4 8 it prints the vocoder's throughput instead: audio seconds voiced per wall second when N sessions
each send a 10-unit write every step, for each --max-batch (VocoderOptions.max_batch; default 16 vs 1: batched vs
voiced one by one), and with --cuda-graphs on the fixed-shape steps a GPU replays:

    python3 bench/tts_vocoder.py --preset 0.5b --device cuda --sessions 1 16 64 --max-batch 64 16 1 --cuda-graphs
On a CPU shared with other work, run it with OMP_NUM_THREADS=1: torch's spinning worker threads make small ops
erratic (10-100x) on a busy 2-core machine.
"""
from __future__ import annotations

import argparse
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch
from harness import bench_dtype, preset_dirs, stage_logs

from omni2.engine.checkpoints.model_dir import ModelDir
from omni2.engine.config import Limits, SamplingParams, TTSOptions, VocoderOptions
from omni2.stages.tts import TTSInput, TTSStage
from omni2.stages.vocoder import VocoderInput, VocoderStage


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def tts_chunks(md: ModelDir, opts: TTSOptions, n_chunks: int, device, dtype) -> list[float]:
    stage = TTSStage.from_checkpoint(md, Limits(max_sessions=1), opts, device=device, dtype=dtype)
    stage.eos_id = -1  # never stop early: every chunk writes its full W units
    stage.open("s", SamplingParams())
    R, H = stage.stream.read, md.config.thinker.hidden_size
    g = torch.Generator().manual_seed(0)
    times = []
    for _ in range(n_chunks):
        ids = torch.randint(0, 100, (R,), generator=g).tolist()
        h = (torch.randn(R, H, generator=g) * 0.5).to(device, dtype)
        _sync(device)
        t0 = time.perf_counter()
        out = stage.step([TTSInput("s", ids, h)])
        while not out[-1].chunk_end:
            out = stage.step()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def vocoder_chunks(vocoder_dir: Path, mode: str, n_chunks: int, device, dtype,
                   left_chunks: int | None = None) -> tuple[list[float], list[int]]:
    """ms per 10-unit write, and the session's flow state in bytes after each (0 in recompute mode)."""
    opts = VocoderOptions(schedule="live", mode=mode, left_chunks=left_chunks)
    stage = VocoderStage.from_checkpoint(vocoder_dir, Limits(max_sessions=1), opts, device=device, dtype=dtype)
    stage.open("s")
    units = np.random.default_rng(0).integers(0, 6561, 10 * n_chunks).tolist()
    times, state = [], []
    for c in range(n_chunks):
        _sync(device)
        t0 = time.perf_counter()
        stage.step([VocoderInput("s", units[10 * c: 10 * c + 10])])
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        stream = stage.sessions["s"].stream
        state.append(stream.cache_bytes() if stream is not None else 0)
    return times, state


def throughput_stage(vocoder_dir: Path, max_sessions: int, max_batch: int, device, dtype, left_chunks: int | None,
                     cuda_graphs: bool) -> VocoderStage:
    """A live-schedule vocoder for up to `max_sessions` sessions, batching `max_batch` of them per step (with
    cuda_graphs: its buckets captured as it loads, which is why one stage serves every session count)."""
    opts = VocoderOptions(schedule="live", left_chunks=left_chunks, max_batch=max_batch)
    return VocoderStage.from_checkpoint(vocoder_dir, Limits(max_sessions=max_sessions), opts, device=device,
                                        dtype=dtype, cuda_graphs=cuda_graphs)


def vocoder_throughput(stage: VocoderStage, sessions: int, writes: int, device) -> float:
    """Audio seconds out per wall second: `sessions` sessions, each a 10-unit write per step, for `writes` steps
    (the first step, the sessions' shortest call, is left out of the timing); the sessions are closed after."""
    rng = np.random.default_rng(0)
    ids = [f"s{i}" for i in range(sessions)]
    for i, sid in enumerate(ids):
        stage.open(sid, seed=i)
    units = [rng.integers(0, 6561, 10 * writes).tolist() for _ in ids]
    samples, t0 = 0, 0.0
    try:
        for w in range(writes):
            if w == 1:
                _sync(device)
                t0, samples = time.perf_counter(), 0
            outs = stage.step([VocoderInput(sid, units[i][10 * w: 10 * w + 10]) for i, sid in enumerate(ids)])
            samples += sum(o.pcm.size for o in outs)
        _sync(device)
        return samples / stage.sample_rate / (time.perf_counter() - t0)
    finally:
        for sid in ids:
            stage.close(sid)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "0.5b", "7b"])
    ap.add_argument("--root", default="checkpoints")
    ap.add_argument("--chunks", type=int, default=30)
    ap.add_argument("--voc-chunks", type=int, default=None, help="vocoder chunks (default --chunks); the official "
                    "recompute at real CosyVoice2 dims takes minutes per late chunk on a CPU")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=["fp32", "bf16"])
    ap.add_argument("--json", help="also write the numbers here")
    ap.add_argument("--memory", action="store_true", help="only the vocoder's flow state per session: exact (and "
                    "--left-chunks K) as the reply grows, in MB per second of audio")
    ap.add_argument("--left-chunks", type=int, default=2, help="window of the windowed flow (default 2)")
    ap.add_argument("--sessions", type=int, nargs="+", help="only the vocoder's throughput at these session counts, "
                    "for each --max-batch (--writes writes each, window --left-chunks)")
    ap.add_argument("--max-batch", type=int, nargs="+", default=[16, 1], metavar="M",
                    help="with --sessions: sessions voiced in one step, each value a stage of its own (default 16 1: "
                    "batched vs one by one)")
    ap.add_argument("--writes", type=int, default=12, help="with --sessions: 10-unit writes per session (default 12)")
    ap.add_argument("--cuda-graphs", action="store_true", help="with --sessions: the vocoder's fixed-shape flow and "
                    "HiFT (CUDA graphs on a GPU; needs the window)")
    args = ap.parse_args(argv)
    if args.sessions and args.writes < 2:
        ap.error("--writes must be at least 2 (the first write is left out of the timing)")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    stage_logs()

    device = torch.device(args.device)
    dtype = bench_dtype(device, args.dtype)
    model_dir, vocoder_dir = preset_dirs(args.root, args.preset)
    md = ModelDir(model_dir)
    torch.set_grad_enabled(False)
    if args.sessions:
        rows: dict[int, dict[str, float]] = {n: {} for n in args.sessions}
        print(f"preset {args.preset}: vocoder audio seconds per wall second (and per session: x real time), live "
              f"schedule, window k={args.left_chunks}, {args.writes} writes of 10 units per session, cuda graphs "
              f"{'on' if args.cuda_graphs else 'off'}, torch threads {torch.get_num_threads()}", flush=True)
        for m in args.max_batch:  # each max_batch loads (and captures) once; a killed run keeps the rows printed
            t0 = time.perf_counter()
            stage = throughput_stage(vocoder_dir, max(args.sessions), m, device, dtype, args.left_chunks,
                                     args.cuda_graphs)
            print(f"max_batch {m}: loaded in {time.perf_counter() - t0:.1f} s", flush=True)
            for n in args.sessions:
                x = rows[n][str(m)] = vocoder_throughput(stage, n, args.writes, device)
                print(f"{n:>3} sessions, max_batch {m:>3}: {x:8.2f} audio s per s, x{x / n:.2f} real time per "
                      "session", flush=True)
                if args.json:
                    Path(args.json).write_text(json.dumps({"preset": args.preset, "cuda_graphs": args.cuda_graphs,
                                                           "writes": args.writes, "throughput": rows}, indent=1))
            # The buckets and their graphs hold each other: only the collector frees the pools (GBs at 64 slots)
            # before the next max_batch allocates its own.
            del stage
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        return
    if args.memory:
        n = args.voc_chunks or args.chunks
        rows = {f"exact {str(dtype).split('.')[-1]}": vocoder_chunks(vocoder_dir, "incremental", n, device, dtype),
                f"window k={args.left_chunks}": vocoder_chunks(vocoder_dir, "incremental", n, device, dtype,
                                                               args.left_chunks)}
        print(f"preset {args.preset}: flow state per session (MB) after each 10-unit write (0.4 s of audio), "
              f"and ms per write")
        for name, (times, state) in rows.items():
            marks = [c for c in (24, 99, 249) if c < n]  # after 10 s, 40 s, 100 s of audio
            at = ", ".join(f"{(c + 1) * 0.4:.0f} s: {state[c] / 1e6:.0f} MB" for c in marks)
            print(f"{name:>14}: {at}; {state[-1] / 1e6 / ((n) * 0.4):.1f} MB/s at the end; ms per write: "
                  f"first 3 median {np.median(times[:3]):.1f}, last 3 median {np.median(times[-3:]):.1f}")
        if args.json:
            Path(args.json).write_text(json.dumps({"preset": args.preset, **{k: {"ms": t, "bytes": b}
                                                                           for k, (t, b) in rows.items()}}))
        return

    res = {
        "tts_ours": tts_chunks(md, TTSOptions(), args.chunks, device, dtype),
        "tts_official": tts_chunks(md, TTSOptions(reprefill=True), args.chunks, device, dtype),
        "voc_ours": vocoder_chunks(vocoder_dir, "incremental", args.voc_chunks or args.chunks, device, dtype)[0],
        "voc_official": vocoder_chunks(vocoder_dir, "recompute", args.voc_chunks or args.chunks, device, dtype)[0],
    }
    print(f"preset {args.preset}  device {device}  dtype {str(dtype).split('.')[-1]}  "
          f"torch threads {torch.get_num_threads()}  (ms per chunk)")
    print(f"{'chunk':>5} {'TTS ours':>9} {'TTS official':>13} {'voc ours':>9} {'voc official':>13}")
    cell = lambda k, c: f"{res[k][c]:.1f}" if c < len(res[k]) else "-"  # noqa: E731
    for c in range(args.chunks):
        print(f"{c + 1:>5} {cell('tts_ours', c):>9} {cell('tts_official', c):>13} "
              f"{cell('voc_ours', c):>9} {cell('voc_official', c):>13}")
    for k, v in res.items():
        first, last = np.median(v[1:4]), np.median(v[-3:])
        print(f"{k:>13}: chunks 2-4 median {first:.1f} ms, last 3 median {last:.1f} ms, growth x{last / first:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "device": str(device), **res}, indent=1))


if __name__ == "__main__":
    main()
