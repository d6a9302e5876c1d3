"""The vocoder stage against a transcription of the official streaming token2wav (MODEL_SPEC §2.6).

The transcription below re-implements `run_cosy2_decoder.py --stream` + `SpeechDecoder.token2wav` (hop/lookahead
schedule, mel and source caches, Hamming cross-fade, finalize) over the independent oracles, not over our modules:
the flow is tests/stages/oracle_flow_encoder.py + oracle_flow_estimator.py (recomputed from unit 0 every call, as
upstream), HiFT is tests/stages/oracle_hift.py, all on the stage's own weights.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from omni2.engine.config import CheckpointError, ConfigError, Limits, VocoderOptions
from omni2.stages import flow_graph
from omni2.stages.vocoder import VocoderError, VocoderInput, VocoderStage
from tests.stages.recorded_graphs import eager_fixed_shapes, record_captures

from . import oracle_flow_encoder, oracle_flow_estimator, oracle_hift


@pytest.fixture(scope="module")
def stages(tiny_vocoder):
    make = lambda **kw: VocoderStage.from_checkpoint(tiny_vocoder, options=VocoderOptions(**kw))  # noqa: E731
    return make


def oracle_token2mel(stage, tokens: torch.Tensor, spk: torch.Tensor, finalize: bool) -> torch.Tensor:
    """CausalMaskedDiffWithXvec.inference from the oracles: (T,) units -> (80, L) mel."""
    cfg, sd = stage.cfg.flow, stage.flow.state_dict()
    mu = oracle_flow_encoder.flow_encode(sd, tokens[None], cfg, finalize).transpose(1, 2)  # (1, 80, L)
    spks = F.linear(F.normalize(spk[None], dim=1), sd["spk_embed_affine_layer.weight"],
                    sd["spk_embed_affine_layer.bias"])
    estimator = lambda *a: oracle_flow_estimator.estimator_forward(sd, cfg.estimator, *a)  # noqa: E731
    return oracle_flow_estimator.cfm_inference(estimator, stage.noise, mu, torch.ones(1, 1, mu.shape[2]),
                                               cfg.cfm.n_timesteps, spks, torch.zeros_like(mu), cfg.cfm.t_scheduler,
                                               cfg.cfm.inference_cfg_rate, cfg.cfm.temperature)[0]


class Token2Wav:
    """SpeechDecoder.token2wav, transcribed over the oracles: flow on units [0, n), mel from 2*offset, HiFT with the
    8-frame mel / 3840-sample source overlap, the Hamming cross-fade, and the withheld tail (HiFT's random draws
    zeroed). One per reply: it holds the overlap cache."""

    def __init__(self, stage, voice_spk):
        self.stage, self.spk, self.cache = stage, voice_spk, None
        self.hcfg, self.hsd = stage.cfg.hift, oracle_hift.official_state_dict(stage.hift.state_dict())
        self.window = torch.from_numpy(np.hamming(2 * 3840)).float()

    @torch.inference_mode()
    def __call__(self, units: list[int], offset: int, finalize: bool) -> np.ndarray:
        mel = oracle_token2mel(self.stage, torch.tensor(units), self.spk, finalize)[:, offset * 2:][None]
        src = torch.zeros(1, 1, 0)
        if self.cache is not None:
            mel = torch.cat([self.cache["mel"], mel], dim=2)
            src = self.cache["source"]
        L = mel.shape[2] * oracle_hift.samples_per_frame(self.hcfg)
        zeros = (torch.zeros(1, self.hcfg.nb_harmonics + 1, 1), torch.zeros(1, self.hcfg.nb_harmonics + 1, L))
        speech, source = oracle_hift.inference(self.hsd, self.hcfg, mel, src, draws=zeros)
        w = self.window
        if self.cache is not None:
            speech[..., :3840] = speech[..., :3840] * w[:3840] + self.cache["speech"][..., -3840:] * w[3840:]
        if not finalize:
            self.cache = {"mel": mel[:, :, -8:], "source": source[:, :, -3840:], "speech": speech[:, -3840:]}
            speech = speech[:, :-3840]
        return speech[0].numpy()


def official_stream(stage, units, voice_spk, hop=50, look=3):
    """run_cosy2_decoder.py --stream, transcribed: a call per `hop` units once `hop + look` are past the offset,
    then a final one. Returns the concatenated speech."""
    token2wav, offset, out = Token2Wav(stage, voice_spk), 0, []
    while len(units) - offset >= hop + look:
        out.append(token2wav(units[:offset + hop + look], offset, False))
        offset += hop
    out.append(token2wav(units, offset, True))
    return np.concatenate(out)


def process_unit_chunk_stream(stage, calls, voice_spk, look=3):
    """serve/flow_inference.py `process_unit_chunk`, transcribed: one token2wav per (units, finalize) call on all
    units so far, token_offset = len - 3 after a non-final call. Returns the speech each call emits."""
    token2wav, offset, generated, out = Token2Wav(stage, voice_spk), 0, [], []
    for new, finalize in calls:
        generated += new
        out.append(token2wav(generated, offset, finalize))
        offset = len(generated) if finalize else len(generated) - look
    return out


UNITS = np.random.default_rng(0).integers(0, 6561, 137).tolist()
REL_BF16 = 0.1  # bf16 mel vs fp32, relative rms; measured 0.034
ERR = {"recompute": 1e-2, "incremental": 1e-2}  # measured against the oracles: 7.1e-3 both (PCM peak ~0.5)
# TTS writes of a reply: full 10-unit chunks, an early-EOS chunk of 6, and a 47-unit final flush.
WRITES = [UNITS[0:10], UNITS[10:20], UNITS[20:26], UNITS[26:36], UNITS[36:83]]


def pieces(writes, w=10):
    """How the engine's TTS runner cuts writes for the vocoder (stages.tts.UnitPieces): W-unit pieces, the rest
    with the write's end."""
    return [(wr[i:i + w], k == len(writes) - 1 and i + w >= len(wr)) for k, wr in enumerate(writes)
            for i in range(0, max(len(wr), 1), w)]


