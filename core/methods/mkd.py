"""Multiresolution Knowledge Distillation (Salehi et al., "Multiresolution Knowledge Distillation for
Anomaly Detection").

A frozen pretrained *source* network (core/nets: VGG16 by default, EfficientNet-Lite0 offline) and a
smaller, bias-free *cloner* trained from scratch on normal images to reproduce the source's activations
at several *critical points* (``layers``: VGG16's max-pool outputs by default):

    L_total = L_val + λ·L_dir,
    L_val = Σ_cp mean((a_s − a_c)²),     L_dir = Σ_cp (1 − cos(vec a_s, vec a_c)).

λ is set once from the untrained cloner so that both terms start equal (λ = L_val / L_dir over the
run's first batches: the trainer computes it with the feature statistics, ``feature_stats.pt``, so
every rank and a resumed run use the same value), unless ``lambda_dir`` fixes it. The anomaly score of
an image is its L_total. The localisation map is ∂L_total/∂x (or SmoothGrad's average over noisy
copies), absolute and averaged over colour channels, blurred with a Gaussian of σ = ``blur_sigma`` and
opened morphologically with a 3×3 ellipse. That map costs a backward pass per image; ``localise_top``
< 1 computes it only for the highest-scoring share of each batch (the rest: zeros), so a slide evaluation
of thousands of tiles costs little more than their scores.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn
from torchvision.transforms.functional import gaussian_blur

from core.config import StrictConfig
from core.methods import register_method
from core.methods.base import Method
from core.nets import create_net, ignore_saved_extractors


class Cloner(nn.Module):
    """VGG-like, without biases or normalisation: per halving of resolution two 3×3 convolutions and a
    max-pool; the stage that reaches a critical point's stride ends with that point's channel count
    (pre-activation, so it can match signed features such as EfficientNet's linear block outputs)."""

    def __init__(self, in_channels: int, points: list[tuple[str, int, int]], base: int):
        super().__init__()
        self.points = [name for name, _, _ in points]
        stages, channels, stride, width = [], in_channels, 1, base
        for _, point_stride, point_channels in points:
            layers = []
            while stride < point_stride:
                last = stride * 2 == point_stride
                out = point_channels if last else min(width, point_channels)
                if channels != in_channels:
                    layers.append(nn.LeakyReLU(0.2))
                layers += [nn.Conv2d(channels, out, 3, 1, 1, bias=False), nn.LeakyReLU(0.2),
                           nn.Conv2d(out, out, 3, 1, 1, bias=False), nn.MaxPool2d(2)]
                channels, stride, width = out, stride * 2, width * 2
            if not layers:
                raise ValueError(f"critical points must have increasing strides, got {points}")
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        out = {}
        for name, stage in zip(self.points, self.stages):
            x = stage(x)
            out[name] = x
        return out


def _opening(maps: torch.Tensor) -> torch.Tensor:
    """Grey-scale morphological opening with the 3×3 ellipse (a cross): erosion, then dilation."""
    def neighbourhood(x):
        padded = F.pad(x, (1, 1, 1, 1), mode="replicate")
        return torch.stack([x, padded[..., :-2, 1:-1], padded[..., 2:, 1:-1],
                            padded[..., 1:-1, :-2], padded[..., 1:-1, 2:]])

    return neighbourhood(neighbourhood(maps).amin(dim=0)).amax(dim=0)


def _default_map_scale(state_dict, prefix, *args) -> None:
    """Weights saved before ``map_scale`` existed load with it unset (-1)."""
    state_dict.setdefault(prefix + "map_scale", torch.tensor(-1.0))


@register_method("mkd")
class MultiresolutionKnowledgeDistillation(Method):
    uses_statistics = True  # statistics() once per run, from the training stream

    class Config(StrictConfig):
        in_channels: int = Field(3, ge=1)             # image channels; 1-channel images are repeated for the net
        net: str = "vgg16"                            # source network (core/nets): vgg16, vgg19, efficientnet_lite0
        weights: str = "imagenet"                     # 'imagenet' (local file), a state-dict path, or 'none'
        layers: list[str] | None = None               # critical points; None: the net's default (VGG: pool1-4)
        cloner_base: int = Field(16, ge=4)            # cloner channels in its first block, doubling per halving
        lambda_dir: float | None = Field(None, ge=0)  # weight of L_dir; None: L_val/L_dir of the untrained cloner
        localisation: Literal["gradient", "smoothgrad", "discrepancy"] = "gradient"  # discrepancy: the
                                                      # critical points' local discrepancy maps upsampled and
                                                      # summed (no backward pass: as cheap as the score)
        smoothgrad_samples: int = Field(8, ge=1)      # noisy copies averaged by SmoothGrad
        smoothgrad_sigma: float = Field(0.1, gt=0)    # their noise, as a share of the image's value range
        blur_sigma: float = Field(4.0, ge=0)          # Gaussian blur of the gradient map (0: none)
        opening: bool = True                          # morphological opening with a 3×3 ellipse
        image_pooling: Literal["mean", "top"] = "mean"  # image score from each critical point's discrepancy
                                                        # map: its mean (the paper), or the mean of its highest
        pooling_top: float = Field(0.1, gt=0, le=1)     # share of positions ('top'): a disc covering a tenth
                                                        # of a tile is not averaged away by the normal rest
        localise_top: float = Field(1.0, gt=0, le=1)  # share of each batch localised, its highest scores; the
                                                      # rest get maps of zeros (0.1: 2.3x less CPU at 128 px,
                                                      # bench/mkd_eval.py; `tessera eval RUN --option localise_top=0.1`)

    def __init__(self, config: "MultiresolutionKnowledgeDistillation.Config"):
        super().__init__()
        self.config = config
        self.source = create_net(config.net, config.weights, config.layers)
        ignore_saved_extractors(self, ("source.",))
        points = [(name, self.source.strides[name], self.source.channels[name]) for name in self.source.layers]
        self.cloner = Cloner(3, points, config.cloner_base)
        fixed = config.lambda_dir if config.lambda_dir is not None else -1.0
        self.register_buffer("lambda_dir", torch.tensor(float(fixed)))
        # L_total of the untrained cloner (2·L_val): divides the discrepancy map into [0, 1] as pixel
        # metrics want (a map at 1 is as far from the source as an untrained cloner is, on average)
        self.register_buffer("map_scale", torch.tensor(-1.0))
        self._register_load_state_dict_pre_hook(_default_map_scale)

    def groups(self) -> dict[str, nn.Module]:
        return {"model": self.cloner}

    def _rgb(self, images: torch.Tensor) -> torch.Tensor:
        return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images

    def terms(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L_val, L_dir) per image, summed over the critical points."""
        images = self._rgb(images)
        with torch.no_grad():
            source = self.source(images)
        cloned = self.cloner(images)
        value = images.new_zeros(len(images))
        direction = images.new_zeros(len(images))
        for name, a_s in source.items():
            a_s, a_c = a_s.float().flatten(1), cloned[name].float().flatten(1)
            value = value + ((a_s - a_c) ** 2).mean(dim=1)
            direction = direction + 1 - F.cosine_similarity(a_s, a_c, dim=1)
        return value, direction

    @torch.no_grad()
    def discrepancy(self, images: torch.Tensor, with_maps: bool = True):
        """(top-pooled image score, L_total, (B, 1, H, W) discrepancy map or None) from one forward. At each
        critical point the per-position discrepancy is the squared difference averaged over channels +
        λ·(1 − cosine over channels); the pooled score sums, over the points, the mean of its highest
        ``pooling_top`` share; the map sums the points' maps upsampled bilinearly to the image. Training
        keeps the paper's whole-map loss (L_total, also returned)."""
        if with_maps and float(self.map_scale) <= 0:
            raise RuntimeError("this MKD model predates localisation: discrepancy (no map scale in its weights); "
                               "score it from its run directory, whose feature_stats.pt holds the scale "
                               "(tessera eval RUN; tessera export RUN for a file that has it)")
        images = self._rgb(images)
        source, cloned = self.source(images), self.cloner(images)
        pooled, whole = images.new_zeros(len(images)), images.new_zeros(len(images))
        maps = images.new_zeros(len(images), 1, *images.shape[-2:]) if with_maps else None
        for name, a_s in source.items():
            a_s, a_c = a_s.float(), cloned[name].float()
            whole = whole + ((a_s - a_c) ** 2).flatten(1).mean(dim=1) + \
                self.lambda_dir * (1 - F.cosine_similarity(a_s.flatten(1), a_c.flatten(1), dim=1))
            local = ((a_s - a_c) ** 2).mean(dim=1) + self.lambda_dir * (1 - F.cosine_similarity(a_s, a_c, dim=1))
            flat = local.flatten(1)
            k = max(1, math.ceil(self.config.pooling_top * flat.shape[1]))
            pooled = pooled + flat.topk(k, dim=1).values.mean(dim=1)
            if with_maps:
                maps += F.interpolate(local[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)
        return pooled, whole, maps / self.map_scale if with_maps else None

    def total(self, images: torch.Tensor) -> torch.Tensor:
        if float(self.lambda_dir) < 0:
            raise RuntimeError("MKD's λ is not set: the trainer sets it from the untrained cloner "
                               "(feature_stats.pt in the run dir); or give lambda_dir")
        value, direction = self.terms(images)
        return value + self.lambda_dir * direction

    # ------------------------------------------------------------ λ from the untrained cloner

    @torch.no_grad()
    def statistics(self, batches) -> dict:
        values, directions = [], []
        for batch in batches:
            value, direction = self.terms(batch["image"])
            values.append(value)
            directions.append(direction)
        value, direction = torch.cat(values).mean(), torch.cat(directions).mean()
        return {"lambda": float(value / direction.clamp_min(1e-12)), "l_val": float(value), "l_dir": float(direction)}

    def set_statistics(self, stats: dict) -> None:
        if self.config.lambda_dir is None:
            self.lambda_dir.fill_(stats["lambda"])
        self.map_scale.fill_(stats["l_val"] + float(self.lambda_dir) * stats["l_dir"])

    # ------------------------------------------------------------------------------ train / score

    def training_step(self, batch: dict, state=None) -> dict[str, torch.Tensor]:
        return {"model": self.total(batch["image"]).mean()}

    def localise(self, images: torch.Tensor) -> torch.Tensor:
        """∂L_total/∂x as a (B, 1, H, W) map: absolute, channel mean, blurred, opened."""
        samples = self.config.smoothgrad_samples if self.config.localisation == "smoothgrad" else 1
        spread = (images.amax(dim=(1, 2, 3), keepdim=True) - images.amin(dim=(1, 2, 3), keepdim=True))
        gradient = torch.zeros_like(images)
        with torch.enable_grad():
            for _ in range(samples):
                x = images.detach().clone()
                if samples > 1:
                    x = x + torch.randn_like(x) * self.config.smoothgrad_sigma * spread
                x.requires_grad_(True)
                gradient += torch.autograd.grad(self.total(x).sum(), x)[0]
        maps = (gradient / samples).abs().mean(dim=1, keepdim=True)
        if self.config.blur_sigma > 0:
            size = 2 * int(round(3 * self.config.blur_sigma)) + 1
            maps = gaussian_blur(maps, [size, size], [self.config.blur_sigma] * 2)
        return _opening(maps) if self.config.opening else maps

    def score(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Image score: L_total (or its top-pooled form); pixel map: the localisation map."""
        images = batch["image"]
        discrepancy_map = self.config.localisation == "discrepancy"
        if discrepancy_map or self.config.image_pooling == "top":
            pooled, whole, local = self.discrepancy(images, with_maps=discrepancy_map)
            scores = pooled if self.config.image_pooling == "top" else whole
            if discrepancy_map:
                return scores, local
        else:
            with torch.no_grad():
                scores = self.total(images)
        if self.config.localise_top >= 1:
            return scores.detach(), self.localise(images).detach()
        # ∂L/∂x costs a backward pass per image: only the batch's most anomalous share gets one
        chosen = scores.topk(max(1, math.ceil(self.config.localise_top * len(images)))).indices
        maps = images.new_zeros(len(images), 1, *images.shape[-2:])
        maps[chosen] = self.localise(images[chosen]).detach().to(maps.dtype)
        return scores.detach(), maps
