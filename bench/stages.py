"""ms per ASR step and per LLM decode step, at several batch sizes, on a random-weight preset checkpoint.

    .venv/bin/python bench/stages.py --preset tiny --batch 1 8
    .venv/bin/python bench/stages.py --preset 7b --device cuda --dtype bf16 --batch 1 8 64

The checkpoint is written once into --root (default ./checkpoints) and reused. Numbers are medians over
--iters timed runs after --warmup untimed ones; decode steps run on sessions whose prompts are already
prefilled (300 speech positions + the chat template), with eos ignored so every step decodes all sessions.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from harness import timed

from omni2.engine.checkpoints.model_dir import ModelDir
from omni2.engine.checkpoints.model_writer import write_checkpoint
from omni2.engine.config import Limits
from omni2.stages.asr import ASRStage
from omni2.stages.llm import LLMStage, LLMTurn

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_asr(md: ModelDir, device, dtype, batches, warmup, iters) -> dict:
    stage = ASRStage.from_checkpoint(md, device=device, dtype=dtype)
    rng = np.random.default_rng(0)
    out = {}
    for B in batches:
        batch = [(f"s{b}", (rng.standard_normal(16000 * 5) * 0.1).astype(np.float32)) for b in range(B)]
        for sid, _ in batch:
            stage.open(sid)
        out[B] = timed(lambda batch=batch: stage.step(batch), device, warmup, iters)
        for sid, _ in batch:
            stage.close(sid)
    return out


def bench_llm(md: ModelDir, device, dtype, batches, warmup, iters) -> dict:
    H = md.config.thinker.hidden_size
    out = {}
    for B in batches:
        limits = Limits(max_sessions=B, max_context=1024, max_new_tokens=1000)
        stage = LLMStage.from_checkpoint(md, limits, device=device, dtype=dtype)
        stage.eos_ids = frozenset()  # keep every session decoding for the whole measurement
        g = torch.Generator().manual_seed(0)
        turns = []
        for b in range(B):
            stage.open(f"s{b}")
            turns.append(LLMTurn(f"s{b}", (torch.randn(300, H, generator=g) * 0.02).to(device, dtype)))
        stage.step(turns)  # prefill
        out[B] = timed(stage.step, device, warmup, iters)
        del stage
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="tiny", choices=["tiny", "0.5b", "7b"])
    ap.add_argument("--root", default="checkpoints", help="where preset checkpoints are written and reused")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--json", help="also write the numbers here")
    args = ap.parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    root = Path(args.root) / args.preset
    model_dir = root / f"omni2-{args.preset}"
    if not (model_dir / "config.json").is_file():
        print(f"writing the random {args.preset} checkpoint into {root} (once)", file=sys.stderr)
        model_dir = write_checkpoint(root, preset=args.preset)
    md = ModelDir(model_dir)
    torch.set_grad_enabled(False)

    asr = bench_asr(md, device, dtype, args.batch, args.warmup, args.iters)
    llm = bench_llm(md, device, dtype, args.batch, args.warmup, args.iters)
    threads = torch.get_num_threads()
    print(f"preset {args.preset}  device {device}  dtype {str(dtype).split('.')[-1]}  torch threads {threads}")
    print(f"{'batch':>6} {'ASR ms/step':>12} {'ASR ms/turn':>12} {'LLM ms/decode step':>19} {'LLM tok/s':>10}")
    for B in args.batch:
        print(f"{B:>6} {asr[B]:>12.1f} {asr[B] / B:>12.1f} {llm[B]:>19.2f} {B * 1e3 / llm[B]:>10.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"preset": args.preset, "device": str(device), "dtype": str(dtype),
                                               "asr_ms": asr, "llm_decode_ms": llm}, indent=1))


if __name__ == "__main__":
    main()