@pytest.mark.parametrize("schedule,mode", [("official-live", "recompute"), ("official-live", "incremental"),
                                           ("live", "incremental")])
def test_the_write_schedules_equal_the_official_live_server_call_for_call(stages, schedule, mode):
    """Driven one input at a time (a TTS write; under "live" a W-unit piece of one), the stage emits per call what
    `process_unit_chunk` emits for the same calls: first audio from the first 10 units, not after 53."""
    st = stages(schedule=schedule, mode=mode, deterministic=True)
    calls = [(w, k == len(WRITES) - 1) for k, w in enumerate(WRITES)] if schedule == "official-live" \
        else pieces(WRITES)
    want = process_unit_chunk_stream(st, calls, st.voices.voice("default"))
    st.open("s")
    got = [st.step([VocoderInput("s", units, final)])[0].pcm for units, final in calls]
    st.close("s")
    assert [g.size for g in got] == [w.size for w in want]
    assert got[0].size == (2 * (10 - 3) - 8) * 480  # 14 mel frames from the first write, 8 of them withheld
    err = max(np.abs(g - w).max() for g, w in zip(got, want) if g.size)
    assert err < ERR[mode], err  # measured: 5.0e-3 official-live (its 47-unit final call), 1.1e-3 live
    assert sum(g.size for g in got) == 83 * 960


def gradio_calls(writes, stopped):
    """The official live server's calls for a reply's TTS writes (gradio_web_server.py over model_worker.py,
    transcribed; the worker keeping up, a message per write): `process_unit_chunk` only for a message with new
    units, `finalize` only on the last message, and only when the reply's text ended with `<|im_end|>`."""
    return [(w, k == len(writes) - 1 and stopped) for k, w in enumerate(writes) if w]


