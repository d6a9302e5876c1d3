"""Time to first audio, and the rest of a reply, under realistic load: the engine through its daemon and client,
beside the official algorithm on the same turns, in one run.

    .venv/bin/python bench/latency.py --quick                        # tiny, CPU, R=3 x W=5,10, 1 and 4 sessions
    .venv/bin/python bench/latency.py --read 1 3 5 --write 5 10 20   # the R/W trade-off (9 daemons)
    .venv/bin/python bench/latency.py --schedule live hop:50 --mode streaming offline --seconds 1 4
    .venv/bin/python bench/latency.py --preset 0.5b --concurrency 1 4 --turns 1 --seconds 1
    .venv/bin/python bench/latency.py --preset 7b --placement cuda --dtype bfloat16 --concurrency 1 8 32 64
    .venv/bin/python bench/latency.py --connect tcp://127.0.0.1:5555 --model-dir M --vocoder-dir V --concurrency 8

Sweeps multiply: every (R, W, vocoder schedule, streaming|offline) is a daemon of its own (R/W are the model's
config.json, so each R/W gets a model directory that differs only there), and within it every question length
and concurrency level is a cell. In a cell N sessions arrive (Poisson or staggered, bench/latency_load.py), each
speaking --turns questions and listening to the replies.

Systems, all on the same checkpoint and the same sessions' seeds and questions:
  engine     the daemon (bench/latency_daemon.py runs serve/daemon.py) through the asyncio client: the wire counts
  reference  engine/reference.py in this process: our algorithm, one stage after another, one turn at a time
  baseline   engine/reference.py with baseline=True: the official cost model (TTS re-prefill every chunk, flow
             recomputed from unit 0 every call), voiced on the official schedule (--baseline-schedule)
The single-process systems answer each script alone; under load they are queued first come, first served (the
official server's one model answers one request at a time), so every engine figure has a baseline and a ratio.

Out (--out DIR): latency.json (schema: bench/README.md), a console table, and three PNGs: the first-audio
breakdown per system and configuration, first audio p50/p95 against concurrency, and first audio against W.
The engine's replies (text token ids and units) must equal the reference's: the table says whether they do.
"""
from __future__ import annotations

import argparse
import datetime
import itertools
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from latency_daemon import DaemonSpec, bench_daemon
from latency_load import QUESTION_RATE, TERMS, Load, drive, fifo, question, question_seed, turn_record
from latency_schema import SCHEMA_ID, validate
from tqdm import tqdm

from omni2.engine.config import SERVING_LEFT_CHUNKS, STAGES, StreamParams, default_worker_threads, parse_left_chunks
from omni2.engine.wire.protocol import AudioDelta, TurnDone

RESULTS = Path(__file__).parent / "results"
# Seeds whose replies stay short on the random tiny preset (R=3, W=5 and 10): a random TTS LM seldom says EOS, so
# some seeds flush 1,000 units after the text: minutes of baseline vocoder work on a CPU, which a sweep of
# first-audio latency need not spend. Other presets or R/W may want others (--seeds).
DEFAULT_SEEDS = (28, 26)
# --quick: the whole sweep machinery (two daemons, both single-process systems, two loads) in ~3 CPU minutes.
QUICK = {"preset": "tiny", "read": [3], "write": [5, 10], "schedule": ["live"], "mode": ["streaming"],
         "seconds": [1.0], "concurrency": [1, 4], "turns": 2, "rate": 4.0, "max_new_tokens": 8}
FULL = {"preset": "tiny", "read": None, "write": None, "schedule": ["live"], "mode": ["streaming"],
        "seconds": [2.0], "concurrency": [1], "turns": 2, "rate": 2.0, "max_new_tokens": 16}


@dataclass(frozen=True)
class Config:
    """One daemon of the sweep and one question length: a row group of the table."""

    read: int
    write: int
    schedule: str  # live | official-live | hop
    token_hop: int | None
    mode: str  # streaming | offline
    question_s: float

    @property
    def schedule_name(self) -> str:
        return self.schedule if self.schedule != "hop" else f"hop {self.token_hop or 50}"

    @property
    def name(self) -> str:
        return f"R{self.read}W{self.write} {self.schedule_name} {self.mode} q{self.question_s:g}s"

    def baseline_schedule(self, choice: str) -> tuple[str, int | None]:
        """The official schedule that matches ours: the live server voices every write (official-live); the
        offline script every 50 units (hop)."""
        if choice == "match":
            return ("official-live", None) if self.schedule != "hop" else ("hop", self.token_hop)
        return parse_schedule(choice)


