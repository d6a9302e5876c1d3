"""The Triton kernels against their torch references: achieved bandwidth, and ms per TTS decode step.

    .venv/bin/python bench/kernels.py                                   # CPU: reference ms only
    .venv/bin/python bench/kernels.py --device cuda --batch 1 8 64      # GPU: GB/s and % of HBM peak too
    TRITON_INTERPRET=1 .venv/bin/python bench/kernels.py --layers 2     # CPU, kernels interpreted (slow)

The 0.5b and 7b presets share one TTS LM (Qwen2.5-0.5B: hidden 896, 158227-row head), so the kernel shapes are
the same for both: gate fusion N = 3 rows (one R=3 chunk) per session with D = 896; FSQ decode H = 896 against
the 6561 unit rows + EOS. GB/s counts the bytes an op must move at least (weights once, inputs, outputs, the fp32
logits scratch written and read back) over its median time; % of peak uses the table below. The decode step is a
whole TTSStage.step of B sessions (random-weight TTS LM, sessions mid-chunk): the official full-vocab head and
sampling, and the units-only head (kernels/fsq_decode.py) through the references and through the kernels.
"""
from __future__ import annotations

import argparse
import dataclasses

import torch
from harness import timed

from omni2.engine.checkpoints.model_writer import PRESETS
from omni2.engine.checkpoints.vocab import N_QWEN_SPECIAL, N_UNITS
from omni2.engine.config import OFFICIAL_SAMPLING, Limits, SamplingParams, TTSOptions
from omni2.kernels import dispatch
from omni2.kernels.fsq_decode import candidate_ids, fsq_decode_ref, fsq_decode_triton, head_logits_triton
from omni2.kernels.gate_fusion import gate_fusion_ref, gate_fusion_triton
from omni2.stages.layers import Qwen2LM
from omni2.stages.tts import SpeechGenerator, TTSInput, TTSStage

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Peak HBM bandwidth, bytes/s, by a substring of torch.cuda.get_device_name() (first match wins).
HBM_PEAK = [("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100", 3.35e12)]


def hbm_peak(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in HBM_PEAK if key in name), None)


def timed_ms(fn, device: torch.device, warmup: int, iters: int, cold_l2: bool = True) -> float:
    """Median ms of fn(). Kernels on CUDA: triton's do_bench (CUDA events, L2 flushed before each run, so the
    weights come from HBM as in a real decode step, where the LM's layers evict them); otherwise wall-clock
    around a synchronised call."""
    if device.type == "cuda" and cold_l2 and dispatch.HAS_TRITON:
        from triton.testing import do_bench
        return do_bench(fn, warmup=25, rep=100, return_mode="median")
    return timed(fn, device, warmup, iters)


def kernels_runnable(device: torch.device) -> bool:
    return dispatch.HAS_TRITON and (device.type == "cuda" or dispatch.INTERPRET)


def fmt_bw(nbytes: int, ms: float | None, peak: float | None) -> str:
    if ms is None or peak is None:
        return f"{'n/a':>9} {'n/a':>7}"
    bw = nbytes / (ms * 1e-3)
    return f"{bw / 1e9:>9.0f} {100 * bw / peak:>6.0f}%"


def fmt_ms(ms: float | None) -> str:
    return f"{'n/a':>10}" if ms is None else f"{ms:>10.3f}"


def bench_ops(device, dtype, batches, warmup, iters, peak) -> None:
    D = H = 896
    vocab = PRESETS["0.5b"].tts.vocab_size
    v0 = PRESETS["0.5b"].text_vocab_size
    unit0, eos = v0 + N_QWEN_SPECIAL + 1, v0
    g = torch.Generator().manual_seed(0)
    head = (torch.randn(vocab, H, generator=g) * 0.02).to(device, dtype)
    W, b = (torch.randn(D, 2 * D, generator=g) * 0.02).to(device, dtype), torch.zeros(D, device=device, dtype=dtype)
    ids = candidate_ids(vocab, unit0, N_UNITS, eos, False, device)
    es = head.element_size()
    run_k = kernels_runnable(device)
    print(f"{'op':<22} {'batch':>5} {'bytes':>10} {'ref ms':>10} {'triton ms':>10} {'GB/s':>9} {'%peak':>7}")
    for B in batches:
        N = 3 * B
        r, e = (torch.randn(N, D, generator=g).to(device, dtype) for _ in range(2))
        nbytes = (D * 2 * D + D + 3 * N * D) * es
        ref = timed_ms(lambda r=r, e=e: gate_fusion_ref(r, e, W, b), device, warmup, iters)
        tri = timed_ms(lambda r=r, e=e: gate_fusion_triton(r, e, W, b), device, warmup, iters) if run_k else None
        print(f"{'gate_fusion D=896':<22} {B:>5} {nbytes:>10} {fmt_ms(ref)} {fmt_ms(tri)} {fmt_bw(nbytes, tri, peak)}")

        h = (torch.randn(B, H, generator=g)).to(device, dtype)
        n = ids.numel()
        logit_bytes = n * H * es + B * H * es + B * n * 4
        tri = timed_ms(lambda h=h: head_logits_triton(h, head, ids), device, warmup, iters) if run_k else None
        print(f"{'fsq head GEMV':<22} {B:>5} {logit_bytes:>10} {fmt_ms(None)} {fmt_ms(tri)} "
              f"{fmt_bw(logit_bytes, tri, peak)}")
        args = (torch.ones(B, device=device), torch.full((B,), 50, device=device), torch.ones(B, device=device),
                torch.arange(B, device=device), torch.zeros(B, dtype=torch.long, device=device))
        nbytes = logit_bytes + B * n * 4 + B * 5 * 8
        ref = timed_ms(lambda h=h, a=args: fsq_decode_ref(h, head, unit0, N_UNITS, eos, *a), device, warmup, iters)
        tri = timed_ms(lambda h=h, a=args: fsq_decode_triton(h, head, unit0, N_UNITS, eos, *a), device, warmup,
                       iters) if run_k else None
        print(f"{'fsq_decode (top_k 50)':<22} {B:>5} {nbytes:>10} {fmt_ms(ref)} {fmt_ms(tri)} "
              f"{fmt_bw(nbytes, tri, peak)}")


