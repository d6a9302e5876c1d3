"""A client that stops reading, against a real daemon (demo model): what the daemon holds for it is bounded by
`--send-hwm` events; once that many wait, its replies are cancelled and its sessions reclaimed after
`--reclaim-after`; another client's turns go on meanwhile and equal the same turns on a quiet daemon."""
from __future__ import annotations

import time

import numpy as np
import zmq

from omni2.engine.client.core import session_open_message
from omni2.engine.wire import protocol as P
from tests.engine.serve.daemon_harness import Daemon, speech

Q = speech(1.0, seed=3)
OPTS = dict(seed=0, greedy=True, max_new_tokens=8, audio_format="float32")
RSS_BOUND_MB = 100  # 50 queued events of at most a few MB, and the kernel's socket buffers, with room to spare


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def test_a_client_that_stops_reading_is_bounded_and_others_go_on(tmp_path):
    d = Daemon(["--send-hwm", "50", "--reclaim-after", "3", "--max-new-tokens", "24"], tmp_path / "serve.log")
    ctx = zmq.Context()
    try:
        with d.client() as b:
            quiet = b.open("quiet", **OPTS).reply(Q, 16000)
            base = peak = rss_mb(d.proc.pid)
            # The stalled client: a DEALER that sends turn after turn and never reads (its own receive queue and
            # socket buffer kept tiny, so the daemon's queue is what fills).
            a = ctx.socket(zmq.DEALER)
            a.setsockopt(zmq.RCVHWM, 1)
            a.setsockopt(zmq.RCVBUF, 4096)
            a.setsockopt(zmq.LINGER, 0)
            a.connect(d.address)
            a.send_multipart(P.encode(session_open_message("stalled", max_new_tokens=24)))
            deadline, busy = time.monotonic() + 60, None
            reclaimed = 0
            while time.monotonic() < deadline:
                a.send_multipart(P.encode(P.AudioAppend("stalled", Q, 16000)))
                a.send_multipart(P.encode(P.AudioCommit("stalled")))
                if busy is None:  # meanwhile, another client's turn on a fresh session with the same options
                    busy = b.open("busy", **OPTS).reply(Q, 16000)
                peak = max(peak, rss_mb(d.proc.pid))
                reclaimed = b.status()["server"]["reclaimed"]
                if reclaimed:
                    break
                time.sleep(0.5)
            a.close()
        log = d.log()
        assert "not reading: cancelling its replies" in log, log[-3000:]
        assert reclaimed >= 1  # the stalled client's session, after --reclaim-after
        print(f"daemon RSS {base:.0f} MB, peak {peak:.0f} MB while the client stalled")
        assert peak - base < RSS_BOUND_MB, (base, peak)
        assert (busy.text, busy.token_ids, busy.units) == (quiet.text, quiet.token_ids, quiet.units)
        # The vocoder may have voiced it in one batch with the stalled client's reply: fp32 rounding of batched
        # matmuls (tests/engine/runtime/test_engine.py, BATCHED_PCM_ATOL).
        assert busy.audio.shape == quiet.audio.shape
        np.testing.assert_allclose(busy.audio, quiet.audio, rtol=0, atol=1e-2)
    finally:
        ctx.term()
        assert d.stop() == 0
        assert not d.leftovers()
