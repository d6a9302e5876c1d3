"""Independent oracle for CosyVoice2's HiFT vocoder: plain functions over a `hift.pt` state dict.

A functional transcription of the HiFTGenerator that LLaMA-Omni2 runs: its vendored CosyVoice
(ictnlp/LLaMA-Omni2 @ c8afa906, `cosyvoice/hifigan/generator.py`: ResBlock, SineGen, SourceModuleHnNSF,
HiFTGenerator.{_stft, _istft, decode, inference}; `cosyvoice/hifigan/f0_predictor.py`: ConvRNNF0Predictor;
`cosyvoice/transformer/activation.py`: Snake with alpha_logscale=False). FunAudioLLM/CosyVoice @ ace7c47f has the
same decode / iSTFT / f0 predictor, but its HiFTGenerator picks `SineGen2` (upsampled-phase variant) for every
rate but 22050 Hz; the vendored copy, which the released cosy2_decoder checkpoint is run with, only has the
original `SineGen` (phase = 2π·(cumsum(f0·k/sr) mod 1)), so that is the one transcribed here (MODEL_SPEC §2.5).

Written from the upstream algorithm only - nothing here imports omni2.stages. Weights are read by their official
names (hift.pt keys, `generator.` prefix optional); a weight-normed layer may be stored as legacy
`weight_g`/`weight_v`, as `parametrizations.weight.original0/1`, or already folded as `weight`.

Randomness: upstream's source draws from torch's global RNG, in this order: the harmonics' initial phases
(`Uniform(-π, π).sample((B, H+1, 1))`, on the CPU), the additive noise (`randn_like` of the sines, (B, H+1, L)),
then a noise-branch tensor `randn_like(uv)` ((B, L, 1)) that is returned and never used. `upstream_draws` makes
exactly those calls; `inference` calls it when no draws are passed, so `torch.manual_seed(s)` before it
reproduces the official module. Everything runs in the input dtype (float32, as upstream runs HiFT).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from omni2.engine.config import HiFTConfig

SNAKE_NO_DIV_BY_ZERO = 1e-9  # activation.py Snake.no_div_by_zero
MAG_MAX = 1e2  # HiFTGenerator._istft clips magnitudes here
POST_LRELU_SLOPE = 0.01  # decode's last leaky_relu uses torch's default slope, not lrelu_slope


# -- weights -------------------------------------------------------------------------------------------------------
def official_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """hift.pt as saved (keys `generator.*`) or already stripped -> keys without the prefix."""
    return {k.removeprefix("generator."): v for k, v in sd.items()}


def weight(sd: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """Effective weight of layer `name`. torch's weight_norm(dim=0) stores g (shape (W.shape[0], 1, 1)) and v and
    computes w = g · v / ‖v‖, the 2-norm over every dim but 0 - for a ConvTranspose1d dim 0 is the input channel."""
    if f"{name}.weight" in sd:
        return sd[f"{name}.weight"]
    if f"{name}.weight_g" in sd:
        g, v = sd[f"{name}.weight_g"], sd[f"{name}.weight_v"]
    else:
        g, v = sd[f"{name}.parametrizations.weight.original0"], sd[f"{name}.parametrizations.weight.original1"]
    norm = v.pow(2).sum(dim=tuple(range(1, v.dim())), keepdim=True).sqrt()  # (W0, 1, 1)
    return g * v / norm


def conv1d(sd, name: str, x: torch.Tensor, stride: int = 1, padding: int = 0, dilation: int = 1) -> torch.Tensor:
    return F.conv1d(x, weight(sd, name), sd[f"{name}.bias"], stride, padding, dilation)


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    return int((kernel_size * dilation - dilation) / 2)  # cosyvoice/utils/common.py: 'same' length for odd kernels


# -- blocks --------------------------------------------------------------------------------------------------------
def snake(x: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """x (B, C, T), alpha (C,) on the linear scale (HiFT builds Snake with alpha_logscale=False)."""
    a = alpha.view(1, -1, 1)
    return x + (1.0 / (a + SNAKE_NO_DIV_BY_ZERO)) * torch.sin(x * a) ** 2


def resblock(sd, name: str, x: torch.Tensor, kernel_size: int, dilations) -> torch.Tensor:
    """HiFT's ResBlock (x (B, C, T) -> same): per dilation d, snake -> conv(k, d) -> snake -> conv(k, 1) + skip."""
    for j, d in enumerate(dilations):
        h = snake(x, sd[f"{name}.activations1.{j}.alpha"])
        h = conv1d(sd, f"{name}.convs1.{j}", h, padding=get_padding(kernel_size, d), dilation=d)
        h = snake(h, sd[f"{name}.activations2.{j}.alpha"])
        h = conv1d(sd, f"{name}.convs2.{j}", h, padding=get_padding(kernel_size, 1))
        x = h + x
    return x


