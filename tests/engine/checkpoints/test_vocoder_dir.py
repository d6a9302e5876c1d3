import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from omni2.engine.checkpoints.hyperyaml import load_hyperpyyaml_data
from omni2.engine.checkpoints.vocoder_dir import VocoderDir, read_cosyvoice_yaml, validate_voice
from omni2.engine.checkpoints.vocoder_writer import (
    VOCODER_PRESETS,
    _init_tensor,
    cosyvoice_yaml,
    flow_tensor_plan,
    hift_tensor_plan,
)
from omni2.engine.cli.main import main
from omni2.engine.config import CheckpointError, FlowConfig, VocoderConfig
from omni2.stages.vocoder import load_hift

CHECK_LAYOUT = Path(__file__).parents[3].parent / "shared/checks/check_layout.py"
HAS_VOICE = all(importlib.util.find_spec(m) for m in ("onnx", "onnxruntime", "kaldi_native_fbank"))
needs_voice = pytest.mark.skipif(not HAS_VOICE, reason="onnx / onnxruntime / kaldi-native-fbank not installed")

# A cosyvoice.yaml in the shape CosyVoice2 releases use (written for this test, values = MODEL_SPEC §2): the newer
# class names, HyperPyYAML tags (!new, !name, !apply, !ref with arithmetic), sections the engine ignores, nested
# refs inside lists, and a YAML-1.2 float.
COSYVOICE2_YAML = """\
__set_seed1: !apply:random.seed [7]
__set_seed3: !apply:torch.manual_seed [7]
sample_rate: 24000
spk_embed_dim: 192
token_frame_rate: 25
token_mel_ratio: 2
chunk_size: 25
num_decoding_left_chunks: -1
qwen_pretrain_path: ''

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: 80
    base_channels: 512
    nb_harmonics: 8
    sampling_rate: !ref <sample_rate>
    nsf_alpha: 0.1
    nsf_sigma: 0.003
    nsf_voiced_threshold: 10
    upsample_rates: [8, 5, 3]
    upsample_kernel_sizes: [16, 11, 7]
    istft_params: {n_fft: 16, hop_len: 4}
    resblock_kernel_sizes: [3, 7, 11]
    resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    source_resblock_kernel_sizes: [7, 7, 11]
    source_resblock_dilation_sizes: [[1, 3, 5], [1, 3, 5], [1, 3, 5]]
    lrelu_slope: 0.1
    audio_limit: 0.99
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: 80
        cond_channels: 512

llm: !new:cosyvoice.llm.llm.Qwen2LM
    speech_token_size: 6561
    llm: !new:cosyvoice.llm.llm.Qwen2Encoder
        pretrain_path: !ref <qwen_pretrain_path>

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    vocab_size: 6561
    input_size: 512
    output_size: 80
    spk_embed_dim: !ref <spk_embed_dim>
    input_frame_rate: !ref <token_frame_rate>
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: 3
    only_mask_loss: True
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        input_size: 512
        output_size: 512
        attention_heads: 8
        linear_units: 2048
        num_blocks: 6
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        spk_emb_dim: 80
        cfm_params: !new:omegaconf.DictConfig
            content:
                t_scheduler: 'cosine'
                inference_cfg_rate: 0.7
                sigma_min: 1e-06
                solver: 'euler'
        estimator: !new:cosyvoice.flow.decoder.CausalConditionalDecoder
            in_channels: 320
            out_channels: 80
            channels: [256]
            n_blocks: 4
            num_mid_blocks: 12
            num_heads: 8
            attention_head_dim: 64
            act_fn: 'gelu'
            static_chunk_size: !ref <chunk_size> * <token_mel_ratio>
            num_decoding_left_chunks: !ref <num_decoding_left_chunks>

mel_fn: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    sampling_rate: !ref <sample_rate>
    fmax: null
hifigan: !new:cosyvoice.hifigan.hifigan.HiFiGan
    generator: !ref <hift>
    discriminator: !new:cosyvoice.hifigan.discriminator.MultipleDiscriminator
        mpd: !new:matcha.hifigan.models.MultiPeriodDiscriminator
    mel_spec_transform: [!ref <mel_fn>]
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
truncate: !name:cosyvoice.dataset.processor.truncate
    truncate_length: 24480
data_pipeline: [!ref <get_tokenizer>, !ref <truncate>]
"""


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()  # see tests/stages/test_hift.py: tiny convs crawl with 2 threads on 2 cores
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _linked_copy(src: Path, dst: Path, skip: tuple[str, ...] = ()) -> Path:
    """A cosy2_decoder whose files are symlinks to `src`'s (cheap), minus `skip`; voices/ is a real copy."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name in skip:
            continue
        if f.is_dir():
            (dst / f.name).mkdir()
            for g in f.iterdir():
                (dst / f.name / g.name).write_bytes(g.read_bytes())
        else:
            (dst / f.name).symlink_to(f)
    return dst


# --- cosyvoice.yaml -------------------------------------------------------------------------------------------
def test_written_yaml_round_trips(tiny_vocoder, tmp_path):
    assert read_cosyvoice_yaml(tiny_vocoder / "cosyvoice.yaml") == VOCODER_PRESETS["tiny"]
    full = tmp_path / "cosyvoice.yaml"
    full.write_text(cosyvoice_yaml(VOCODER_PRESETS["0.5b"]))
    assert read_cosyvoice_yaml(full) == VocoderConfig()
    text = full.read_text()
    for tag in ("!new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec", "!new:cosyvoice.flow.decoder.ConditionalDecoder",
                "causal: True", "!new:cosyvoice.hifigan.generator.HiFTGenerator", "!ref <sample_rate>",
                "!apply:torch.manual_seed"):
        assert tag in text
    assert "static_chunk_size: !ref <chunk_size>\n" in text  # the vendored estimator takes no chunk argument


def test_cosyvoice2_yaml_parses_with_overrides(tmp_path):
    path = tmp_path / "cosyvoice.yaml"
    path.write_text(COSYVOICE2_YAML)
    doc = load_hyperpyyaml_data(path)
    assert doc["__set_seed1"] is None and doc["__set_seed3"] is None  # !apply: never executed
    assert doc["flow"]["__class__"] == "cosyvoice.flow.flow.CausalMaskedDiffWithXvec"
    assert doc["flow"]["__kind__"] == "new" and doc["get_tokenizer"]["__kind__"] == "name"
    est = doc["flow"]["decoder"]["estimator"]
    assert est["static_chunk_size"] == 50 and est["num_decoding_left_chunks"] == -1  # <chunk_size> * <ratio>
    assert doc["flow"]["decoder"]["cfm_params"]["content"]["sigma_min"] == pytest.approx(1e-6)
    assert doc["hifigan"]["generator"] == doc["hift"] and doc["llm"]["llm"]["pretrain_path"] == ""
    assert doc["hifigan"]["discriminator"]["mpd"] == {"__class__": "matcha.hifigan.models.MultiPeriodDiscriminator",
                                                     "__kind__": "new"}
    assert doc["data_pipeline"][1]["truncate_length"] == 24480

    cfg = read_cosyvoice_yaml(path)
    assert cfg == VocoderConfig()  # the config defaults are CosyVoice2's numbers + LLaMA-Omni2's overrides
    assert cfg.flow.encoder.static_chunk_size == 50 and cfg.flow.estimator.static_chunk_size == 100
    assert cfg.token_hop == 50 and cfg.mel_cache_len == 8 and cfg.source_cache_len == 3840
    assert cfg.hift.samples_per_frame == 480 and cfg.flow.cfm.sigma_min == 1e-6

    # the overrides follow input_frame_rate / token_mel_ratio, whatever the yaml's chunk says
    path.write_text(COSYVOICE2_YAML.replace("token_frame_rate: 25", "token_frame_rate: 50")
                    .replace("chunk_size: 25", "chunk_size: 7"))
    cfg = read_cosyvoice_yaml(path)
    assert (cfg.flow.encoder.static_chunk_size, cfg.flow.estimator.static_chunk_size, cfg.token_hop) == (100, 200, 100)


@pytest.mark.parametrize("edit,match", [
    (("HiFTGenerator\n", "HiFiGan\n"), "HiFTGenerator"),
    (("flow.flow.CausalMaskedDiffWithXvec", "flow.flow.MaskedDiffWithXvec"), "CausalMaskedDiffWithXvec"),
    (("decoder.CausalConditionalDecoder", "decoder.ConditionalDecoder"), "causal: True"),
    (("static_chunk_size: !ref <chunk_size>\n", "static_chunk_size: !ref <chunk>\n"), "<chunk>"),
    (("num_blocks: 6", "num_blocks: six"), "flow.encoder.num_blocks"),
    (("upsample_rates: [8, 5, 3]", "upsample_rates: 8"), "hift.upsample_rates"),
    (("        output_size: 512", "        output_size: 256"), "512"),
    (("flow: !new:", "flow: !name:"), None),  # a !name: node is still a class reference: accepted
    (("hop_len: 4", "hop_len: [4"), "not valid YAML"),
])
def test_yaml_errors_name_the_problem(tmp_path, edit, match):
    path = tmp_path / "cosyvoice.yaml"
    assert edit[0] in COSYVOICE2_YAML
    path.write_text(COSYVOICE2_YAML.replace(edit[0], edit[1], 1))
    if match is None:
        read_cosyvoice_yaml(path)
        return
    with pytest.raises(CheckpointError, match=match):
        read_cosyvoice_yaml(path)


def test_yaml_without_hift_section(tmp_path):
    path = tmp_path / "cosyvoice.yaml"
    without = re.sub(r"\nhift: !new:.*?\n\n", "\n", COSYVOICE2_YAML, flags=re.S)
    path.write_text(without.replace("    generator: !ref <hift>\n", ""))
    with pytest.raises(CheckpointError, match="`hift`"):
        read_cosyvoice_yaml(path)


# --- tensor layouts ---------------------------------------------------------------------------------------------
def test_flow_plan_official_names_and_shapes():
    plan = {n: s for n, s, _ in flow_tensor_plan(FlowConfig())}
    p = "decoder.estimator."
    expect = {  # MODEL_SPEC §2.3
        "input_embedding.weight": (6561, 512), "spk_embed_affine_layer.weight": (80, 192),
        "encoder_proj.weight": (80, 512), "encoder.embed.out.0.weight": (512, 512), "encoder.embed.out.1.bias": (512,),
        "encoder.pre_lookahead_layer.conv1.weight": (512, 512, 4), "encoder.pre_lookahead_layer.conv2.weight":
        (512, 512, 3), "encoder.encoders.5.self_attn.pos_bias_u": (8, 64), "encoder.encoders.0.self_attn.linear_pos"
        ".weight": (512, 512), "encoder.encoders.0.feed_forward.w_1.weight": (2048, 512), "encoder.up_layer.conv"
        ".weight": (512, 512, 5), "encoder.up_encoders.3.norm_mha.weight": (512,), "encoder.after_norm.weight": (512,),
        f"{p}time_mlp.linear_1.weight": (1024, 320), f"{p}time_mlp.linear_2.weight": (1024, 1024),
        f"{p}down_blocks.0.0.block1.block.0.weight": (256, 320, 3), f"{p}down_blocks.0.0.block1.block.2.weight":
        (256,), f"{p}down_blocks.0.0.mlp.1.weight": (256, 1024), f"{p}down_blocks.0.0.res_conv.weight": (256, 320, 1),
        f"{p}down_blocks.0.1.3.attn1.to_q.weight": (512, 256), f"{p}down_blocks.0.1.0.attn1.to_out.0.weight":
        (256, 512), f"{p}down_blocks.0.1.0.ff.net.0.proj.weight": (1024, 256), f"{p}down_blocks.0.2.weight":
        (256, 256, 3), f"{p}mid_blocks.11.0.block2.block.0.weight": (256, 256, 3), f"{p}up_blocks.0.0.block1.block.0"
        ".weight": (256, 512, 3), f"{p}up_blocks.0.2.weight": (256, 256, 3), f"{p}final_block.block.2.weight": (256,),
        f"{p}final_proj.weight": (80, 256, 1),
    }
    for k, shape in expect.items():
        assert plan[k] == shape, k
    assert "encoder.encoders.0.self_attn.linear_pos.bias" not in plan
    assert f"{p}down_blocks.0.1.0.attn1.to_q.bias" not in plan and f"{p}mid_blocks.12.0.mlp.1.weight" not in plan
    assert len(plan) == 1121


def test_flow_plan_matches_the_flow_module():
    flow = pytest.importorskip("omni2.stages.flow")
    for cfg in (VOCODER_PRESETS["tiny"].flow, FlowConfig(),
                FlowConfig(estimator=dataclasses.replace(FlowConfig().estimator, channels=(64, 32), n_blocks=1,
                                                         num_mid_blocks=1))):
        try:
            with torch.device("meta"):
                module = flow.Flow(cfg)
        except NotImplementedError:  # the engine's flow supports the single-level estimator only
            assert len(cfg.estimator.channels) > 1
            continue
        want = [(k, tuple(v.shape)) for k, v in module.state_dict().items()]
        assert [(n, s) for n, s, _ in flow_tensor_plan(cfg)] == want


def test_written_tensors(tiny_vocoder):
    vd = VocoderDir(tiny_vocoder)
    flow = vd.flow_state()
    assert {k: tuple(v.shape) for k, v in flow.items()} == {n: s for n, s, _ in flow_tensor_plan(vd.config.flow)}
    assert all(v.dtype == torch.float32 for v in flow.values())
    raw = torch.load(tiny_vocoder / "hift.pt", weights_only=True)
    assert all(k.startswith("generator.") for k in raw)
    hift = vd.hift_state()
    assert {k: tuple(v.shape) for k, v in hift.items()} == {n: s for n, s, _ in hift_tensor_plan(vd.config.hift)}
    assert torch.equal(hift["conv_post.bias"], raw["generator.conv_post.bias"])
    # seeded per tensor: a function of (seed, name) only
    a = _init_tensor("hift.conv_pre.weight_v", (4, 3, 2), "wn_v", 0)
    assert torch.equal(a, _init_tensor("hift.conv_pre.weight_v", (4, 3, 2), "wn_v", 0))
    assert not torch.equal(a, _init_tensor("hift.conv_pre.weight_v", (4, 3, 2), "wn_v", 1))
    assert not torch.equal(a, _init_tensor("hift.ups.0.weight_v", (4, 3, 2), "wn_v", 0))


def test_load_hift_gives_audible_unclipped_audio(tiny_vocoder):
    vd = VocoderDir(tiny_vocoder)
    h = load_hift(vd)
    assert not any(p.requires_grad for p in h.parameters())
    sd = vd.hift_state()
    assert all(torch.equal(v, sd[k]) for k, v in h.state_dict().items())
    for scale, offset in ((1.0, 0.0), (2.0, -6.0)):  # N(0, 1) and log-mel-like
        mel = torch.randn(1, 80, 40, generator=torch.Generator().manual_seed(0)) * scale + offset
        wav, _ = h.inference(mel, generator=torch.Generator().manual_seed(0))
        rms = float(wav.pow(2).mean().sqrt())
        clipped = float((wav.abs() >= vd.config.hift.audio_limit).float().mean())
        assert 0.03 < rms < 0.4 and clipped < 0.01, (scale, offset, rms, clipped)
    other, _ = h.inference(torch.randn(1, 80, 40), deterministic=True)
    assert not torch.allclose(other, h.inference(torch.randn(1, 80, 40), deterministic=True)[0])


@pytest.mark.parametrize("missing", ["cosyvoice.yaml", "flow.pt", "hift.pt"])
def test_missing_files_are_named(tiny_vocoder, tmp_path, missing):
    d = _linked_copy(tiny_vocoder, tmp_path / "v", skip=(missing,))
    with pytest.raises(CheckpointError, match=missing.replace(".", r"\.")):
        VocoderDir(d)
    with pytest.raises(CheckpointError, match="no cosy2_decoder directory"):
        VocoderDir(tmp_path / "nowhere")


def test_misshaped_hift_tensors_are_named(tiny_vocoder, tmp_path):
    d = _linked_copy(tiny_vocoder, tmp_path / "v", skip=("hift.pt",))
    raw = torch.load(tiny_vocoder / "hift.pt", weights_only=True)
    bad = dict(raw)
    bad["generator.conv_pre.weight_g"] = torch.zeros(7, 1, 1)
    del bad["generator.m_source.l_linear.bias"]
    bad["generator.extra.weight"] = torch.zeros(2)
    torch.save(bad, d / "hift.pt")
    with pytest.raises(CheckpointError) as e:
        load_hift(VocoderDir(d))
    msg = str(e.value)
    assert "conv_pre.weight_g has shape (7, 1, 1)" in msg and "(32, 1, 1)" in msg
    assert "missing tensor m_source.l_linear.bias" in msg and "unexpected tensor extra.weight" in msg
    torch.save([1, 2], d / "hift.pt")
    with pytest.raises(CheckpointError, match="state dict"):
        VocoderDir(d).hift_state()


# --- the fixed CFM noise ----------------------------------------------------------------------------------------
def test_noise_seeded_or_from_file(tiny_vocoder, tmp_path):
    cfm = VOCODER_PRESETS["tiny"].flow.cfm
    want = torch.randn([1, 80, cfm.noise_frames], generator=torch.Generator().manual_seed(cfm.noise_seed))
    assert torch.equal(VocoderDir(tiny_vocoder).noise(), want)
    d = _linked_copy(tiny_vocoder, tmp_path / "v")
    dumped = torch.randn(1, 80, 300)
    np.save(d / "rand_noise.npy", dumped.numpy())
    assert torch.equal(VocoderDir(d).noise(), dumped)
    torch.save(2 * dumped, d / "rand_noise.pt")  # .pt wins over .npy
    assert torch.equal(VocoderDir(d).noise(), 2 * dumped)
    torch.save(torch.zeros(80, 300), d / "rand_noise.pt")
    with pytest.raises(CheckpointError, match=r"rand_noise\.pt must hold a \(1, 80, frames\)"):
        VocoderDir(d).noise()


# --- voices -------------------------------------------------------------------------------------------------------
def test_voices_store(tiny_vocoder, tmp_path):
    d = _linked_copy(tiny_vocoder, tmp_path / "v")
    vd = VocoderDir(d)
    v = vd.voice()
    assert v.shape == (192,) and v.dtype == torch.float32 and abs(float(v.norm()) - 1) < 1e-5
    assert vd.voices() == ["default"]
    with pytest.raises(CheckpointError, match=r"unknown voice 'alice' \(known voices: default\).*omni2-engine voice "
                                              rf"add alice --wav prompt\.wav --vocoder-dir {re.escape(str(d))}.*"
                                              r"--embedding file\.npy"):
        vd.voice("alice")
    x = np.random.default_rng(0).standard_normal((1, 192))
    assert vd.add_voice("alice", x) == d / "voices" / "alice.npy"
    np.testing.assert_allclose(vd.voice("alice").numpy(), x[0].astype(np.float32))
    with pytest.raises(FileExistsError, match="--force"):
        vd.add_voice("alice", x)
    vd.add_voice("alice", 2 * x, overwrite=True)
    assert vd.voices() == ["alice", "default"]
    # an extra store: written to, searched first
    extra = VocoderDir(d, voices_dir=tmp_path / "mine")
    extra.add_voice("default", torch.ones(192))
    assert torch.equal(extra.voice("default"), torch.ones(192)) and not torch.equal(vd.voice("default"),
                                                                                    torch.ones(192))
    assert extra.voices() == ["alice", "default"]


@pytest.mark.parametrize("value,match", [
    (np.zeros(191), r"shape \(191,\)"), (np.zeros((2, 192)), r"shape \(2, 192\)"),
    (np.full(192, np.nan), "NaN"), (np.arange(192), "floats"), ("abc", "shape"),
])
def test_bad_voice_values(value, match):
    with pytest.raises(CheckpointError, match=match):
        validate_voice(value, "test")


@pytest.mark.parametrize("name", ["../evil", "a b", "", "-x", "x.npy", "a" * 65])
def test_bad_voice_names(tiny_vocoder, name):
    with pytest.raises(CheckpointError, match="not a safe file name"):
        VocoderDir(tiny_vocoder).add_voice(name, np.zeros(192, np.float32))


def test_stored_voice_file_is_validated(tiny_vocoder, tmp_path):
    d = _linked_copy(tiny_vocoder, tmp_path / "v")
    np.save(d / "voices" / "odd.npy", np.zeros(10, np.float32))
    with pytest.raises(CheckpointError, match=r"odd\.npy.*shape \(10,\)"):
        VocoderDir(d).voice("odd")


def test_voice_cli(tiny_vocoder, tmp_path, capsys):
    d = _linked_copy(tiny_vocoder, tmp_path / "v")
    assert main(["voice", "list", "--vocoder-dir", str(d)]) == 0
    assert capsys.readouterr().out.split("\t")[0] == "default"
    np.save(tmp_path / "e.npy", np.ones((1, 192), np.float32))
    assert main(["voice", "add", "bob", "--embedding", str(tmp_path / "e.npy"), "--vocoder-dir", str(d)]) == 0
    assert torch.equal(VocoderDir(d).voice("bob"), torch.ones(192))
    capsys.readouterr()
    assert main(["voice", "add", "bob", "--embedding", str(tmp_path / "e.npy"), "--vocoder-dir", str(d)]) == 2
    assert "already exists" in capsys.readouterr().err
    np.save(tmp_path / "bad.npy", np.ones(5, np.float32))
    assert main(["voice", "add", "eve", "--embedding", str(tmp_path / "bad.npy"), "--vocoder-dir", str(d)]) == 2
    assert "shape (5,)" in capsys.readouterr().err
    assert main(["voice", "list", "--vocoder-dir", str(tmp_path / "none")]) == 2
    assert "no cosy2_decoder directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # --wav and --embedding are exclusive
        main(["voice", "add", "x", "--wav", "a.wav", "--embedding", "b.npy", "--vocoder-dir", str(d)])


# --- make-checkpoint ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not CHECK_LAYOUT.is_file(), reason="shared/checks/check_layout.py not beside the repo")
def test_make_checkpoint_writes_both_and_passes_check_layout(tmp_path, capsys):
    assert main(["make-checkpoint", "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out.split() == [str(tmp_path / "omni2-tiny"), str(tmp_path / "cosy2_decoder")]
    assert sorted(p.name for p in (tmp_path / "cosy2_decoder").iterdir()) == sorted(
        ["cosyvoice.yaml", "flow.pt", "hift.pt", "voices"] + (["campplus.onnx"] if importlib.util.find_spec("onnx")
                                                             else []))
    r = subprocess.run([sys.executable, str(CHECK_LAYOUT), str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "vocoder 205 flow + 328 hift tensors" in r.stdout


# --- voice enrolment (campplus.onnx) ---------------------------------------------------------------------------
def _kaldi_fbank_ref(wav: np.ndarray) -> np.ndarray:
    """torchaudio.compliance.kaldi.fbank(wav[None], num_mel_bins=80, dither=0, sample_frequency=16000), in numpy."""
    x = wav.astype(np.float64)
    n = 1 + (len(x) - 400) // 160  # snip_edges
    frames = np.stack([x[i * 160: i * 160 + 400] for i in range(n)])
    frames = frames - frames.mean(axis=1, keepdims=True)  # remove_dc_offset
    frames = frames - 0.97 * np.concatenate([frames[:, :1], frames[:, :-1]], axis=1)  # preemphasis
    frames = frames * (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(400) / 399)) ** 0.85  # povey window
    power = np.abs(np.fft.rfft(frames, n=512)) ** 2  # (T, 257)

    def mel(f):
        return 1127.0 * np.log(1.0 + f / 700.0)

    lo, hi = mel(20.0), mel(8000.0)
    delta = (hi - lo) / 81
    fft_mel = mel(np.arange(256) * 16000 / 512)
    banks = np.zeros((80, 257))
    for m in range(80):
        left, center, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        banks[m, :256] = np.maximum(0, np.minimum((fft_mel - left) / (center - left),
                                                  (right - fft_mel) / (right - center)))
    return np.log(np.maximum(power @ banks.T, np.finfo(np.float32).eps))


def _prompt(seconds: float = 1.5, sr: int = 16000) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    rng = np.random.default_rng(0)
    return (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + 0.5 * np.sin(2 * np.pi * 3 * t))
            + 0.02 * rng.standard_normal(t.size)).astype(np.float32)


@needs_voice
def test_kaldi_fbank_matches_torchaudio_recipe():
    from omni2.engine.checkpoints.voices import kaldi_fbank

    wav = _prompt()
    got = kaldi_fbank(wav)
    assert got.shape == (1 + (len(wav) - 400) // 160, 80) and got.dtype == np.float32
    np.testing.assert_allclose(got, _kaldi_fbank_ref(wav), atol=2e-3, rtol=1e-3)


@needs_voice
def test_enrol_from_wav_end_to_end(tiny_vocoder, tmp_path, capsys):
    import onnx
    from onnx import numpy_helper

    from omni2.engine.checkpoints.voices import enroll_wav, speaker_embedding

    campplus = tiny_vocoder / "campplus.onnx"
    init = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(campplus)).graph.initializer}
    wav = _prompt()
    feat = _kaldi_fbank_ref(wav)
    feat = feat - feat.mean(axis=0, keepdims=True)
    want = np.tanh(feat @ init["w"] + init["b"]).mean(axis=0)
    got = speaker_embedding(wav, campplus)
    assert got.shape == (192,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, atol=1e-3)

    # a 22.05 kHz stereo file: downmixed and resampled to 16 kHz first, then through the CLI
    t = np.arange(int(1.5 * 22050)) / 22050
    stereo = np.stack([0.3 * np.sin(2 * np.pi * 180 * t), 0.2 * np.sin(2 * np.pi * 300 * t)], axis=1)
    sf.write(tmp_path / "p.wav", stereo.astype(np.float32), 22050)
    emb = enroll_wav(tmp_path / "p.wav", campplus)
    assert emb.shape == (192,) and np.isfinite(emb).all() and np.abs(emb).max() > 1e-3
    d = _linked_copy(tiny_vocoder, tmp_path / "v")
    assert main(["voice", "add", "carol", "--wav", str(tmp_path / "p.wav"), "--vocoder-dir", str(d)]) == 0
    np.testing.assert_allclose(VocoderDir(d).voice("carol").numpy(), emb)
    capsys.readouterr()
    (d / "campplus.onnx").unlink()
    assert main(["voice", "add", "dave", "--wav", str(tmp_path / "p.wav"), "--vocoder-dir", str(d)]) == 2
    assert "lacks campplus.onnx" in capsys.readouterr().err


def test_enrol_errors(tiny_vocoder, tmp_path, monkeypatch):
    import importlib

    from omni2.engine.checkpoints import voices as voice

    with pytest.raises(voice.VoiceError, match="no audio file"):
        voice.enroll_wav(tmp_path / "missing.wav", tiny_vocoder / "campplus.onnx")
    if HAS_VOICE:
        with pytest.raises(voice.VoiceError, match="at least 400 samples"):
            voice.kaldi_fbank(np.zeros(100, np.float32))
    real = importlib.import_module

    def without_extras(name, *args, **kwargs):
        if name in ("kaldi_native_fbank", "onnxruntime"):
            raise ImportError(f"No module named {name!r}")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib, "import_module", without_extras)
    with pytest.raises(voice.VoiceError, match=r"kaldi-native-fbank.*pip install 'omni2-engine\[voice\]'"):
        voice.kaldi_fbank(_prompt())
