"""StyleGAN2's generator and discriminator (Karras et al. 2020), single-device PyTorch.

Written from the paper (and the structure of NVlabs' StyleGAN2-ADA, whose code is not copied: its
licence forbids it):

- :class:`MappingNetwork`: z (normalised to unit second moment) -> w through ``layers`` fully connected
  layers at a learning-rate multiplier of 0.01; keeps the running mean ``w_avg`` for truncation (ψ).
- :class:`SynthesisNetwork`: a learned 4x4 constant, then per resolution two 3x3 modulated convolutions
  (weights scaled per sample by the style, then demodulated to unit output variance), per-pixel noise
  with a learned strength, and a ToRGB (1x1, not demodulated) whose outputs are upsampled and summed:
  the "skip" generator of configs E and F.
- :class:`Discriminator`: the residual discriminator, FromRGB at the top resolution, blocks of two 3x3
  convolutions (the second downsampling) beside a 1x1 downsampling skip, and at 4x4 the minibatch
  standard deviation, a convolution and two fully connected layers.

Channel counts are ``min(channel_base // resolution, channel_max)``: config E is channel_base 16384,
config F (the paper's "large networks") 32768. Images are [-1, 1], (N, 3, R, R).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from core.nets.ops import EqualConv2d, EqualLinear, bias_act, resampled_conv2d, setup_filter, upsample2d

CONFIGS = {"E": 16384, "F": 32768}  # channel_base of the paper's configs E and F


def channels_at(resolution: int, channel_base: int, channel_max: int) -> int:
    return min(channel_base // resolution, channel_max)


def block_resolutions(resolution: int) -> list[int]:
    if resolution < 4 or resolution & (resolution - 1):
        raise ValueError(f"StyleGAN2's resolution must be a power of two >= 4, got {resolution}")
    return [2 ** i for i in range(2, int(math.log2(resolution)) + 1)]


def normalize_2nd_moment(x: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    return x * (x.square().mean(dim, keepdim=True) + eps).rsqrt()


def modulated_conv2d(x: torch.Tensor, weight: torch.Tensor, styles: torch.Tensor, up: bool = False,
                     down: bool = False, padding: int = 0, resample_filter: torch.Tensor | None = None,
                     demodulate: bool = True, fused: bool = True) -> torch.Tensor:
    """Convolve each sample of ``x`` [N, I, H, W] with ``weight`` [O, I, k, k] scaled by its own
    ``styles`` [N, I] and, when ``demodulate``, rescaled so each output channel has unit expected
    variance (the paper's eq. 1–3).

    ``fused``: one grouped convolution with per-sample weights (fastest for small batches and inference);
    otherwise the styles scale the input and the demodulation the output around one shared convolution
    (the same numbers, faster for training batches on most devices)."""
    n, i, h, w_ = x.shape
    o, _, kh, kw = weight.shape
    weight = weight.to(x.dtype)
    styles = styles.to(x.dtype)
    coefficients = None
    if demodulate or fused:
        w = weight.unsqueeze(0) * styles.reshape(n, 1, i, 1, 1)                      # [N, O, I, k, k]
        if demodulate:
            coefficients = (w.square().sum((2, 3, 4)) + 1e-8).rsqrt()               # [N, O]
    if fused:
        if demodulate:
            w = w * coefficients.reshape(n, o, 1, 1, 1)
        out = resampled_conv2d(x.reshape(1, n * i, h, w_), w.reshape(n * o, i, kh, kw), resample_filter, up, down,
                               padding, groups=n)
        return out.reshape(n, o, *out.shape[2:])
    out = resampled_conv2d(x * styles.reshape(n, i, 1, 1), weight, resample_filter, up, down, padding)
    if demodulate:
        out = out * coefficients.reshape(n, o, 1, 1)
    return out


class MappingNetwork(nn.Module):
    def __init__(self, z_dim: int, w_dim: int, num_ws: int, layers: int = 8, lr_multiplier: float = 0.01,
                 w_avg_beta: float = 0.995):
        super().__init__()
        self.z_dim, self.w_dim, self.num_ws, self.w_avg_beta = z_dim, w_dim, num_ws, w_avg_beta
        self.layers = nn.ModuleList(EqualLinear(z_dim if k == 0 else w_dim, w_dim, act="lrelu",
                                                lr_multiplier=lr_multiplier) for k in range(layers))
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, z: torch.Tensor, psi: float = 1.0, cutoff: int | None = None,
                update_w_avg: bool = False) -> torch.Tensor:
        """w broadcast to every layer, [N, num_ws, w_dim]; truncated towards ``w_avg`` by ψ (in the first
        ``cutoff`` layers only, when given)."""
        x = normalize_2nd_moment(z.to(torch.float32))
        for layer in self.layers:
            x = layer(x)
        if update_w_avg:
            self.w_avg.copy_(x.detach().float().mean(0).lerp(self.w_avg, self.w_avg_beta))
        ws = x.unsqueeze(1).repeat(1, self.num_ws, 1)
        if psi != 1:
            if cutoff is None:
                ws = self.w_avg.lerp(ws, psi)
            else:
                ws[:, :cutoff] = self.w_avg.lerp(ws[:, :cutoff], psi)
        return ws


class SynthesisLayer(nn.Module):
    """Modulated 3x3 convolution (upsampling when ``up``), noise, bias, leaky ReLU."""

    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, up: bool = False,
                 clamp: float | None = None):
        super().__init__()
        self.up, self.resolution, self.clamp = up, resolution, clamp
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 3, 3))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.noise_strength = nn.Parameter(torch.zeros(1))  # 1-element, not 0-d: DeepSpeed broadcasts bytes views
        self.register_buffer("noise_const", torch.randn(resolution, resolution))
        self.register_buffer("resample_filter", setup_filter(), persistent=False)

    def forward(self, x: torch.Tensor, w: torch.Tensor, noise_mode: str = "random", fused: bool = True,
                noise: torch.Tensor | None = None):
        """``noise`` [N, 1, R, R], when given, replaces the noise_mode's (the projector optimises it)."""
        styles = self.affine(w)
        x = modulated_conv2d(x, self.weight, styles, up=self.up, padding=1, resample_filter=self.resample_filter,
                             fused=fused)
        if noise is not None:
            x = x + noise.to(x.dtype) * self.noise_strength.to(x.dtype)
        elif noise_mode == "random":
            x = x + torch.randn(x.shape[0], 1, self.resolution, self.resolution, device=x.device,
                                dtype=x.dtype) * self.noise_strength.to(x.dtype)
        elif noise_mode == "const":
            x = x + self.noise_const.to(x.dtype) * self.noise_strength.to(x.dtype)
        elif noise_mode != "none":
            raise ValueError(f"noise_mode must be random, const or none, got {noise_mode!r}")
        return bias_act(x, self.bias, "lrelu", clamp=self.clamp)


class ToRGB(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, clamp: float | None = None):
        super().__init__()
        self.clamp = clamp
        self.affine = EqualLinear(w_dim, in_channels, bias_init=1.0)
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        self.weight_gain = 1 / math.sqrt(in_channels)

    def forward(self, x: torch.Tensor, w: torch.Tensor, fused: bool = True) -> torch.Tensor:
        styles = self.affine(w) * self.weight_gain
        x = modulated_conv2d(x, self.weight, styles, demodulate=False, fused=fused)
        return bias_act(x, self.bias, clamp=self.clamp)


class SynthesisBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, w_dim: int, resolution: int, img_channels: int,
                 clamp: float | None = None):
        super().__init__()
        self.resolution = resolution
        if in_channels == 0:
            self.const = nn.Parameter(torch.randn(out_channels, resolution, resolution))
        else:
            self.conv0 = SynthesisLayer(in_channels, out_channels, w_dim, resolution, up=True, clamp=clamp)
        self.conv1 = SynthesisLayer(out_channels, out_channels, w_dim, resolution, clamp=clamp)
        self.torgb = ToRGB(out_channels, img_channels, w_dim, clamp=clamp)
        self.num_conv = 1 if in_channels == 0 else 2
        self.register_buffer("resample_filter", setup_filter(), persistent=False)

    def layers(self) -> list[SynthesisLayer]:
        return [self.conv1] if self.num_conv == 1 else [self.conv0, self.conv1]

    def forward(self, x, img, ws, noise_mode="random", fused=True, noises=None):
        """``ws`` [N, num_conv + 1, w_dim]: one per convolution, then ToRGB's; ``noises``: one per
        convolution or None."""
        noises = noises or [None] * self.num_conv
        if x is None:
            x = self.const.to(ws.dtype).unsqueeze(0).repeat(ws.shape[0], 1, 1, 1)
            x = self.conv1(x, ws[:, 0], noise_mode, fused, noises[0])
        else:
            x = self.conv0(x, ws[:, 0], noise_mode, fused, noises[0])
            x = self.conv1(x, ws[:, 1], noise_mode, fused, noises[1])
        rgb = self.torgb(x, ws[:, self.num_conv], fused)
        img = rgb if img is None else upsample2d(img, self.resample_filter) + rgb
        return x, img


