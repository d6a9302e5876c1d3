"""Every config and option dataclass of the engine, in one tree: the model and vocoder dimensions, placement,
limits, per-session sampling and options, the stages' options, and the engine's and the daemon's settings.

Model dataclasses are read from an official LLaMA-Omni2 `config.json` (MODEL_SPEC §1.2) and written back in the
same form by the random-checkpoint writer, so `ModelConfig.from_dict(cfg.to_dict())` round-trips. This module
imports nothing of ours, so every part of the engine (and the client) may import it.
"""
from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Fixed by the official code, not by config.json: the projector's hidden width is a literal 2048 in
# EncoderProjectorConcat, and Whisper's attention heads are always 64 wide (large-v3: 1280 / 20).
PROJECTOR_HIDDEN = 2048
WHISPER_HEAD_DIM = 64
WHISPER_N_MELS = 128
WHISPER_N_CTX = 1500  # encoder positions for 30 s of audio; Whisper asserts this exact length


class ConfigError(ValueError):
    """A config.json (or a user-supplied option) that the engine cannot run."""


class CheckpointError(ValueError):
    """A model directory or checkpoint file that does not match the official layout (missing, extra, misshaped)."""


@dataclass(frozen=True)
class Qwen2Config:
    """Dimensions of a Qwen2 decoder: the thinker (top level of config.json) or the TTS LM (`speech_generator`)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rope_theta: float = 1e6
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 32768
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    hidden_act: str = "silu"

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"{self.num_attention_heads} heads are not a multiple of "
                              f"{self.num_key_value_heads} KV heads")
        if self.hidden_act != "silu":
            raise ConfigError(f"hidden_act {self.hidden_act!r} is not supported (Qwen2 uses silu)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Qwen2Config:
        names = {f.name for f in dataclasses.fields(cls)}
        missing = [n for n in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if n not in d]
        if missing:
            raise ConfigError(f"Qwen2 config lacks {missing}")
        kw = {k: v for k, v in d.items() if k in names}
        kw.setdefault("num_key_value_heads", d["num_attention_heads"])
        kw["tie_word_embeddings"] = bool(kw.get("tie_word_embeddings", False))
        return cls(**kw)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class WhisperEncoderConfig:
    """Whisper AudioEncoder dims. The official code builds it from large-v3.pt; we read the width from
    config.json and the depth/positions from the checkpoint's tensors (heads = width / 64)."""

    n_state: int = 1280
    n_layer: int = 32
    n_mels: int = WHISPER_N_MELS
    n_ctx: int = WHISPER_N_CTX

    @property
    def n_head(self) -> int:
        return self.n_state // WHISPER_HEAD_DIM


@dataclass(frozen=True)
class ProjectorConfig:
    """EncoderProjectorConcat: stack `ds_rate` encoder frames, Linear(E*k, 2048), ReLU, Linear(2048, H)."""

    ds_rate: int = 5
    encoder_dim: int = 1280
    hidden: int = PROJECTOR_HIDDEN
    out_dim: int = 3584


@dataclass(frozen=True)
class StreamParams:
    """Read-R-Write-W: after every `read` thinker tokens the TTS LM writes `write` speech units."""

    read: int = 3
    write: int = 10

    def __post_init__(self):
        if self.read < 1 or self.write < 1:
            raise ConfigError(f"stream params must be positive, got ({self.read},{self.write})")

    @classmethod
    def parse(cls, s: str | tuple | list | None) -> StreamParams:
        """Parse the official `"(3,10)"` string without eval (the official code evals it)."""
        if s is None:
            return cls(1, 1)  # the official default when config.json has no stream_params
        if isinstance(s, (tuple, list)):
            if len(s) != 2:
                raise ConfigError(f"stream_params needs two numbers, got {s!r}")
            return cls(int(s[0]), int(s[1]))
        m = re.fullmatch(r"\s*\(?\s*(\d+)\s*,\s*(\d+)\s*\)?\s*", str(s))
        if not m:
            raise ConfigError(f"stream_params {s!r} is not of the form '(R,W)'")
        return cls(int(m.group(1)), int(m.group(2)))

    def to_str(self) -> str:
        return f"({self.read},{self.write})"

    def tokens_read(self, units: int, n_tokens: int) -> int:
        """Text tokens of an n_tokens reply that the TTS LM had read when it wrote its first `units` units: write
        chunk c (units cW .. cW+W-1) follows the reading of tokens up to (c+1)R; the chunks after the text's end
        (the final flush after <sep>) follow all of it. What the user has heard of a reply's text when its
        audio is cut after `units` units (conversation.item.truncate)."""
        if units <= 0:
            return 0
        chunk = (units - 1) // self.write
        return (chunk + 1) * self.read if chunk < n_tokens // self.read else n_tokens