def f0_predictor(sd, mel: torch.Tensor) -> torch.Tensor:
    """ConvRNNF0Predictor: mel (B, 80, T) -> f0 (B, T). `condnet` is a Sequential (conv, ELU) × 5, so the convs
    sit at the even indices 0, 2, 4, 6, 8."""
    x = mel
    for idx in (0, 2, 4, 6, 8):
        x = F.elu(conv1d(sd, f"f0_predictor.condnet.{idx}", x, padding=1))
    x = x.transpose(1, 2)  # (B, T, C)
    logits = F.linear(x, sd["f0_predictor.classifier.weight"], sd["f0_predictor.classifier.bias"])  # (B, T, 1)
    return logits.squeeze(-1).abs()


def samples_per_frame(cfg: HiFTConfig) -> int:
    return math.prod(cfg.upsample_rates) * cfg.istft_hop_len  # f0_upsamp's scale factor: 480 for CosyVoice2


def upsample_f0(f0: torch.Tensor, cfg: HiFTConfig) -> torch.Tensor:
    """nn.Upsample(scale_factor=480) (nearest) on f0[:, None]: every frame value repeated 480 times -> (B, 1, L)."""
    return f0[:, None].repeat_interleave(samples_per_frame(cfg), dim=-1)


# -- the NSF source ------------------------------------------------------------------------------------------------
def upstream_draws(batch: int, n_sines: int, length: int,
                   device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The source's random draws, made as upstream makes them (global RNG): phases (B, H+1, 1) uniform in
    [-π, π) on the CPU, standard-normal noise (B, H+1, L) on `device`, then the discarded noise-branch draw."""
    phases = torch.distributions.Uniform(-math.pi, math.pi).sample((batch, n_sines, 1)).to(device)
    noise = torch.randn(batch, n_sines, length, device=device)
    torch.randn(batch, length, 1, device=device)  # SourceModuleHnNSF's noise branch: drawn, returned, unused
    return phases, noise


def sine_gen(f0_up: torch.Tensor, cfg: HiFTConfig, phases: torch.Tensor,
             noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SineGen: f0 (B, 1, L) Hz -> (sines + noise (B, H+1, L), uv (B, 1, L)); `noise` is the raw N(0, 1) draw."""
    H = cfg.nb_harmonics
    f_mat = torch.cat([f0_up * (i + 1) / cfg.sampling_rate for i in range(H + 1)], dim=1)  # (B, H+1, L) cycles/sample
    # the running phase is wrapped to [0, 1) cycles *after* the float32 cumsum, as upstream does
    theta = 2 * math.pi * (torch.cumsum(f_mat, dim=-1) % 1)
    phases = phases.clone()
    phases[:, 0, :] = 0  # the fundamental always starts at phase 0
    sines = cfg.nsf_alpha * torch.sin(theta + phases)
    uv = (f0_up > cfg.nsf_voiced_threshold).to(torch.float32)
    # unvoiced samples carry only noise, of std sine_amp/3 so its peaks stay near the sine amplitude
    noise_amp = uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3
    return sines * uv + noise_amp * noise, uv


def source_module(sd, f0_up: torch.Tensor, cfg: HiFTConfig, phases: torch.Tensor,
                  noise: torch.Tensor) -> torch.Tensor:
    """SourceModuleHnNSF's harmonic branch: f0 (B, 1, L) -> tanh(l_linear(sines)) (B, L, 1)."""
    sines, _ = sine_gen(f0_up, cfg, phases, noise)
    merged = F.linear(sines.transpose(1, 2), sd["m_source.l_linear.weight"], sd["m_source.l_linear.bias"])
    return torch.tanh(merged)


# -- STFT pair -----------------------------------------------------------------------------------------------------
def hann(n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """scipy.signal.get_window('hann', n, fftbins=True) cast to float32: the periodic Hann window."""
    k = torch.arange(n, dtype=torch.float64, device=device)
    return (0.5 - 0.5 * torch.cos(2 * math.pi * k / n)).to(torch.float32)


def stft(x: torch.Tensor, cfg: HiFTConfig) -> torch.Tensor:
    """HiFTGenerator._stft + the concat in decode: x (B, L) -> [real; imag] (B, n_fft + 2, L / hop + 1)."""
    n_fft, hop = cfg.istft_n_fft, cfg.istft_hop_len
    spec = torch.stft(x, n_fft, hop, n_fft, window=hann(n_fft, x.device), center=True, pad_mode="reflect",
                      return_complex=True)  # (B, n_fft/2 + 1, frames)
    return torch.cat([spec.real, spec.imag], dim=1)


def istft(magnitude: torch.Tensor, phase: torch.Tensor, cfg: HiFTConfig) -> torch.Tensor:
    """HiFTGenerator._istft: (B, n_fft/2 + 1, F) each -> (B, (F - 1)·hop)."""
    n_fft, hop = cfg.istft_n_fft, cfg.istft_hop_len
    magnitude = magnitude.clamp(max=MAG_MAX)
    spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
    return torch.istft(spec, n_fft, hop, n_fft, window=hann(n_fft, magnitude.device), center=True)


# -- the generator -------------------------------------------------------------------------------------------------
def source_down_rates(cfg: HiFTConfig) -> list[int]:
    """Stride of source_downs.{i}: the source STFT runs at the last stage's rate, so stage i sees it decimated by
    the product of the upsample rates after stage i - (15, 3, 1) for rates (8, 5, 3)."""
    rates = list(cfg.upsample_rates)
    return [math.prod(rates[i + 1:]) for i in range(len(rates))]


def decode(sd, cfg: HiFTConfig, mel: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """HiFTGenerator.decode: mel (B, 80, T) + source s (B, 1, 480·T) -> speech (B, 480·T)."""
    n_fft = cfg.istft_n_fft
    n_k = len(cfg.resblock_kernel_sizes)
    n_up = len(cfg.upsample_rates)
    s_stft = stft(s.squeeze(1), cfg)  # (B, 18, 120·T + 1)

    x = conv1d(sd, "conv_pre", mel, padding=3)  # (B, C, T)
    for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)):
        x = F.leaky_relu(x, cfg.lrelu_slope)
        x = F.conv_transpose1d(x, weight(sd, f"ups.{i}"), sd[f"ups.{i}.bias"], stride=u, padding=(k - u) // 2)
        if i == n_up - 1:
            # ReflectionPad1d((1, 0)): the STFT has frames/hop + 1 frames, the upsampler one fewer
            x = torch.cat([x[..., 1:2], x], dim=-1)
        d = source_down_rates(cfg)[i]
        if d == 1:
            si = conv1d(sd, f"source_downs.{i}", s_stft)  # a 1x1 conv at the full rate
        else:
            si = conv1d(sd, f"source_downs.{i}", s_stft, stride=d, padding=d // 2)  # kernel 2d
        si = resblock(sd, f"source_resblocks.{i}", si, cfg.source_resblock_kernel_sizes[i],
                      cfg.source_resblock_dilation_sizes[i])
        x = x + si  # (B, C >> (i + 1), T · Π rates[:i+1] (+1 at the last stage))
        xs = None
        for j, (kj, dj) in enumerate(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes)):
            r = resblock(sd, f"resblocks.{i * n_k + j}", x, kj, dj)
            xs = r if xs is None else xs + r
        x = xs / n_k

    x = conv1d(sd, "conv_post", F.leaky_relu(x, POST_LRELU_SLOPE), padding=3)  # (B, n_fft + 2, 120·T + 1)
    half = n_fft // 2 + 1
    magnitude = torch.exp(x[:, :half])
    phase = torch.sin(x[:, half:])  # upstream feeds sin(x) as the phase ("actually, sin is redundancy")
    speech = istft(magnitude, phase, cfg)
    return speech.clamp(-cfg.audio_limit, cfg.audio_limit)


def inference(sd, cfg: HiFTConfig, mel: torch.Tensor, cache_source: torch.Tensor | None = None,
              draws: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """HiFTGenerator.inference: mel (B, 80, T) -> (speech (B, 480·T), source s (B, 1, 480·T)).

    `draws` = (phases (B, H+1, 1), noise (B, H+1, L)); None draws them as upstream does (`upstream_draws`), from
    the global RNG after the f0 predictor. A non-empty `cache_source` (B, 1, S) overwrites s[..., :S].
    """
    f0 = f0_predictor(sd, mel)  # (B, T)
    f0_up = upsample_f0(f0, cfg)  # (B, 1, L)
    B, _, L = f0_up.shape
    if draws is None:
        draws = upstream_draws(B, cfg.nb_harmonics + 1, L, mel.device)
    s = source_module(sd, f0_up, cfg, *draws).transpose(1, 2)  # (B, 1, L)
    if cache_source is not None and cache_source.shape[2] != 0:
        s[:, :, :cache_source.shape[2]] = cache_source  # the previous chunk's source tail, to avoid a glitch
    return decode(sd, cfg, mel, s), s
