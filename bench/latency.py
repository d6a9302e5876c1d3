"""Time to first audio and throughput: the pipelined engine vs the official algorithm, on one checkpoint, one run.

    .venv/bin/python bench/latency.py --preset tiny --sessions 1 4 8
    .venv/bin/python bench/latency.py --preset 0.5b --sessions 1 --turns 1
    .venv/bin/python bench/latency.py --preset 7b --placement cuda --dtype bfloat16 --sessions 1 16 64

Three systems answer the same spoken question with the same seed:
  baseline   engine/reference.py with baseline=True: one process, stages in turn, the official cost model
             (TTS re-prefill every chunk, flow recomputed from unit 0 every vocoder call)
  reference  engine/reference.py: one process, stages in turn, our incremental TTS and flow
  engine     engine/runtime/: four worker processes, pipelined, N concurrent sessions
For each: the latency terms of DESIGN.md (t_asr, t_llm, t_tts, first_audio, total; seconds after the turn was
submitted) and, for the engine, the real-time factor per session (audio seconds out / wall seconds). Writes
JSON (and a PNG with --png). The replies are checked to be the same across the three systems.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from omni2.engine.checkpoints.model_writer import write_checkpoint
from omni2.engine.checkpoints.vocoder_writer import write_vocoder_checkpoint
from omni2.engine.cli.generate import run_turn, session_options
from omni2.engine.config import VOCODER_SCHEDULES, EngineConfig, Limits, VocoderOptions
from omni2.engine.reference import ReferencePipeline
from omni2.engine.runtime import Engine
from omni2.engine.wire.protocol import AudioDelta, ErrorEvent, TurnDone

KEYS = ("t_asr", "t_llm", "t_tts", "first_audio", "total")


def question(seconds: float, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(int(16000 * seconds)) * 0.1).astype(np.float32)


def single_process(model_dir, vocoder_dir, baseline: bool, args, limits) -> dict:
    import torch

    dtype = getattr(torch, args.dtype)
    device = "cuda" if args.placement != "cpu" else "cpu"
    voc = VocoderOptions(schedule="hop" if baseline else args.vocoder_schedule)
    pipe = ReferencePipeline(model_dir, vocoder_dir, device=device, dtype=dtype, limits=limits, baseline=baseline,
                             vocoder_options=voc)
    run_turn(pipe, question(args.seconds, 99), 16000, session_options(seed=99))  # warm-up, not recorded
    runs = []
    for i in range(args.turns):
        r = run_turn(pipe, question(args.seconds, i), 16000, session_options(seed=i))
        runs.append({"timings": r.timings, "units": r.units, "tokens": r.token_ids,
                     "audio_s": r.pcm.size / r.sample_rate})
    return {"runs": runs}


def engine_runs(model_dir, vocoder_dir, args, limits) -> dict:
    cfg = EngineConfig(str(model_dir), str(vocoder_dir), placement=args.placement, dtype=args.dtype, limits=limits,
                       vocoder_options=VocoderOptions(schedule=args.vocoder_schedule))
    out = {}
    with Engine(cfg) as eng:
        eng.open("warm-up", session_options(seed=99))  # first calls pay lazy initialisation: not recorded
        list(eng.turn("warm-up", question(args.seconds, 99), timeout=args.timeout))
        eng.close("warm-up")
        for n in args.sessions:
            runs = []
            for turn in range(args.turns):
                sids = [f"b{n}-{turn}-{k}" for k in range(n)]
                for k, sid in enumerate(sids):
                    eng.open(sid, session_options(seed=turn if k == 0 else 1000 + k))
                t0 = time.perf_counter()
                for k, sid in enumerate(sids):
                    eng.submit(sid, question(args.seconds, turn if k == 0 else 1000 + k))
                for k, sid in enumerate(sids):
                    audio_s, done = 0.0, None
                    for ev in eng.events(sid, timeout=args.timeout):
                        if isinstance(ev, AudioDelta):
                            audio_s += ev.pcm.size / ev.sample_rate
                        elif isinstance(ev, (TurnDone, ErrorEvent)):
                            done = ev
                    if not isinstance(done, TurnDone):
                        raise RuntimeError(f"engine turn failed: {done}")
                    wall = time.perf_counter() - t0
                    runs.append({"timings": done.timings, "units": done.units, "tokens": done.token_ids,
                                 "audio_s": audio_s, "rtf": audio_s / max(done.timings["total"], 1e-9),
                                 "first": k == 0, "wall": wall})
                for sid in sids:
                    eng.close(sid)
            out[str(n)] = {"runs": runs}
            print(f"engine, {n} sessions: " + summary(runs), file=sys.stderr)
    return out


def summary(runs: list[dict]) -> str:
    parts = [f"{k} {statistics.median(r['timings'].get(k, float('nan')) for r in runs) * 1e3:.0f} ms" for k in KEYS]
    if "rtf" in runs[0]:
        parts.append(f"audio/wall per session {min(r['rtf'] for r in runs):.2f}x (worst)")
    return ", ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=("tiny", "0.5b", "7b"))
    ap.add_argument("--ckpt-root", default=None, help="reuse checkpoints written here (default: a temp dir)")
    ap.add_argument("--sessions", type=int, nargs="+", default=[1])
    ap.add_argument("--turns", type=int, default=2, help="turns per measurement (seeds 0..turns-1)")
    ap.add_argument("--seconds", type=float, default=2.0, help="length of each spoken question")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--placement", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--timeout", type=float, default=600.0)
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--vocoder-schedule", default="live", choices=VOCODER_SCHEDULES,
                    help="when the vocoder voices (the baseline keeps the official offline hop of 50)")
    ap.add_argument("--out", default=None, help="JSON file (default bench/results/latency-<preset>.json)")
    ap.add_argument("--png", action="store_true", help="also plot the latency terms (needs matplotlib)")
    args = ap.parse_args()

    root = Path(args.ckpt_root or tempfile.mkdtemp(prefix="omni2-bench-"))
    model_dir, vocoder_dir = root / f"omni2-{args.preset}", root / "cosy2_decoder"
    if not model_dir.is_dir():
        print(f"writing a random {args.preset} checkpoint to {root} ...", file=sys.stderr)
        write_checkpoint(root, args.preset, seed=0)
    if not vocoder_dir.is_dir():
        write_vocoder_checkpoint(root, args.preset, seed=0)
    limits = Limits(max_sessions=max(args.sessions), max_new_tokens=args.max_new_tokens)

    result = {"preset": args.preset, "placement": args.placement, "dtype": args.dtype, "seconds": args.seconds,
              "max_new_tokens": args.max_new_tokens, "vocoder_schedule": args.vocoder_schedule, "systems": {}}
    for name, baseline in ((("baseline", True),) if not args.skip_baseline else ()) + (("reference", False),):
        result["systems"][name] = single_process(model_dir, vocoder_dir, baseline, args, limits)
        print(f"{name}: " + summary(result["systems"][name]["runs"]), file=sys.stderr)
    result["systems"]["engine"] = engine_runs(model_dir, vocoder_dir, args, limits)

    # Same seed, same reply: the first session of each engine turn against the single-process runs.
    ref_runs = result["systems"]["reference"]["runs"]
    for n, res in result["systems"]["engine"].items():
        firsts = [r for r in res["runs"] if r["first"]]
        same = all(a["units"] == b["units"] and a["tokens"] == b["tokens"] for a, b in zip(firsts, ref_runs))
        res["same_as_reference"] = same
        print(f"engine ({n} sessions) replies equal the reference: {same}", file=sys.stderr)

    out = Path(args.out or Path(__file__).parent / "results" / f"latency-{args.preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}", file=sys.stderr)
    if args.png:
        plot(result, out.with_suffix(".png"))
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(name, s["runs"]) for name, s in result["systems"].items() if name != "engine"]
    rows += [(f"engine x{n}", s["runs"]) for n, s in result["systems"]["engine"].items()]
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    for i, (_, runs) in enumerate(rows):
        for k in KEYS[:-1]:
            ms = statistics.median(r["timings"].get(k, float("nan")) for r in runs) * 1e3
            ax.plot(ms, i, "o", label=k if i == 0 else None)
    ax.set_yticks(range(len(rows)), [r[0] for r in rows])
    ax.set_xlabel("ms after the end of the question")
    ax.set_title(f"latency terms, {result['preset']} on {result['placement']} ({result['dtype']})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
