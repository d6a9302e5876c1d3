import numpy as np
import pytest
import torch
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper import modeling_whisper as hf_whisper

from omni2.engine.audio import N_SAMPLES, SAMPLE_RATE, AudioError
from omni2.engine.config import ProjectorConfig, WhisperEncoderConfig
from omni2.stages.asr import ASRStage, Projector, WhisperEncoder, log_mel, sinusoids

ENC = WhisperEncoderConfig(n_state=128, n_layer=2)  # 2 heads of 64, n_mels 128, n_ctx 1500 as in large-v3
PROJ = ProjectorConfig(ds_rate=5, encoder_dim=128, hidden=64, out_dim=96)


def _signals() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    t = np.arange(3 * SAMPLE_RATE) / SAMPLE_RATE
    return {
        "noise": rng.uniform(-0.5, 0.5, 5 * SAMPLE_RATE).astype(np.float32),
        "chirp": (0.3 * np.sin(2 * np.pi * (100 * t + 1200 * t**2))).astype(np.float32),  # 100 Hz -> 7.3 kHz
        "silence": np.zeros(2 * SAMPLE_RATE, np.float32),
        "clip_1s": (rng.standard_normal(SAMPLE_RATE) * 0.05).astype(np.float32),
        "clip_30s": (rng.standard_normal(N_SAMPLES) * 0.1).astype(np.float32),
    }


