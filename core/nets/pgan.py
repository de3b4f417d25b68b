"""The progressive GAN's networks (Karras et al. 2018, "Progressive Growing of GANs"), and its encoder.

Written from the paper (and the reference settings of tkarras/progressive_growing_of_gans and
facebookresearch/pytorch_GAN_zoo's ``pgan_config.py``): every layer has the equalised learning rate
(core/nets/ops.py), the generator normalises each pixel's feature vector after every convolution (pixel
norm) and its latent on entry, the discriminator ends with a minibatch standard-deviation channel.
Channels at resolution r are ``min(channel_base // r, channel_max)`` (the paper: 8192·2 // r, at most 512).

Growing: every network holds the layers of all resolutions 4 … ``resolution`` and runs at the one its
input (D, E) or ``resolution=`` argument (G) names. While a new resolution fades in, with weight α, the
output blends the new block's path with the previous resolution's, upsampled (G) or fed the
downsampled image (D, E): α = 0 is exactly the smaller network, so growing changes nothing abruptly.

The encoder is the discriminator's layout with ``z_dim`` outputs and no minibatch statistic (an image's
code must not depend on the other images of its batch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from core.nets.ops import EqualConv2d, EqualLinear
from core.nets.stylegan2 import MinibatchStd


def pixel_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Each position's feature vector scaled to unit root mean square (the latent: norm √z_dim)."""
    return x * (x.square().mean(dim=1, keepdim=True) + eps).rsqrt()


def resolutions_up_to(resolution: int) -> list[int]:
    if resolution < 4 or resolution & (resolution - 1):
        raise ValueError(f"resolution must be a power of two >= 4, got {resolution}")
    return [4 * 2 ** i for i in range(resolution.bit_length() - 2)]


def channels_at(resolution: int, base: int, cap: int) -> int:
    return max(min(base // resolution, cap), 1)


class ProgressiveGenerator(nn.Module):
    """z [N, z_dim] -> image [N, C, r, r] in about [-1, 1], at any r of the growing schedule."""

    def __init__(self, resolution: int, z_dim: int = 512, channel_base: int = 8192, channel_max: int = 512,
                 img_channels: int = 3):
        super().__init__()
        self.resolution, self.z_dim = resolution, z_dim
        self.resolutions = resolutions_up_to(resolution)
        ch = {r: channels_at(r, channel_base, channel_max) for r in self.resolutions}
        self.dense = EqualLinear(z_dim, ch[4] * 16, act="lrelu")
        self.conv4 = EqualConv2d(ch[4], ch[4], 3, act="lrelu")
        self.blocks = nn.ModuleDict({str(r): nn.ModuleList([EqualConv2d(ch[r // 2], ch[r], 3, act="lrelu"),
                                                            EqualConv2d(ch[r], ch[r], 3, act="lrelu")])
                                     for r in self.resolutions[1:]})
        self.to_rgb = nn.ModuleDict({str(r): EqualConv2d(ch[r], img_channels, 1) for r in self.resolutions})
        self.channels4 = ch[4]

    def forward(self, z: torch.Tensor, resolution: int | None = None, alpha: float = 1.0) -> torch.Tensor:
        resolution = resolution or self.resolution
        if resolution not in self.resolutions:
            raise ValueError(f"the generator grows through {self.resolutions}, not {resolution}")
        h = pixel_norm(self.dense(pixel_norm(z)).view(len(z), self.channels4, 4, 4))
        h = pixel_norm(self.conv4(h))
        previous = h
        for r in self.resolutions[1:self.resolutions.index(resolution) + 1]:
            previous = h
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            for conv in self.blocks[str(r)]:
                h = pixel_norm(conv(h))
        out = self.to_rgb[str(resolution)](h)
        if alpha < 1 and resolution > 4:
            faded = F.interpolate(self.to_rgb[str(resolution // 2)](previous), scale_factor=2, mode="nearest")
            out = alpha * out + (1 - alpha) * faded
        return out


class ProgressiveDiscriminator(nn.Module):
    """image [N, C, r, r] in [-1, 1] -> [N, outputs] at any r of the growing schedule: the critic (1
    output, minibatch std on) or the encoder (z_dim outputs, ``mbstd_group=0``)."""

    def __init__(self, resolution: int, channel_base: int = 8192, channel_max: int = 512, img_channels: int = 3,
                 outputs: int = 1, mbstd_group: int = 4):
        super().__init__()
        self.resolution = resolution
        self.resolutions = resolutions_up_to(resolution)
        ch = {r: channels_at(r, channel_base, channel_max) for r in self.resolutions}
        self.from_rgb = nn.ModuleDict({str(r): EqualConv2d(img_channels, ch[r], 1, act="lrelu")
                                       for r in self.resolutions})
        self.blocks = nn.ModuleDict({str(r): nn.ModuleList([EqualConv2d(ch[r], ch[r], 3, act="lrelu"),
                                                            EqualConv2d(ch[r], ch[r // 2], 3, act="lrelu")])
                                     for r in self.resolutions[1:]})
        self.mbstd = MinibatchStd(mbstd_group, 1) if mbstd_group else None
        self.conv4 = EqualConv2d(ch[4] + (1 if mbstd_group else 0), ch[4], 3, act="lrelu")
        self.fc = EqualLinear(ch[4] * 16, ch[4], act="lrelu")
        self.out = EqualLinear(ch[4], outputs)

    def features(self, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        """The 4×4 features before the minibatch statistic (f-AnoGAN's f_D: one image's own)."""
        resolution = x.shape[-1]
        if resolution not in self.resolutions or x.shape[-2] != resolution:
            raise ValueError(f"the network takes square images of {self.resolutions} px, got {tuple(x.shape[-2:])}")
        h = self.from_rgb[str(resolution)](x)
        for r in self.resolutions[:0:-1]:
            if r > resolution:
                continue
            h = F.avg_pool2d(self.blocks[str(r)][1](self.blocks[str(r)][0](h)), 2)
            if r == resolution and alpha < 1:
                h = alpha * h + (1 - alpha) * self.from_rgb[str(r // 2)](F.avg_pool2d(x, 2))
        return h

    def head(self, h: torch.Tensor) -> torch.Tensor:
        if self.mbstd is not None:
            h = self.mbstd(h)
        return self.out(self.fc(self.conv4(h).flatten(1)))

    def forward(self, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        return self.head(self.features(x, alpha))


def idle_parameter_names(network: nn.Module, resolution: int, alpha: float) -> set[str]:
    """Names of ``network``'s parameters a pass at ``resolution`` (fading in by ``alpha``) leaves unused: the
    entry/exit layers of other resolutions and the blocks above it."""
    used = {resolution, resolution // 2} if alpha < 1 else {resolution}
    idle = set()
    for name, _ in network.named_parameters():
        kind, _, rest = name.partition(".")
        if kind in ("from_rgb", "to_rgb") and int(rest.split(".")[0]) not in used:
            idle.add(name)
        elif kind == "blocks" and int(rest.split(".")[0]) > resolution:
            idle.add(name)
    return idle