@dataclass(frozen=True)
class SpeechGeneratorConfig:
    lm: Qwen2Config
    stream: StreamParams = field(default_factory=StreamParams)
    unit_vocab_size: int = 6561


@dataclass(frozen=True)
class ModelConfig:
    """Everything config.json says about one LLaMA-Omni2 model directory."""

    thinker: Qwen2Config
    encoder: WhisperEncoderConfig
    projector: ProjectorConfig
    generator: SpeechGeneratorConfig
    max_context: int | None = 4096  # tokenizer_model_max_length
    raw: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], encoder_layers: int | None = None) -> ModelConfig:
        if d.get("model_type") != "omni2_speech2s_qwen2":
            raise ConfigError(f"model_type {d.get('model_type')!r} is not omni2_speech2s_qwen2")
        for k in ("speech_generator", "speech_encoder_hidden_size"):
            if k not in d:
                raise ConfigError(f"config.json lacks {k}")
        if "whisper" not in str(d.get("speech_encoder_type", "whisper")):
            raise ConfigError(f"speech_encoder_type {d['speech_encoder_type']!r} is not whisper")
        if d.get("speech_projector_type", "linear") != "linear":
            raise ConfigError(f"speech_projector_type {d['speech_projector_type']!r} is not linear")
        thinker = Qwen2Config.from_dict(d)
        width = int(d["speech_encoder_hidden_size"])
        if width % WHISPER_HEAD_DIM:
            raise ConfigError(f"speech_encoder_hidden_size {width} is not a multiple of {WHISPER_HEAD_DIM}")
        encoder = WhisperEncoderConfig(n_state=width, n_layer=encoder_layers or 32)
        projector = ProjectorConfig(ds_rate=int(d.get("speech_encoder_ds_rate", 5)), encoder_dim=width,
                                    out_dim=thinker.hidden_size)
        generator = SpeechGeneratorConfig(
            lm=Qwen2Config.from_dict(d["speech_generator"]),
            stream=StreamParams.parse(d.get("stream_params")),
            unit_vocab_size=int(d.get("unit_vocab_size", 6561)),
        )
        return cls(thinker, encoder, projector, generator, d.get("tokenizer_model_max_length"), raw=dict(d))

    @classmethod
    def from_file(cls, path: str | Path, encoder_layers: int | None = None) -> ModelConfig:
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json at {path}")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from e
        return cls.from_dict(d, encoder_layers)


@dataclass(frozen=True)
class FlowEncoderConfig:
    """UpsampleConformerEncoder (`flow.encoder` in cosyvoice.yaml). Defaults: CosyVoice2-0.5B."""

    output_size: int = 512
    attention_heads: int = 8
    linear_units: int = 2048
    num_blocks: int = 6
    num_up_blocks: int = 4  # fixed in the official class, not in the yaml
    # LLaMA-Omni2's SpeechDecoder overrides the yaml's chunk (25) with 2 * input_frame_rate = 50 tokens.
    static_chunk_size: int = 50


@dataclass(frozen=True)
class FlowEstimatorConfig:
    """ConditionalDecoder(causal=True) (`flow.decoder.estimator`). Chunk overridden to 50 * token_mel_ratio."""

    in_channels: int = 320
    out_channels: int = 80
    channels: tuple[int, ...] = (256,)
    n_blocks: int = 4
    num_mid_blocks: int = 12
    num_heads: int = 8
    attention_head_dim: int = 64
    static_chunk_size: int = 100


@dataclass(frozen=True)
class CFMConfig:
    """CausalConditionalCFM: Euler solver over a cosine t-schedule with classifier-free guidance."""

    n_timesteps: int = 10  # hard-coded in CausalMaskedDiffWithXvec.inference
    sigma_min: float = 1e-6
    t_scheduler: str = "cosine"
    inference_cfg_rate: float = 0.7
    temperature: float = 1.0
    noise_frames: int = 50 * 300  # the fixed noise tensor covers 300 s of mel frames
    noise_seed: int = 0  # CosyVoice seeds 0 right before drawing it