def parse_schedule(s: str) -> tuple[str, int | None]:
    name, _, hop = s.partition(":")
    if name not in ("live", "official-live", "hop") or (hop and (name != "hop" or not hop.isdigit() or int(hop) < 1)):
        raise argparse.ArgumentTypeError(f"schedule {s!r} is not live, official-live, hop or hop:N")
    return name, int(hop) if hop else None


# --------------------------------------------------------------------------------------------- checkpoints


def checkpoints(args) -> tuple[Path, Path, Path | None]:
    """(model_dir, vocoder_dir, a temp root to delete at the end or None)."""
    if args.model_dir:
        return Path(args.model_dir), Path(args.vocoder_dir), None
    from omni2.engine.checkpoints.model_writer import write_checkpoint
    from omni2.engine.checkpoints.vocoder_writer import write_vocoder_checkpoint

    temp = args.ckpt_root is None
    root = Path(args.ckpt_root or tempfile.mkdtemp(prefix="omni2-bench-"))
    model_dir, vocoder_dir = root / f"omni2-{args.preset}", root / "cosy2_decoder"
    if not (model_dir / "config.json").is_file():
        print(f"writing a random {args.preset} checkpoint to {root} ...", file=sys.stderr)
        write_checkpoint(root, args.preset, seed=0)
    if not vocoder_dir.is_dir():
        write_vocoder_checkpoint(root, args.preset, seed=0)
    return model_dir, vocoder_dir, root if temp else None


def with_stream(model_dir: Path, read: int, write: int, root: Path) -> Path:
    """The model directory, or a twin of it whose config.json says Read-R-Write-W (the weights are links)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    if StreamParams.parse(cfg.get("stream_params")) == StreamParams(read, write):
        return model_dir
    twin = root / f"{model_dir.name}-r{read}w{write}"
    if twin.exists():
        shutil.rmtree(twin)
    twin.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (twin / f.name).symlink_to(f.resolve())
    cfg["stream_params"] = StreamParams(read, write).to_str()
    (twin / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return twin


# ------------------------------------------------------------------------------------- single-process systems


def single_process(model_dir: Path, vocoder_dir: Path, cfg: Config, baseline: bool, args, bar) -> list[dict]:
    """Each script's turns, one after another, in one session per script: a turn_record each."""
    import torch

    from omni2.engine.config import Limits, TTSOptions, VocoderOptions
    from omni2.engine.reference import ReferencePipeline

    schedule, hop = cfg.baseline_schedule(args.baseline_schedule) if baseline else (cfg.schedule, cfg.token_hop)
    pipe = ReferencePipeline(model_dir, vocoder_dir, device="cpu" if args.placement == "cpu" else "cuda",
                             dtype=getattr(torch, args.dtype), baseline=baseline,
                             cuda_graphs=args.cuda_graphs and not baseline,
                             limits=Limits(max_sessions=1, max_new_tokens=args.max_new_tokens),
                             tts_options=TTSOptions(offline=cfg.mode == "offline"),
                             vocoder_options=VocoderOptions(schedule=schedule, token_hop=hop,
                                                            left_chunks=None if baseline else args.vocoder_left_chunks))
    first = args.seeds[0]  # a short reply: the first turn pays lazy initialisation, and is not recorded
    _answer(pipe, first, [question(cfg.question_s, question_seed(first, 0))])
    out = []
    for seed in args.seeds:
        questions = [question(cfg.question_s, question_seed(seed, t)) for t in range(args.turns)]
        for turn, rec in enumerate(_answer(pipe, seed, questions, bar)):
            out.append(dict(rec, seed=seed, turn=turn))
    del pipe
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the daemon that follows wants the memory
    return out


def _answer(pipe, seed: int, questions: list[np.ndarray], bar=None) -> list[dict]:
    from omni2.engine.cli.generate import session_options

    pipe.open("bench", session_options(seed=seed))
    recs = []
    try:
        for audio in questions:
            t0, chunks, done = time.perf_counter(), [], None
            for ev in pipe.turn("bench", audio, QUESTION_RATE):
                if isinstance(ev, AudioDelta) and ev.pcm.size:
                    chunks.append((ev.t - t0, ev.pcm.size / ev.sample_rate))
                elif isinstance(ev, TurnDone):
                    done = ev
            end = time.perf_counter() - t0
            recs.append(turn_record(done.timings, chunks, end, done.token_ids, done.units, done.finish_reason))
            if bar is not None:
                bar.update()
    finally:
        pipe.close("bench")
    return recs


