"""The official `cosy2_decoder/` directory (MODEL_SPEC §2.1): read it (`VocoderDir`). Random ones are written by
vocoder_writer.py.

On disk (official, loaded unchanged):
    cosy2_decoder/
      cosyvoice.yaml   HyperPyYAML: the `flow` (CausalMaskedDiffWithXvec) and `hift` (HiFTGenerator) sections
      flow.pt          state_dict of `flow`, official key names (MODEL_SPEC §2.3)
      hift.pt          state_dict of the HiFT generator, every key prefixed `generator.`
      campplus.onnx    speaker x-vector model (only needed to enrol a voice from a wav)
      rand_noise.pt|.npy   optional: the official module's `flow.decoder.rand_noise` (1, 80, F), for bit-matching
      voices/<name>.npy    the one thing the engine adds: stored 192-d float32 speaker x-vectors
(speech_tokenizer_v2.onnx, spk2info.pt, CosyVoice-BlankEN/ and the JIT/ONNX/TRT exports are never read.)

The yaml is parsed without executing it: `!new:` / `!name:` nodes become plain dicts with a `__class__` entry,
`!apply:` nodes become None, `!ref <key>` (and arithmetic such as `!ref <a> * <b>`) resolves against top-level keys.
LLaMA-Omni2's runtime overrides (SpeechDecoder.__init__) are applied on top.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from omni2.engine.checkpoints.hyperyaml import load_hyperpyyaml_data
from omni2.engine.checkpoints.voices import VOICE_DIM
from omni2.engine.config import (
    CFMConfig,
    CheckpointError,
    FlowConfig,
    FlowEncoderConfig,
    FlowEstimatorConfig,
    HiFTConfig,
    VocoderConfig,
)

VOCODER_DIR = "cosy2_decoder"
YAML_FILE, FLOW_FILE, HIFT_FILE, CAMPPLUS_FILE = "cosyvoice.yaml", "flow.pt", "hift.pt", "campplus.onnx"
NOISE_FILES = ("rand_noise.pt", "rand_noise.npy")
VOICES_DIR = "voices"
HIFT_PREFIX = "generator."
FLOW_CHANNELS = 512  # UpsampleConformerEncoder hard-codes its pre-lookahead and up-sampling convs to 512 channels
ENCODER_LOOKAHEAD = 3  # ... and PreLookaheadLayer's pre_lookahead_len=3, whatever the flow's own setting
MEL_CACHE_LEN = 8  # SpeechDecoder: mel frames HiFT re-reads from the previous chunk
_VOICE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")


def _section(node: Any, where: str, classes: tuple[str, ...], path: Path) -> dict[str, Any]:
    if not isinstance(node, dict) or "__class__" not in node:
        raise CheckpointError(f"{path}: `{where}` is not a !new:{classes[0]} object")
    name = str(node["__class__"]).rsplit(".", 1)[-1]
    if name not in classes:
        raise CheckpointError(f"{path}: `{where}` is {node['__class__']}, but the engine implements "
                              f"{' / '.join(classes)} only")
    return node


def _coerce(v: Any, default: Any, key: str, path: Path) -> Any:
    try:
        if isinstance(default, tuple):
            if not isinstance(v, (list, tuple)):
                raise TypeError
            inner = default[0] if default else 0
            return tuple(_coerce(x, inner, key, path) for x in v)
        if isinstance(v, bool) or not isinstance(v, (int, float, str)):
            raise TypeError
        if isinstance(default, str):
            return str(v)
        if isinstance(default, int):
            if float(v) != int(v):
                raise TypeError
            return int(v)
        return float(v)
    except (TypeError, ValueError):
        raise CheckpointError(f"{path}: `{key}` = {v!r} is not a valid {type(default).__name__}") from None


def _fill(cls: type, node: dict[str, Any], where: str, path: Path, **given: Any) -> Any:
    kw = dict(given)
    for f in dataclasses.fields(cls):
        if f.name in node and f.name not in kw:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            kw[f.name] = _coerce(node[f.name], default, f"{where}.{f.name}", path)
    return cls(**kw)


def read_cosyvoice_yaml(path: str | Path) -> VocoderConfig:
    """The `VocoderConfig` of a cosyvoice.yaml, with LLaMA-Omni2's runtime overrides applied: encoder chunk
    2·input_frame_rate, estimator chunk 2·input_frame_rate·token_mel_ratio, hop 2·input_frame_rate, 8 cached mels."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no {YAML_FILE} at {path}")
    doc = load_hyperpyyaml_data(path)
    flow = _section(doc.get("flow"), "flow", ("CausalMaskedDiffWithXvec",), path)
    enc = _section(flow.get("encoder"), "flow.encoder", ("UpsampleConformerEncoder",), path)
    cfm = _section(flow.get("decoder"), "flow.decoder", ("CausalConditionalCFM",), path)
    est = _section(cfm.get("estimator"), "flow.decoder.estimator",
                   ("ConditionalDecoder", "CausalConditionalDecoder"), path)
    if est["__class__"].endswith(".ConditionalDecoder") and est.get("causal") is not True:
        raise CheckpointError(f"{path}: flow.decoder.estimator is a ConditionalDecoder without `causal: True`; "
                              f"the engine implements the causal (CosyVoice2) estimator only")
    hift = _section(doc.get("hift"), "hift", ("HiFTGenerator",), path)
    f0 = _section(hift.get("f0_predictor"), "hift.f0_predictor", ("ConvRNNF0Predictor",), path)
    if f0.get("num_class", 1) != 1:
        raise CheckpointError(f"{path}: hift.f0_predictor.num_class must be 1, got {f0['num_class']!r}")

    params = cfm.get("cfm_params") or {}
    params = params.get("content", params) if isinstance(params, dict) else {}
    flow_cfg = _fill(FlowConfig, flow, "flow", path,
                     encoder=_fill(FlowEncoderConfig, enc, "flow.encoder", path),
                     estimator=_fill(FlowEstimatorConfig, est, "flow.decoder.estimator", path),
                     cfm=_fill(CFMConfig, params, "flow.decoder.cfm_params", path))
    if flow_cfg.encoder.output_size != FLOW_CHANNELS or flow_cfg.input_size != FLOW_CHANNELS:
        raise CheckpointError(f"{path}: flow input_size / encoder output_size must be {FLOW_CHANNELS} (the "
                              f"official UpsampleConformerEncoder hard-codes its channels), got "
                              f"{flow_cfg.input_size} / {flow_cfg.encoder.output_size}")
    istft = hift.get("istft_params") or {}
    extra = {k: _coerce(istft[y], 0, f"hift.istft_params.{y}", path)
             for k, y in (("istft_n_fft", "n_fft"), ("istft_hop_len", "hop_len")) if y in istft}
    if "cond_channels" in f0:
        extra["f0_cond_channels"] = _coerce(f0["cond_channels"], 0, "hift.f0_predictor.cond_channels", path)
    hift_cfg = _fill(HiFTConfig, hift, "hift", path, **extra)

    # LLaMA-Omni2's SpeechDecoder.__init__ overrides (both copies of it do the same)
    rate = flow_cfg.input_frame_rate
    flow_cfg = dataclasses.replace(
        flow_cfg, encoder=dataclasses.replace(flow_cfg.encoder, static_chunk_size=2 * rate),
        estimator=dataclasses.replace(flow_cfg.estimator, static_chunk_size=2 * rate * flow_cfg.token_mel_ratio))
    return VocoderConfig(flow=flow_cfg, hift=hift_cfg, token_hop=2 * rate, mel_cache_len=MEL_CACHE_LEN)


