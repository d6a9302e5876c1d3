"""The random `cosy2_decoder/` writer: every flow.pt / hift.pt tensor's name, shape and init, the presets, and
cosyvoice.yaml in the official HyperPyYAML form. The reader (and the file names both sides use) is
vocoder_dir.py.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni2.engine.checkpoints.model_writer import tensor_seed
from omni2.engine.checkpoints.vocoder_dir import (
    CAMPPLUS_FILE,
    ENCODER_LOOKAHEAD,
    FLOW_CHANNELS,
    FLOW_FILE,
    HIFT_FILE,
    HIFT_PREFIX,
    VOCODER_DIR,
    VOICES_DIR,
    YAML_FILE,
)
from omni2.engine.checkpoints.voices import N_FBANK, VOICE_DIM
from omni2.engine.config import FlowConfig, FlowEncoderConfig, FlowEstimatorConfig, HiFTConfig, VocoderConfig

# -- tensor layouts ---------------------------------------------------------------------------------------------
Plan = list[tuple[str, tuple[int, ...], str]]  # (name, shape, init kind)


def _linear(name: str, cout: int, cin: int, bias: bool = True, kind: str = "w") -> Plan:
    return [(f"{name}.weight", (cout, cin), kind)] + ([(f"{name}.bias", (cout,), "b")] if bias else [])


def _conv(name: str, cout: int, cin: int, k: int) -> Plan:
    return [(f"{name}.weight", (cout, cin, k), "w"), (f"{name}.bias", (cout,), "b")]


def _norm(name: str, dim: int) -> Plan:
    return [(f"{name}.weight", (dim,), "norm"), (f"{name}.bias", (dim,), "b")]


def _conformer_layer(p: str, enc: FlowEncoderConfig) -> Plan:
    D, h = enc.output_size, enc.attention_heads
    plan = [(f"{p}self_attn.pos_bias_u", (h, D // h), "b"), (f"{p}self_attn.pos_bias_v", (h, D // h), "b")]
    for lin in ("linear_q", "linear_k", "linear_v", "linear_out"):
        plan += _linear(f"{p}self_attn.{lin}", D, D)
    plan += _linear(f"{p}self_attn.linear_pos", D, D, bias=False)
    plan += _linear(f"{p}feed_forward.w_1", enc.linear_units, D) + _linear(f"{p}feed_forward.w_2", D, enc.linear_units)
    return plan + _norm(f"{p}norm_ff", D) + _norm(f"{p}norm_mha", D)


def _resnet(p: str, din: int, dout: int, temb: int) -> Plan:
    plan = _linear(f"{p}mlp.1", dout, temb)
    for blk, cin in (("block1", din), ("block2", dout)):
        plan += _conv(f"{p}{blk}.block.0", dout, cin, 3) + _norm(f"{p}{blk}.block.2", dout)
    return plan + _conv(f"{p}res_conv", dout, din, 1)


def _transformer(p: str, dim: int, est: FlowEstimatorConfig) -> Plan:
    inner = est.num_heads * est.attention_head_dim
    plan = _norm(f"{p}norm1", dim)
    for lin in ("to_q", "to_k", "to_v"):
        plan += _linear(f"{p}attn1.{lin}", inner, dim, bias=False)
    plan += _linear(f"{p}attn1.to_out.0", dim, inner) + _norm(f"{p}norm3", dim)
    return plan + _linear(f"{p}ff.net.0.proj", 4 * dim, dim) + _linear(f"{p}ff.net.2", dim, 4 * dim)


def flow_tensor_plan(cfg: FlowConfig) -> Plan:
    """(name, shape, init kind) of every tensor of the official flow.pt (CausalMaskedDiffWithXvec with the causal
    ConditionalDecoder), in state_dict order, read off the vendored constructors (MODEL_SPEC §2.3)."""
    enc, est, D = cfg.encoder, cfg.estimator, cfg.encoder.output_size
    plan: Plan = [("input_embedding.weight", (cfg.vocab_size, cfg.input_size), "emb")]
    plan += _linear("spk_embed_affine_layer", cfg.output_size, cfg.spk_embed_dim)
    plan += _linear("encoder.embed.out.0", D, cfg.input_size) + _norm("encoder.embed.out.1", D)
    plan += _norm("encoder.after_norm", D)
    plan += _conv("encoder.pre_lookahead_layer.conv1", FLOW_CHANNELS, FLOW_CHANNELS, ENCODER_LOOKAHEAD + 1)
    plan += _conv("encoder.pre_lookahead_layer.conv2", FLOW_CHANNELS, FLOW_CHANNELS, 3)
    for i in range(enc.num_blocks):
        plan += _conformer_layer(f"encoder.encoders.{i}.", enc)
    plan += _conv("encoder.up_layer.conv", FLOW_CHANNELS, FLOW_CHANNELS, 2 * 2 + 1)  # stride 2: kernel 2·stride+1
    plan += _linear("encoder.up_embed.out.0", D, cfg.input_size) + _norm("encoder.up_embed.out.1", D)
    for i in range(enc.num_up_blocks):
        plan += _conformer_layer(f"encoder.up_encoders.{i}.", enc)
    plan += _linear("encoder_proj", cfg.output_size, D)

    p, ch = "decoder.estimator.", tuple(est.channels)
    temb = 4 * ch[0]
    plan += _linear(f"{p}time_mlp.linear_1", temb, est.in_channels) + _linear(f"{p}time_mlp.linear_2", temb, temb)
    cin = est.in_channels
    for i, cout in enumerate(ch):
        plan += _resnet(f"{p}down_blocks.{i}.0.", cin, cout, temb)
        for j in range(est.n_blocks):
            plan += _transformer(f"{p}down_blocks.{i}.1.{j}.", cout, est)
        last = i == len(ch) - 1
        plan += _conv(f"{p}down_blocks.{i}.2" + ("" if last else ".conv"), cout, cout, 3)  # causal conv / Downsample
        cin = cout
    for i in range(est.num_mid_blocks):
        plan += _resnet(f"{p}mid_blocks.{i}.0.", ch[-1], ch[-1], temb)
        for j in range(est.n_blocks):
            plan += _transformer(f"{p}mid_blocks.{i}.1.{j}.", ch[-1], est)
    up = ch[::-1] + (ch[0],)
    for i in range(len(up) - 1):
        cout, last = up[i + 1], i == len(up) - 2
        plan += _resnet(f"{p}up_blocks.{i}.0.", 2 * up[i], cout, temb)
        for j in range(est.n_blocks):
            plan += _transformer(f"{p}up_blocks.{i}.1.{j}.", cout, est)
        if last:
            plan += _conv(f"{p}up_blocks.{i}.2", cout, cout, 3)
        else:  # Upsample1D's ConvTranspose1d(c, c, 4, 2, 1): weight (in, out, k)
            plan += [(f"{p}up_blocks.{i}.2.conv.weight", (cout, cout, 4), "w"),
                     (f"{p}up_blocks.{i}.2.conv.bias", (cout,), "b")]
    plan += _conv(f"{p}final_block.block.0", ch[0], ch[0], 3) + _norm(f"{p}final_block.block.2", ch[0])
    return plan + _conv(f"{p}final_proj", est.out_channels, ch[0], 1)


def hift_tensor_plan(cfg: HiFTConfig) -> Plan:
    """(name, shape, init kind) of hift.pt's tensors (prefix `generator.` not included), from the module itself."""
    from omni2.stages.hift import HiFT

    with torch.device("meta"):
        sd = HiFT(cfg).state_dict()
    plan = []
    for name, t in sd.items():
        leaf = name.rsplit(".", 1)[-1]
        if name.startswith("f0_predictor.classifier."):
            kind = "f0_" + leaf  # a voiced f0 range, so random checkpoints exercise the harmonic source
        elif name.startswith("conv_post.") and leaf == "bias":
            kind = "post_bias"
        elif leaf == "weight_g" and name.split(".")[0] in ("conv_pre", "conv_post"):
            kind = "wn_g_" + name.split(".")[0]
        else:
            kind = {"weight_g": "wn_g", "weight_v": "wn_v", "alpha": "alpha", "bias": "b"}.get(leaf, "w")
        plan.append((name, tuple(t.shape), kind))
    return plan