# ------------------------------------------------------------------------------------------------ summaries


def pct(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


def summarize(turns: list[dict]) -> dict:
    out = {}
    for k in TERMS:
        out[f"{k}_p50"], out[f"{k}_p95"] = pct([t[k] for t in turns], 50), pct([t[k] for t in turns], 95)
    rtfs = [t["rtf"] for t in turns if t["rtf"] is not None]
    out.update(rtf_p50=pct(rtfs, 50), rtf_max=max(rtfs, default=None), audio_s=sum(t["audio_s"] for t in turns),
               stalls=sum(t["stalls"] for t in turns), stall_s=sum(t["stall_s"] for t in turns),
               turns_stalled=sum(t["stalls"] > 0 for t in turns), turns=len(turns))
    return out


def per_session(turns: list[dict]) -> list[dict]:
    out = []
    for k, group in itertools.groupby(sorted(turns, key=lambda t: t["session"]), key=lambda t: t["session"]):
        g = list(group)
        audio = sum(t["audio_s"] for t in g)
        streaming = sum(t["end"] - t["first_audio"] for t in g)
        out.append({"session": k, "seed": g[0]["seed"], "turns": len(g), "audio_s": audio,
                    "rtf": streaming / audio if audio else None, "stalls": sum(t["stalls"] for t in g),
                    "stall_s": sum(t["stall_s"] for t in g)})
    return out


def ratio(base: float | None, ours: float | None) -> float | None:
    return base / ours if base and ours else None


def cell_result(cfg_single: dict, load: Load, turns: list[dict], stages: dict) -> dict:
    """A cell's JSON: our turns, the queued single-process systems' summaries, ratios and the equality check."""
    ours = summarize(turns)
    cell = {"concurrency": load.concurrency, "arrivals": load.arrivals, "rate": load.rate, "turns": turns,
            "sessions": per_session(turns), "stages": stages, "summary": ours, "queued": {}, "ratio": {}}
    for name, recs in cfg_single.items():
        measured = {(r["seed"], r["turn"]): r for r in recs}
        q = fifo(load, measured)
        cell["queued"][name] = {"summary": summarize(q), "wait_s_p50": pct([r["wait_s"] for r in q], 50),
                                "wait_s_max": max(r["wait_s"] for r in q)}
    if "baseline" in cell["queued"]:
        b = cell["queued"]["baseline"]["summary"]
        cell["ratio"] = {key: ratio(b[key], ours[key]) for key in ("first_audio_p50", "first_audio_p95", "end_p50")}
    truth_name = "reference" if "reference" in cfg_single else "baseline" if "baseline" in cfg_single else None
    if truth_name is None:
        cell["same_as_reference"], cell["mismatches"] = None, []
    else:
        truth = {(r["seed"], r["turn"]): r["reply"] for r in cfg_single[truth_name]}
        bad = [[t["session"], t["turn"]] for t in turns if truth[(t["seed"], t["turn"])] != t["reply"]]
        cell["same_as_reference"], cell["mismatches"] = not bad, bad
    return cell


# ---------------------------------------------------------------------------------------------------- table


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x * 1e3:.0f}"