class SynthesisNetwork(nn.Module):
    def __init__(self, w_dim: int, resolution: int, img_channels: int = 3, channel_base: int = 16384,
                 channel_max: int = 512, clamp: float | None = None):
        super().__init__()
        self.resolution, self.w_dim = resolution, w_dim
        self.blocks = nn.ModuleList()
        previous = 0
        for res in block_resolutions(resolution):
            out = channels_at(res, channel_base, channel_max)
            self.blocks.append(SynthesisBlock(previous, out, w_dim, res, img_channels, clamp))
            previous = out
        # block b reads num_conv + 1 consecutive ws starting where the previous block's convolutions ended
        self.num_ws = sum(b.num_conv for b in self.blocks) + 1

    def noise_layers(self) -> list[SynthesisLayer]:
        """The layers with noise inputs, in the order ``forward``'s ``noises`` lists them."""
        return [layer for block in self.blocks for layer in block.layers()]

    def forward(self, ws: torch.Tensor, noise_mode: str = "random", fused: bool = True,
                noises: list[torch.Tensor] | None = None) -> torch.Tensor:
        x = img = None
        start = 0
        for block in self.blocks:
            given = noises[start:start + block.num_conv] if noises is not None else None
            x, img = block(x, img, ws[:, start:start + block.num_conv + 1], noise_mode, fused, given)
            start += block.num_conv
        return img


