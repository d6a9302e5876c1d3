"""`omni2-engine` command line: one argparse subcommand per verb.

Each subcommand is a pair `_add_<verb>(subparsers)` (declares its options and sets `func`) and `_run_<verb>(args)`
(returns the exit status). Heavy imports happen inside `_run_*`, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .config import CheckpointError, ConfigError


# -- make-checkpoint -------------------------------------------------------------------------------------------
def _add_make_checkpoint(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("make-checkpoint", help="write random-weight model + vocoder directories in the official layout",
                       description="Write OUT/omni2-<preset>/ (config.json, sharded safetensors, tokenizers) and "
                                   "OUT/cosy2_decoder/ (cosyvoice.yaml, flow.pt, hift.pt, voices/) with random "
                                   "weights, in the official LLaMA-Omni2 layout.")
    p.add_argument("--preset", choices=("tiny", "0.5b", "7b"), default="tiny")
    p.add_argument("--out", required=True, help="directory to write omni2-<preset>/ and cosy2_decoder/ into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="tensor dtype (default: fp32 for tiny, bf16 otherwise)")
    p.set_defaults(func=_run_make_checkpoint)


def _run_make_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import write_checkpoint
    from .vocoder_ckpt import write_vocoder_checkpoint

    print(write_checkpoint(args.out, preset=args.preset, seed=args.seed, dtype=args.dtype))
    print(write_vocoder_checkpoint(args.out, preset=args.preset, seed=args.seed))  # always fp32, as released
    return 0


# -- voice -------------------------------------------------------------------------------------------------------
_VOCODER_DIR_DEFAULT = "models/cosy2_decoder"  # where the official scripts expect it


def _add_voice(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("voice", help="list or add speaker voices (stored 192-d x-vectors)",
                       description="Voices are speaker x-vectors stored as VOCODER_DIR/voices/<name>.npy (or in "
                                   "--voices-dir); the vocoder conditions on the selected one.")
    verbs = p.add_subparsers(dest="voice_command", required=True, metavar="VERB")
    add = verbs.add_parser("add", help="store a voice from a prompt wav (needs omni2-engine[voice]) or an embedding")
    add.add_argument("name", help="voice name: letters, digits, '_' or '-'")
    src = add.add_mutually_exclusive_group(required=True)
    src.add_argument("--wav", help="prompt audio of the speaker (any rate; x-vector via the dir's campplus.onnx)")
    src.add_argument("--embedding", help="a .npy file holding a (192,) or (1, 192) float x-vector")
    add.add_argument("--force", action="store_true", help="overwrite an existing voice of that name")
    lst = verbs.add_parser("list", help="list the stored voices")
    for q in (add, lst):
        q.add_argument("--vocoder-dir", default=_VOCODER_DIR_DEFAULT,
                       help=f"the cosy2_decoder directory (default: {_VOCODER_DIR_DEFAULT})")
        q.add_argument("--voices-dir", default=None, help="an extra voice store (searched first, written to)")
    add.set_defaults(func=_run_voice_add)
    lst.set_defaults(func=_run_voice_list)


def _run_voice_add(args: argparse.Namespace) -> int:
    from .vocoder_ckpt import VocoderDir

    vd = VocoderDir(args.vocoder_dir, voices_dir=args.voices_dir)
    if args.wav is not None:
        from .voice import enroll_wav

        embedding = enroll_wav(args.wav, vd.campplus_path())
    else:
        import numpy as np

        try:
            embedding = np.load(args.embedding, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read an embedding from {args.embedding}: {e}") from e
    print(vd.add_voice(args.name, embedding, overwrite=args.force))
    return 0


def _run_voice_list(args: argparse.Namespace) -> int:
    from .vocoder_ckpt import VocoderDir

    vd = VocoderDir(args.vocoder_dir, voices_dir=args.voices_dir)
    for name in vd.voices():
        print(f"{name}\t{vd.voice_file(name)}")
    return 0


# -- other subcommands (serve, generate, chat) register here -----------------------------------------------------


def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="answer one spoken question in one process (the reference pipeline)",
                       description="Speech in, text + speech out: ASR -> LLM -> TTS -> vocoder, sequentially.")
    p.add_argument("--model-dir", required=True, help="official LLaMA-Omni2 model directory (or a random one)")
    p.add_argument("--vocoder-dir", required=True, help="cosy2_decoder directory")
    p.add_argument("--wav", required=True, help="the question (any sample rate; mono or stereo)")
    p.add_argument("--out", required=True, help="reply WAV to write (24 kHz)")
    p.add_argument("--json", help="also write text, token_ids, units and timings here")
    p.add_argument("--greedy", action="store_true", help="greedy TTS too (the thinker is greedy by default)")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (TTS sampling, HiFT source)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on reply text tokens (default 256)")
    p.add_argument("--voice", default="default", help="speaker voice name (see `omni2-engine voice list`)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.set_defaults(func=_run_generate)


def _run_generate(args: argparse.Namespace) -> int:
    from omni2.engine import generate

    return generate.main(args)


_SUBCOMMANDS = (_add_make_checkpoint, _add_voice, _add_generate)


def build_parser() -> argparse.ArgumentParser:
    """The full `omni2-engine` parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="omni2-engine", description="Streaming LLaMA-Omni2 inference engine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in _SUBCOMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `omni2-engine` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        # Bad input, not a bug: one line instead of a traceback.
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