@pytest.mark.parametrize("case", ["stopped", "cut at max_new_tokens", "stopped, empty final flush"])
def test_official_live_ends_a_reply_as_the_official_server(stages, case):
    """A reply cut at max_new_tokens ends on a non-final call: its last 3 units' frames and the withheld 3840
    samples are never voiced; a reply whose final flush is empty makes no last call, with the same loss. Only a
    reply that stopped on <|im_end|> with units in its flush is finalized."""
    st = stages(schedule="official-live", deterministic=True)
    writes = WRITES[:-1] + [[]] if case.endswith("empty final flush") else WRITES
    stopped = case.startswith("stopped")
    want = process_unit_chunk_stream(st, gradio_calls(writes, stopped), st.voices.voice("default"))
    st.open("s")
    outs = [st.step([VocoderInput("s", w, k == len(writes) - 1, stopped)])[0] for k, w in enumerate(writes)]
    st.close("s")
    assert outs[-1].final and not any(o.final for o in outs[:-1])
    got = [o.pcm for o, w in zip(outs, writes) if w]
    assert [g.size for g in got] == [w.size for w in want] and outs[-1].pcm.size == want[-1].size * bool(writes[-1])
    assert max(np.abs(g - w).max() for g, w in zip(got, want) if g.size) < ERR["incremental"]
    voiced = {"stopped": 83 * 960, "cut at max_new_tokens": (83 - 3) * 960 - 3840,
              "stopped, empty final flush": (36 - 3) * 960 - 3840}[case]
    assert sum(g.size for g in got) == voiced


def test_a_first_write_too_short_for_the_overlap_waits_for_the_next(stages):
    """A first write of 6 units makes 6 mel frames, fewer than the 8 HiFT keeps for the next call's cross-fade: it
    is voiced together with the next write, exactly as if the two had been one."""
    st = stages(schedule="live", deterministic=True)
    writes = [UNITS[0:6], UNITS[6:16], UNITS[16:40]]
    st.open("s")
    got = [st.step([VocoderInput("s", w, k == 2)])[0].pcm for k, w in enumerate(writes)]
    st.close("s")
    assert got[0].size == 0
    want = process_unit_chunk_stream(st, [(writes[0] + writes[1], False), (writes[2], True)],
                                     st.voices.voice("default"))
    assert [g.size for g in got[1:]] == [w.size for w in want]
    assert max(np.abs(g - w).max() for g, w in zip(got[1:], want)) < ERR["incremental"]


def run(stage, units, burst, sid="s", seed=0):
    stage.open(sid, seed=seed)
    pcm = []
    for i in range(0, len(units), burst):
        pcm.append(stage.step([VocoderInput(sid, units[i:i + burst], final=i + burst >= len(units))])[0].pcm)
    stage.close(sid)
    return np.concatenate(pcm)




@pytest.mark.parametrize("mode,burst", [("recompute", 10), ("incremental", 7)])
def test_the_hop_schedule_equals_the_official_offline_stream(stages, mode, burst):
    """Mel frames agree with the oracles to ~1e-6 (tests/stages/test_flow.py); HiFT's NSF source integrates f0 into
    a phase over every sample, which turns fp32 rounding differences into larger PCM differences: ERR[mode] is the
    bound, a few times what was measured."""
    st = stages(schedule="hop", mode=mode, deterministic=True)
    ref = official_stream(st, UNITS, st.voices.voice("default"))
    ours = run(st, UNITS, burst=burst)
    assert ours.shape == ref.shape == (137 * 960,)  # 2 mel frames per unit, 480 samples per frame
    err = np.abs(ours - ref).max()
    assert err < ERR[mode], err
    assert np.sqrt(np.mean(ours ** 2)) > 0.01  # real audio, not silence


def test_recompute_and_incremental_modes_agree(stages):
    a = run(stages(schedule="hop", mode="recompute", deterministic=True), UNITS, burst=10)
    b = run(stages(schedule="hop", mode="incremental", deterministic=True), UNITS, burst=10)
    assert np.abs(a - b).max() < ERR["incremental"]  # measured 4.1e-3


def test_burst_size_does_not_change_the_audio_of_the_hop_schedule(stages):
    st = stages(schedule="hop", mode="recompute", deterministic=True)
    assert np.array_equal(run(st, UNITS, burst=10), run(st, UNITS, burst=137))


