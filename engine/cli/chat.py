"""`omni2-engine chat` and `omni2-engine status`: the command-line clients of `omni2-engine serve`.

`chat --wav` sends one question and writes the reply like `omni2-engine generate` (same WAV, same reply.json,
and with the same seed the same numbers: the audio travels as float32 and is quantized by the same write_wav).
`chat --mic` is a live conversation: 30 ms microphone blocks, an energy detector for the end of the user's turn,
the reply played as it streams, and barge-in (speech during a reply cancels it and becomes the next turn).
Use headphones: a speaker the microphone hears would barge in on itself.
"""
from __future__ import annotations

import collections
import json
import math
import queue
import sys
import threading
import time

import numpy as np

from omni2.engine.audio import SAMPLE_RATE, prepare_audio, read_wav
from omni2.engine.cli.reply import Reply
from omni2.engine.client import Client, ClientError, RemoteError, to_float
from omni2.engine.wire import protocol as P

BLOCK_MS = 30  # microphone block: the detector's time resolution
PRE_ROLL_MS = 300  # audio kept from before the detector fired (a word's onset is quieter than its middle)
MIN_SPEECH_MS = 150  # shorter bursts (a click, a cough) are not a turn
PORTAUDIO_HINT = ("--mic needs the sounddevice package and the PortAudio library: `pip install -e .[audio]` "
                  "(or `pip install sounddevice`) and, on Debian/Ubuntu, `sudo apt-get install libportaudio2`")


def _client(args) -> Client:
    # --timeout also bounds the wait for a connection (the client's own default is 10 s): `status --timeout 1`
    # against no daemon answers in 1 s.
    return Client(args.connect, token=args.token, timeout=args.timeout, connect_timeout=min(args.timeout, 10.0),
                  curve_server_key=args.curve_server_key, curve_secret_file=args.curve_secret_file)


def _open_options(args) -> dict:
    return dict(voice=args.voice, seed=args.seed, greedy=args.greedy, max_new_tokens=args.max_new_tokens,
                vocoder_schedule=args.vocoder_schedule or "",
                audio_format="float32")  # float32: the WAV is quantized once, here, exactly as `generate` does


def run_wav(args) -> int:
    """`chat --wav Q --out R`: one turn; text to stdout as it streams, the audio to R; first-audio latency."""
    samples, sr = read_wav(args.wav)
    audio = prepare_audio(samples, sr)  # here as in `generate`: downmix + resample give the same 16 kHz samples
    try:
        with _client(args) as c:
            s = c.open(**_open_options(args))
            r = s.reply(audio, SAMPLE_RATE, on_text=lambda t: print(t, end="", flush=True))
            s.close()
    except ClientError as e:
        print(f"\nomni2-engine chat: error: {e}", file=sys.stderr)
        return 1
    print()
    reply = Reply(r.text, r.token_ids, r.units, r.audio, r.sample_rate, r.finish_reason, r.timings)
    first = f"{r.first_audio_s * 1e3:.0f} ms" if r.first_audio_s is not None else "never (no audio)"
    reply.save(args.out, args.json, f"{first} (engine: {r.timings.get('first_audio', float('nan')) * 1e3:.0f} ms)")
    return 0