def table(doc: dict) -> str:
    head = (f"{'configuration':<32} {'N':>3} {'t_asr':>6} {'t_llm':>6} {'t_tts':>6} {'first audio p50/p95':>20} "
            f"{'baseline p50/p95':>17} {'x p50':>6} {'end p50':>8} {'rtf':>5} {'stalls':>9} "
            f"{'batch asr/llm/tts/voc':>22} {'same':>5}")
    lines = ["ms after the end of the question; ours through the daemon's client; baseline = the official cost "
             "model, one request at a time; x = baseline / ours", head, "-" * len(head)]
    for c in doc["configs"]:
        alone = {n: summarize(recs) for n, recs in c["single"].items()}
        for name, s in alone.items():
            lines.append(f"{c['name']:<32} {'1':>3} {ms(s['t_asr_p50']):>6} {ms(s['t_llm_p50']):>6} "
                         f"{ms(s['t_tts_p50']):>6} {ms(s['first_audio_p50']) + '/' + ms(s['first_audio_p95']):>20} "
                         f"{'(' + name + ', alone)':>17} {'':>6} {ms(s['end_p50']):>8} "
                         f"{_num(s['rtf_p50']):>5} {_stalls(s):>9} {'':>22} {'':>5}")
        for cell in c["cells"]:
            s, b = cell["summary"], cell["queued"].get("baseline", {}).get("summary", {})
            batches = "/".join(_num(cell["stages"].get(st, {}).get("batch_mean"), 1) for st in STAGES)
            lines.append(f"{c['name']:<32} {cell['concurrency']:>3} {ms(s['t_asr_p50']):>6} {ms(s['t_llm_p50']):>6} "
                         f"{ms(s['t_tts_p50']):>6} {ms(s['first_audio_p50']) + '/' + ms(s['first_audio_p95']):>20} "
                         f"{ms(b.get('first_audio_p50')) + '/' + ms(b.get('first_audio_p95')):>17} "
                         f"{_num(cell['ratio'].get('first_audio_p50')):>6} {ms(s['end_p50']):>8} "
                         f"{_num(s['rtf_p50']):>5} {_stalls(s):>9} {batches:>22} "
                         f"{str(cell['same_as_reference']).lower():>5}")
    return "\n".join(lines)


def _num(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _stalls(s: dict) -> str:
    return f"{s['stalls']}/{s['stall_s']:.1f}s"


# ------------------------------------------------------------------------------------------------------ main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="the small sweep `make bench` runs (tiny, CPU, ~3 min); "
                                                         "other flags still override its choices")
    ap.add_argument("--preset", choices=("tiny", "0.5b", "7b"), help="random checkpoint to write (default tiny)")
    ap.add_argument("--ckpt-root", help="write/reuse the preset's checkpoints here (default: a temp dir, removed)")
    ap.add_argument("--model-dir", help="a model directory instead of a preset (with --vocoder-dir)")
    ap.add_argument("--vocoder-dir")
    ap.add_argument("--connect", help="measure a daemon already running at this address (one configuration: "
                                      "describe it with --read/--write/--schedule/--mode for the baseline)")
    ap.add_argument("--token", default="", help="the --connect daemon's access token")
    ap.add_argument("--read", type=int, nargs="+", help="R values (default: the model's)")
    ap.add_argument("--write", type=int, nargs="+", help="W values (default: the model's)")
    ap.add_argument("--schedule", nargs="+", help="vocoder schedules: live, official-live, hop, hop:N (default live)")
    ap.add_argument("--baseline-schedule", default="match",
                    help="the baseline's vocoder schedule: match (official-live for live, the same hop for hop), "
                         "or one schedule for all")
    ap.add_argument("--mode", nargs="+", choices=("streaming", "offline"),
                    help="offline: the TTS reads the whole reply before writing (the paper's non-streaming case)")
    ap.add_argument("--seconds", type=float, nargs="+", help="question lengths, seconds")
    ap.add_argument("--concurrency", type=int, nargs="+", help="sessions per cell")
    ap.add_argument("--arrivals", choices=("poisson", "staggered"), default="poisson")
    ap.add_argument("--rate", type=float, help="sessions arriving per second")
    ap.add_argument("--turns", type=int, help="questions per session")
    ap.add_argument("--gap", type=float, default=0.5, help="seconds a user thinks after hearing a reply out")
    ap.add_argument("--no-listen", dest="listen", action="store_false",
                    help="the next question follows the reply's last byte, not the end of its playback")
    ap.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                    help="one per distinct script (session k follows seeds[k %% len]); seeds set sampling and "
                         "questions")
    ap.add_argument("--max-new-tokens", type=int)
    ap.add_argument("--placement", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    ap.add_argument("--threads", type=int, help="torch threads per worker, and in this process (default: every "
                                                "core, as serve)")
    ap.add_argument("--vocoder-left-chunks", type=parse_left_chunks, default=SERVING_LEFT_CHUNKS, metavar="K|all",
                    help=f"the flow's window for ours, engine and reference (default {SERVING_LEFT_CHUNKS}, as serve); "
                         "all = the exact official flow. The baseline is always exact")
    ap.add_argument("--vocoder-batch", type=int, metavar="N", help="sessions the daemon's vocoder voices in one "
                    "step (serve --vocoder-batch; default serve's)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="ours (daemon and reference) replay the LLM's and TTS LM's decode steps and the "
                         "vocoder's flow encoder, Euler steps and HiFT as CUDA graphs")
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds without an event before a turn fails")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--skip-reference", action="store_true", help="check replies against the baseline instead")
    ap.add_argument("--out", help="results folder (default bench/results/latency-<preset, model dir name or "
                                  "connect>[-quick])")
    ap.add_argument("--no-png", dest="png", action="store_false")
    args = ap.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if (args.model_dir is None) != (args.vocoder_dir is None):
        ap.error("give both --model-dir and --vocoder-dir, or neither (a --preset)")
    if args.connect and not args.model_dir and (args.skip_baseline is False or args.skip_reference is False) \
            and args.ckpt_root is None:
        ap.error("--connect needs the daemon's --model-dir/--vocoder-dir (or --ckpt-root of its preset) for the "
                 "single-process systems, or --skip-baseline --skip-reference")
    if args.vocoder_batch is not None and args.vocoder_batch < 1:
        ap.error(f"--vocoder-batch must be at least 1, got {args.vocoder_batch}")
    args.schedules = [parse_schedule(s) for s in args.schedule]
    return args


