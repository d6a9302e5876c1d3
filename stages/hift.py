"""HiFT vocoder (CosyVoice2 `HiFTGenerator`): mel `(B, 80, T)` at 50 Hz -> 24 kHz waveform `(B, 480·T)`.

MODEL_SPEC §2.5. Neural source filter + iSTFTNet: an f0 predictor reads the mel, a sine source of f0 and its
harmonics (plus noise) is built at the output rate, and a HiFi-GAN upsampler fuses the source's STFT at every scale
before a 16-point iSTFT head. Attribute names mirror cosyvoice/hifigan/{generator,f0_predictor}.py, so `hift.pt`
(with its `generator.` prefix stripped) loads unchanged: weight-normed convs hold `weight_g` / `weight_v` / `bias`
exactly as the legacy `torch.nn.utils.weight_norm(dim=0)` stores them.

Randomness is explicit. The source draws, in upstream's order: the harmonics' initial phases (uniform, on the CPU),
the additive noise, and one more noise tensor upstream draws and never uses (drawn here too, so the RNG stream
stays aligned). With `generator=None` every draw comes from torch's global RNGs on the devices upstream uses, so
`torch.manual_seed(s)` reproduces the official module's output; with a `torch.Generator` every draw comes from it
(on its device); `deterministic=True` zeroes phases and noise.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from omni2.engine.config import HiFTConfig

MAG_CLIP = 1e2  # iSTFT magnitudes are clipped here (exp of the head's first half)
SNAKE_EPS = 1e-9  # Snake's guard against alpha == 0
# torch.distributions.Uniform(-π, π)'s float32 bounds, as the source draws its phases: low + u * (high - low).
# 0-dim CPU tensors enter a CUDA op as scalars: no copy to the device (which would wait for the queued kernels).
PHASE_LOW = torch.tensor(-math.pi)
PHASE_SPAN = torch.tensor(math.pi) - PHASE_LOW


def get_padding(kernel_size: int, dilation: int = 1) -> int:
    return (kernel_size * dilation - dilation) // 2


# -- weight-normed convolutions ----------------------------------------------------------------------------------
class _WeightNorm(nn.Module):
    """Parameters as legacy `weight_norm(layer, dim=0)` leaves them: w = g · v / ‖v‖, the norm taken over every dim
    but 0, so `weight_g` is `(v.shape[0], 1, 1)` - out channels for Conv1d, *in* channels for ConvTranspose1d."""

    def __init__(self, v_shape: tuple[int, int, int], bias: int):
        super().__init__()
        self.bias = nn.Parameter(torch.empty(bias))  # registration order as weight_norm leaves it: bias, g, v
        self.weight_g = nn.Parameter(torch.empty(v_shape[0], 1, 1))
        self.weight_v = nn.Parameter(torch.empty(v_shape))
        self._folded: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # A fresh layer as upstream builds it: torch's default conv init of v, then weight_norm sets g = ‖v‖.
        # (upstream's init_weights writes into the recomputed `.weight`, which the next forward overwrites.)
        if self.weight_v.is_meta:  # meta builds get their tensors from a checkpoint (and norms on meta are slow)
            return
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        bound = 1 / math.sqrt(self.weight_v[0].numel())
        nn.init.uniform_(self.bias, -bound, bound)
        with torch.no_grad():
            self.weight_g.copy_(self.weight_v.flatten(1).norm(dim=1).view(-1, 1, 1))

    def weight(self) -> torch.Tensor:
        if self._folded is not None:
            return self._folded
        # NOTE(hift): legacy weight_norm calls the fused torch._weight_norm, equal up to rounding; its CPU kernel
        # costs ~10 ms a call on 2-core machines (thread wake-ups), 80 calls per forward, so the formula it is.
        return self.weight_v * (self.weight_g / torch.norm_except_dim(self.weight_v, 2, 0))

    def fold(self) -> None:
        """Cache the effective weight (inference only); loading a state dict drops the cache."""
        self._folded = self.weight().detach()

    def _load_from_state_dict(self, *args, **kwargs):
        self._folded = None
        super()._load_from_state_dict(*args, **kwargs)


class WNConv1d(_WeightNorm):
    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int = 1, padding: int = 0, dilation: int = 1):
        super().__init__((cout, cin, kernel_size), cout)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv1d(x, self.weight(), self.bias, self.stride, self.padding, self.dilation)


class WNConvTranspose1d(_WeightNorm):
    def __init__(self, cin: int, cout: int, kernel_size: int, stride: int, padding: int):
        super().__init__((cin, cout, kernel_size), cout)
        self.stride, self.padding = stride, padding

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose1d(x, self.weight(), self.bias, self.stride, self.padding)


# -- building blocks ---------------------------------------------------------------------------------------------
class Snake(nn.Module):
    """x + sin²(αx) / (α + 1e-9), one α per channel (linear scale, as HiFT uses it)."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, T)
        alpha = self.alpha[None, :, None]
        return x + (1.0 / (alpha + SNAKE_EPS)) * torch.sin(x * alpha).pow(2)