@dataclass(frozen=True)
class FlowConfig:
    """CausalMaskedDiffWithXvec (`flow` in cosyvoice.yaml)."""

    input_size: int = 512
    output_size: int = 80  # mel bins
    spk_embed_dim: int = 192
    vocab_size: int = 6561
    input_frame_rate: int = 25
    token_mel_ratio: int = 2
    pre_lookahead_len: int = 3
    encoder: FlowEncoderConfig = field(default_factory=FlowEncoderConfig)
    estimator: FlowEstimatorConfig = field(default_factory=FlowEstimatorConfig)
    cfm: CFMConfig = field(default_factory=CFMConfig)


@dataclass(frozen=True)
class HiFTConfig:
    """HiFTGenerator (`hift` in cosyvoice.yaml): NSF source + HiFi-GAN upsampler + iSTFT head."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = 24000
    nsf_alpha: float = 0.1
    nsf_sigma: float = 0.003
    nsf_voiced_threshold: float = 10.0
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop_len: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5), (1, 3, 5), (1, 3, 5))
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512  # ConvRNNF0Predictor

    @property
    def samples_per_frame(self) -> int:
        hop = self.istft_hop_len
        for r in self.upsample_rates:
            hop *= r
        return hop  # 480 for 24 kHz at 50 mel frames/s


@dataclass(frozen=True)
class VocoderConfig:
    """CosyVoice2 token2wav as LLaMA-Omni2 runs it (cosy2_decoder/ + SpeechDecoder's overrides)."""

    flow: FlowConfig = field(default_factory=FlowConfig)
    hift: HiFTConfig = field(default_factory=HiFTConfig)
    token_hop: int = 50  # official stream hop in tokens (2 * input_frame_rate)
    mel_cache_len: int = 8  # mel frames HiFT re-reads from the previous chunk

    @property
    def sample_rate(self) -> int:
        return self.hift.sampling_rate

    @property
    def source_cache_len(self) -> int:
        return self.mel_cache_len * self.hift.samples_per_frame  # 3840 samples, also the cross-fade half


STAGES = ("asr", "llm", "tts", "vocoder")  # the pipeline, in order (runtime/topology.py wires it)


@dataclass(frozen=True)
class Placement:
    """Which device each stage runs on: `cpu`, `cuda` (one GPU, a stream each) or `asr=0,llm=1,tts=1,vocoder=1`."""

    devices: dict[str, str] = field(default_factory=lambda: {s: "cpu" for s in STAGES})

    @classmethod
    def parse(cls, spec: str) -> Placement:
        spec = spec.strip()
        if spec in ("cpu", "cuda"):
            dev = "cuda:0" if spec == "cuda" else "cpu"
            return cls({s: dev for s in STAGES})
        devices = {}
        for part in spec.split(","):
            name, eq, dev = part.partition("=")
            if not eq:
                raise ConfigError(f"placement {spec!r} is not cpu, cuda or STAGE=DEVICE for every stage "
                                  f"(e.g. asr=0,llm=1,tts=1,vocoder=1)")
            name, dev = name.strip(), dev.strip()
            if name not in STAGES:
                raise ConfigError(f"placement: unknown stage {name!r} (stages: {', '.join(STAGES)})")
            if dev.isdigit():
                dev = f"cuda:{dev}"
            if not re.fullmatch(r"cpu|cuda(:\d+)?", dev):
                raise ConfigError(f"placement: bad device {dev!r} for {name}")
            devices[name] = dev
        if set(devices) != set(STAGES):
            raise ConfigError(f"placement: missing stages {sorted(set(STAGES) - set(devices))}")
        return cls(devices)


MIN_CONTEXT = 16  # thinker positions: below this not even the chat template's fixed part fits


@dataclass(frozen=True)
class Limits:
    max_sessions: int = 8
    max_context: int = 4096  # positions per session in the thinker's KV cache
    max_new_tokens: int = 256  # the official run_llama_omni2.py default
    max_audio_seconds: float = 30.0  # Whisper sees 30 s per turn; longer input is an error

    def __post_init__(self):
        if self.max_sessions < 1 or self.max_context < MIN_CONTEXT or self.max_new_tokens < 1:
            raise ConfigError(f"limits out of range: {self}")


# ------------------------------------------------------------------------------------- sampling and sessions


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 = greedy. top_k 0 = off. top_p 1.0 = off. Defaults follow run_llama_omni2.py (greedy)."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if not (self.temperature >= 0.0 and self.temperature == self.temperature):
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be a non-negative 63-bit integer, got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


# The official generate_units sampling: temperature 1, top_p 1, and transformers' default top_k of 50.
OFFICIAL_SAMPLING = SamplingParams(temperature=1.0, top_k=50, top_p=1.0)


@dataclass(frozen=True)
class SessionOptions:
    """Per-session choices: voice, thinker sampling (greedy by default, as run_llama_omni2.py), TTS sampling
    (the official temperature 1 / top-k 50 unless greedy), and the seed every random draw derives from."""

    voice: str = "default"
    seed: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    tts_sampling: SamplingParams = OFFICIAL_SAMPLING
    max_new_tokens: int | None = None
    vocoder_schedule: str | None = None  # one of VOCODER_SCHEDULES; None = the engine's (VocoderOptions.schedule)

    def __post_init__(self):
        if self.vocoder_schedule is not None and self.vocoder_schedule not in VOCODER_SCHEDULES:
            raise ConfigError(f"vocoder schedule {self.vocoder_schedule!r} is not one of "
                              f"{', '.join(VOCODER_SCHEDULES)}")

    def seeded(self) -> tuple[SamplingParams, SamplingParams]:
        # Distinct streams for the two LMs, both pure functions of the session seed.
        return replace(self.sampling, seed=self.seed), replace(self.tts_sampling, seed=self.seed + 1)

    @property
    def vocoder_seed(self) -> int:
        """The seed of the session's vocoder randomness (HiFT's source phases and noise)."""
        return self.seed + 2


# ------------------------------------------------------------------------------------------- stage options


@dataclass(frozen=True)
class TTSOptions:
    """Deviations from the official algorithm, each off by default.

    units_only: sample among unit tokens + EOS only (the official head may pick text ids, which yield no audio);
        the head then reads only those 6562 rows (kernels/fsq_decode.py).
    offline: read the whole reply before writing any unit (the paper's non-streaming comparison).
    gate_override: fix the fusion gate g (1.0 = hidden state only, 0.0 = text embedding only; paper ablation).
    reprefill: the official cost model — rebuild the cache from position 0 every chunk (baseline for benches).
    """

    units_only: bool = False
    offline: bool = False
    gate_override: float | None = None
    reprefill: bool = False
    max_context: int | None = None  # TTS positions per session; None: what a reply of Limits.max_new_tokens
    # can take at most (stages.tts.reply_positions), so that no reply the thinker may write is cut short


VOCODER_SCHEDULES = ("live", "official-live", "hop")


@dataclass(frozen=True)
class VocoderOptions:
    """schedule: when the vocoder voices (docs/ARCHITECTURE.md, "Vocoder schedules"):
        "live" (default): one token2wav call per TTS write, as the official live server (`process_unit_chunk`),
            a write longer than W (the final flush) in pieces of W units, so that its tail streams too;
        "official-live": one call per TTS write, the long final one included: the official server, call for call;
        "hop": the offline script (`run_cosy2_decoder.py --stream`): a call per `token_hop` units (None = 50).
    mode: "incremental" (cached chunks) or "recompute" (official cost). left_chunks: flow attention window in
    chunks (None = all = exact). deterministic: zero HiFT's random source phases and noise (tests, comparisons).
    max_batch: sessions voiced together in one step (flow encoder, estimator and HiFT batched across them); 1
    voices them one after another, bit for bit the single-session result (a batch equals it to fp rounding)."""

    schedule: str = "live"
    mode: str = "incremental"
    token_hop: int | None = None
    left_chunks: int | None = None
    deterministic: bool = False
    max_batch: int = 16

    def __post_init__(self):
        if self.schedule not in VOCODER_SCHEDULES:
            raise ConfigError(f"vocoder schedule {self.schedule!r} is not one of {', '.join(VOCODER_SCHEDULES)}")
        if self.mode not in ("incremental", "recompute"):
            raise ConfigError(f"vocoder mode {self.mode!r} is not 'incremental' or 'recompute'")
        if self.token_hop is not None and self.token_hop < 1:
            raise ConfigError(f"token_hop must be >= 1, got {self.token_hop}")
        if self.max_batch < 1:
            raise ConfigError(f"vocoder max_batch must be >= 1, got {self.max_batch}")


# What `serve` and `generate` run with unless told otherwise (`--vocoder-left-chunks`): a window of 1 chunk keeps a
# session's flow state flat (1.04 GB fp32, 0.52 GB bf16 at CosyVoice2 dims) however long the reply, where the exact
# flow grows by ~230 MB per second of audio; 64 sessions' state then fits beside a 7B model on one 80 GB GPU
# (docs/ARCHITECTURE.md, "Vocoder memory"). The library default stays exact.
SERVING_LEFT_CHUNKS = 1


def parse_left_chunks(value: str) -> int | None:
    """A flow window as a command line gives it: a number of chunks, or "all" (None: the exact official flow)."""
    if value == "all":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"expected a number of chunks or 'all', got {value!r}") from None


