"""Deep Perceptual Autoencoder (Tuluptceva et al., "Anomaly Detection with Deep Perceptual Autoencoders").

An autoencoder g of pre-activation residual blocks is trained on normal images only, with the
relative-perceptual-L1 loss

    L(x) = ‖f̂(x) − f̂(g(x))‖₁ / ‖f̂(x)‖₁,     f̂ = (f − μ) / σ,

f a pretrained network's intermediate layer (core/nets) and μ, σ its per-channel statistics over the
training data (computed once per run by the trainer: ``feature_stats.pt``). The same quantity is the
anomaly score of an image; the pixel map is the per-location share of that L1 distance, upsampled.

Progressive growing (``train.growing``): training starts at a low resolution and doubles up to
``resolution``; each new level fades in with α rising 0 → 1 (``StepState``), and the loss follows in
sync with ever deeper features: L = α·L(f₂(x), f₂(g(x))) + (1 − α)·L(f₁(↓x), f₁(↓g(x))). ``layers`` lists
the feature layers shallow to deep; the last one is used at the target resolution (and throughout
without growing), each halving below it takes the previous one.

Options off by default, as in the paper's ablation: an extra pixel L1 term (``l1_weight``) and an
adversarial term (``adversarial_weight``, adding a discriminator group ``D``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from core.config import StrictConfig
from core.methods import register_method
from core.methods.base import Method, Phase
from core.nets import create_net, feature_statistics, ignore_saved_extractors


class PreActBlock(nn.Module):
    """BN-LeakyReLU-conv ×2 with an identity (or 1×1) shortcut: the pre-activation residual block."""

    def __init__(self, channels_in: int, channels_out: int):
        super().__init__()
        self.body = nn.Sequential(nn.BatchNorm2d(channels_in), nn.LeakyReLU(0.2),
                                  nn.Conv2d(channels_in, channels_out, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(channels_out), nn.LeakyReLU(0.2),
                                  nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False))
        self.shortcut = nn.Conv2d(channels_in, channels_out, 1, bias=False) if channels_in != channels_out \
            else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shortcut(x) + self.body(x)


class ProgressiveAutoencoder(nn.Module):
    """Encoder from any resolution r ∈ {8, 16, …, resolution} down to 4×4 and a dense bottleneck; the
    decoder back up to r. ``from_rgb[r]`` / ``to_rgb[r]`` enter and leave at resolution r; at a fade-in
    the previous resolution's path is blended with weight 1 − α (Karras et al.)."""

    def __init__(self, channels: int, resolution: int, base: int, max_channels: int, latent: int):
        super().__init__()
        self.resolutions = [4 * 2**i for i in range(int(math.log2(resolution // 4)) + 1)]  # 4 … resolution
        self.width = {r: min(base * resolution // r, max_channels) for r in self.resolutions}
        w = self.width
        self.from_rgb = nn.ModuleDict({str(r): nn.Conv2d(channels, w[r], 1) for r in self.resolutions[1:]})
        self.down = nn.ModuleDict({str(r): PreActBlock(w[r], w[r // 2]) for r in self.resolutions[1:]})
        self.encode_4 = nn.Sequential(nn.BatchNorm2d(w[4]), nn.LeakyReLU(0.2), nn.Flatten(),
                                      nn.Linear(w[4] * 16, latent))
        self.decode_4 = nn.Linear(latent, w[4] * 16)
        self.up = nn.ModuleDict({str(r): PreActBlock(w[r // 2], w[r]) for r in self.resolutions[1:]})
        self.to_rgb = nn.ModuleDict({str(r): nn.Sequential(nn.BatchNorm2d(w[r]), nn.LeakyReLU(0.2),
                                                           nn.Conv2d(w[r], channels, 1))
                                     for r in self.resolutions[1:]})

    def forward(self, x: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        r = x.shape[-1]
        if r not in self.resolutions[1:] or x.shape[-2] != r:
            raise ValueError(f"the autoencoder takes square inputs of {self.resolutions[1:]} px, got "
                             f"{tuple(x.shape[-2:])}: set the method's resolution to the tile/crop size")
        h = F.avg_pool2d(self.down[str(r)](self.from_rgb[str(r)](x)), 2)
        if alpha < 1 and r > 8:
            h = alpha * h + (1 - alpha) * self.from_rgb[str(r // 2)](F.avg_pool2d(x, 2))
        size = r // 2
        while size > 4:
            h = F.avg_pool2d(self.down[str(size)](h), 2)
            size //= 2
        h = self.decode_4(self.encode_4(h)).view(len(x), self.width[4], 4, 4)
        while size < r // 2:
            size *= 2
            h = self.up[str(size)](F.interpolate(h, scale_factor=2, mode="nearest"))
        out = self.to_rgb[str(r)](self.up[str(r)](F.interpolate(h, scale_factor=2, mode="nearest")))
        if alpha < 1 and r > 8:
            previous = F.interpolate(self.to_rgb[str(r // 2)](h), scale_factor=2, mode="nearest")
            out = alpha * out + (1 - alpha) * previous
        return out


class Discriminator(nn.Module):
    """A small patch discriminator for the optional adversarial term."""

    def __init__(self, channels: int, base: int):
        super().__init__()
        layers, width = [], channels
        for i in range(4):
            layers += [nn.Conv2d(width, base * 2**i, 4, 2, 1), nn.LeakyReLU(0.2)]
            width = base * 2**i
        self.body = nn.Sequential(*layers, nn.Conv2d(width, 1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x).flatten(1).mean(dim=1)


def relative_perceptual_l1(real: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """‖real − fake‖₁ / ‖real‖₁ per sample, for normalised features (B, C, H, W) -> (B,)."""
    return (real - fake).abs().flatten(1).sum(dim=1) / real.abs().flatten(1).sum(dim=1).clamp_min(1e-8)


@register_method("dpa")
class DeepPerceptualAutoencoder(Method):
    uses_statistics = True  # statistics() once per run, from the training stream

    class Config(StrictConfig):
        in_channels: int = Field(3, ge=1)             # image channels; 1-channel images are repeated for the net
        resolution: int = Field(64, ge=8)             # target (and test) image size: a power of two
        base: int = Field(32, ge=4)                   # channels at the target resolution, doubling per halving
        max_channels: int = Field(256, ge=8)          # cap on channels of the deepest levels
        latent: int = Field(256, ge=1)                # dense bottleneck size
        net: str = "efficientnet_lite0"               # feature extractor (core/nets): vgg16, vgg19, efficientnet_lite0
        weights: str = "imagenet"                     # 'imagenet' (local file), a state-dict path, or 'none'
        layers: list[str] = ["reduction3"]            # feature layers, shallow -> deep; the last at full resolution
        normalise: bool = True                        # f̂ = (f − μ)/σ with the run's feature statistics
        l1_weight: float = Field(0.0, ge=0)           # extra pixel L1 term (ablation; off)
        adversarial_weight: float = Field(0.0, ge=0)  # extra adversarial term with a discriminator (ablation; off)
        # Scoring only (`tessera eval --option`, `tessera posthoc --search`): a tile larger than resolution
        # is scored as windows every window_stride px (null: resolution, side by side as in the paper;
        # half of it: overlapping, so an anomaly on a window's edge is whole in another); a window's
        # score is its whole relative L1 ('mean', the paper) or that of its highest pooling_top share of
        # feature positions, scaled to the whole map ('top': a small anomaly is not diluted).
        window_stride: int | None = Field(None, ge=1)
        image_pooling: Literal["mean", "top"] = "mean"
        pooling_top: float = Field(0.1, gt=0, le=1)

        @model_validator(mode="after")
        def _power_of_two(self):
            if self.resolution & (self.resolution - 1):
                raise ValueError(f"resolution must be a power of two, got {self.resolution}")
            if not self.layers:
                raise ValueError("layers must name at least one feature layer")
            return self

    def __init__(self, config: "DeepPerceptualAutoencoder.Config"):
        super().__init__()
        self.config = config
        self.autoencoder = ProgressiveAutoencoder(config.in_channels, config.resolution, config.base,
                                                  config.max_channels, config.latent)
        self.discriminator = Discriminator(config.in_channels, 32) if config.adversarial_weight else None
        self.features = create_net(config.net, config.weights, list(dict.fromkeys(config.layers)))
        ignore_saved_extractors(self, ("features.",))
        for layer in dict.fromkeys(config.layers):
            channels = self.features.channels[layer]
            self.register_buffer(f"mean_{layer}", torch.zeros(1, channels, 1, 1))
            self.register_buffer(f"std_{layer}", torch.ones(1, channels, 1, 1))
        self.register_buffer("statistics_ready", torch.tensor(not config.normalise))

    # -------------------------------------------------------------------------- feature statistics

    def statistics(self, batches) -> dict:
        """Channel mean/std of each feature layer over ``batches`` of training data, each layer at the
        resolution it is used at (a shallower layer of the growing schedule sees downsampled images)."""
        images = [b["image"] for b in batches]
        stats = {}
        for layer in dict.fromkeys(self.config.layers):
            last_use = max(i for i, name in enumerate(self.config.layers) if name == layer)
            resolution = max(self.config.resolution // 2 ** (len(self.config.layers) - 1 - last_use), 8)
            sized = (self._rgb(F.interpolate(x, size=(resolution, resolution), mode="area")
                               if x.shape[-1] != resolution else x) for x in images)
            stats.update(feature_statistics(self.features, sized, [layer]))
        return stats

    def set_statistics(self, stats: dict) -> None:
        for layer in dict.fromkeys(self.config.layers):
            getattr(self, f"mean_{layer}").copy_(stats[layer]["mean"].view(1, -1, 1, 1))
            getattr(self, f"std_{layer}").copy_(stats[layer]["std"].view(1, -1, 1, 1))
        self.statistics_ready.fill_(True)

    # -------------------------------------------------------------------------------------- model

    def groups(self) -> dict[str, nn.Module]:
        groups = {"model": self.autoencoder}
        if self.discriminator is not None:
            groups["D"] = self.discriminator
        return groups

    def idle_parameters(self, state=None) -> set[str]:
        """Names (in ``groups()['model']``) of the parameters a step at ``state`` leaves without gradient:
        the entry/exit layers of the resolutions not in use (progressive growing's other levels)."""
        resolution = state.resolution if state is not None and state.resolution else self.config.resolution
        alpha = state.alpha if state is not None and state.resolution else 1.0
        used = {resolution, resolution // 2} if alpha < 1 else {resolution}
        return {name for name, _ in self.autoencoder.named_parameters()
                if name.startswith(("from_rgb.", "to_rgb.")) and int(name.split(".")[1]) not in used}

    def _rgb(self, images: torch.Tensor) -> torch.Tensor:
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def _layer(self, resolution: int) -> str:
        below = int(math.log2(self.config.resolution // resolution))
        return self.config.layers[max(len(self.config.layers) - 1 - below, 0)]

    def _features(self, images: torch.Tensor, layer: str) -> torch.Tensor:
        f = self.features(self._rgb(images), [layer])[layer].float()
        if self.config.normalise:
            if not bool(self.statistics_ready):
                raise RuntimeError("DPA's feature statistics are not set: the trainer computes them "
                                   "(feature_stats.pt in the run dir); or set normalise: false")
            f = (f - getattr(self, f"mean_{layer}")) / getattr(self, f"std_{layer}")
        return f

    def perceptual(self, images: torch.Tensor, reconstructions: torch.Tensor, layer: str) -> torch.Tensor:
        return relative_perceptual_l1(self._features(images, layer), self._features(reconstructions, layer))

    def forward(self, images: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
        return self.autoencoder(images, alpha)

    def _inputs(self, batch: dict, state) -> tuple[torch.Tensor, int, float]:
        """The batch's images at the growing schedule's resolution, that resolution and the fade-in α."""
        images = batch["image"]
        resolution = state.resolution if state is not None and state.resolution else self.config.resolution
        alpha = state.alpha if state is not None and state.resolution else 1.0
        if images.shape[-1] != resolution:
            images = F.interpolate(images, size=(resolution, resolution), mode="area")
        return images, resolution, alpha

    def phases(self) -> list[Phase]:
        if self.discriminator is None:
            return super().phases()
        # The autoencoder's phase, then the discriminator's on its own batch and its own forward, which
        # sees the autoencoder as just updated.
        return [Phase("main", "model", lambda batch, state: self.training_step(batch, state)["model"]),
                Phase("D", "D", self._discriminator_loss)]

    def _discriminator_loss(self, batch: dict, state=None) -> torch.Tensor:
        images, _, alpha = self._inputs(batch, state)
        with torch.no_grad():
            recon = self.autoencoder(images, alpha)
        return F.softplus(self.discriminator(recon)).mean() + F.softplus(-self.discriminator(images)).mean()

    def training_step(self, batch: dict, state=None) -> dict[str, torch.Tensor]:
        images, resolution, alpha = self._inputs(batch, state)
        recon = self.autoencoder(images, alpha)
        loss = self.perceptual(images, recon, self._layer(resolution)).mean()
        if alpha < 1:
            previous = self._layer(resolution // 2)
            loss = alpha * loss + (1 - alpha) * self.perceptual(F.avg_pool2d(images, 2), F.avg_pool2d(recon, 2),
                                                                 previous).mean()
        if self.config.l1_weight:
            loss = loss + self.config.l1_weight * (recon - images).abs().mean()
        losses = {"model": loss}
        if self.discriminator is not None:
            # Generator term through a discriminator whose weights get no gradient from it.
            self.discriminator.requires_grad_(False)
            losses["model"] = loss + self.config.adversarial_weight * F.softplus(-self.discriminator(recon)).mean()
            self.discriminator.requires_grad_(True)
        return losses

    @torch.no_grad()
    def score(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Image score: the relative-perceptual-L1 of its reconstruction; pixel map: each location's
        share of that L1 distance (summed over channels), bilinearly upsampled to the image.

        An image larger than ``resolution`` (a multiple of it per side: a 256 px tile for a model trained
        on 64 px crops) is scored window by window: its pixel map is the windows' maps side by side and
        its score the highest window score (an anomaly is local; averaging would dilute it)."""
        images = batch["image"]
        size = self.config.resolution
        stride = self.config.window_stride or size
        height, width = images.shape[-2:]
        if (height, width) != (size, size) and height >= size and width >= size and \
                (height - size) % stride == 0 and (width - size) % stride == 0:
            windows = images.unfold(2, size, stride).unfold(3, size, stride)  # B, C, rows, columns, size, size
            rows, columns = windows.shape[2:4]
            windows = windows.permute(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1], size, size)
            scores, maps = self._score_windows(windows)
            scores = scores.view(len(images), rows * columns).amax(dim=1)
            # each pixel: the mean of the maps of the windows that cover it (one, without overlap)
            blocks = maps.reshape(len(images), rows * columns, size * size).transpose(1, 2)
            summed = F.fold(blocks, (height, width), size, stride=stride)
            covered = F.fold(torch.ones_like(blocks), (height, width), size, stride=stride)
            return scores, summed / covered
        return self._score_windows(images)

    def _score_windows(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.config.layers[-1]
        real = self._features(images, layer)
        fake = self._features(self.autoencoder(images), layer)
        distance = (real - fake).abs().sum(dim=1, keepdim=True)
        scale = real.abs().flatten(1).sum(dim=1).clamp_min(1e-8).view(-1, 1, 1, 1)
        flat = distance.flatten(1)
        if self.config.image_pooling == "top":  # the top share's mean, times the positions: the whole map's scale
            k = max(1, math.ceil(self.config.pooling_top * flat.shape[1]))
            image_scores = flat.topk(k, dim=1).values.mean(dim=1) * flat.shape[1] / scale.flatten()
        else:
            image_scores = flat.sum(dim=1) / scale.flatten()
        pixel = F.interpolate(distance / scale * distance[0, 0].numel(), size=images.shape[-2:],
                              mode="bilinear", align_corners=False)
        return image_scores, pixel