def run_status(args) -> int:
    """`status`: one table of the daemon's sessions and stages (or --json)."""
    try:
        with _client(args) as c:
            st = c.status(timeout=args.timeout)
    except ClientError as e:
        print(f"omni2-engine status: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=1))
        return 0
    srv = st.get("server", {})
    print(f"{srv.get('endpoint', args.connect)}: {st.get('sessions')}/{st.get('max_sessions')} sessions, "
          f"{srv.get('replies_in_flight', 0)} replies in flight, {srv.get('clients', 0)} clients, "
          f"up {srv.get('uptime_s', 0):.0f} s")
    print(f"{'stage':<8} {'pid':>7} {'alive':>5} {'busy':>5} {'sessions':>8} {'queued':>6} {'step ms':>8} "
          f"{'batch':>5} {'steps':>8} {'restarts':>8}")
    for name, s in st.get("stages", {}).items():
        print(f"{name:<8} {s.get('pid', '-'):>7} {str(s.get('alive', '-')):>5} {str(s.get('busy', '-')):>5} "
              f"{s.get('sessions', '-'):>8} {s.get('queued', '-'):>6} {s.get('last_step_ms', 0):>8.1f} "
              f"{s.get('last_batch', '-'):>5} {s.get('steps', '-'):>8} {s.get('restarts', '-'):>8}")
    for edge, r in st.get("rings", {}).items():
        print(f"ring {edge:<8} {r.get('in_use', '-')}/{r.get('n_slots', '-')} slots in use")
    return 0


# -- --mic ---------------------------------------------------------------------------------------------------------
def sounddevice():
    """The one place sounddevice is imported (tests replace this function with a file-fed fake device)."""
    try:
        import sounddevice as sd
    except (ImportError, OSError) as e:  # OSError: the package is there but libportaudio is not
        raise ClientError(f"{PORTAUDIO_HINT} ({type(e).__name__}: {e})") from None
    return sd


class Player:
    """Reply audio waiting for the speaker; the output callback pulls from it, silence when empty. A lock: a
    barge-in's clear() landing inside the callback would make it raise (PortAudio then never calls it again) or
    put a piece of the cut reply back in front of the next one."""

    def __init__(self):
        self.buf: collections.deque[np.ndarray] = collections.deque()
        self.played = 0  # samples handed to the device
        self.lock = threading.Lock()

    def push(self, pcm: np.ndarray) -> None:
        with self.lock:
            self.buf.append(np.asarray(pcm, np.float32))

    def clear(self) -> None:
        with self.lock:
            self.buf.clear()

    @property
    def idle(self) -> bool:
        return not self.buf

    def callback(self, outdata, frames, time_info, status) -> None:  # PortAudio's thread
        out = outdata[:, 0]
        n = 0
        with self.lock:
            while n < frames and self.buf:
                head = self.buf[0]
                k = min(frames - n, head.size)
                out[n:n + k] = head[:k]
                n += k
                if k == head.size:
                    self.buf.popleft()
                else:
                    self.buf[0] = head[k:]
        out[n:] = 0.0
        self.played += n


class TurnDetector:
    """Energy-based end of turn: a block is speech when its RMS exceeds `db` dBFS; a turn is >= MIN_SPEECH_MS of
    speech followed by `silence_ms` of non-speech. Keeps PRE_ROLL_MS of audio from before the first speech."""

    def __init__(self, db: float, silence_ms: int):
        self.threshold = 10 ** (db / 20)
        self.silence_blocks = max(1, math.ceil(silence_ms / BLOCK_MS))
        self.pre = collections.deque(maxlen=max(1, PRE_ROLL_MS // BLOCK_MS))
        self.blocks: list[np.ndarray] = []
        self.speech_blocks = 0  # speech blocks in the current turn
        self.quiet = 0  # non-speech blocks since the last speech block

    def push(self, block: np.ndarray) -> bool:
        """Feed one block; True when it completes a turn (then `take()` it)."""
        speech = float(np.sqrt(np.mean(np.square(block, dtype=np.float64)))) > self.threshold
        if not self.blocks:
            if not speech:
                self.pre.append(block)
                return False
            self.blocks = [*self.pre, block]
            self.pre.clear()
            self.speech_blocks, self.quiet = 1, 0
            return False
        self.blocks.append(block)
        if speech:
            self.speech_blocks, self.quiet = self.speech_blocks + 1, 0
        else:
            self.quiet += 1
        if self.quiet >= self.silence_blocks:
            if self.speech_blocks * BLOCK_MS >= MIN_SPEECH_MS:
                return True
            self.blocks = []  # a click: forget it
        return False

    @property
    def speaking_ms(self) -> int:
        return self.speech_blocks * BLOCK_MS if self.blocks else 0

    def take(self) -> np.ndarray:
        audio = np.concatenate(self.blocks)
        self.blocks, self.speech_blocks, self.quiet = [], 0, 0
        return audio


def run_mic(args) -> int:
    """`chat --mic`: capture, detect turns, stream replies to the speaker, barge in. Ctrl-C ends it; --out and
    --json then get the last reply that ended (cut by a barge-in: what had arrived before the cut)."""
    last: list[Reply] = []
    rc = 0
    try:
        sd = sounddevice()
        with _client(args) as c:
            s = c.open(**_open_options(args))
            try:
                _converse(sd, c, s, args, last)
                s.close()
            except BaseException:
                try:  # free the session (and cancel its reply) now, not after the daemon's reclaim timeout
                    s.close(timeout=2)
                except ClientError:
                    pass
                raise
    except ClientError as e:
        print(f"\nomni2-engine chat: error: {e}", file=sys.stderr)
        rc = 1
    except KeyboardInterrupt:
        print("\nbye", file=sys.stderr)
    if args.out and last:
        last[-1].save(args.out, args.json)
    return rc


def _converse(sd, c: Client, s, args, last: list[Reply]) -> None:
    mic: queue.Queue = queue.Queue()
    player = Player()
    detector = TurnDetector(args.vad_db, args.silence_ms)
    block = SAMPLE_RATE * BLOCK_MS // 1000
    replies, in_flight, last_pcm, cut = 0, False, [], False

    def on_audio(indata, frames, time_info, status):  # PortAudio's thread: copy out, nothing else
        mic.put(indata[:, 0].copy())

    try:
        ins = sd.InputStream(samplerate=SAMPLE_RATE, channels=1, dtype="float32", blocksize=block, callback=on_audio)
        outs = sd.OutputStream(samplerate=s.sample_rate, channels=1, dtype="float32", callback=player.callback)
    except Exception as e:  # sounddevice.PortAudioError: no device (a machine without sound), a rate it refuses
        raise ClientError(f"cannot open the audio devices: {e} (`python -m sounddevice` lists them)") from None
    print(f"listening (speech above {args.vad_db:g} dBFS; {args.silence_ms} ms of silence ends a turn; "
          f"Ctrl-C quits)", file=sys.stderr)
    with ins, outs:
        while not args.turns or replies < args.turns:
            # 1. microphone: detect the end of a turn, or a barge-in over the reply
            try:
                x = mic.get(timeout=0.01)
            except queue.Empty:
                x = None
            if x is not None:
                done = detector.push(x)
                busy = in_flight or not player.idle
                if busy and args.barge_in_ms and detector.speaking_ms >= args.barge_in_ms and not cut:
                    if in_flight:
                        s.cancel()  # the reply ends with response.done(cancelled), read below
                    player.clear()
                    cut = True
                    print("\n[barge-in]", file=sys.stderr)
                if done and not in_flight:
                    s.append(detector.take(), SAMPLE_RATE)
                    s.commit()
                    in_flight, last_pcm, cut = True, [], False
                    print("you: (spoke)\nomni2: ", end="", flush=True)
            # 2. the reply's events that have arrived
            while in_flight:
                ev = c.next_event(s.id, 0)
                if ev is None:
                    break
                if isinstance(ev, P.ServerError):
                    raise RemoteError(ev)
                if isinstance(ev, P.ResponseTextDelta):
                    print(ev.text, end="", flush=True)
                elif isinstance(ev, P.ResponseAudioDelta) and not cut:
                    pcm = to_float(ev.audio)
                    player.push(pcm)
                    last_pcm.append(pcm)
                elif isinstance(ev, P.ResponseDone):
                    in_flight = False
                    replies += 1
                    pcm = np.concatenate(last_pcm) if last_pcm else np.zeros(0, np.float32)
                    last[:] = [Reply(ev.text, ev.token_ids, ev.units, pcm, s.sample_rate, ev.finish_reason,
                                     ev.timings)]
                    print(f"  [{ev.finish_reason}]", flush=True)
        while not player.idle and not cut:  # let the last reply finish playing
            time.sleep(0.02)
