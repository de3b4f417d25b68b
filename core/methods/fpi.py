"""Foreign Patch Interpolation (Tan et al., "Detecting Outliers with Foreign Patch Interpolation").

Self-supervised: a patch of a second normal sample B is blended into A with weight α, and a wide
residual encoder-decoder learns to predict α per pixel. At test time the predicted α map is the
pixel score; an image (slice, tile) or volume score is the mean of its highest-scoring pixels.

- Pairs: ``image_b`` from the stream when it has one (slice k of another volume: PairedSliceStream,
  ``train.data: slice_pairs``), else the batch paired with itself shifted by one (the batch is
  shuffled, so a random pairing of tiles); ``random_partner_share`` mixes the two, and
  ``zoomed_partner_share`` (our addition, not the paper's) replaces a share of partners by a zoomed copy
  of the item itself. New pairs, boxes and α at every step, made on the device that trains
  (core.anomalies.foreign_patch_interpolation).
- ``mode: continuous``: α ~ U(0, 1), sigmoid head, pixel-wise binary cross-entropy on the soft label.
  ``mode: discrete``: α ∈ {0, .25, .5, .75, 1}, 5-class softmax head and cross-entropy; the pixel
  score is the expected α under the softmax.
- Network: a stem convolution, ``levels`` pre-activation wide residual blocks down (stride 2), the
  same up (bilinear ×2, added skip connection), and a 1×1 head. ``depth`` counts residual units the
  WRN way, 2 + 2·levels: 14 → 6 levels (256² down to 4²), 16 → 7 levels (512²).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from core.anomalies import FPI_ALPHAS, foreign_patch_interpolation, zoomed_copies
from core.config import StrictConfig
from core.methods import register_method
from core.methods.base import Method


class _ResidualBlock(nn.Module):
    """Pre-activation wide residual block (Zagoruyko & Komodakis): BN-ReLU-conv3x3 twice, 1×1 shortcut
    when the shape changes."""

    def __init__(self, channels_in: int, channels_out: int, stride: int = 1, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(channels_in)
        self.conv1 = nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(channels_out)
        self.dropout = nn.Dropout2d(dropout) if dropout else nn.Identity()
        self.conv2 = nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(channels_in, channels_out, 1, stride, bias=False) \
            if stride != 1 or channels_in != channels_out else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.norm1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.norm2(out))))
        return out + (self.shortcut(activated) if self.shortcut is not None else x)


class WideResidualEncoderDecoder(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, base: int, widen: int, levels: int,
                 max_channels: int, dropout: float):
        super().__init__()
        widths = [min(base * widen * 2**i, max_channels) for i in range(levels)]
        self.stem = nn.Conv2d(in_channels, base, 3, 1, 1, bias=False)
        self.down = nn.ModuleList(_ResidualBlock(a, b, 2, dropout) for a, b in zip([base] + widths[:-1], widths))
        skips = [base] + widths[:-1]  # channels of the feature map each up level adds back
        self.lift = nn.ModuleList(nn.Conv2d(c_in, c_skip, 1, bias=False)
                                  for c_in, c_skip in zip(widths[::-1], skips[::-1]))
        self.up = nn.ModuleList(_ResidualBlock(c, c, 1, dropout) for c in skips[::-1])
        self.head = nn.Sequential(nn.BatchNorm2d(base), nn.ReLU(inplace=True), nn.Conv2d(base, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = [self.stem(x)]
        for block in self.down:
            features.append(block(features[-1]))
        out = features.pop()
        for lift, block in zip(self.lift, self.up):
            skip = features.pop()
            out = F.interpolate(lift(out), size=skip.shape[-2:], mode="bilinear", align_corners=False)
            out = block(out + skip)
        return self.head(out)


@register_method("fpi")
class ForeignPatchInterpolation(Method):
    pooling_options = ("volume_top_fraction",)  # the volume score pools the reassembled map; slices ignore it

    class Config(StrictConfig):
        in_channels: int = Field(1, ge=1)             # 1 for MRI slices, 3 for RGB tiles
        mode: Literal["continuous", "discrete"] = "continuous"  # α ~ U(0,1) with BCE, or 5 levels with CE
        base: int = Field(16, ge=4)                   # channels of the stem (and of the full-resolution skip)
        widen: int = Field(4, ge=1)                   # WRN widening factor k
        depth: int = Field(14, ge=6)                  # 2 + 2·levels: 14 for 256² inputs, 16 for 512²
        max_channels: int = Field(512, ge=8)          # cap on channels of the deepest levels
        dropout: float = Field(0.0, ge=0, lt=1)       # dropout inside residual blocks
        top_fraction: float = Field(0.01, gt=0, le=1)  # image score: mean of this share of highest pixels
        volume_top_fraction: float = Field(0.001, gt=0, le=1)  # volume score: mean of this share of voxels
        # With aligned pairs in the batch (train.data: slice_pairs): the share of items whose foreign patch
        # comes from a random other item of the batch instead. Aligned partners teach fine anatomical
        # differences (deformations); random ones teach foreign content; 0 = the paper's aligned pairs.
        random_partner_share: float = Field(0.0, ge=0, le=1)
        # The share of items whose foreign patch comes from the item itself, zoomed about a random point
        # (core.anomalies.zoomed_copies): the patch then shows the right tissue at a wrong scale and place,
        # which teaches local deformations that a partner from another subject does not. 0 = the paper.
        zoomed_partner_share: float = Field(0.0, ge=0, le=1)
        zoom_range: tuple[float, float] = (0.5, 2.0)  # scale of the zoomed copies, log-uniform
        # Test-time augmentation: the pixel map is the mean of the maps of the image and of these views of
        # it, each mapped back ("flip_x"/"flip_y": mirrored along width/height; "shift": moved by 1/32
        # of the side). A convolutional network's errors on normal anatomy vary with such views, an
        # interpolated patch does not, so averaging lowers the false positives. Costs one pass per view.
        test_views: list[Literal["flip_x", "flip_y", "shift"]] = []

        @model_validator(mode="after")
        def _zoom_range_ordered(self):
            if not 0 < self.zoom_range[0] <= self.zoom_range[1]:
                raise ValueError(f"zoom_range must be (low, high) with 0 < low <= high, got {self.zoom_range}")
            return self

        @model_validator(mode="after")
        def _depth_is_wrn_like(self):
            if (self.depth - 2) % 2:
                raise ValueError(f"depth must be 2 + 2·levels (even), got {self.depth}")
            return self

    def __init__(self, config: "ForeignPatchInterpolation.Config"):
        super().__init__()
        self.config = config
        self.levels = (config.depth - 2) // 2
        classes = len(FPI_ALPHAS) if config.mode == "discrete" else 1
        self.model = WideResidualEncoderDecoder(config.in_channels, classes, config.base, config.widen,
                                                self.levels, config.max_channels, config.dropout)
        self.register_buffer("alphas", torch.tensor(FPI_ALPHAS), persistent=False)

    def groups(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Predicted α per pixel, (B, 1, H, W) in [0, 1]."""
        logits = self.model(images)
        if self.config.mode == "discrete":
            return (logits.softmax(dim=1) * self.alphas.view(1, -1, 1, 1)).sum(dim=1, keepdim=True)
        return torch.sigmoid(logits)

    def training_step(self, batch: dict, state=None) -> dict[str, torch.Tensor]:
        images = batch["image"]
        others = batch.get("image_b")
        if others is None:
            others = torch.roll(images, 1, dims=0)
        elif self.config.random_partner_share > 0:
            pick = torch.rand(len(images), device=images.device) < self.config.random_partner_share
            others = torch.where(pick.view(-1, *[1] * (images.dim() - 1)), torch.roll(images, 1, dims=0), others)
        if self.config.zoomed_partner_share > 0:
            pick = torch.rand(len(images), device=images.device) < self.config.zoomed_partner_share
            if pick.any():
                others = others.clone()
                others[pick] = zoomed_copies(images[pick], self.config.zoom_range)
        blended, label, _ = foreign_patch_interpolation(images, others, discrete=self.config.mode == "discrete")
        logits = self.model(blended)
        if self.config.mode == "discrete":
            target = torch.round(label[:, 0] * (len(FPI_ALPHAS) - 1)).long()
            loss = F.cross_entropy(logits.float(), target)
        else:
            loss = F.binary_cross_entropy_with_logits(logits.float(), label)
        return {"model": loss}

    @torch.no_grad()
    def score(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Pixel map: predicted α; image score: mean of the top ``top_fraction`` of its pixels."""
        images = batch["image"]
        pixel = self(images).float()
        for view in self.config.test_views:
            if view == "shift":
                # moved down-right with the edge replicated (a wrapped-around strip would look foreign)
                step = max(1, images.shape[-1] // 32)
                height, width = images.shape[-2:]
                moved = F.pad(images, (step, 0, step, 0), mode="replicate")[..., :height, :width]
                pixel += F.pad(self(moved).float(), (0, step, 0, step), mode="replicate")[..., step:, step:]
            else:
                dims = (-1,) if view == "flip_x" else (-2,)
                pixel += self(images.flip(dims)).float().flip(dims)
        pixel /= 1 + len(self.config.test_views)
        flat = pixel.flatten(1)
        k = max(1, int(round(self.config.top_fraction * flat.shape[1])))
        return flat.topk(k, dim=1).values.mean(dim=1), pixel

    def sample_score(self, voxel_scores: np.ndarray) -> float:
        """A volume's score from its reassembled voxel map: mean of the top ``volume_top_fraction``."""
        flat = np.asarray(voxel_scores, np.float32).ravel()
        k = max(1, int(round(self.config.volume_top_fraction * flat.size)))
        return float(np.partition(flat, flat.size - k)[flat.size - k:].mean())