class ResBlock(nn.Module):
    """Per dilation d: x += conv2(snake(conv1_d(snake(x)))), all 'same' padded."""

    def __init__(self, channels: int, kernel_size: int, dilations: tuple[int, ...]):
        super().__init__()
        self.convs1 = nn.ModuleList(WNConv1d(channels, channels, kernel_size, padding=get_padding(kernel_size, d),
                                             dilation=d) for d in dilations)
        self.convs2 = nn.ModuleList(WNConv1d(channels, channels, kernel_size, padding=get_padding(kernel_size))
                                    for _ in dilations)
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for c1, c2, a1, a2 in zip(self.convs1, self.convs2, self.activations1, self.activations2):
            x = c2(a2(c1(a1(x)))) + x
        return x


class ConvRNNF0Predictor(nn.Module):
    """mel (B, 80, T) -> f0 (B, T) in Hz: five wn-convs k3 + ELU, a Linear to one class, |·|."""

    def __init__(self, in_channels: int = 80, cond_channels: int = 512):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            layers += [WNConv1d(in_channels if i == 0 else cond_channels, cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        x = self.condnet(mel).transpose(1, 2)  # (B, T, C)
        return torch.abs(self.classifier(x).squeeze(-1))  # (B, T)


def sine_gen(f0: torch.Tensor, sampling_rate: int, harmonic_num: int, sine_amp: float, noise_std: float,
             voiced_threshold: float, phases: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """SineGen with its randomness passed in: f0 (B, 1, L) Hz at the output rate -> sines (B, H+1, L), uv (B, 1, L).

    Harmonic k (k = 1..H+1) has phase 2π·((Σ f0·k/sr) mod 1) + phases[:, k-1] (the fundamental's phase is forced
    to 0, as upstream does); sines are zeroed where f0 <= voiced_threshold; `noise` (standard normal, (B, H+1, L))
    is added with std `noise_std` where voiced and sine_amp/3 where not. Computed in float32.
    """
    f0 = f0.float()
    k = torch.arange(1, harmonic_num + 2, device=f0.device, dtype=torch.float32).view(1, -1, 1)
    f_mat = f0 * k / sampling_rate  # (B, H+1, L): cycles per sample
    # NOTE(hift): the float32 cumsum runs over the whole utterance (upstream's precision, kept for parity).
    theta = 2 * math.pi * (torch.cumsum(f_mat, dim=-1) % 1)
    phases = phases.float().clone()
    phases[:, 0, :] = 0
    sines = sine_amp * torch.sin(theta + phases)
    uv = (f0 > voiced_threshold).float()  # (B, 1, L)
    noise_amp = uv * noise_std + (1 - uv) * sine_amp / 3
    return sines * uv + noise_amp * noise.float(), uv


def draw_source_randomness(batch: int, n_harmonics: int, length: int, device: torch.device,
                           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Upstream's draws, in its order: phases U(-π, π) (B, H+1, 1), noise N(0, 1) (B, H+1, L), and the unused
    noise-branch tensor (B, L, 1). `generator=None`: the global RNGs (phases on the CPU, noise on `device`)."""
    gdev = generator.device if generator is not None else None
    u = torch.rand((batch, n_harmonics, 1), generator=generator, device=gdev or "cpu")
    phases = (PHASE_LOW + u * PHASE_SPAN).to(device)
    noise = torch.randn((batch, n_harmonics, length), generator=generator, device=gdev or device).to(device)
    torch.randn((batch, length, 1), generator=generator, device=gdev or device)  # upstream's unused noise branch
    return phases, noise


class SourceModuleHnNSF(nn.Module):
    """Harmonic-plus-noise source: the sines of `sine_gen` merged by Linear(H+1, 1) + tanh -> (B, L, 1)."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)

    def forward(self, f0: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
                deterministic: bool = False) -> torch.Tensor:  # f0 (B, 1, L) -> (B, L, 1)
        """`generator`: one for the whole batch, or one per row (a batch of sessions, each drawing what it would
        draw alone)."""
        return self.excite(f0, *self.draw(f0.shape[0], f0.shape[2], f0.device, generator, deterministic))

    def draw(self, batch: int, length: int, device: torch.device,
             generator: torch.Generator | list[torch.Generator] | None = None, deterministic: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's randomness for `batch` rows of `length` samples: phases (B, H+1, 1), noise (B, H+1, L)."""
        H1 = self.cfg.nb_harmonics + 1
        if deterministic:
            return torch.zeros(batch, H1, 1, device=device), torch.zeros(batch, H1, length, device=device)
        if isinstance(generator, list):
            if len(generator) != batch:
                raise ValueError(f"{len(generator)} generators for a batch of {batch}")
            draws = [draw_source_randomness(1, H1, length, device, g) for g in generator]
            return torch.cat([d[0] for d in draws]), torch.cat([d[1] for d in draws])
        return draw_source_randomness(batch, H1, length, device, generator)

    def excite(self, f0: torch.Tensor, phases: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """f0 (B, 1, L) and the drawn phases and noise -> (B, L, 1)."""
        c = self.cfg
        sines, _ = sine_gen(f0, c.sampling_rate, c.nb_harmonics, c.nsf_alpha, c.nsf_sigma, c.nsf_voiced_threshold,
                            phases, noise)
        w = self.l_linear.weight
        return torch.tanh(self.l_linear(sines.transpose(1, 2).to(w.dtype)))


# -- the generator -----------------------------------------------------------------------------------------------
class HiFT(nn.Module):
    """CosyVoice2's HiFTGenerator; `inference` is the entry point (see the module docstring)."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        C, n_fft = cfg.base_channels, cfg.istft_n_fft
        self.m_source = SourceModuleHnNSF(cfg)
        self.conv_pre = WNConv1d(cfg.in_channels, C, 7, padding=3)
        self.ups = nn.ModuleList(
            WNConvTranspose1d(C >> i, C >> (i + 1), k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes)))
        # The source's STFT frames run at the final rate; stage i sees them downsampled by the rates after it.
        down = [1]
        for r in cfg.upsample_rates[::-1][:-1]:
            down.append(down[-1] * r)
        self.source_downs = nn.ModuleList()
        self.source_resblocks = nn.ModuleList()
        for i, (u, k, d) in enumerate(zip(down[::-1], cfg.source_resblock_kernel_sizes,
                                          cfg.source_resblock_dilation_sizes)):
            ch = C >> (i + 1)
            self.source_downs.append(nn.Conv1d(n_fft + 2, ch, 1) if u == 1 else
                                     nn.Conv1d(n_fft + 2, ch, u * 2, u, padding=u // 2))
            self.source_resblocks.append(ResBlock(ch, k, tuple(d)))
        self.resblocks = nn.ModuleList(
            ResBlock(C >> (i + 1), k, tuple(d))
            for i in range(len(self.ups))
            for k, d in zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes))
        self.conv_post = WNConv1d(C >> len(self.ups), n_fft + 2, 7, padding=3)
        self.f0_predictor = ConvRNNF0Predictor(cfg.in_channels, cfg.f0_cond_channels)
        # built on the CPU even under a meta-device context (hann_window on meta is slow); .to() moves it
        self.register_buffer("stft_window", self._window("cpu"), persistent=False)

    def _window(self, device: torch.device | str | None = None) -> torch.Tensor:
        # scipy's get_window("hann", n, fftbins=True): periodic Hann in float64, cast to float32
        return torch.hann_window(self.cfg.istft_n_fft, periodic=True, dtype=torch.float64, device=device).float()

    def init_non_persistent(self, device: torch.device | str) -> None:
        """Rebuild what the checkpoint does not hold (the STFT window) after a meta-device load."""
        self.stft_window = self._window(device)

    def fold_weight_norm(self) -> HiFT:
        """Precompute every weight-normed conv's effective weight for inference (keys stay g/v)."""
        for m in self.modules():
            if isinstance(m, _WeightNorm):
                m.fold()
        return self

    # -- pieces ------------------------------------------------------------------------------------------------
    def draw(self, mel: torch.Tensor, generator: torch.Generator | list[torch.Generator] | None = None,
             deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """The source's randomness for mel (B, 80, T): phases (B, H+1, 1), noise (B, H+1, 480·T) (no draw reads the
        mel's values, only its shape)."""
        B, _, T = mel.shape
        return self.m_source.draw(B, T * self.cfg.samples_per_frame, mel.device, generator, deterministic)

    def excite(self, mel: torch.Tensor, phases: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) and the drawn phases and noise -> NSF excitation s (B, 1, 480·T)."""
        f0 = self.f0_predictor(mel.to(self.conv_pre.weight_v.dtype)).float()  # (B, T); f0 integrates in fp32
        scale = float(self.cfg.samples_per_frame)
        f0_up = F.interpolate(f0[:, None], scale_factor=scale, mode="nearest")  # (B, 1, L), nn.Upsample's default
        return self.m_source.excite(f0_up, phases, noise).transpose(1, 2)  # (B, 1, L)

    def _stft(self, x: torch.Tensor) -> torch.Tensor:  # (B, L) -> (B, n_fft + 2, L / hop + 1): [real; imag]
        n_fft, hop = self.cfg.istft_n_fft, self.cfg.istft_hop_len
        spec = torch.stft(x.float(), n_fft, hop, n_fft, window=self.stft_window, return_complex=True)
        spec = torch.view_as_real(spec)
        return torch.cat([spec[..., 0], spec[..., 1]], dim=1)

    def istft_head(self, x: torch.Tensor) -> torch.Tensor:
        """conv_post output (B, n_fft + 2, F) -> waveform (B, (F - 1)·hop), clamped to ±audio_limit."""
        n_fft, hop = self.cfg.istft_n_fft, self.cfg.istft_hop_len
        half = n_fft // 2 + 1
        x = x.float()
        magnitude = torch.clip(torch.exp(x[:, :half]), max=MAG_CLIP)
        # NOTE(hift): upstream takes sin() of the phase channels and then cos/sin of *that* ("actually, sin is
        # redundancy" in its comment): phase = sin(x) is what the trained weights expect, so it stays.
        phase = torch.sin(x[:, half:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        wav = torch.istft(spec, n_fft, hop, n_fft, window=self.stft_window)
        return torch.clamp(wav, -self.cfg.audio_limit, self.cfg.audio_limit)

    def decode(self, mel: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) + source s (B, 1, 480·T) -> speech (B, 480·T)."""
        return self.istft_head(self.spectrum(mel, s))

    def spectrum(self, mel: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T) + source s (B, 1, 480·T) -> conv_post's output (B, n_fft + 2, 120·T + 1): the iSTFT
        head's log-magnitudes and phases."""
        c = self.cfg
        dtype = self.conv_pre.weight_v.dtype
        s_stft = self._stft(s.squeeze(1)).to(dtype)  # (B, 18, 120·T + 1)
        x = self.conv_pre(mel.to(dtype))  # (B, C, T)
        n_k = len(c.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, c.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # ReflectionPad1d((1, 0)): one more frame, as the STFT has
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            xs = self.resblocks[i * n_k](x)
            for j in range(1, n_k):
                xs = xs + self.resblocks[i * n_k + j](x)
            x = xs / n_k
        return self.conv_post(F.leaky_relu(x))  # default slope 0.01 here, as upstream

    @torch.inference_mode()
    def inference(self, mel: torch.Tensor, cache_source: torch.Tensor | None = None,
                  generator: torch.Generator | list[torch.Generator] | None = None,
                  deterministic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, T) -> (speech (B, 480·T), source (B, 1, 480·T)).

        `cache_source` (B, 1, S): the previous chunk's source tail, which overwrites the first S source samples
        (upstream's glitch avoidance when consecutive chunks overlap by mel_cache_len frames).
        """
        spec, s = self.excited_spectrum(mel, *self.draw(mel, generator, deterministic), cache_source)
        return self.istft_head(spec), s

    def excited_spectrum(self, mel: torch.Tensor, phases: torch.Tensor, noise: torch.Tensor,
                         cache_source: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """`inference` up to the iSTFT head, its randomness drawn (`draw`): (spectrum, source). Nothing in it
        depends on values on the host, so a CUDA graph can replay it (stages/hift_graph.py); torch.istft checks its
        window envelope on the host, so the head stays outside."""
        s = self.excite(mel, phases, noise)
        if cache_source is not None and cache_source.shape[-1] > 0:
            S = cache_source.shape[-1]
            if S > s.shape[-1]:
                raise ValueError(f"cache_source has {S} samples, more than the {s.shape[-1]} of this chunk")
            s[:, :, :S] = cache_source.to(s)
        return self.spectrum(mel, s), s
