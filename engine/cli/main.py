"""`omni2-engine` command line: one argparse subcommand per verb.

Each subcommand is a pair `_add_<verb>(subparsers)` (declares its options and sets `func`) and `_run_<verb>(args)`
(returns the exit status). Heavy imports happen inside `_run_*`, so `--help` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from omni2.engine.config import (
    MIN_CONTEXT,
    SERVING_LEFT_CHUNKS,
    CheckpointError,
    ConfigError,
    Limits,
    VocoderOptions,
    check_endpoint,
    parse_left_chunks,
)


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
    from omni2.engine.checkpoints.model_writer import write_checkpoint
    from omni2.engine.checkpoints.vocoder_writer import write_vocoder_checkpoint

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
    from omni2.engine.checkpoints.vocoder_dir import VocoderDir

    vd = VocoderDir(args.vocoder_dir, voices_dir=args.voices_dir)
    if args.wav is not None:
        from omni2.engine.checkpoints.voices import enroll_wav

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
    from omni2.engine.checkpoints.vocoder_dir import VocoderDir

    vd = VocoderDir(args.vocoder_dir, voices_dir=args.voices_dir)
    for name in vd.voices():
        print(f"{name}\t{vd.voice_file(name)}")
    return 0


# -- other subcommands (serve, generate, chat) register here -----------------------------------------------------


def _add_vocoder_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vocoder-schedule", choices=("live", "official-live", "hop"), default="live",
                   help="when speech is voiced: live = each TTS write at once, a long final write in pieces "
                        "(default); official-live = each write in one call, as the official live server; hop = "
                        "every --hop units, as the official offline script")
    p.add_argument("--hop", type=int, default=None, help="units per vocoder call of the hop schedule (default 50)")
    p.add_argument("--vocoder-left-chunks", type=_chunks, default=SERVING_LEFT_CHUNKS, metavar="K|all",
                   help="flow attention sees the last K completed chunks (2 s each): memory per session stays flat "
                        f"whatever the reply's length (default {SERVING_LEFT_CHUNKS}: equal to the official flow for "
                        "the first (K+1) chunks, close after); all = the official flow exactly, its memory growing "
                        "with the reply (docs/ARCHITECTURE.md, \"Vocoder memory\")")
    p.add_argument("--vocoder-batch", type=int, default=VocoderOptions.max_batch, metavar="N",
                   help=f"sessions the vocoder voices in one batched step (default {VocoderOptions.max_batch}; "
                        "1 = one by one)")


def _add_cuda_graphs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cuda-graphs", action="store_true",
                   help="replay the thinker's and the TTS LM's short steps, the windowed vocoder flow's encoder "
                        "and Euler steps, and HiFT on a steady stream's chunks, as CUDA graphs (fewer kernel "
                        "launches: a GPU's steps are bound by them otherwise)")


def _chunks(value: str) -> int | None:
    try:
        return parse_left_chunks(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def vocoder_options(args: argparse.Namespace):
    from omni2.engine.config import VocoderOptions

    if args.hop is not None and args.vocoder_schedule != "hop":
        raise ConfigError("--hop applies to --vocoder-schedule hop only")
    return VocoderOptions(schedule=args.vocoder_schedule, token_hop=args.hop, left_chunks=args.vocoder_left_chunks,
                          max_batch=args.vocoder_batch)


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
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: every core, as each stage worker of `serve` has, so that the two "
                        "agree bit for bit; docs/ARCHITECTURE.md, \"Threads\")")
    _add_max_context(p)
    _add_cuda_graphs(p)

    _add_vocoder_options(p)
    p.set_defaults(func=_run_generate)


def _add_max_context(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-context", type=int, default=None, metavar="N",
                   help=f"positions per session in the thinker's KV cache, allocated for every session at start: "
                        f"a prompt (every turn's speech and replies) that does not fit is refused, a reply that "
                        f"fills it ends with finish_reason context (default {Limits.max_context}, "
                        f"minimum {MIN_CONTEXT})")


def _check_context(args: argparse.Namespace) -> None:
    if args.max_context is not None and args.max_context < MIN_CONTEXT:
        raise ConfigError(f"--max-context must be >= {MIN_CONTEXT}, got {args.max_context}")


def _check_devices(devices) -> None:
    """A GPU this torch cannot use is refused before anything loads (importing torch only when one is named)."""
    if any(d != "cpu" for d in devices):
        from omni2.stages.device import check_device

        for device in sorted(set(devices)):
            check_device(device)


def _check_positive(args: argparse.Namespace, *names: str) -> None:
    """Counts where 0 or less is a mistake (not "the default"): refused before anything loads or connects."""
    for name in names:
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _run_generate(args: argparse.Namespace) -> int:
    _check_positive(args, "max_new_tokens", "threads", "hop", "vocoder_left_chunks", "vocoder_batch")  # pre-torch
    _check_context(args)
    vocoder_options(args)
    _check_devices([args.device])
    from omni2.engine.cli import generate
    from omni2.engine.cli.reply import check_writable

    check_writable(out=args.out, json=args.json)  # not after minutes of loading and generating
    return generate.main(args)


# -- serve / chat / status: the daemon and its clients --------------------------------------------------------
_ADDRESS = "tcp://127.0.0.1:5555"


def _add_serve(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the engine as a daemon (ZMQ front door; `chat` and omni2.engine.client talk "
                                     "to it)",
                       description="Start the engine's workers and serve clients until SIGINT/SIGTERM. With no "
                                   "--model-dir it serves the embedded DEMO model: tiny random weights written once "
                                   "into $OMNI2_CACHE (default ~/.cache/omni2-engine); it babbles, but every stage "
                                   "runs.")
    p.add_argument("--model-dir", help="official LLaMA-Omni2 model directory (default: the demo model)")
    p.add_argument("--vocoder-dir", help="cosy2_decoder directory (required with --model-dir)")
    p.add_argument("--placement", default="cpu", help="cpu | cuda | asr=0,llm=1,tts=1,vocoder=1 (default cpu)")
    p.add_argument("--dtype", default="float32", help="float32 | bfloat16 | float16 (default float32)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per stage worker (default: every core; docs/ARCHITECTURE.md, \"Threads\")")
    _add_cuda_graphs(p)
    p.add_argument("--vocoder-memory", type=float, default=None, metavar="GB",
                   help="admit a session only while the vocoder state of the longest replies still fits in GB "
                        "(default: no check); refused opens get engine_full")
    p.add_argument("--hang-timeout", type=float, default=1.0,
                   help="seconds without a worker heartbeat before it counts as hung and is restarted (default 1)")
    p.add_argument("--bind", default=_ADDRESS, help=f"ZMQ endpoint (default {_ADDRESS}; a non-loopback address "
                                                    f"needs --token-file or --curve-clients; port 0 = any free port)")
    p.add_argument("--max-sessions", type=int, default=8, help="sessions the engine holds at once (default 8)")
    p.add_argument("--max-sessions-per-client", type=int, default=8, help="per connection (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="cap on reply text tokens (default 256); also sizes each session's TTS cache (2,130 positions "
                        "at 256), and is refused past what the TTS LM was built for")
    _add_max_context(p)
    p.add_argument("--token-file", help="file holding the access token clients must present")
    p.add_argument("--curve-secret-file", help="ZMQ CURVE: the daemon's key pair (NAME.key_secret from "
                                               "`omni2-engine curve-keys`): traffic is encrypted")
    p.add_argument("--curve-clients", help="ZMQ CURVE: a directory of the public keys (NAME.key) of the clients "
                                           "allowed in; others fail the handshake")
    p.add_argument("--reclaim-after", type=float, default=10.0,
                   help="seconds a vanished client's sessions are kept for a reconnect (default 10)")
    p.add_argument("--send-hwm", type=int, default=2000, metavar="N",
                   help="events queued for one connection before it counts as not reading: its replies are "
                        "cancelled and its sessions reclaimed after --reclaim-after (default 2000, ~40 MB)")
    p.add_argument("--idle-timeout", type=float, default=900.0,
                   help="close a session that has seen nothing for this many seconds (default 900)")
    p.add_argument("--realtime", metavar="HOST:PORT",
                   help="also serve the OpenAI Realtime-compatible WebSocket API at ws://HOST:PORT/v1/realtime "
                        "(docs/REALTIME.md); a non-loopback HOST needs --token-file (clients send "
                        "'Authorization: Bearer TOKEN')")
    p.add_argument("--demo", action="store_true", help="with --realtime: serve the browser demo page at "
                                                       "http://HOST:PORT/")
    p.add_argument("--log-level", default="INFO", help="DEBUG | INFO | WARNING (default INFO)")
    _add_vocoder_options(p)
    p.set_defaults(func=_run_serve)


def _read_token(path: str | None) -> str | None:
    if path is None:
        return None
    from pathlib import Path

    try:
        token = Path(path).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:  # a binary file too: name the option, not just the codec
        raise ConfigError(f"cannot read --token-file {path}: {e}") from e
    if not token or len(token) > 4096 or not token.isprintable():
        raise ConfigError(f"--token-file {path} must hold one printable token of 1-4096 characters")
    return token


def _run_serve(args: argparse.Namespace) -> int:
    """The options as an EngineConfig and a ServerConfig (the bind checked before any model loads), the model
    dirs (the demo checkpoint when none are given), then serve/daemon.py until a signal."""
    import dataclasses
    import json
    import logging
    from pathlib import Path

    from omni2.engine.config import DTYPES, EngineConfig, Placement, RealtimeConfig, ServerConfig, StreamParams

    # Bad values fail here, at once: before the demo checkpoint is written or a model directory is read.
    if args.dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    _check_devices(Placement.parse(args.placement).devices.values())
    _check_positive(args, "max_new_tokens", "threads", "max_sessions", "max_sessions_per_client", "hop", "send_hwm",
                    "vocoder_left_chunks", "vocoder_batch")
    _check_context(args)
    if args.vocoder_memory is not None and not args.vocoder_memory > 0:
        raise ConfigError(f"--vocoder-memory must be a positive number of GB, got {args.vocoder_memory}")
    vocoder_options(args)
    if args.demo and not args.realtime:
        raise ConfigError("--demo needs --realtime HOST:PORT (the page talks to the Realtime endpoint)")
    realtime = RealtimeConfig.parse(args.realtime, demo=args.demo) if args.realtime else None
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s omni2-engine serve: %(message)s",
                        stream=sys.stderr)
    log = logging.getLogger("omni2.serve")
    limits = Limits(max_sessions=args.max_sessions, max_new_tokens=args.max_new_tokens,
                    max_context=args.max_context or Limits.max_context)
    cfg = ServerConfig(bind=args.bind, token=_read_token(args.token_file),
                       max_sessions_per_client=args.max_sessions_per_client,
                       max_turn_seconds=limits.max_audio_seconds, max_new_tokens=limits.max_new_tokens,
                       reclaim_s=args.reclaim_after, idle_timeout_s=args.idle_timeout, send_hwm=args.send_hwm,
                       curve_secret_file=args.curve_secret_file, curve_clients=args.curve_clients,
                       realtime=realtime)
    if (args.model_dir is None) != (args.vocoder_dir is None):
        raise ConfigError("give both --model-dir and --vocoder-dir, or neither (the demo model)")
    if args.model_dir is None:
        from omni2.engine.checkpoints.demo import demo_dirs

        model_dir, vocoder_dir = demo_dirs()
        log.warning("serving the DEMO model from %s: tiny random weights — it babbles, but every stage runs. "
                    "Pass --model-dir/--vocoder-dir for a real model.", model_dir.parent)
    else:
        model_dir, vocoder_dir = Path(args.model_dir), Path(args.vocoder_dir)
        log.info("model %s, vocoder %s", model_dir, vocoder_dir)
    try:
        raw = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{model_dir} is not a model directory (config.json: {e})") from e
    cfg = dataclasses.replace(cfg, stream_params=StreamParams.parse(raw.get("stream_params")).to_str())
    budget = None if args.vocoder_memory is None else int(args.vocoder_memory * 1e9)
    engine_cfg = EngineConfig(model_dir=str(model_dir), vocoder_dir=str(vocoder_dir), placement=args.placement,
                              dtype=args.dtype, limits=limits, threads=args.threads, hang_s=args.hang_timeout,
                              vocoder_options=vocoder_options(args), vocoder_memory_bytes=budget,
                              cuda_graphs=args.cuda_graphs)

    from omni2.engine.runtime import EngineError
    from omni2.engine.serve.daemon import serve

    try:
        return serve(cfg, engine_cfg)
    except EngineError as e:
        print(f"omni2-engine serve: error: the engine failed to start: {e}", file=sys.stderr)
        return 1


def _add_client_auth(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", help="file holding the daemon's access token")
    p.add_argument("--curve-server-key", help="ZMQ CURVE: the daemon's public key file (NAME.key)")
    p.add_argument("--curve-secret-file", help="ZMQ CURVE: this client's key pair (NAME.key_secret), for a daemon "
                                               "that admits only listed clients")


def _add_curve_keys(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("curve-keys", help="write a ZMQ CURVE key pair (for serve --curve-*, chat --curve-*)",
                       description="Writes DIR/NAME.key (public: give it to the other side) and DIR/NAME.key_secret "
                                   "(keep it private).")
    p.add_argument("name", help="e.g. server, or a client's name")
    p.add_argument("--out", default=".", help="directory (default .)")
    p.set_defaults(func=_run_curve_keys)


def _run_curve_keys(args: argparse.Namespace) -> int:
    import os

    import zmq.auth

    os.makedirs(args.out, exist_ok=True)
    public, secret = zmq.auth.create_certificates(args.out, args.name)
    os.chmod(secret, 0o600)
    print(public)
    print(secret)
    return 0


def _add_chat(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("chat", help="talk to a running `omni2-engine serve`: a WAV file or the microphone",
                       description="--wav: send one question, print the reply text as it streams, write the reply "
                                   "audio (and --json like `generate`). --mic: converse through the microphone "
                                   "and speakers (needs sounddevice + PortAudio); speak over a reply to cut it off.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--wav", help="the question (any sample rate; mono or stereo)")
    src.add_argument("--mic", action="store_true", help="live conversation through the default audio devices")
    p.add_argument("--out", help="reply WAV to write (24 kHz; required with --wav; with --mic: the last reply, "
                                 "written when the chat ends, Ctrl-C included)")
    p.add_argument("--json", help="also write text, token_ids, units and timings here (as `generate` does; with "
                                  "--mic: of the last reply, beside --out)")
    p.add_argument("--connect", default=_ADDRESS, help=f"the daemon's address (default {_ADDRESS})")
    _add_client_auth(p)
    p.add_argument("--voice", default="default", help="speaker voice name")
    p.add_argument("--seed", type=int, default=0, help="seed of every random draw (same as `generate --seed`)")
    p.add_argument("--greedy", action="store_true", help="greedy TTS too (the thinker is greedy by default)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="cap on reply text tokens")
    p.add_argument("--vocoder-schedule", choices=("live", "official-live", "hop"), default=None,
                   help="this session's vocoder schedule (default: the daemon's; see `serve --help`)")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the next event (default 120)")
    mic = p.add_argument_group("--mic options")
    mic.add_argument("--vad-db", type=float, default=-40.0,
                     help="speech when a 30 ms block's level exceeds this many dBFS (default -40)")
    mic.add_argument("--silence-ms", type=int, default=700, help="silence that ends a turn (default 700)")
    mic.add_argument("--barge-in-ms", type=int, default=240,
                     help="speech during a reply that cancels it (default 240; 0 = no barge-in)")
    mic.add_argument("--turns", type=int, default=0, help="stop after this many replies (default 0 = until Ctrl-C)")
    p.set_defaults(func=_run_chat)


def _run_chat(args: argparse.Namespace) -> int:
    from omni2.engine.cli import chat
    from omni2.engine.cli.reply import check_writable

    args.token = _read_token(args.token_file) or ""
    if args.wav is not None and not args.out:
        raise ConfigError("--wav needs --out (where to write the reply audio)")
    if args.json and not args.out:
        raise ConfigError("--json needs --out (the reply's audio is written beside it)")
    _check_positive(args, "max_new_tokens")  # here, not as the daemon's bad_value after connecting
    _check_client(args)
    check_writable(out=args.out, json=args.json)
    return chat.run_mic(args) if args.mic else chat.run_wav(args)


def _add_status(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("status", help="sessions, stage queues, step times and batch sizes of a running daemon")
    p.add_argument("--connect", default=_ADDRESS, help=f"the daemon's address (default {_ADDRESS})")
    _add_client_auth(p)
    p.add_argument("--json", action="store_true", help="print the raw status as JSON")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the daemon (default 5)")
    p.set_defaults(func=_run_status)


def _run_status(args: argparse.Namespace) -> int:
    from omni2.engine.cli import chat

    args.token = _read_token(args.token_file) or ""
    _check_client(args)
    return chat.run_status(args)


def _check_client(args: argparse.Namespace) -> None:
    check_endpoint(args.connect, "--connect")
    if not args.timeout > 0:
        raise ConfigError(f"--timeout must be > 0 seconds, got {args.timeout:g}")


# -- demo ----------------------------------------------------------------------------------------------------------
def _add_demo(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="write a synthetic spoken question, or the demo checkpoint `serve` uses",
                       description="No microphone? --question writes a 2-second spoken-ish WAV (16 kHz) for `chat "
                                   "--wav`. --checkpoint writes the demo model into the cache now (serve does it on "
                                   "first start).")
    p.add_argument("--question", help="write the question WAV here")
    p.add_argument("--checkpoint", action="store_true", help="write the demo checkpoint into the cache")
    p.set_defaults(func=_run_demo)


def _run_demo(args: argparse.Namespace) -> int:
    from omni2.engine.checkpoints import demo

    if not args.question and not args.checkpoint:
        raise ConfigError("demo: give --question FILE and/or --checkpoint")
    if args.question:
        from omni2.engine.audio import write_wav

        write_wav(args.question, demo.question(), 16000)
        print(args.question)
    if args.checkpoint:
        print(*demo.demo_dirs())
    return 0


_SUBCOMMANDS = (_add_make_checkpoint, _add_voice, _add_generate, _add_serve, _add_chat, _add_status,
                _add_curve_keys, _add_demo)


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
    except KeyboardInterrupt:
        return 130
    except (ConfigError, CheckpointError, FileExistsError, FileNotFoundError, ValueError) as e:
        # Bad input, not a bug: one line instead of a traceback.
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2