# Init of random checkpoints. Fan-in-scaled weights keep activations O(1) through the flow's LayerNorm-free
# paths. HiFT's weight-norm gains (the norm of each filter) and head bias are tuned so random mels - N(0, 1) as
# well as log-mel-like N(-6, 2) - give audio of RMS ~0.1-0.2 that depends on the mel and is (almost) never clipped.
WN_GAINS = {"wn_g": 1.0, "wn_g_conv_pre": 0.2, "wn_g_conv_post": 0.7}  # conv_pre small: mels carry a large DC
F0_HZ = 200.0  # f0 bias: well above the 10 Hz voiced threshold, so the harmonic source is exercised
POST_LOG_MAG = -1.5  # conv_post bias of the log-magnitude channels: exp(-1.5) ≈ 0.22


def _init_tensor(name: str, shape: tuple[int, ...], kind: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    t = torch.randn(shape, generator=g)
    fan_in = max(1, int(np.prod(shape[1:])))
    if kind == "w":
        return t.mul_(fan_in ** -0.5)
    if kind in ("emb", "wn_v"):
        return t  # embeddings N(0, 1); weight-norm directions only matter up to scale
    if kind == "norm":
        return t.mul_(0.02).add_(1.0)
    if kind in WN_GAINS:
        return t.mul_(0.02).add_(1.0).mul_(WN_GAINS[kind])
    if kind == "alpha":
        return t.mul_(0.1).add_(1.0)
    if kind == "f0_weight":
        return t.mul_(20.0 * fan_in ** -0.5)
    if kind == "f0_bias":
        return t.mul_(10.0).add_(F0_HZ)
    if kind == "post_bias":
        t.mul_(0.02)
        t[:shape[0] // 2] += POST_LOG_MAG  # channels 0..n_fft/2 are log-magnitudes, the rest phases
        return t
    return t.mul_(0.02)  # "b": biases and position biases


# -- presets + the yaml ------------------------------------------------------------------------------------------
_TINY = VocoderConfig(
    flow=FlowConfig(encoder=FlowEncoderConfig(attention_heads=2, linear_units=256, num_blocks=1),
                    estimator=FlowEstimatorConfig(channels=(64,), n_blocks=1, num_mid_blocks=1, num_heads=2,
                                                  attention_head_dim=32)),
    hift=HiFTConfig(base_channels=32, f0_cond_channels=32))
VOCODER_PRESETS: dict[str, VocoderConfig] = {"tiny": _TINY, "0.5b": VocoderConfig(), "7b": VocoderConfig()}


def _yl(v: Any) -> str:
    return json.dumps([list(x) if isinstance(x, tuple) else x for x in v])


def cosyvoice_yaml(cfg: VocoderConfig, note: str = "") -> str:
    """A cosyvoice.yaml in the official HyperPyYAML form (the vendored LLaMA-Omni2 classes: a causal
    ConditionalDecoder estimator) holding `cfg`'s numbers; only the sections SpeechDecoder reads."""
    f, e, s, c, h = cfg.flow, cfg.flow.encoder, cfg.flow.estimator, cfg.flow.cfm, cfg.hift
    return f"""# CosyVoice2 token2wav config for LLaMA-Omni2's cosy2_decoder{note}
# set random seed, so that you may reproduce your result.
__set_seed1: !apply:random.seed [1986]
__set_seed2: !apply:numpy.random.seed [1986]
__set_seed3: !apply:torch.manual_seed [1986]
__set_seed4: !apply:torch.cuda.manual_seed_all [1986]

# fixed params
sample_rate: {h.sampling_rate}
spk_embed_dim: {f.spk_embed_dim}
qwen_pretrain_path: ''
token_frame_rate: {f.input_frame_rate}
token_mel_ratio: {f.token_mel_ratio}

# stream related params (LLaMA-Omni2 overrides the chunks at load time)
chunk_size: {f.input_frame_rate} # streaming inference chunk size, in token

flow: !new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec
    input_size: {f.input_size}
    output_size: {f.output_size}
    spk_embed_dim: !ref <spk_embed_dim>
    output_type: 'mel'
    vocab_size: {f.vocab_size}
    input_frame_rate: !ref <token_frame_rate>
    only_mask_loss: True
    token_mel_ratio: !ref <token_mel_ratio>
    pre_lookahead_len: {f.pre_lookahead_len}
    encoder: !new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder
        output_size: {e.output_size}
        attention_heads: {e.attention_heads}
        linear_units: {e.linear_units}
        num_blocks: {e.num_blocks}
        dropout_rate: 0.1
        positional_dropout_rate: 0.1
        attention_dropout_rate: 0.1
        normalize_before: True
        input_layer: 'linear'
        pos_enc_layer_type: 'rel_pos_espnet'
        selfattention_layer_type: 'rel_selfattn'
        input_size: {f.input_size}
        use_cnn_module: False
        macaron_style: False
        static_chunk_size: !ref <chunk_size>
    decoder: !new:cosyvoice.flow.flow_matching.CausalConditionalCFM
        in_channels: 240
        n_spks: 1
        spk_emb_dim: {f.output_size}
        cfm_params: !new:omegaconf.DictConfig
            content:
                sigma_min: {c.sigma_min:g}
                solver: 'euler'
                t_scheduler: '{c.t_scheduler}'
                training_cfg_rate: 0.2
                inference_cfg_rate: {c.inference_cfg_rate}
                reg_loss_type: 'l1'
        estimator: !new:cosyvoice.flow.decoder.ConditionalDecoder
            in_channels: {s.in_channels}
            out_channels: {s.out_channels}
            causal: True
            channels: {_yl(s.channels)}
            dropout: 0.0
            attention_head_dim: {s.attention_head_dim}
            n_blocks: {s.n_blocks}
            num_mid_blocks: {s.num_mid_blocks}
            num_heads: {s.num_heads}
            act_fn: 'gelu'

hift: !new:cosyvoice.hifigan.generator.HiFTGenerator
    in_channels: {h.in_channels}
    base_channels: {h.base_channels}
    nb_harmonics: {h.nb_harmonics}
    sampling_rate: !ref <sample_rate>
    nsf_alpha: {h.nsf_alpha}
    nsf_sigma: {h.nsf_sigma}
    nsf_voiced_threshold: {h.nsf_voiced_threshold:g}
    upsample_rates: {_yl(h.upsample_rates)}
    upsample_kernel_sizes: {_yl(h.upsample_kernel_sizes)}
    istft_params:
        n_fft: {h.istft_n_fft}
        hop_len: {h.istft_hop_len}
    resblock_kernel_sizes: {_yl(h.resblock_kernel_sizes)}
    resblock_dilation_sizes: {_yl(h.resblock_dilation_sizes)}
    source_resblock_kernel_sizes: {_yl(h.source_resblock_kernel_sizes)}
    source_resblock_dilation_sizes: {_yl(h.source_resblock_dilation_sizes)}
    lrelu_slope: {h.lrelu_slope}
    audio_limit: {h.audio_limit}
    f0_predictor: !new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor
        num_class: 1
        in_channels: {h.in_channels}
        cond_channels: {h.f0_cond_channels}

# frontend (SpeechDecoder builds CosyVoiceFrontEnd from these)
get_tokenizer: !name:cosyvoice.tokenizer.tokenizer.get_qwen_tokenizer
    token_path: !ref <qwen_pretrain_path>
    skip_special_tokens: True
allowed_special: 'all'
feat_extractor: !name:matcha.utils.audio.mel_spectrogram
    n_fft: 1920
    num_mels: {f.output_size}
    sampling_rate: !ref <sample_rate>
    hop_size: 480
    win_size: 1920
    fmin: 0
    fmax: 8000
    center: False
"""


def _default_voice(seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(tensor_seed(seed, "voices/default"))
    v = torch.randn(VOICE_DIM, generator=g)
    return (v / v.norm()).numpy().astype(np.float32)


def write_vocoder_checkpoint(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight `out_dir/cosy2_decoder/` in the official layout; return its path.

    cosyvoice.yaml (official HyperPyYAML form), flow.pt, hift.pt (`generator.` keys, weight-norm g/v), fp32 as the
    released files are; voices/default.npy (a random unit-norm x-vector); and, when the `onnx` package is
    installed, a tiny random campplus.onnx ([1, T, 80] -> [1, 192]) so voice enrolment runs end to end.
    Deterministic per (preset, seed): every tensor has its own seeded generator.
    """
    if preset not in VOCODER_PRESETS:
        raise ValueError(f"unknown preset {preset!r} (presets: {', '.join(VOCODER_PRESETS)})")
    cfg = VOCODER_PRESETS[preset]
    out_dir = Path(out_dir)
    final, tmp = out_dir / VOCODER_DIR, out_dir / f".{VOCODER_DIR}.partial"
    if final.exists() and not (final / YAML_FILE).is_file() and any(final.iterdir()):
        raise FileExistsError(f"{final} exists and is not a cosy2_decoder directory; not overwriting it")
    if tmp.exists():
        shutil.rmtree(tmp)
    (tmp / VOICES_DIR).mkdir(parents=True)

    (tmp / YAML_FILE).write_text(cosyvoice_yaml(cfg, f" (random weights: omni2-engine preset {preset}, seed {seed})"))
    flow = {n: _init_tensor(f"flow.{n}", shape, kind, seed) for n, shape, kind in flow_tensor_plan(cfg.flow)}
    torch.save(flow, tmp / FLOW_FILE)
    del flow
    hift = {HIFT_PREFIX + n: _init_tensor(f"hift.{n}", shape, kind, seed)
            for n, shape, kind in hift_tensor_plan(cfg.hift)}
    torch.save(hift, tmp / HIFT_FILE)
    np.save(tmp / VOICES_DIR / "default.npy", _default_voice(seed))
    write_random_campplus(tmp / CAMPPLUS_FILE, seed)  # no-op without the onnx package
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def write_random_campplus(path: str | Path, seed: int = 0) -> bool:
    """Write a tiny random stand-in for campplus.onnx ([1, T, 80] -> tanh(x W + b) -> mean over T -> [1, 192]) with
    the same input/output contract; returns False (writing nothing) when the `onnx` package is missing."""
    try:
        import onnx
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return False
    rng = np.random.default_rng(tensor_seed(seed, "campplus.onnx"))
    w = (rng.standard_normal((N_FBANK, VOICE_DIM)) / np.sqrt(N_FBANK)).astype(np.float32)
    b = (0.1 * rng.standard_normal(VOICE_DIM)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["input", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["h"]),
             helper.make_node("Tanh", ["h"], ["t"]),
             helper.make_node("ReduceMean", ["t"], ["embedding"], axes=[1], keepdims=0)]
    graph = helper.make_graph(
        nodes, "campplus_random",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, "T", N_FBANK])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, VOICE_DIM])],
        initializer=[numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="omni2-engine")
    model.ir_version = 8  # readable by any onnxruntime since 1.10
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return True