def test_seeded_randomness(stages):
    st = stages(mode="recompute")
    a, b, c = run(st, UNITS[:60], 10, seed=1), run(st, UNITS[:60], 10, seed=1), run(st, UNITS[:60], 10, seed=2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    det = stages(mode="recompute", deterministic=True)
    assert np.array_equal(run(det, UNITS[:60], 10, seed=1), run(det, UNITS[:60], 10, seed=2))


def test_short_and_silent_replies(stages):
    st = stages()
    assert run(st, UNITS[:5], 5).shape == (5 * 960,)
    st.open("q")
    out = st.step([VocoderInput("q", [], final=True)])[0]
    assert out.final and out.pcm.size == 0


def test_bad_inputs_are_clear_errors(stages):
    st = stages()
    with pytest.raises(VocoderError, match="unknown session"):
        st.step([VocoderInput("nope", [1, 2])])
    st.open("a")
    with pytest.raises(VocoderError, match="out of range"):
        st.step([VocoderInput("a", [1, 6561])])
    with pytest.raises(VocoderError, match="out of range"):
        st.step([VocoderInput("a", [-1])])
    with pytest.raises(CheckpointError, match="voice"):
        st.open("b", voice="nobody")
    with pytest.raises(VocoderError, match="no units"):
        st.synthesize([])
    with pytest.raises(ConfigError, match="token_hop"):
        stages(schedule="hop", token_hop=3)
    with pytest.raises(ConfigError, match="mode"):
        VocoderOptions(mode="fast")


@pytest.mark.parametrize("schedule", ["live", "hop"])
def test_a_batched_step_equals_each_session_alone(stages, schedule):
    """Eight sessions with different reply lengths, starting at different steps, each step voicing whoever has a
    write: the batched stage (flow encoder, estimator and HiFT over all of them at once) gives every session the
    PCM it gets alone, to fp32 rounding (ERR: HiFT's phase integration magnifies it, see above); max_batch=1 runs
    the same steps one session at a time, bit for bit the single-session result."""
    rng = np.random.default_rng(7)
    replies = [rng.integers(0, 6561, n).tolist() for n in (23, 61, 10, 97, 45, 8, 79, 40)]
    writes = [[r[i:i + 10] for i in range(0, len(r), 10)] for r in replies]
    start = [0, 1, 0, 2, 5, 3, 0, 1]  # the step of each session's first write

    def drive(stage, together: bool) -> list[np.ndarray]:
        for i in range(8):
            stage.open(f"s{i}", seed=i)
        pcm = [[] for _ in range(8)]
        for t in range(max(s + len(w) for s, w in zip(start, writes))):
            inputs = [VocoderInput(f"s{i}", w[t - start[i]], final=t - start[i] == len(w) - 1)
                      for i, w in enumerate(writes) if 0 <= t - start[i] < len(w)]
            outs = stage.step(inputs) if together else [stage.step([x])[0] for x in inputs]
            for o in outs:
                pcm[int(o.session_id[1:])].append(o.pcm)
        for i in range(8):
            stage.close(f"s{i}")
        return [np.concatenate(p) for p in pcm]

    alone = drive(stages(schedule=schedule), together=False)
    st = stages(schedule=schedule)
    hift_rows, flow_rows, inference, stream_step = [], [], st.hift.inference, st.flow.stream_step
    st.hift.inference = lambda mel, *a: hift_rows.append(mel.shape[0]) or inference(mel, *a)
    st.flow.stream_step = lambda streams, f: flow_rows.append(len(streams)) or stream_step(streams, f)
    batched = drive(st, together=True)
    one_at_a_time = drive(stages(schedule=schedule, max_batch=1), together=True)
    for a, b, c, r in zip(alone, batched, one_at_a_time, replies):
        assert a.shape == b.shape == (len(r) * 960,)
        assert np.abs(a - b).max() < ERR["incremental"], np.abs(a - b).max()  # measured <= 3.6e-3
        assert np.array_equal(a, c)
    assert max(flow_rows) >= 2  # sessions whose hops come due together share one flow call
    if schedule == "live":
        assert max(hift_rows) >= 4  # steady W-unit writes have equal mel lengths: they share one HiFT call


def test_bfloat16_runs_and_its_mel_stays_near_float32(tiny_vocoder):
    """The whole stage in bf16 (what a GPU serves): the flow's state and HiFT's input keep the weights' dtype (an
    fp32 empty tensor once promoted a bf16 mu and broke the first call). The flow's mel stays near fp32's (measured
    rms difference 0.034 of the mel's rms); the PCM does not (random-weight HiFT's phase integration decorrelates
    it), so only its shape and sanity are checked."""
    units = torch.tensor(UNITS[:40])
    mel, pcm = {}, {}
    for dtype in (torch.float32, torch.bfloat16):
        st = VocoderStage.from_checkpoint(tiny_vocoder, options=VocoderOptions(deterministic=True), dtype=dtype)
        spk = st.voices.voice("default").to(dtype)
        stream = st.flow.new_stream(spk, st.noise)
        parts = []
        for i in range(0, 40, 10):
            stream.push(units[i:i + 10])
            parts.append(stream.mel(finalize=i + 10 >= 40))
        mel[dtype] = torch.cat(parts, 1).float()
        st.open("s")
        pcm[dtype] = np.concatenate([st.step([VocoderInput("s", UNITS[i:i + 10], final=i + 10 >= 40)])[0].pcm
                                     for i in range(0, 40, 10)])
    a, b = mel[torch.float32], mel[torch.bfloat16]
    assert a.shape == b.shape == (80, 80)
    rel = ((a - b).pow(2).mean().sqrt() / a.pow(2).mean().sqrt()).item()
    assert rel < REL_BF16
    assert pcm[torch.bfloat16].shape == (40 * 960,) and np.isfinite(pcm[torch.bfloat16]).all()
    assert np.sqrt(np.mean(pcm[torch.bfloat16] ** 2)) > 0.01


_rng = np.random.default_rng(8)
EIGHT_REPLIES = [_rng.integers(0, 6561, n).tolist() for n in (23, 61, 10, 97, 45, 8, 79, 140)]
EIGHT_STARTS = [0, 1, 0, 2, 5, 3, 0, 1]


def graphed_runs(stage) -> list:
    """Every fixed-shape bucket a vocoder stage holds: its flow's Euler steps and encoder passes, its HiFT chunks."""
    return [*stage.graphs.solves.values(), *stage.graphs.encodes.values(), *stage.hift_graphs.voices.values()]


def eight_sessions(stage) -> list[np.ndarray]:
    """Eight sessions with different reply lengths and starts, one cancelled mid-reply and answering again in its
    slot, one closed and its slot reopened: each session's PCM."""
    writes = [[r[i:i + 10] for i in range(0, len(r), 10)] for r in EIGHT_REPLIES]
    for i in range(8):
        stage.open(f"s{i}", seed=i)
    stage.step([VocoderInput("s3", EIGHT_REPLIES[0][:30])])  # a reply cancelled mid-way: s3 answers again after it
    stage.cancel("s3")
    stage.open("gone", seed=9)  # a session that comes and goes: its slot is reused below
    stage.step([VocoderInput("gone", EIGHT_REPLIES[1][:20])])
    stage.close("gone")
    stage.close("s5")
    stage.open("s5", seed=5)
    pcm = [[] for _ in range(8)]
    for t in range(max(s + len(w) for s, w in zip(EIGHT_STARTS, writes))):
        inputs = [VocoderInput(f"s{i}", w[t - EIGHT_STARTS[i]], final=t - EIGHT_STARTS[i] == len(w) - 1)
                  for i, w in enumerate(writes) if 0 <= t - EIGHT_STARTS[i] < len(w)]
        for o in stage.step(inputs):
            pcm[int(o.session_id[1:])].append(o.pcm)
    for i in range(8):
        stage.close(f"s{i}")
    return [np.concatenate(p) for p in pcm]


@pytest.mark.parametrize("max_batch,recorded", [(1, False), (8, False), (2, True)], ids=["1", "8", "2-recorded"])
def test_fixed_shape_flow_steps_voice_as_the_dynamic_window(tiny_vocoder, max_batch, recorded, monkeypatch):
    """With cuda_graphs and a window (the serving default), the flow's encoder pass and Euler steps run on fixed
    shapes over pools of one slot per session (stages/flow_graph.py; eagerly on a CPU), and HiFT on the fixed chunk
    lengths of a steady stream (stages/hift_graph.py). Over eight_sessions (a cancel, reused slots), every
    session's PCM equals the dynamic windowed stage's to fp32 rounding, which HiFT's phase integration magnifies from
    the flow's ~1e-6 (tests/stages/test_flow_graph.py) as it does a batch's (ERR). Recorded: every bucket captured as
    the stage loads and replayed as a CUDA graph would be (tests/stages/recorded_graphs.py)."""
    if recorded:
        record_captures(monkeypatch)
        # Recording is slow (Python per op): flow buckets up to 64 frames and 32 tokens (wider calls run eagerly),
        # and HiFT's hop-schedule lengths (unused here) as short as a live write's (hop 10: 20 and 28 frames).
        monkeypatch.setattr(flow_graph, "MAX_FRAMES", 64)
        monkeypatch.setattr(flow_graph, "MAX_TOKENS", 32)
    opts = VocoderOptions(left_chunks=1, max_batch=max_batch, token_hop=10 if recorded else None)

    limits = Limits(max_sessions=9)
    fixed_stage = VocoderStage.from_checkpoint(tiny_vocoder, limits, opts, cuda_graphs=True)
    assert fixed_stage.graphs is not None and fixed_stage.graphs.capture == recorded
    runs = graphed_runs(fixed_stage)
    assert all((r.graph is not None) == recorded for r in runs)
    fixed = eight_sessions(fixed_stage)
    voices = fixed_stage.hift_graphs.voices  # recorded: all warmed, the used ones replayed
    used = {(T, cached) for (_, T, cached), v in voices.items() if not recorded or v.graph.replays}
    live = {(14, False), (28, True)}  # every live chunk but the finals' shorter ones
    assert used == (live | {(20, False)} if recorded else live)  # hop 10's uncached length: a lone 10-unit reply
    dynamic = eight_sessions(VocoderStage.from_checkpoint(tiny_vocoder, limits, opts))
    for a, b, r in zip(fixed, dynamic, EIGHT_REPLIES):
        assert a.shape == b.shape == (len(r) * 960,)
        assert np.abs(a - b).max() < ERR["incremental"], np.abs(a - b).max()  # measured <= 2.3e-3
        assert np.sqrt(np.mean((a - b) ** 2)) < 1e-4  # measured <= 6.5e-5, of a PCM rms ~0.12
    # The exact flow (no window) has no fixed shape: it stays dynamic; HiFT's lengths follow the model's W.
    monkeypatch.undo()  # (nothing to record: a stage made only to read its buckets)
    exact = VocoderStage.from_checkpoint(tiny_vocoder, options=VocoderOptions(), cuda_graphs=True, write=12)
    assert exact.graphs is None and exact.hift_graphs.frames == [(18, False), (32, True), (100, False), (108, True)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_stage_voices_as_its_eager_fixed_shapes(tiny_vocoder, monkeypatch):
    """On a GPU the whole live write replays as CUDA graphs (flow encoder, Euler steps, HiFT), captured as the stage
    loads: eight_sessions' PCM equals the same stage's fixed shapes run eagerly on the same GPU (the same kernels;
    to the CPU test's bound, in case a kernel is not deterministic)."""
    limits, opts = Limits(max_sessions=9), VocoderOptions(left_chunks=1, max_batch=8)
    graphed_stage = VocoderStage.from_checkpoint(tiny_vocoder, limits, opts, device="cuda", cuda_graphs=True)
    runs = graphed_runs(graphed_stage)
    assert runs and all(r.graph is not None for r in runs)  # every bucket captured: none refused
    graphed = eight_sessions(graphed_stage)
    eager_fixed_shapes(monkeypatch)  # the same stage with its buckets left eager
    eager_stage = VocoderStage.from_checkpoint(tiny_vocoder, limits, opts, device="cuda", cuda_graphs=True)
    assert not eager_stage.graphs.capture and not eager_stage.hift_graphs.capture
    eager = eight_sessions(eager_stage)
    for a, b, r in zip(graphed, eager, EIGHT_REPLIES):
        assert a.shape == b.shape == (len(r) * 960,)
        assert np.abs(a - b).max() < ERR["incremental"], np.abs(a - b).max()