def configs(args, model_read: int, model_write: int) -> list[Config]:
    reads, writes = args.read or [model_read], args.write or [model_write]
    return [Config(r, w, s, hop, m, q) for r, w, (s, hop), m, q in
            itertools.product(reads, writes, args.schedules, args.mode, args.seconds)]


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {"hostname": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpu": cpu, "cpu_count": os.cpu_count(), "memory_gb": round(mem, 1) if mem else None}


def device(args) -> dict:
    import torch

    cuda = args.placement != "cpu" and torch.cuda.is_available()
    return {"placement": args.placement, "dtype": args.dtype, "cuda_graphs": args.cuda_graphs,
            "name": torch.cuda.get_device_name(0) if cuda else "cpu", "cuda": torch.version.cuda if cuda else None}


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    started, t_start = datetime.datetime.now(datetime.timezone.utc), time.monotonic()
    # A given model directory is no preset: its results must not land in (and overwrite) the preset's.
    name = Path(args.model_dir).name if args.model_dir else ("connect" if args.connect and not args.ckpt_root
                                                             else args.preset)
    out = Path(args.out or RESULTS / f"latency-{name}{'-quick' if args.quick else ''}")
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or default_worker_threads()
    torch.set_num_threads(threads)  # as the workers: equal replies need equal reduction orders
    have_model = not args.connect or args.model_dir or args.ckpt_root
    model_dir, vocoder_dir, temp_root = checkpoints(args) if have_model else (None, None, None)
    stream = (StreamParams.parse(json.loads((model_dir / "config.json").read_text()).get("stream_params"))
              if model_dir else StreamParams())
    plan = configs(args, stream.read, stream.write)
    daemons = sorted({(c.read, c.write, c.schedule, c.token_hop or 0, c.mode) for c in plan})  # hop None: 0
    if args.connect and len(daemons) > 1:
        raise SystemExit("--connect measures one daemon: give one value each of --read/--write/--schedule/--mode")
    systems = [n for n, skip in (("baseline", args.skip_baseline), ("reference", args.skip_reference)) if not skip]
    if not have_model:
        systems = []
    twins = Path(tempfile.mkdtemp(prefix="omni2-bench-rw-"))
    doc = {"schema": SCHEMA_ID, "command": [sys.executable, *sys.argv] if argv is None else ["latency.py", *argv],
           "started": started.isoformat(timespec="seconds"), "wall_s": None, "machine": machine(),
           "device": device(args), "torch": torch.__version__,
           "settings": {"preset": None if args.model_dir else args.preset,
                        "model_dir": str(model_dir) if model_dir else None,
                        "vocoder_dir": str(vocoder_dir) if vocoder_dir else None, "connect": args.connect,
                        "threads": threads,
                        "max_new_tokens": args.max_new_tokens, "turns": args.turns, "seeds": list(args.seeds),
                        "arrivals": args.arrivals, "rate": args.rate, "gap_s": args.gap, "listen": args.listen,
                        "baseline_schedule": args.baseline_schedule, "systems": ["engine", *systems],
                        "vocoder_batch": args.vocoder_batch},
           "configs": []}
    path = out / "latency.json"
    # A run stopped by a time limit (bench/gpu.sh gives each step one) still stops its daemon, and keeps the cells
    # it measured: SIGTERM unwinds like Ctrl-C, and latency.json holds every finished cell as it goes.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    per_cell = sum(n * args.turns for n in args.concurrency)
    total = len(plan) * (len(systems) * len(args.seeds) * args.turns + per_cell)
    bar = tqdm(total=total, unit="turn", desc="latency", dynamic_ncols=True)
    try:
        for r, w, schedule, hop, mode in daemons:
            group = [c for c in plan if (c.read, c.write, c.schedule, c.token_hop or 0, c.mode) == (r, w, schedule,
                                                                                               hop, mode)]
            variant = with_stream(model_dir, r, w, twins) if model_dir else None
            results = []
            for cfg in group:
                single = {}
                for name in systems:
                    bar.set_postfix_str(f"{cfg.name}: {name}")
                    single[name] = single_process(variant, vocoder_dir, cfg, name == "baseline", args, bar)
                results.append((cfg, single))
            daemon = None
            if args.connect:
                address = args.connect
            else:
                bar.set_postfix_str(f"R{r}W{w} {schedule} {mode}: starting the daemon")
                spec = DaemonSpec(str(variant), str(vocoder_dir), placement=args.placement, dtype=args.dtype,
                                  threads=threads, max_sessions=max(args.concurrency),
                                  max_new_tokens=args.max_new_tokens, schedule=schedule, token_hop=hop or None,
                                  left_chunks=args.vocoder_left_chunks, offline=mode == "offline",
                                  cuda_graphs=args.cuda_graphs, vocoder_batch=args.vocoder_batch)
                daemon = bench_daemon(spec, out / "logs" / f"daemon-r{r}w{w}-{schedule}{hop or ''}-{mode}.log")
                address = daemon.start()
            try:
                warm = Load(1, 1, (args.seeds[0],), group[0].question_s, listen=False, timeout_s=args.timeout,
                            max_new_tokens=args.max_new_tokens)
                drive(address, warm, args.token)  # lazy initialisation in every worker: not recorded
                for cfg, single in results:
                    entry = {"name": cfg.name, "read": cfg.read, "write": cfg.write, "schedule": cfg.schedule,
                             "token_hop": cfg.token_hop, "mode": cfg.mode, "question_s": cfg.question_s,
                             "baseline_schedule": " ".join(str(x) for x in cfg.baseline_schedule(
                                 args.baseline_schedule) if x is not None),
                             "single": single, "cells": []}
                    if len(single) == 2:
                        entry["baseline_same_as_reference"] = all(
                            a["reply"] == b["reply"] for a, b in zip(single["baseline"], single["reference"]))
                    for n in args.concurrency:
                        bar.set_postfix_str(f"{cfg.name}: engine x{n}")
                        load = Load(n, args.turns, tuple(args.seeds), cfg.question_s, args.arrivals, args.rate,
                                    args.gap, args.listen, args.timeout, args.max_new_tokens)
                        turns, stages = drive(address, load, args.token, on_turn=bar.update)
                        entry["cells"].append(cell_result(single, load, turns, stages))
                        path.write_text(json.dumps({**doc, "configs": [*doc["configs"], entry]}, indent=1) + "\n")
                    doc["configs"].append(entry)
            finally:
                if daemon is not None:
                    daemon.stop()
    finally:
        bar.close()
        shutil.rmtree(twins, ignore_errors=True)
        if temp_root is not None:
            shutil.rmtree(temp_root, ignore_errors=True)
    doc["wall_s"] = round(time.monotonic() - t_start, 1)
    problems = validate(doc)
    path.write_text(json.dumps(doc, indent=1) + "\n")
    print(table(doc))
    print(f"wrote {path}", file=sys.stderr)
    if args.png:
        from latency_plots import plot_all

        for p in plot_all(doc, out):
            print(f"wrote {p}", file=sys.stderr)
    if problems:
        print("the JSON does not match its schema:\n  " + "\n  ".join(problems), file=sys.stderr)
        return 1
    same = [c.get("same_as_reference") for cfg in doc["configs"] for c in cfg["cells"]]
    if False in same:
        print("the engine's replies differ from the reference's (see mismatches in the JSON)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
