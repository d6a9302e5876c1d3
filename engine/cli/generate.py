"""`omni2-engine generate`: one spoken question in, the reply's text, units and audio out, in one process.

Runs engine/reference.py (the ground truth pipeline), prints the text as it streams and writes the reply
WAV (24 kHz) and, optionally, reply.json with `text`, `token_ids`, `units` and per-stage timings.
"""
from __future__ import annotations

import sys
from dataclasses import replace

import numpy as np

from omni2.engine.audio import read_wav
from omni2.engine.cli.main import vocoder_options
from omni2.engine.cli.reply import Reply
from omni2.engine.config import Limits, SamplingParams, SessionOptions, default_worker_threads
from omni2.engine.reference import ReferencePipeline
from omni2.engine.wire.protocol import AudioDelta, TextDelta, TurnDone
from omni2.stages.llm import LLMError
from omni2.stages.tts import TTSError
from omni2.stages.vocoder import VocoderError


def session_options(seed: int = 0, greedy: bool = False, voice: str = "default",
                    max_new_tokens: int | None = None) -> SessionOptions:
    """The CLI's sampling choices: the official defaults (greedy thinker, sampled TTS) or all-greedy."""
    opts = SessionOptions(voice=voice, seed=seed, max_new_tokens=max_new_tokens)
    if greedy:
        opts = replace(opts, tts_sampling=SamplingParams())
    return opts


def run_turn(pipe: ReferencePipeline, audio: np.ndarray, sample_rate: int, options: SessionOptions,
             on_text=None) -> Reply:
    sid = "generate"
    pipe.open(sid, options)
    try:
        pcm, done = [], None
        for ev in pipe.turn(sid, audio, sample_rate):
            if isinstance(ev, TextDelta) and on_text is not None:
                on_text(ev.text)
            elif isinstance(ev, AudioDelta):
                pcm.append(ev.pcm)
            elif isinstance(ev, TurnDone):
                done = ev
    finally:
        pipe.close(sid)
    audio_out = np.concatenate(pcm) if pcm else np.zeros(0, np.float32)
    return Reply(done.text, done.token_ids, done.units, audio_out, pipe.sample_rate, done.finish_reason,
                 done.timings)


def main(args) -> int:
    """Entry for the CLI subcommand (argparse namespace from cli/main.py)."""
    import torch

    before = torch.get_num_threads()  # callable in process (tests): leave the caller's count as it was
    torch.set_num_threads(args.threads or default_worker_threads())
    try:
        return _generate(args)
    except (LLMError, TTSError, VocoderError) as e:  # a limit the reply met (the context, say): no traceback
        print(f"omni2-engine generate: error: {e}", file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(before)


def _generate(args) -> int:
    samples, sr = read_wav(args.wav)  # first: a missing or unreadable question fails before seconds of loading
    limits = Limits(max_sessions=1, max_new_tokens=args.max_new_tokens or Limits.max_new_tokens,
                    max_context=args.max_context or Limits.max_context)
    print(f"loading {args.model_dir} and {args.vocoder_dir} ...", file=sys.stderr)
    pipe = ReferencePipeline(args.model_dir, args.vocoder_dir, device=args.device, limits=limits,
                             vocoder_options=vocoder_options(args), cuda_graphs=args.cuda_graphs)
    opts = session_options(args.seed, args.greedy, args.voice, args.max_new_tokens)
    reply = run_turn(pipe, samples, sr, opts, on_text=lambda t: print(t, end="", flush=True))
    print()
    reply.save(args.out, args.json)
    return 0