class Generator(nn.Module):
    """z [N, z_dim] -> image [N, 3, R, R] in about [-1, 1]."""

    def __init__(self, resolution: int, z_dim: int = 512, w_dim: int = 512, mapping_layers: int = 8,
                 mapping_lr_multiplier: float = 0.01, channel_base: int = 16384, channel_max: int = 512,
                 img_channels: int = 3, clamp: float | None = None):
        super().__init__()
        self.z_dim, self.w_dim, self.resolution = z_dim, w_dim, resolution
        self.synthesis = SynthesisNetwork(w_dim, resolution, img_channels, channel_base, channel_max, clamp)
        self.num_ws = self.synthesis.num_ws
        self.mapping = MappingNetwork(z_dim, w_dim, self.num_ws, mapping_layers, mapping_lr_multiplier)

    def forward(self, z: torch.Tensor, psi: float = 1.0, noise_mode: str = "random", fused: bool = True):
        return self.synthesis(self.mapping(z, psi), noise_mode, fused)


def _group_size(batch: int, wanted: int) -> int:
    """The largest group of at most ``wanted`` samples that divides the batch."""
    return max(g for g in range(1, min(wanted, batch) + 1) if batch % g == 0)


class MinibatchStd(nn.Module):
    """Appends the standard deviation of each feature over groups of samples, averaged, as ``channels``
    extra feature maps: D sees how varied a batch is, which discourages mode collapse."""

    def __init__(self, group_size: int = 4, channels: int = 1):
        super().__init__()
        self.group_size, self.channels = group_size, channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        g, f = _group_size(n, self.group_size), self.channels
        y = x.reshape(g, -1, f, c // f, h, w).float()
        y = (y - y.mean(0)).square().mean(0)
        y = (y + 1e-8).sqrt().mean((2, 3, 4))                  # [N/G, F]
        y = y.reshape(-1, f, 1, 1).repeat(g, 1, h, w).to(x.dtype)
        return torch.cat([x, y], 1)


class DiscriminatorBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, img_channels: int, first: bool,
                 clamp: float | None = None):
        super().__init__()
        self.fromrgb = EqualConv2d(img_channels, in_channels, 1, act="lrelu", clamp=clamp) if first else None
        self.conv0 = EqualConv2d(in_channels, in_channels, 3, act="lrelu", clamp=clamp)
        self.conv1 = EqualConv2d(in_channels, out_channels, 3, act="lrelu", down=True, clamp=clamp,
                                 gain=math.sqrt(0.5))
        self.skip = EqualConv2d(in_channels, out_channels, 1, bias=False, down=True, gain=math.sqrt(0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fromrgb is not None:
            x = self.fromrgb(x)
        return self.skip(x) + self.conv1(self.conv0(x))  # each branch carries √0.5: unit variance


class Discriminator(nn.Module):
    """image [N, 3, R, R] in [-1, 1] -> logit [N, 1] (real > 0)."""

    def __init__(self, resolution: int, channel_base: int = 16384, channel_max: int = 512, img_channels: int = 3,
                 mbstd_group: int = 4, mbstd_channels: int = 1, clamp: float | None = None):
        super().__init__()
        self.resolution = resolution
        resolutions = block_resolutions(resolution)[::-1][:-1]  # R ... 8
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(channels_at(r, channel_base, channel_max), channels_at(r // 2, channel_base, channel_max),
                               img_channels, first=(r == resolution), clamp=clamp)
            for r in resolutions)
        channels = channels_at(4, channel_base, channel_max)
        self.fromrgb4 = EqualConv2d(img_channels, channels, 1, act="lrelu", clamp=clamp) if resolution == 4 else None
        self.mbstd = MinibatchStd(mbstd_group, mbstd_channels)
        self.conv = EqualConv2d(channels + mbstd_channels, channels, 3, act="lrelu", clamp=clamp)
        self.fc = EqualLinear(channels * 16, channels, act="lrelu")
        self.out = EqualLinear(channels, 1)

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        if img.shape[-1] != self.resolution or img.shape[-2] != self.resolution:
            raise ValueError(f"the discriminator takes {self.resolution}x{self.resolution} images, got "
                             f"{tuple(img.shape[-2:])}")
        x = self.fromrgb4(img) if self.fromrgb4 is not None else img
        for block in self.blocks:
            x = block(x)
        x = self.conv(self.mbstd(x))
        return self.out(self.fc(x.flatten(1)))


def count_parameters(module: nn.Module) -> int:
    return int(sum(np.prod(p.shape) for p in module.parameters()))