# -- reading -----------------------------------------------------------------------------------------------------
def _load_pt(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"no {path.name} in {path.parent}")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # legacy (non-zip) files cannot be mapped: read them whole
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling errors have no common base class
        raise CheckpointError(f"cannot read {path} as a tensor state dict (weights_only): {e}") from e
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise CheckpointError(f"{path} does not hold a state dict of tensors")
    return sd


def check_state_dict(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise CheckpointError naming every missing, unexpected or misshaped tensor of `state` for `module`."""
    expected = module.state_dict()
    problems = [f"missing tensor {k} {tuple(v.shape)}" for k, v in expected.items() if k not in state]
    problems += [f"unexpected tensor {k} {tuple(v.shape)}" for k, v in state.items() if k not in expected]
    problems += [f"tensor {k} has shape {tuple(state[k].shape)}, the module expects {tuple(v.shape)}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        more = f" (+{len(problems) - 8} more)" if len(problems) > 8 else ""
        raise CheckpointError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems[:8]) + more)


def validate_voice(embedding: Any, source: str = "voice") -> np.ndarray:
    """A speaker x-vector as float32 (192,), from (192,) or (1, 192) floats; CheckpointError otherwise."""
    if torch.is_tensor(embedding):
        embedding = embedding.detach().cpu().float().numpy()
    try:
        x = np.asarray(embedding)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot read an embedding from {type(embedding).__name__}: {e}") from e
    if x.shape not in ((VOICE_DIM,), (1, VOICE_DIM)):
        raise CheckpointError(f"{source}: a voice is a {VOICE_DIM}-d speaker x-vector, shaped ({VOICE_DIM},) or "
                              f"(1, {VOICE_DIM}); got shape {x.shape}")
    if x.dtype.kind != "f":
        raise CheckpointError(f"{source}: a voice holds floats, got dtype {x.dtype}")
    if not np.isfinite(x).all():
        raise CheckpointError(f"{source}: the embedding holds NaN or infinite values")
    return np.ascontiguousarray(x.reshape(VOICE_DIM), dtype=np.float32)


def _check_voice_name(name: str) -> str:
    if not isinstance(name, str) or not _VOICE_NAME.fullmatch(name):
        raise CheckpointError(f"voice name {name!r} is not a safe file name: use 1-64 letters, digits, '_' or '-', "
                              f"starting with a letter or digit")
    return name


class VocoderDir:
    """An official cosy2_decoder directory: its config (overrides applied), tensors, fixed CFM noise and voices.

    `voices_dir`: an optional extra voice store; `add_voice` writes there when given, and its voices shadow the
    directory's own `voices/`.
    """

    def __init__(self, path: str | Path, voices_dir: str | Path | None = None):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"no cosy2_decoder directory at {self.path}")
        for f in (YAML_FILE, FLOW_FILE, HIFT_FILE):
            if not (self.path / f).is_file():
                raise CheckpointError(f"{self.path} lacks {f} (a cosy2_decoder directory holds {YAML_FILE}, "
                                      f"{FLOW_FILE} and {HIFT_FILE})")
        self.config: VocoderConfig = read_cosyvoice_yaml(self.path / YAML_FILE)
        self.voices_dir = Path(voices_dir) if voices_dir is not None else None
        self._noise: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"VocoderDir({str(self.path)!r})"

    def flow_state(self) -> dict[str, torch.Tensor]:
        """flow.pt as stored (official CausalMaskedDiffWithXvec keys), memory-mapped on the CPU."""
        return _load_pt(self.path / FLOW_FILE)

    def hift_state(self) -> dict[str, torch.Tensor]:
        """hift.pt with the `generator.` prefix stripped (what `HiFT.load_state_dict` takes)."""
        return {k[len(HIFT_PREFIX):] if k.startswith(HIFT_PREFIX) else k: v
                for k, v in _load_pt(self.path / HIFT_FILE).items()}

    def noise(self) -> torch.Tensor:
        """The CFM's fixed noise (1, 80, F): rand_noise.pt / rand_noise.npy from the directory when present (dump
        the official module's `flow.decoder.rand_noise` there to bit-match it), else a seeded `torch.randn`."""
        if self._noise is None:
            cfm, mels = self.config.flow.cfm, self.config.flow.output_size
            pt, npy = (self.path / f for f in NOISE_FILES)
            if pt.is_file():
                try:
                    t = torch.load(pt, map_location="cpu", weights_only=True)
                except Exception as e:
                    raise CheckpointError(f"cannot read {pt}: {e}") from e
            elif npy.is_file():
                t = torch.from_numpy(np.load(npy, allow_pickle=False))
            else:
                g = torch.Generator().manual_seed(cfm.noise_seed)
                t = torch.randn([1, mels, cfm.noise_frames], generator=g)
            src = pt if pt.is_file() else npy
            if not torch.is_tensor(t) or t.dim() != 3 or t.shape[:2] != (1, mels) or t.shape[2] < 1:
                raise CheckpointError(f"{src} must hold a (1, {mels}, frames) tensor, got "
                                      f"{tuple(t.shape) if torch.is_tensor(t) else type(t).__name__}")
            if not t.is_floating_point():
                raise CheckpointError(f"{src} must hold floats, got {t.dtype}")
            self._noise = t.float().contiguous()
        return self._noise

    def load_into(self, module: torch.nn.Module, which: str, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> torch.nn.Module:
        """Assign flow.pt (`which="flow"`) or hift.pt (`"hift"`) into `module`, built on the meta device by the
        caller, after naming every missing, extra or misshaped tensor. Returns the module."""
        state, source = {"flow": (self.flow_state, FLOW_FILE), "hift": (self.hift_state, HIFT_FILE)}[which]
        state = state()
        check_state_dict(module, state, str(self.path / source))
        module.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, strict=True,
                               assign=True)
        return module

    # -- voices ----------------------------------------------------------------------------------------------
    def campplus_path(self) -> Path:
        p = self.path / CAMPPLUS_FILE
        if not p.is_file():
            raise CheckpointError(f"{self.path} lacks {CAMPPLUS_FILE}, the speaker model that enrols a voice from a "
                                  f"wav; add a stored x-vector instead with --embedding file.npy")
        return p

    def _voice_dirs(self) -> list[Path]:
        return ([self.voices_dir] if self.voices_dir is not None else []) + [self.path / VOICES_DIR]

    def voices(self) -> list[str]:
        """Names of the stored voices (both stores)."""
        return sorted({f.stem for d in self._voice_dirs() if d.is_dir() for f in d.glob("*.npy")
                       if _VOICE_NAME.fullmatch(f.stem)})

    def voice_file(self, name: str = "default") -> Path:
        _check_voice_name(name)
        for d in self._voice_dirs():
            if (d / f"{name}.npy").is_file():
                return d / f"{name}.npy"
        known = ", ".join(self.voices()) or "none"
        where = f"--vocoder-dir {self.path}"
        raise CheckpointError(f"unknown voice {name!r} (known voices: {known}); add one with "
                              f"`omni2-engine voice add {name} --wav prompt.wav {where}` (x-vector of a 16 kHz prompt "
                              f"via {CAMPPLUS_FILE}) or `omni2-engine voice add {name} --embedding file.npy {where}` "
                              f"(a {VOICE_DIM}-d float vector)")

    def voice(self, name: str = "default") -> torch.Tensor:
        """The stored x-vector of voice `name`, float32 (192,)."""
        f = self.voice_file(name)
        try:
            x = np.load(f, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read voice file {f}: {e}") from e
        return torch.from_numpy(validate_voice(x, str(f)))

    def add_voice(self, name: str, embedding: Any, overwrite: bool = False) -> Path:
        """Store `embedding` ((192,) or (1, 192) floats) as voice `name`; returns the file written."""
        _check_voice_name(name)
        x = validate_voice(embedding, f"voice {name!r}")
        d = self.voices_dir if self.voices_dir is not None else self.path / VOICES_DIR
        f = d / f"{name}.npy"
        if f.exists() and not overwrite:
            raise FileExistsError(f"voice {name!r} already exists at {f} (overwrite it with --force)")
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{name}.partial.npy"
        np.save(tmp, x)
        tmp.replace(f)
        return f
