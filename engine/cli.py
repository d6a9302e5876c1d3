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
    p = sub.add_parser("make-checkpoint", help="write a random-weight model directory in the official layout",
                       description="Write OUT/omni2-<preset>/ (config.json, sharded safetensors, tokenizers) with "
                                   "random weights, in the official LLaMA-Omni2 layout.")
    p.add_argument("--preset", choices=("tiny", "0.5b", "7b"), default="tiny")
    p.add_argument("--out", required=True, help="directory to write omni2-<preset>/ into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None,
                   help="tensor dtype (default: fp32 for tiny, bf16 otherwise)")
    p.set_defaults(func=_run_make_checkpoint)


def _run_make_checkpoint(args: argparse.Namespace) -> int:
    from .checkpoint import write_checkpoint

    print(write_checkpoint(args.out, preset=args.preset, seed=args.seed, dtype=args.dtype))
    return 0


# -- other subcommands (serve, generate, chat, voice) register here ----------------------------------------------


_SUBCOMMANDS = (_add_make_checkpoint,)


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
    except (ConfigError, CheckpointError, FileExistsError) as e:
        # Bad input, not a bug: one line instead of a traceback.
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
