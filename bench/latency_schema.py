"""The shape of bench/latency.py's JSON (described for readers in bench/README.md), and a checker for it.

Hand-written rather than JSON Schema: the project has no jsonschema dependency, and a spec made of Python types
reads as what it checks. A dict spec lists the keys a value must have (more are allowed), [spec] is a list of
such values, MapOf(spec) a dict of any names to them, OneOf(...) a closed set of values, a type or a tuple of
types an isinstance check.
"""
from __future__ import annotations

from dataclasses import dataclass

SCHEMA_ID = "omni2-bench-latency/2"


@dataclass(frozen=True)
class MapOf:
    spec: object


@dataclass(frozen=True)
class OneOf:
    values: tuple


NUM = (int, float)
OPT_NUM = (int, float, type(None))

TURN = {  # one answered question; seconds after the end of the user's speech
    "seed": int, "turn": int, "t_asr": NUM, "t_llm": NUM, "t_tts": NUM, "first_audio": NUM, "end": NUM,
    "engine_first_audio": NUM, "audio_s": NUM, "rtf": OPT_NUM, "stalls": int, "stall_s": NUM, "played_s": NUM,
    "n_tokens": int, "n_units": int, "finish_reason": str, "reply": str,
}
ENGINE_TURN = {**TURN, "session": int, "committed_s": NUM}
SUMMARY = {
    **{f"{k}_{q}": OPT_NUM for k in ("t_asr", "t_llm", "t_tts", "first_audio", "end") for q in ("p50", "p95")},
    "rtf_p50": OPT_NUM, "rtf_max": OPT_NUM, "audio_s": NUM, "stalls": int, "stall_s": NUM, "turns_stalled": int,
    "turns": int,
}
STAGE = {"steps": int, "samples": int, "batch_mean": OPT_NUM, "batch_max": (int, type(None)),
         "max_batch_since_start": int, "step_ms_p50": OPT_NUM, "step_ms_p95": OPT_NUM,
         "queued_max": (int, type(None))}
CELL = {
    "concurrency": int, "arrivals": OneOf(("poisson", "staggered")), "rate": NUM, "turns": [ENGINE_TURN],
    "sessions": [{"session": int, "seed": int, "turns": int, "audio_s": NUM, "rtf": OPT_NUM, "stalls": int,
                  "stall_s": NUM}],
    "stages": MapOf(STAGE), "summary": SUMMARY,
    "queued": MapOf({"summary": SUMMARY, "wait_s_p50": OPT_NUM, "wait_s_max": NUM}),
    "ratio": MapOf(OPT_NUM), "same_as_reference": (bool, type(None)), "mismatches": [[int]],
}
CONFIG = {
    "name": str, "read": int, "write": int, "schedule": OneOf(("live", "official-live", "hop")),
    "token_hop": (int, type(None)), "mode": OneOf(("streaming", "offline")), "question_s": NUM,
    "baseline_schedule": str, "single": MapOf([TURN]), "cells": [CELL],
}
DOCUMENT = {
    "schema": OneOf((SCHEMA_ID,)), "command": [str], "started": str, "wall_s": NUM,
    "machine": {"hostname": str, "platform": str, "python": str, "cpu": str, "cpu_count": (int, type(None)),
                "memory_gb": OPT_NUM},
    "device": {"placement": str, "dtype": str, "name": str, "cuda": (str, type(None))}, "torch": str,
    "settings": {"preset": (str, type(None)), "model_dir": (str, type(None)), "vocoder_dir": (str, type(None)),
                 "connect": (str, type(None)), "threads": int, "max_new_tokens": int, "turns": int, "seeds": [int],
                 "arrivals": str, "rate": NUM, "gap_s": NUM, "listen": bool, "baseline_schedule": str,
                 "systems": [str]},
    "configs": [CONFIG],
}


def validate(doc, spec=DOCUMENT, path: str = "$") -> list[str]:
    """Every place where `doc` departs from `spec`, as 'path: what'; [] when it conforms."""
    if isinstance(spec, dict):
        if not isinstance(doc, dict):
            return [f"{path}: expected an object, got {type(doc).__name__}"]
        errors = [f"{path}: missing {k!r}" for k in spec if k not in doc]
        for k, sub in spec.items():
            if k in doc:
                errors += validate(doc[k], sub, f"{path}.{k}")
        return errors
    if isinstance(spec, list):
        if not isinstance(doc, list):
            return [f"{path}: expected a list, got {type(doc).__name__}"]
        return [e for i, item in enumerate(doc) for e in validate(item, spec[0], f"{path}[{i}]")]
    if isinstance(spec, MapOf):
        if not isinstance(doc, dict):
            return [f"{path}: expected an object, got {type(doc).__name__}"]
        return [e for k, v in doc.items() for e in validate(v, spec.spec, f"{path}.{k}")]
    if isinstance(spec, OneOf):
        return [] if doc in spec.values else [f"{path}: {doc!r} is not one of {list(spec.values)}"]
    types = spec if isinstance(spec, tuple) else (spec,)
    # bool is an int to isinstance; a count or a time that is True is a bug, not a number
    if isinstance(doc, bool) and bool not in types:
        return [f"{path}: expected {'/'.join(t.__name__ for t in types)}, got bool"]
    if not isinstance(doc, types):
        return [f"{path}: expected {'/'.join(t.__name__ for t in types)}, got {type(doc).__name__}"]
    return []
