"""Soak `omni2-engine serve`: clients talking turn after turn for minutes, with every kind of trouble mixed in, while
the daemon's processes are sampled; does anything creep?

    .venv/bin/python bench/soak.py --sessions 4 --minutes 30          # its own daemon (demo model, CPU)
    .venv/bin/python bench/soak.py --sessions 4 --minutes 5 --out bench/results/soak-tiny

Each client thread opens a session and speaks turn after turn (synthetic speech of random length), and each turn
is, at random: heard to the end; cancelled at its first audio; barged in on (cancelled and the next turn sent at
once); abandoned (the connection closed mid-reply without session.close: the daemon reclaims it); or preceded by a
malformed frame (an `error` reply, nothing else). A conversation that fills the context limit is closed and a
new one opened, as a user would. Every `--kill-every` seconds a random stage worker is SIGKILLed
(the supervisor restarts it; turns in flight end with `worker_crashed`). Every `--sample-every` seconds the daemon
and each worker are sampled: RSS, open fds, threads, and /dev/shm (this daemon's segments, count and bytes).

Out: soak.json (settings, samples, counts), soak.png (resources over time), and one summary line: turns
answered, errors by code, restarts, and each resource's growth after warm-up (the first --warmup fraction),
compared between the first and the last minute after it (mean of the samples in each; thirds of a short run).
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import textwrap
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import zmq
from daemon_process import DaemonProcess, free_address, serve_argv
from latency_load import question

from omni2.engine.client import Client, ClientError, RemoteError
from omni2.engine.wire import protocol as P

ACTIONS = (("heard", 0.6), ("cancel", 0.12), ("barge_in", 0.12), ("abandon", 0.06), ("malformed", 0.1))


def proc_sample(pid: int) -> dict | None:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_mb": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"]), "fds": fds}


def shm_sample(daemon_pid: int) -> dict:
    names = [n for n in os.listdir("/dev/shm") if n.startswith(f"omni2-{daemon_pid}-")]
    return {"count": len(names), "mb": sum(os.path.getsize(f"/dev/shm/{n}") for n in names) / 2**20}


class Soak:
    def __init__(self, args, address: str, daemon_pid: int):
        self.args, self.address, self.daemon_pid = args, address, daemon_pid
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.counts: Counter = Counter()
        self.errors: Counter = Counter()
        self.messages: dict[str, list[str]] = {}  # up to 3 distinct messages per error code, to tell causes apart
        self.samples: list[dict] = []
        self.kills: list[dict] = []
        self.restarts: dict[str, int] = {}
        self.t0 = time.monotonic()

    def count(self, key: str, errors: bool = False, message: str = "") -> None:
        with self.lock:
            (self.errors if errors else self.counts)[key] += 1
            seen = self.messages.setdefault(key, []) if errors else []
            if message and message not in seen and len(seen) < 3:
                seen.append(message)

    # -- clients -------------------------------------------------------------------------------------------------
    def client(self, k: int) -> None:
        rng = random.Random(self.args.seed * 1000 + k)
        while not self.stop.is_set():
            try:
                with Client(self.address, timeout=120) as c:
                    s = c.open(seed=k, max_new_tokens=self.args.max_new_tokens)
                    while not self.stop.is_set():
                        action = rng.choices([a for a, _ in ACTIONS], [w for _, w in ACTIONS])[0]
                        audio = question(rng.uniform(0.5, 3.0), rng.randrange(10**6))
                        if action == "malformed":
                            self.malformed(rng)
                            action = "heard"
                        if action == "abandon":
                            s.send(audio, 16000)
                            self.count("abandoned")
                            break  # the with-block closes the socket mid-reply; the daemon reclaims the session
                        full = not self.turn(s, audio, action)
                        if not full and action == "barge_in":
                            full = not self.turn(s, question(rng.uniform(0.5, 2.0), rng.randrange(10**6)), "heard")
                        if full:
                            s.close()
                            s = c.open(seed=k, max_new_tokens=self.args.max_new_tokens)
            except RemoteError as e:
                self.count(e.code, errors=True, message=e.message)
                if e.code == "too_many_sessions":  # abandoned sessions hold their slots until reclaimed
                    time.sleep(1.0)
            except ClientError as e:
                self.count(type(e).__name__, errors=True, message=str(e))
            time.sleep(0.2)

    def malformed(self, rng: random.Random) -> None:
        """A garbage frame on a connection of its own: the daemon must answer it with one `error`."""
        sock = zmq.Context.instance().socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, 10_000)
        try:
            sock.connect(self.address)
            sock.send_multipart([bytes([rng.randrange(256)]), os.urandom(rng.randrange(1, 64))])
            reply = P.decode(sock.recv_multipart())
            self.count("malformed answered" if isinstance(reply, P.ServerError) else "malformed: odd reply")
        except zmq.Again:
            self.count("malformed: no reply", errors=True)
        finally:
            sock.close()

    def turn(self, s, audio: np.ndarray, action: str) -> bool:
        """One turn; False when the conversation is full (the user starts a new session, as one would)."""
        try:
            s.send(audio, 16000)
            for ev in s.events(timeout=120):
                if isinstance(ev, P.ResponseAudioDelta) and action in ("cancel", "barge_in"):
                    s.cancel()
                    action = "cancelled"
                if isinstance(ev, P.ResponseDone):
                    self.count("cancelled" if ev.finish_reason == "cancelled" else "answered")
        except RemoteError as e:
            if e.code == "llm_refused" and "context limit" in e.message:
                self.count("conversations full")
                return False
            self.count(e.code, errors=True, message=e.message)
        return True

    # -- the daemon's processes ----------------------------------------------------------------------------------
    def workers(self) -> dict[str, int]:
        try:
            with Client(self.address, timeout=10) as c:
                st = c.status(timeout=10)
        except ClientError:
            return {}
        self.restarts = {name: w.get("restarts", 0) for name, w in st["stages"].items()}
        return {name: (w["pid"], bool(w.get("ready"))) for name, w in st["stages"].items() if w.get("pid")}

    def sampler(self) -> None:
        rng = random.Random(self.args.seed)
        next_kill = self.args.kill_every
        while not self.stop.wait(self.args.sample_every):
            t = time.monotonic() - self.t0
            procs = {"daemon": (self.daemon_pid, True), **self.workers()}
            pids = {name: pid for name, (pid, _) in procs.items()}
            row = {"t": round(t, 1), "shm": shm_sample(self.daemon_pid)}
            for name, (pid, ready) in procs.items():
                row[name] = proc_sample(pid)
                if row[name] is not None:
                    row[name]["ready"] = ready
            self.samples.append(row)
            done = self.args.minutes * 60
            if t >= done:
                self.stop.set()
                break
            if self.args.kill_every and t >= next_kill and len(pids) > 1:
                stage = rng.choice([n for n in pids if n != "daemon"])
                os.kill(pids[stage], signal.SIGKILL)
                self.kills.append({"t": round(t, 1), "stage": stage})
                next_kill += self.args.kill_every
            print(f"\rsoak {t / 60:5.1f}/{self.args.minutes} min  answered {self.counts['answered']}  "
                  f"errors {sum(self.errors.values())}  kills {len(self.kills)}", end="", file=sys.stderr)


def growth(samples: list[dict], warmup: float) -> dict:
    """Per resource: mean of the first minute after warm-up, mean of the last minute, and the difference. A run
    shorter than 3 minutes after warm-up compares its first and last thirds instead (the windows never overlap).

    A sample taken while any worker restarts (SIGKILLed, not ready again yet) is left out of both means: the
    reloading process has not opened its sockets, threads and ring yet, and its peers (the daemon, the stages on
    either side) have closed their connections to it; counting those dips would read as growth once they are back.
    A restarted worker's own warm-up after it is ready still counts."""
    if not samples:
        return {}
    end = samples[-1]["t"]
    start = end * warmup
    span = min(60.0, (end - start) / 3)
    procs = sorted({k for s in samples for k in s if k not in ("t", "shm")})

    def settled(s: dict) -> bool:
        return all(s.get(p) and s[p].get("ready", True) for p in procs)

    first = [s for s in samples if start <= s["t"] < start + span and settled(s)]
    last = [s for s in samples if s["t"] >= end - span and settled(s)]
    out = {}
    if not first or not last:
        return out
    for proc in procs:
        for metric in ("rss_mb", "fds", "threads"):
            out[f"{proc}.{metric}"] = round(float(np.mean([s[proc][metric] for s in last])
                                                  - np.mean([s[proc][metric] for s in first])), 2)
    for metric in ("count", "mb"):
        out[f"shm.{metric}"] = round(float(np.mean([s["shm"][metric] for s in last])
                                           - np.mean([s["shm"][metric] for s in first])), 2)
    return out