# ---------------------------------------------------------------------------------------- engine and daemon

DTYPES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def default_worker_threads() -> int:
    """torch threads per stage worker when none are asked for: every core. The stages take turns more than they
    overlap (a lone turn runs ASR, then LLM and TTS, then the vocoder), and a stage that runs alone should have the
    whole machine; when several run at once their threads share the cores, which costs little because waiting
    OpenMP threads sleep instead of spinning (WORKER_ENV). Measured in docs/ARCHITECTURE.md, "Threads"."""
    return os.cpu_count() or 1


# Set in each worker process's environment unless the caller's has it. PASSIVE: an OpenMP thread with nothing to
# do sleeps at once, instead of spinning for a while on a core another worker needs (libgomp's default, which made
# two 2-thread workers on 2 busy cores 20x slower).
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


@dataclass(frozen=True)
class EngineConfig:
    """The multi-process engine (omni2.engine.runtime): where the model is, how it is placed and limited.

    threads: torch threads per worker process. None gives every worker every core (default_worker_threads);
    the reference pipeline equals the engine bit for bit only when both use the same count (docs/ARCHITECTURE.md,
    "Threads")."""

    model_dir: str
    vocoder_dir: str
    placement: str = "cpu"  # cpu | cuda | asr=0,llm=1,tts=1,vocoder=1
    dtype: str = "float32"
    limits: Limits = Limits()
    tts_options: TTSOptions = TTSOptions()
    vocoder_options: VocoderOptions = VocoderOptions()
    ring_slots: int = 8
    asr_batch: int = 4
    heartbeat_s: float = 0.2
    hang_s: float = 1.0  # a worker silent this long is hung
    step_timeout_s: float = 300.0  # one step running this long is hung
    start_timeout_s: float = 600.0
    open_timeout_s: float = 60.0
    threads: int | None = None
    # The thinker's and the TTS LM's short steps, a windowed vocoder flow's encoder pass and Euler steps, and HiFT
    # on a steady stream's chunks, on fixed shapes replayed as CUDA graphs on a CUDA device (stages/decode_graph.py,
    # flow_graph.py, hift_graph.py; on a CPU the same steps run eagerly, which only tests them).
    cuda_graphs: bool = False
    # Flow state all sessions together may hold (bytes; None = no check): a session is admitted only if the
    # longest reply the limits allow still fits (docs/ARCHITECTURE.md, "Vocoder memory").
    vocoder_memory_bytes: int | None = None

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")

    @property
    def worker_threads(self) -> int:
        return self.threads or default_worker_threads()


