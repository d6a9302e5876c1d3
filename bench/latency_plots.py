"""The three figures of bench/latency.py, each meant to be read without the code:

  latency-breakdown.png    where first audio goes: one stacked bar per system and configuration
  latency-concurrency.png  first audio p50 and p95 against sessions, ours beside the official cost model
  latency-rw.png           first audio against W, a line per R (the Read-R-Write-W trade-off)

A figure whose x axis the sweep did not vary (one concurrency level, one W) says nothing and is not drawn.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on a bench machine
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402

# One colour per latency term, in pipeline order, in every figure.
SEGMENTS = [("t_asr", "ASR (speech embeddings ready)", "#4C72B0"),
            ("t_llm", "LLM (first R text tokens)", "#55A868"),
            ("t_tts", "TTS (first units voiced)", "#C44E52"),
            ("engine_first_audio", "vocoder (first PCM out)", "#8172B2"),
            ("first_audio", "wire (daemon to client)", "#CCB974")]
SYSTEM_LABELS = {"baseline": "official cost model, 1 process", "reference": "ours, 1 process"}
CONFIG_COLOURS = plt.get_cmap("tab10").colors


def plot_all(doc: dict, out: Path) -> list[Path]:
    written = [breakdown(doc, out / "latency-breakdown.png")]
    if len({c["concurrency"] for cfg in doc["configs"] for c in cfg["cells"]}) > 1:
        written.append(concurrency(doc, out / "latency-concurrency.png"))
    if len({cfg["write"] for cfg in doc["configs"]}) > 1:
        written.append(rw(doc, out / "latency-rw.png"))
    return written


def _title(doc: dict, what: str) -> str:
    s, d = doc["settings"], doc["device"]
    model = s["preset"] or Path(s["model_dir"]).name
    turns = f"{s['turns']} turn{'s' if s['turns'] > 1 else ''} per session"
    return f"{what}\n{model}, {d['name']} ({d['dtype']}), {turns}, {s['arrivals']} arrivals"


def _median(turns: list[dict], key: str) -> float:
    values = sorted(t[key] for t in turns)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def breakdown(doc: dict, path: Path) -> Path:
    """Medians of the cumulative terms, stacked as differences: the terms are ordered in every turn, so their
    medians are too, and the bar ends at the median first audio."""
    rows = []  # (row label, turns, is the engine); turns None = a configuration's heading
    doc_cells = {}  # row -> its cell, for the ratio beside an engine bar
    for c in doc["configs"]:
        rows.append((c["name"], None, False))
        for name, turns in c["single"].items():
            rows.append((SYSTEM_LABELS.get(name, name) + ", alone", turns, False))
        for cell in c["cells"]:
            n = cell["concurrency"]
            doc_cells[len(rows)] = cell
            rows.append((f"engine via client, {n} session{'s' if n > 1 else ''}", cell["turns"], True))
    fig, ax = plt.subplots(figsize=(12, 0.36 * len(rows) + 1.8))
    for i, (_, turns, engine) in enumerate(rows):
        if turns is None:
            if i:
                ax.axhline(i - 0.5, color="grey", lw=0.6)
            continue
        left = 0.0
        for key, _, colour in SEGMENTS:
            if key == "first_audio" and not engine:
                continue  # no wire in one process
            edge = _median(turns, key) * 1e3
            ax.barh(i, max(edge - left, 0.0), left=left, color=colour, edgecolor="white", height=0.7)
            left = max(left, edge)
        note = f" {left:.0f} ms"
        if engine:
            note += _versus(doc_cells[i])
        ax.text(left, i, note, va="center", fontsize=8)
    ax.set_yticks(range(len(rows)), [label for label, _, _ in rows], fontsize=8)
    for tick, (_, turns, _) in zip(ax.get_yticklabels(), rows):
        if turns is None:
            tick.set_fontweight("bold")
    ax.set_ylim(len(rows) - 0.5, -0.5)
    ax.set_xlabel("ms after the end of the question (median of the turns)")
    ax.set_xlim(0, ax.get_xlim()[1] * 1.08)  # room for the totals
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for _, _, c in SEGMENTS]
    ax.legend(handles, [label for _, label, _ in SEGMENTS], loc="upper left", bbox_to_anchor=(1.01, 1.0),
              fontsize=8, title="first audio is the sum of", title_fontsize=8, frameon=False)
    ax.set_title(_title(doc, "Where the time to first audio goes"), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _versus(cell: dict) -> str:
    base = cell["queued"].get("baseline", {}).get("summary")
    if not base:
        return ""
    r = cell["ratio"].get("first_audio_p50")
    return f"   (official, same load: {base['first_audio_p50'] * 1e3:.0f} ms = {r:.2f}x ours)" if r else ""


def concurrency(doc: dict, path: Path) -> Path:
    """p50 left, p95 right; colour = configuration, solid = ours, dashed = the official cost model queued."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), sharey=True)
    levels = sorted({cell["concurrency"] for c in doc["configs"] for cell in c["cells"]})
    for ax, q in zip(axes, ("p50", "p95")):
        for i, c in enumerate(doc["configs"]):
            colour = CONFIG_COLOURS[i % len(CONFIG_COLOURS)]
            cells = sorted(c["cells"], key=lambda cell: cell["concurrency"])
            n = [cell["concurrency"] for cell in cells]
            ax.plot(n, [cell["summary"][f"first_audio_{q}"] * 1e3 for cell in cells], "o-", color=colour,
                    label=f"{c['name']}: ours")
            base = [cell["queued"].get("baseline", {}).get("summary") for cell in cells]
            if all(base):
                ax.plot(n, [b[f"first_audio_{q}"] * 1e3 for b in base], "s--", color=colour, mfc="white",
                        label=f"{c['name']}: official")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(levels, [str(n) for n in levels])
        ax.minorticks_off()
        ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.set_xlabel(f"concurrent sessions ({doc['settings']['arrivals']} arrivals, "
                      f"{doc['settings']['rate']:g}/s)")
        ax.set_title(f"{q} of the turns", fontsize=9)
        ax.grid(True, which="major", alpha=0.3)
    axes[0].set_ylabel("first audio, ms after the end of the question (log)")
    axes[1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    fig.suptitle(_title(doc, "First audio under load: ours (solid, via the daemon) vs the official cost model "
                             "answering one request at a time (dashed)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def rw(doc: dict, path: Path) -> Path:
    """At the lowest concurrency, per (schedule, mode, question length) family, a line per R: first audio on the
    left, and on the right what a small W costs the listener (silence inside the reply, as played)."""
    fig, (ax, ax_gap) = plt.subplots(1, 2, figsize=(12, 4.8))
    families: dict[tuple, dict[int, list]] = {}
    for c in doc["configs"]:
        cell = min(c["cells"], key=lambda cell: cell["concurrency"])
        fam = families.setdefault((c["schedule"], c["token_hop"], c["mode"], c["question_s"]), {})
        base = cell["queued"].get("baseline", {}).get("summary", {})
        s = cell["summary"]
        fam.setdefault(c["read"], []).append((c["write"], s["first_audio_p50"], base.get("first_audio_p50"),
                                              s["stall_s"] / s["turns"], (base.get("stall_s") or 0) / s["turns"]))
    i = 0
    for (schedule, hop, mode, q), by_r in families.items():
        for r, points in sorted(by_r.items()):
            colour = CONFIG_COLOURS[i % len(CONFIG_COLOURS)]
            i += 1
            points.sort()
            w = [p[0] for p in points]
            tag = f"R={r}, {schedule if schedule != 'hop' else f'hop {hop or 50}'} {mode} q{q:g}s"
            ax.plot(w, [p[1] * 1e3 for p in points], "o-", color=colour, label=f"{tag}: ours")
            ax_gap.plot(w, [p[3] for p in points], "o-", color=colour, label=f"{tag}: ours")
            if all(p[2] is not None for p in points):
                ax.plot(w, [p[2] * 1e3 for p in points], "s--", color=colour, mfc="white", label=f"{tag}: official")
                ax_gap.plot(w, [p[4] for p in points], "s--", color=colour, mfc="white", label=f"{tag}: official")
    writes = sorted({c["write"] for c in doc["configs"]})
    for a in (ax, ax_gap):
        a.set_xticks(writes, [str(w) for w in writes])
        a.set_xlabel("W: speech units the TTS writes per R text tokens read")
        a.set_ylim(0, a.get_ylim()[1] * 1.1)  # a lone point must not sit on the frame
        a.grid(True, alpha=0.3)
    ax.set_ylabel("first audio p50, ms after the end of the question")
    ax_gap.set_ylabel("seconds of silence per reply (playback stalls)")
    ax.set_title("first audio (a smaller W should voice sooner)", fontsize=9)
    ax_gap.set_title("silence a listener hears inside a reply (what a smaller W may cost)", fontsize=9)
    ax_gap.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    n = min(cell["concurrency"] for c in doc["configs"] for cell in c["cells"])
    fig.suptitle(_title(doc, f"The R/W trade-off at {n} session{'s' if n > 1 else ''} (solid: ours via the "
                             f"daemon, dashed: the official cost model)"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
