"""Pieces of the worker loop that need no process: splitting a batch that does not fit a slot, refusing parallel
lists that are not parallel, and a sender thread that fails taking the worker down."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from omni2.engine.runtime.worker import Worker, check_rows, split_rows
from omni2.engine.wire.codec import ProtocolError
from omni2.engine.wire.protocol import LlmToTts, VocoderToEngine


def test_split_rows_halves_lists_and_tensors_together():
    msg = LlmToTts(["a", "b", "c"], [0, 1, 2], [7, 8, 9], torch.arange(6.0).reshape(3, 2), [False, True, False], 1.5)
    first, second = split_rows(msg)
    assert first.session_ids == ["a"] and second.session_ids == ["b", "c"]
    assert first.token_ids == [7] and second.finished == [True, False]
    assert torch.equal(torch.cat([first.hidden, second.hidden]), msg.hidden)
    assert first.t == second.t == 1.5
    assert split_rows(LlmToTts(["a"], [0], [1], torch.zeros(1, 2), [True], 0.0)) is None


def test_split_rows_keeps_an_empty_optional_list_whole():
    pcm = [np.ones(4, np.float32), np.zeros(2, np.float32)]
    a, b = split_rows(VocoderToEngine(["x", "y"], [0, 0], pcm, [False, True], 24000, 2.0))
    assert a.in_t == [] and b.in_t == [] and a.pcm[0].size == 4 and b.finals == [True]
    a, b = split_rows(VocoderToEngine(["x", "y"], [0, 0], pcm, [False, True], 24000, 2.0, [0.5, 0.7]))
    assert a.in_t == [0.5] and b.in_t == [0.7]


def test_rows_that_are_not_parallel_are_refused():
    check_rows(LlmToTts(["a", "b"], [0, 0], [1, 2], torch.zeros(2, 4), [False, False], 0.0))
    with pytest.raises(ProtocolError, match="turns has 1 rows for 2 sessions"):
        check_rows(LlmToTts(["a", "b"], [0], [1, 2], torch.zeros(2, 4), [False, False], 0.0))
    with pytest.raises(ProtocolError, match="hidden has shape"):
        check_rows(LlmToTts(["a", "b"], [0, 0], [1, 2], torch.zeros(3, 4), [False, False], 0.0))
    with pytest.raises(ProtocolError, match="in_t has 1 rows"):
        check_rows(VocoderToEngine(["x", "y"], [0, 0], [np.zeros(1, np.float32)] * 2, [False] * 2, 24000, 0.0, [1.0]))


def test_a_sender_that_fails_takes_the_worker_down(monkeypatch):
    """An output that cannot be sent (here an encoding error) must not leave a worker whose heartbeats look healthy
    while its compute thread waits on the full send queue forever: the process exits, and is restarted."""
    class Producer:
        def put(self, msg, timeout):
            raise ProtocolError("TtsToVocoder.units: expected list[int], got 'x'")

    exits = []

    def exit_(code):
        exits.append(code)
        raise SystemExit(code)

    monkeypatch.setattr(os, "_exit", exit_)
    w = Worker(SimpleNamespace(stage="tts"))
    try:
        w.producers = {"tts_voc": Producer()}
        w.sendq.put(("tts_voc", "a message", None))
        with pytest.raises(SystemExit):
            w._sender()
        assert exits == [1]
    finally:
        w.ctx.destroy(linger=0)
        w._wake.close()


def test_a_device_error_takes_the_worker_down_and_any_other_fails_its_sessions_only(monkeypatch):
    """A CUDA error leaves the device unusable for every later step: the process exits, to be restarted. Any other
    step failure fails the sessions of that step and the worker goes on."""
    failed, exits = [], []

    def exit_(code):
        exits.append(code)
        raise SystemExit(code)

    def runner(error):
        def step():
            raise error
        return SimpleNamespace(active=lambda: ["a", "b"], step=step,
                               fail=lambda sid, code, message: failed.append((sid, code)))

    monkeypatch.setattr(os, "_exit", exit_)
    w = Worker(SimpleNamespace(stage="llm"))
    w.stream = None  # on a CPU (run() sets it)
    try:
        w.runner = runner(ValueError("a bad row"))
        w._step()
        assert failed == [("a", "stage_error"), ("b", "stage_error")] and exits == []
        w.runner = runner(torch.AcceleratorError("CUDA error: an illegal memory access was encountered"))
        with pytest.raises(SystemExit):
            w._step()
        assert exits == [1] and len(failed) == 2
    finally:
        w.ctx.destroy(linger=0)
        w._wake.close()