@dataclass(frozen=True)
class RealtimeConfig:
    """The OpenAI Realtime-compatible WebSocket endpoint (`serve --realtime HOST:PORT`, serve/realtime.py)."""

    host: str = "127.0.0.1"
    port: int = 8000  # 0 = any free port
    demo: bool = False  # also serve the browser demo page at /
    input_rate: int = 24000  # PCM16 rate of input_audio_buffer.append until session.update names another (the API's)
    output_rate: int = 24000  # PCM16 rate of response.output_audio.delta (the API's; the vocoder's own rate)
    max_append_bytes: int = 15 << 20  # base64 audio in one append (the API's limit); more is refused, nothing kept
    # One WebSocket message; a bigger one closes the connection (code 1009). The largest valid event is an append
    # of max_append_bytes plus its JSON; at most 4 such messages wait per connection while it is busy.
    max_message_bytes: int = 16 << 20

    @classmethod
    def parse(cls, hostport: str, demo: bool = False) -> RealtimeConfig:
        host, sep, port = hostport.rpartition(":")
        if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"--realtime wants HOST:PORT (e.g. 127.0.0.1:8000), got {hostport!r}")
        return cls(host=host.strip("[]") or "127.0.0.1", port=int(port), demo=demo)


@dataclass(frozen=True)
class ServerConfig:
    """The daemon's front door (omni2.engine.serve)."""

    bind: str = "tcp://127.0.0.1:5555"
    token: str | None = None  # required for a non-loopback bind
    max_frame_bytes: int = 4 << 20  # one request, all frames together; 30 s of 48 kHz float32 is 5.8 MB: chunk it
    max_sessions_per_client: int = 8
    max_turn_seconds: float = 30.0  # user audio per turn (Limits.max_audio_seconds)
    max_new_tokens: int = 256  # the largest max_new_tokens a session may ask for (Limits.max_new_tokens)
    stream_params: str = "(3,10)"  # the model's Read-R-Write-W, reported in session.opened
    probe_s: float = 2.0  # a client with sessions that sent nothing for this long is probed (a pong it ignores)
    reclaim_s: float = 10.0  # a client unreachable this long loses its sessions (a reconnect within it keeps them)
    idle_timeout_s: float = 900.0  # a session with no request and no reply for this long is closed
    # Events queued for one connection before it counts as not reading: its replies are cancelled then and its
    # sessions reclaimed after reclaim_s. A reply is a few hundred events (audio deltas of ~19 KB), so this
    # bounds what a stalled client can make the daemon hold at ~40 MB, plus the kernel's socket buffers.
    send_hwm: int = 2_000
    # ZMQ CURVE: encryption with the server's key pair (a zmq certificate file holding the secret key); with
    # curve_clients (a directory of allowed clients' public certificates) also authentication.
    curve_secret_file: str | None = None
    curve_clients: str | None = None
    realtime: RealtimeConfig | None = None  # the WebSocket endpoint beside the ZMQ front door, if any

    def __post_init__(self):
        if self.curve_clients is not None and self.curve_secret_file is None:
            raise ConfigError("--curve-clients needs --curve-secret-file (the daemon's own key pair)")
        check_bind(self.bind, self.token, authenticated=self.curve_clients is not None)
        if self.realtime is not None:
            if self.curve_clients is not None or self.curve_secret_file is not None:
                raise ConfigError("--realtime cannot be combined with ZMQ CURVE yet (its bridge to the front door "
                                  "would need a client certificate); use --token-file")
            host = f"[{self.realtime.host}]" if ":" in self.realtime.host else self.realtime.host  # IPv6
            check_bind(f"tcp://{host}:{self.realtime.port}", self.token)


def is_loopback(bind: str) -> bool:
    """True for ipc://, inproc:// and tcp:// on 127.0.0.0/8, ::1 or localhost; False for anything else."""
    u = urlsplit(bind)
    if u.scheme in ("ipc", "inproc"):
        return True
    if u.scheme != "tcp":
        return False
    host = (u.hostname or "").strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", an interface name or a DNS name: reachable from elsewhere


def check_endpoint(address: str, flag: str) -> None:
    if not re.fullmatch(r"(tcp|ipc|inproc)://.+", address):
        raise ConfigError(f"{flag} {address!r} is not a ZMQ endpoint such as tcp://127.0.0.1:5555")


def check_bind(bind: str, token: str | None, authenticated: bool = False) -> None:
    """A bind other than loopback needs a token or CURVE client authentication (`authenticated`)."""
    check_endpoint(bind, "--bind")
    if not is_loopback(bind) and not token and not authenticated:
        raise ConfigError(f"refusing to bind {bind}: it is reachable from other machines and no --token-file was "
                          f"given. Anyone who can connect could run the model; pass --token-file FILE (clients "
                          f"then need the same token), or --curve-secret-file with --curve-clients DIR (ZMQ CURVE "
                          f"keys), or bind tcp://127.0.0.1:PORT")