def plot(doc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    samples = doc["samples"]
    procs = sorted({k for s in samples for k in s if k not in ("t", "shm")})
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    for ax, metric, label in zip(axes[:3], ("rss_mb", "fds", "threads"), ("RSS (MB)", "open fds", "threads")):
        for proc in procs:
            pts = [(s["t"] / 60, s[proc][metric]) for s in samples if s.get(proc)]
            if pts:
                ax.plot(*zip(*pts), label=proc, lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(loc="upper left", ncol=5, fontsize=8)
    axes[3].plot([s["t"] / 60 for s in samples], [s["shm"]["count"] for s in samples], color="k", lw=1.2)
    axes[3].set_ylabel("/dev/shm segments")
    axes[3].grid(alpha=0.3)
    for ax in axes:
        for k in doc["kills"]:
            ax.axvline(k["t"] / 60, color="r", alpha=0.35, lw=0.8)
        ax.axvspan(0, doc["settings"]["warmup"] * samples[-1]["t"] / 60, color="0.9", zorder=-1)
    axes[3].set_xlabel("minutes (grey: warm-up; red lines: a worker SIGKILLed)")
    fig.suptitle(textwrap.fill(f"soak: {doc['settings']['sessions']} sessions, {doc['summary']}", 150), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sessions", type=int, default=4)
    ap.add_argument("--minutes", type=float, default=5.0)
    ap.add_argument("--kill-every", type=float, default=120.0, help="seconds between worker SIGKILLs (0: none)")
    ap.add_argument("--sample-every", type=float, default=2.0)
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the run left out of the growth")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench/results/soak")
    ap.add_argument("--serve-arg", action="append", default=[], help="extra `serve` argument (repeatable)")
    args = ap.parse_args(argv)

    out = Path(args.out)
    address = free_address()
    daemon = DaemonProcess(serve_argv(address, "--max-sessions", str(args.sessions + 2), "--max-new-tokens",
                                      str(args.max_new_tokens), *args.serve_arg), address, out / "daemon.log")
    daemon.start()
    try:
        soak = Soak(args, address, daemon.proc.pid)
        threads = [threading.Thread(target=soak.client, args=(k,), daemon=True) for k in range(args.sessions)]
        for t in threads:
            t.start()
        soak.sampler()
        for t in threads:
            t.join(timeout=180)
        print(file=sys.stderr)
        grown = growth(soak.samples, args.warmup)
        summary = (f"turns answered {soak.counts['answered']}, cancelled {soak.counts['cancelled']}, abandoned "
                   f"{soak.counts['abandoned']}; errors {dict(soak.errors) or 0}; restarts "
                   f"{sum(soak.restarts.values())} ({len(soak.kills)} kills); growth after warm-up "
                   + ", ".join(f"{k} {v:+g}" for k, v in grown.items()))
        doc = {"command": [sys.executable, *sys.argv], "settings": vars(args), "counts": dict(soak.counts),
               "errors": dict(soak.errors), "error_messages": soak.messages, "kills": soak.kills,
               "restarts": soak.restarts, "growth": grown, "summary": summary, "samples": soak.samples}
        (out / "soak.json").write_text(json.dumps(doc, indent=1) + "\n")
        plot(doc, out / "soak.png")
        print(summary)
        print(f"wrote {out / 'soak.json'} and {out / 'soak.png'}", file=sys.stderr)
    finally:
        daemon.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
