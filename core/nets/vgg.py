"""VGG16 and VGG19 (torchvision) as feature extractors. Layers are named the usual way, per block b and
convolution c: ``conv{b}_{c}``, ``relu{b}_{c}``, ``pool{b}`` (pool1…pool5 are the max-pool outputs)."""

from __future__ import annotations

from pathlib import Path

import torch
import torchvision

from core.nets import FeatureExtractor, load_weights, register_net

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _layer_names(features: torch.nn.Sequential) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
    taps, strides, channels = {}, {}, {}
    block, conv, stride, width = 1, 0, 1, 3
    for index, module in enumerate(features):
        if isinstance(module, torch.nn.Conv2d):
            conv += 1
            width = module.out_channels
            name = f"conv{block}_{conv}"
        elif isinstance(module, torch.nn.ReLU):
            name = f"relu{block}_{conv}"
        else:
            stride *= 2
            name = f"pool{block}"
            block, conv = block + 1, 0
        taps[name], strides[name], channels[name] = index, stride, width
    return taps, strides, channels


def _build(name: str, weights: str, layers: list[str] | None) -> FeatureExtractor:
    enum = {"vgg16": torchvision.models.VGG16_Weights, "vgg19": torchvision.models.VGG19_Weights}[name]
    model = getattr(torchvision.models, name)(weights=None)
    url = enum.IMAGENET1K_V1.url
    cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    load_weights(model, weights, cached, f"Download {url} to that path (it is the torch hub cache "
                                         f"torchvision uses; $TORCH_HOME moves it)")
    features = model.features
    for module in features:
        if isinstance(module, torch.nn.ReLU):
            module.inplace = False  # a tapped conv output must not be overwritten by the next ReLU
    taps, strides, channels = _layer_names(features)
    stages = [(name_, features[index]) for name_, index in sorted(taps.items(), key=lambda item: item[1])]
    return FeatureExtractor(name, stages, taps, IMAGENET_MEAN, IMAGENET_STD, strides, channels,
                            layers or ["pool1", "pool2", "pool3", "pool4"])


@register_net("vgg16")
def vgg16(weights: str = "imagenet", layers: list[str] | None = None) -> FeatureExtractor:
    return _build("vgg16", weights, layers)


@register_net("vgg19")
def vgg19(weights: str = "imagenet", layers: list[str] | None = None) -> FeatureExtractor:
    return _build("vgg19", weights, layers)