def decode_step_ms(lm, gen, device, dtype, B, units_only, kernels, warmup, iters) -> float | None:
    """ms of one TTSStage.step over B sessions that are mid-chunk (one new position each)."""
    if kernels and not kernels_runnable(device):
        return None
    v0 = PRESETS["0.5b"].text_vocab_size
    stage = TTSStage(lm, gen, sep_id=v0 + N_QWEN_SPECIAL, eos_id=v0, unit0=v0 + N_QWEN_SPECIAL + 1, n_units=N_UNITS,
                     limits=Limits(max_sessions=B), options=TTSOptions(units_only=units_only,
                                                                       max_context=warmup + iters + 16),
                     device=device, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    H_thinker = gen.input_proj[0].in_features
    inputs = []
    for i in range(B):
        stage.open(f"s{i}", SamplingParams(OFFICIAL_SAMPLING.temperature, OFFICIAL_SAMPLING.top_k,
                                           OFFICIAL_SAMPLING.top_p, seed=i))
        inputs.append(TTSInput(f"s{i}", [11, 12, 13], torch.randn(3, H_thinker, generator=g).to(device, dtype)))
    prev = dispatch.FORCE_TRITON, dispatch.FORCE_REFERENCE
    dispatch.FORCE_TRITON, dispatch.FORCE_REFERENCE = kernels and device.type != "cuda", not kernels
    try:
        with torch.inference_mode():
            stage.step(inputs)  # the chunk's prefill

            def step():
                stage.step()
                for s in stage.sessions.values():  # keep every session writing (no chunk end, no EOS stop)
                    s.budget = 1 << 30
            step()
            return timed_ms(step, device, warmup, iters, cold_l2=False)
    finally:
        dispatch.FORCE_TRITON, dispatch.FORCE_REFERENCE = prev


def bench_decode(device, dtype, batches, layers, warmup, iters) -> None:
    p = PRESETS["0.5b"]
    cfg = dataclasses.replace(p.tts, num_hidden_layers=layers or p.tts.num_hidden_layers)
    with torch.device("meta"):
        lm, gen = Qwen2LM(cfg), SpeechGenerator(p.thinker.hidden_size, cfg.hidden_size)
    lm, gen = lm.to_empty(device=device).to(dtype), gen.to_empty(device=device).to(dtype)
    with torch.no_grad():
        for t in list(lm.parameters()) + list(gen.parameters()):
            t.normal_(0.0, 0.02)
        for name, t in lm.named_parameters():
            if name.endswith("norm.weight"):
                t.fill_(1.0)
    print(f"\nTTS decode step, ms (TTS LM: {cfg.num_hidden_layers} layers x {cfg.hidden_size}, "
          f"{cfg.vocab_size}-row head; top_k 50, temperature 1)")
    print(f"{'batch':>5} {'full-vocab ref':>15} {'full-vocab kern':>16} {'units ref':>10} {'units kern':>11}")
    for B in batches:
        cols = [decode_step_ms(lm, gen, device, dtype, B, u, k, warmup, iters)
                for u, k in ((False, False), (False, True), (True, False), (True, True))]
        print(f"{B:>5} " + " ".join(f"{'n/a' if c is None else f'{c:.2f}':>{w}}"
                                    for c, w in zip(cols, (15, 16, 10, 11))))


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, choices=list(DTYPES), help="default: fp32 on cpu, bf16 on cuda")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 64])
    ap.add_argument("--layers", type=int, default=0, help="TTS LM layers for the decode step (default: all 24)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--skip-decode", action="store_true", help="kernel-level numbers only")
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    peak = hbm_peak(device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    where = "interpreter" if dispatch.INTERPRET else ("compiled" if device.type == "cuda" else "n/a")
    print(f"device {name}  dtype {str(dtype).split('.')[-1]}  HBM peak "
          f"{'n/a' if peak is None else f'{peak / 1e12:.2f} TB/s'}  triton {where}  torch threads "
          f"{torch.get_num_threads()}")
    torch.set_grad_enabled(False)
    bench_ops(device, dtype, args.batch, args.warmup, args.iters, peak)
    if not args.skip_decode:
        bench_decode(device, dtype, args.batch, args.layers, args.warmup, args.iters)


if __name__ == "__main__":
    main()