def _random_encoder(seed: int = 0) -> WhisperEncoder:
    torch.manual_seed(seed)
    enc = WhisperEncoder(ENC)
    with torch.no_grad():  # non-trivial norms and biases, so a swapped name cannot hide behind ones and zeros
        for name, p in enc.named_parameters():
            if name.endswith(("ln.weight", "ln_post.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
    return enc.eval()


# --- log-mel front end ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def feature_extractor() -> WhisperFeatureExtractor:
    return WhisperFeatureExtractor(feature_size=128)


@pytest.mark.parametrize("name", list(_signals()))
def test_log_mel_matches_transformers(name, feature_extractor):
    audio = _signals()[name]
    want = feature_extractor(audio, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features[0]  # (128, 3000)
    got = log_mel(torch.from_numpy(audio)).numpy()
    assert got.shape == want.shape == (128, 3000)
    assert np.abs(got - want).max() < 1e-4
    # transformers' numpy path is an independent STFT (its torch path, above, follows whisper's recipe)
    padded = np.pad(audio, (0, N_SAMPLES - len(audio)))[None]  # (1, 480000)
    want_np = feature_extractor._np_extract_fbank_features(padded, "cpu")[0]
    assert np.abs(got - want_np).max() < 1e-4


def test_log_mel_batch_is_per_example(feature_extractor):
    audios = list(_signals().values())
    batch = torch.zeros(len(audios), N_SAMPLES)
    for i, a in enumerate(audios):
        batch[i, : len(a)] = torch.from_numpy(a)
    got = log_mel(batch)  # (B, 128, 3000)
    want = feature_extractor([a for a in audios], sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
    assert got.shape == want.shape == (len(audios), 128, 3000)
    assert np.abs(got.numpy() - want).max() < 1e-4
    for i in range(len(audios)):  # a loud neighbour must not move a quiet turn's -80 dB floor
        torch.testing.assert_close(got[i], log_mel(batch[i]), rtol=0, atol=1e-5)


def test_log_mel_silence_and_trim():
    silent = log_mel(torch.zeros(1, 100))
    torch.testing.assert_close(silent, torch.full((1, 128, 3000), -1.5))  # (log10(1e-10) + 4) / 4
    long = torch.randn(N_SAMPLES + 999) * 0.1
    torch.testing.assert_close(log_mel(long), log_mel(long[:N_SAMPLES]))  # whisper's pad_or_trim


# --- encoder vs transformers ----------------------------------------------------------------------------------

def to_hf_whisper_encoder(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """openai-whisper AudioEncoder names (ours) -> transformers WhisperEncoder names.

    conv1/conv2 -> same; positional_embedding -> embed_positions.weight; ln_post -> layer_norm;
    blocks.i.attn.{query,key,value,out} -> layers.i.self_attn.{q,k,v,out}_proj (k has no bias in both);
    blocks.i.attn_ln -> layers.i.self_attn_layer_norm; blocks.i.mlp.0 / mlp.2 -> layers.i.fc1 / fc2;
    blocks.i.mlp_ln -> layers.i.final_layer_norm.
    """
    renames = [(".attn.query.", ".self_attn.q_proj."), (".attn.key.", ".self_attn.k_proj."),
               (".attn.value.", ".self_attn.v_proj."), (".attn.out.", ".self_attn.out_proj."),
               (".attn_ln.", ".self_attn_layer_norm."), (".mlp.0.", ".fc1."), (".mlp.2.", ".fc2."),
               (".mlp_ln.", ".final_layer_norm.")]
    out = {}
    for k, v in sd.items():
        if k == "positional_embedding":
            k = "embed_positions.weight"
        elif k.startswith("ln_post."):
            k = "layer_norm." + k.removeprefix("ln_post.")
        elif k.startswith("blocks."):
            k = "layers." + k.removeprefix("blocks.")
            for old, new in renames:
                k = k.replace(old, new)
        out[k] = v
    return out


def test_sinusoids_match_transformers():
    torch.testing.assert_close(sinusoids(1500, 128), hf_whisper.sinusoids(1500, 128), rtol=0, atol=1e-6)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_encoder_matches_transformers(attn):
    ours = _random_encoder()
    cfg = WhisperConfig(d_model=128, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=512,
                        num_mel_bins=128, max_source_positions=1500, activation_function="gelu",
                        dropout=0.1, attention_dropout=0.1, activation_dropout=0.1, encoder_layerdrop=0.5,
                        attn_implementation=attn)
    hf = hf_whisper.WhisperEncoder(cfg).eval()  # eval(): dropout and layerdrop above must be inert
    assert hf.config._attn_implementation == attn
    hf.load_state_dict(to_hf_whisper_encoder(ours.state_dict()), strict=True)

    mel = log_mel(torch.randn(2, N_SAMPLES) * 0.1)  # (2, 128, 3000)
    with torch.inference_mode():
        got = ours(mel)
        want = hf(mel).last_hidden_state
    assert got.shape == want.shape == (2, 1500, 128)
    diff = (got - want).abs().max().item()
    print(f"encoder ({attn}) max |ours - transformers| = {diff:.2e}")
    assert diff < 1e-4


def test_encoder_state_dict_keys_are_the_official_ones():
    keys = set(WhisperEncoder(WhisperEncoderConfig(n_state=128, n_layer=1)).state_dict())
    assert keys == {"conv1.weight", "conv1.bias", "conv2.weight", "conv2.bias", "positional_embedding",
                    "ln_post.weight", "ln_post.bias"} | {
        f"blocks.0.{k}" for k in ("attn.query.weight", "attn.query.bias", "attn.key.weight", "attn.value.weight",
                                  "attn.value.bias", "attn.out.weight", "attn.out.bias", "attn_ln.weight",
                                  "attn_ln.bias", "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias",
                                  "mlp_ln.weight", "mlp_ln.bias")}
    assert set(Projector(PROJ).state_dict()) == {"linear1.weight", "linear1.bias", "linear2.weight", "linear2.bias"}


def test_encoder_refuses_unpadded_mel():
    with pytest.raises(ValueError, match="exactly 30 s"):
        _random_encoder()(torch.zeros(1, 128, 2000))


# --- projector ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("T", [1500, 1503, 10, 4])
def test_projector_matches_official_formula(T):
    torch.manual_seed(0)
    proj = Projector(PROJ).eval()
    x = torch.randn(2, T, PROJ.encoder_dim)  # (B, T, E)
    # EncoderProjectorConcat.forward, transcribed: drop T % k trailing frames, view, Linear, ReLU, Linear
    k = PROJ.ds_rate
    drop = T % k
    y = x[:, :-drop, :] if drop else x
    y = y.contiguous().view(2, y.size(1) // k, PROJ.encoder_dim * k)
    want = proj.linear2(torch.relu(proj.linear1(y)))
    got = proj(x)
    assert got.shape == (2, T // k, PROJ.out_dim)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# --- stage ----------------------------------------------------------------------------------------------------

def _stage() -> ASRStage:
    torch.manual_seed(1)
    return ASRStage.from_modules(_random_encoder(), Projector(PROJ), device="cpu", dtype=torch.float32)


def test_step_batch_equals_each_alone():
    stage = _stage()
    rng = np.random.default_rng(2)
    turns = [("a", (rng.standard_normal(SAMPLE_RATE) * 0.1).astype(np.float32)),
             ("b", np.zeros(10, np.float32)),
             ("c", (rng.standard_normal(N_SAMPLES) * 0.3).astype(np.float32))]
    for sid, _ in turns:
        stage.open(sid)
    out = stage.step(turns)
    assert [sid for sid, _ in out] == ["a", "b", "c"]
    for (sid, audio), (_, emb) in zip(turns, out, strict=True):
        assert emb.shape == (300, PROJ.out_dim) and emb.dtype == torch.float32
        (_, alone), = stage.step([(sid, audio)])
        torch.testing.assert_close(emb, alone, rtol=0, atol=1e-5)
    assert not torch.allclose(out[0][1], out[1][1])
    assert stage.n_out == 300 and stage.out_dim == PROJ.out_dim


def test_step_session_errors():
    stage = _stage()
    audio = np.zeros(100, np.float32)
    with pytest.raises(KeyError, match="not opened"):
        stage.step([("x", audio)])
    stage.open("x")
    with pytest.raises(ValueError, match="already open"):
        stage.open("x")
    with pytest.raises(ValueError, match="one turn per session"):
        stage.step([("x", audio), ("x", audio)])
    stage.close("x")
    stage.close("x")
    with pytest.raises(KeyError, match="not opened"):
        stage.step([("x", audio)])
    assert stage.step([]) == []


def test_step_audio_errors():
    stage = _stage()
    stage.open(7)
    for bad in (np.zeros(N_SAMPLES + 1, np.float32), np.zeros(100, np.int16), np.zeros((100, 2), np.float32),
                [0.0] * 100):
        with pytest.raises(AudioError):
            stage.step([(7, bad)])


def test_meta_build_then_assign_load_equals_eager_build():
    src = _stage()
    with torch.device("meta"):  # what from_checkpoint does before ModelDir.load_module fills the tensors
        enc, proj = WhisperEncoder(ENC), Projector(PROJ)
    enc.load_state_dict(src.encoder.state_dict(), strict=True, assign=True)
    proj.load_state_dict(src.projector.state_dict(), strict=True, assign=True)
    stage = ASRStage.from_modules(enc, proj)
    audio = (np.random.default_rng(3).standard_normal(8000) * 0.1).astype(np.float32)
    for s in (src, stage):
        s.open("a")
    torch.testing.assert_close(stage.step([("a", audio)])[0][1], src.step([("a", audio)])[0][1], rtol=0, atol=0)


def test_from_checkpoint_tiny(request, tmp_path):
    from safetensors.torch import load_file

    try:
        model_dir = request.getfixturevalue("tiny_ckpt")  # tests/conftest.py: the shared tiny model directory
    except pytest.FixtureLookupError:
        from omni2.engine.checkpoints.model_writer import write_checkpoint

        model_dir = write_checkpoint(tmp_path, "tiny")
    stage = ASRStage.from_checkpoint(model_dir)
    # independent of ModelDir: the same tensors read straight from the safetensors files
    tensors = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(f))
    parts = {}
    for prefix in ("model.speech_encoder.", "model.speech_projector."):
        parts[prefix] = {k.removeprefix(prefix): v.float() for k, v in tensors.items() if k.startswith(prefix)}
    enc = WhisperEncoder(stage.encoder.cfg)
    enc.load_state_dict(parts["model.speech_encoder."], strict=True)
    proj = Projector(ProjectorConfig(ds_rate=stage.projector.k, encoder_dim=stage.encoder.cfg.n_state,
                                     hidden=stage.projector.linear1.out_features, out_dim=stage.out_dim))
    proj.load_state_dict(parts["model.speech_projector."], strict=True)
    ref = ASRStage.from_modules(enc, proj)

    audio = (np.random.default_rng(4).standard_normal(SAMPLE_RATE) * 0.1).astype(np.float32)
    for s in (stage, ref):
        s.open("t")
    (_, got), = stage.step([("t", audio)])
    (_, want), = ref.step([("t", audio)])
    assert got.shape == (300, stage.out_dim)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_bf16_stage_runs_and_stays_close():
    ref = _stage()
    torch.manual_seed(1)
    low = ASRStage.from_modules(_random_encoder(), Projector(PROJ), dtype=torch.bfloat16)
    low.projector.load_state_dict(ref.projector.state_dict())
    audio = (np.random.default_rng(5).standard_normal(SAMPLE_RATE) * 0.1).astype(np.float32)
    for s in (ref, low):
        s.open(0)
    (_, want), = ref.step([(0, audio)])
    (_, got), = low.step([(0, audio)])
    assert got.dtype == torch.bfloat16
    assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_stage_equals_cpu():
    ref = _stage()
    gpu = ASRStage.from_modules(_random_encoder(), Projector(PROJ), device="cuda")
    gpu.projector.load_state_dict(ref.projector.state_dict())
    audio = (np.random.default_rng(6).standard_normal(3 * SAMPLE_RATE) * 0.1).astype(np.float32)
    for s in (ref, gpu):
        s.open(0)
    (_, want), = ref.step([(0, audio)])
    (_, got), = gpu.step([(0, audio)])
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), want, rtol=1e-3, atol=1e-3)  # TF32 and cuFFT differ from CPU


def test_checkpoint_encoder_loads_into_transformers_whisper(tiny_ckpt):
    """The layout proof: the tiny checkpoint's `model.speech_encoder.*` tensors, renamed by the documented
    mapping (`to_hf_whisper_encoder`, docs/ARCHITECTURE.md), load strictly into transformers' WhisperEncoder
    and give our encoder's output."""
    from omni2.engine.checkpoints.model_dir import PREFIX_ENCODER, ModelDir

    md = ModelDir(tiny_ckpt)
    sd = {k.removeprefix(PREFIX_ENCODER): md.get_tensor(k, dtype=torch.float32) for k in md.keys(PREFIX_ENCODER)}
    c = md.config.encoder
    hf = hf_whisper.WhisperEncoder(WhisperConfig(
        d_model=c.n_state, encoder_layers=c.n_layer, encoder_attention_heads=c.n_head, encoder_ffn_dim=4 * c.n_state,
        num_mel_bins=c.n_mels, max_source_positions=c.n_ctx)).eval()
    hf.load_state_dict(to_hf_whisper_encoder(sd), strict=True)
    stage = ASRStage.from_checkpoint(md)
    mel = log_mel(torch.randn(1, SAMPLE_RATE * 3) * 0.1)
    with torch.inference_mode():
        diff = (stage.encoder(mel) - hf(mel).last_hidden_state).abs().max().item()
    assert diff < 1e-4
