"""The reference method: a small convolutional autoencoder scored by its L2 reconstruction error.

It is the baseline every real method must beat, and small enough to train in CI.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from core.config import StrictConfig
from core.methods import register_method
from core.methods.base import Method


def _block(channels_in: int, channels_out: int, down: bool) -> nn.Sequential:
    conv = nn.Conv2d(channels_in, channels_out, 4, 2, 1) if down else \
        nn.ConvTranspose2d(channels_in, channels_out, 4, 2, 1)
    return nn.Sequential(conv, nn.BatchNorm2d(channels_out), nn.LeakyReLU(0.2, inplace=True))


@register_method("reference_ae")
class ReferenceAutoencoder(Method):
    """Encoder of ``depth`` stride-2 convolutions to a bottleneck, mirrored decoder, sigmoid output."""

    class Config(StrictConfig):
        in_channels: int = Field(3, ge=1)             # image channels (3 for RGB tiles, 1 for MRI slices)
        width: int = Field(32, ge=4)                  # channels after the first convolution (doubling per level)
        depth: int = Field(4, ge=1, le=7)             # stride-2 levels; inputs must be divisible by 2**depth
        bottleneck: int = Field(64, ge=1)             # channels of the bottleneck feature map
        image_pooling: Literal["mean", "top"] = "mean"  # image score: the error map's mean, or the mean of
        pooling_top: float = Field(0.1, gt=0, le=1)     # its highest pooling_top share (scoring only)

    def __init__(self, config: "ReferenceAutoencoder.Config"):
        super().__init__()
        self.config = config
        widths = [config.width * 2**i for i in range(config.depth)]
        encoder = [_block(config.in_channels, widths[0], True)]
        encoder += [_block(a, b, True) for a, b in zip(widths, widths[1:])]
        encoder += [nn.Conv2d(widths[-1], config.bottleneck, 1)]
        decoder = [nn.Conv2d(config.bottleneck, widths[-1], 1)]
        decoder += [_block(b, a, False) for a, b in zip(widths[::-1][1:], widths[::-1])]
        decoder += [nn.ConvTranspose2d(widths[0], config.in_channels, 4, 2, 1), nn.Sigmoid()]
        self.model = nn.Sequential(nn.Sequential(*encoder), nn.Sequential(*decoder))

    def groups(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(images)

    def training_step(self, batch: dict, state=None) -> dict[str, torch.Tensor]:
        images = batch["image"]
        return {"model": torch.mean((self(images) - images) ** 2)}

    @torch.no_grad()
    def score(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Image score: mean squared error (or the mean of its highest ``pooling_top`` share of pixels);
        pixel map: squared error averaged over channels."""
        images = batch["image"]
        error = (self(images) - images) ** 2
        pixel = error.mean(dim=1, keepdim=True)
        flat = pixel.flatten(1)
        if self.config.image_pooling == "top":
            return flat.topk(max(1, math.ceil(self.config.pooling_top * flat.shape[1])), dim=1).values.mean(dim=1), pixel
        return flat.mean(dim=1), pixel
