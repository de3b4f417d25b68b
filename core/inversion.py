"""Inverting a StyleGAN2 generator: which w (and noise) makes G reproduce a given tile, and how far the
best reproduction stays from it. Normal tissue is reproduced; tissue the generator never learned
(tumour, artefacts) is not, which makes the distance an anomaly score (Štepec & Skočaj).

- :class:`PerceptualDistance`: the squared difference of channel-normalised features, averaged over
  positions and summed over layers, plus a pixel term. ``vgg16`` (ImageNet weights from a local file)
  weighs the channels with LPIPS's linear heads, which torchmetrics ships: that is LPIPS-VGG (Zhang et
  al.), ImageNet normalisation being LPIPS's input scaling. The offline surrogate ``efficientnet_lite0``
  is unweighted (the paper's "baseline" variant) and is labelled so.
- :func:`project`: StyleGAN2's projector, batched: w starts at w_avg and is optimised with Adam under
  a cosine-ramped learning rate, with decaying noise added to w early on (exploration), jointly with the
  per-layer noise maps, which a multi-scale autocorrelation penalty keeps from absorbing the image.
- :class:`Encoder`: x -> w in one pass (f-AnoGAN's izi_f idea applied to StyleGAN2's W space), trained
  with G frozen (core/methods/stylegan2_encoder.py); its w can seed a few projector steps.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from core.nets.ops import EqualConv2d, EqualLinear

DISTANCE_LAYERS = {"vgg16": ["relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3"],
                   "efficientnet_lite0": ["reduction1", "reduction2", "reduction3", "reduction4"]}


class PerceptualDistance(nn.Module):
    """d(x, y) per sample, images in [0, 1]; ``pixel`` weighs a mean squared pixel difference in."""

    def __init__(self, net: str = "efficientnet_lite0", weights: str = "imagenet", pixel: float = 0.0,
                 size: int | None = None):
        super().__init__()
        from core.nets import create_net

        if net not in DISTANCE_LAYERS:
            raise ValueError(f"perceptual distance over '{net}' is not defined (known: {', '.join(DISTANCE_LAYERS)})")
        self.net_name, self.pixel, self.size = net, pixel, size
        self.layers = DISTANCE_LAYERS[net]
        self.net = create_net(net, weights, self.layers)
        self.heads = lpips_heads() if net == "vgg16" else None  # [C] channel weights per layer

    def label(self) -> str:
        return "LPIPS-VGG16" if self.net_name == "vgg16" else "perceptual-EffNetLite0 (LPIPS-style, unweighted)"

    def _layer(self, fx: torch.Tensor, fy: torch.Tensor, index: int) -> torch.Tensor:
        """[N, h, w]: one layer's (weighted) squared difference summed over channels."""
        square = (fx - fy).square()
        if self.heads is not None:
            square = square * self.heads[index].to(square.device, square.dtype).view(1, -1, 1, 1)
        return square.sum(1)

    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.size is not None and images.shape[-1] < self.size:  # small tiles: the network sees them larger
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return {k: v / (v.square().sum(1, keepdim=True) + 1e-10).sqrt() for k, v in self.net(images).items()}

    def forward(self, x: torch.Tensor, y: torch.Tensor, y_features: dict | None = None) -> torch.Tensor:
        fx = self.features(x)
        fy = y_features if y_features is not None else self.features(y)
        d = sum(self._layer(fx[k], fy[k], i).mean((1, 2)) for i, k in enumerate(self.layers))
        if self.pixel:
            d = d + self.pixel * (x - y).square().mean((1, 2, 3))
        return d

    def map(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per-pixel distance [N, 1, H, W]: each layer's squared difference upsampled to the image, summed,
        then squashed by d / (1 + d) into [0, 1), where the pixel metrics (which clip to [0, 1], as MOOD
        does) can rank it; the squash is monotone, so the ranking of pixels is the distance's."""
        fx, fy = self.features(x), self.features(y)
        size = x.shape[-2:]
        out = sum(F.interpolate(self._layer(fx[k], fy[k], i).unsqueeze(1), size=size, mode="bilinear",
                                align_corners=False) for i, k in enumerate(self.layers))
        if self.pixel:
            out = out + self.pixel * (x - y).square().mean(1, keepdim=True)
        return out / (1 + out)


def lpips_heads() -> list[torch.Tensor]:
    """LPIPS-VGG's learned channel weights (v0.1), from the file torchmetrics ships: offline."""
    import importlib.resources

    path = importlib.resources.files("torchmetrics") / "functional" / "image" / "lpips_models" / "vgg.pth"
    state = torch.load(str(path), map_location="cpu", weights_only=True)
    return [state[f"lin{i}.model.1.weight"].flatten().float() for i in range(5)]


def noise_regularisation(noises: list[torch.Tensor]) -> torch.Tensor:
    """Sum over noise maps and scales of their squared autocorrelation at a one-pixel shift (x and y),
    halving each map until 8x8: small when the maps stay white noise, large when they carry image."""
    total = 0.0
    for noise in noises:
        n = noise
        while True:
            total = total + (n * torch.roll(n, 1, dims=3)).mean((1, 2, 3)).square() + \
                (n * torch.roll(n, 1, dims=2)).mean((1, 2, 3)).square()
            if n.shape[-1] <= 8:
                break
            n = F.avg_pool2d(n, 2)
    return total


def w_statistics(G, samples: int = 2000, seed: int = 0) -> tuple[torch.Tensor, float]:
    """(w_avg, w_std): the mean of mapped latents and their typical distance from it."""
    device = G.mapping.w_avg.device
    z = torch.randn(samples, G.z_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        w = G.mapping(z)[:, 0].float()
    mean = w.mean(0)
    return mean, float(((w - mean).square().sum(1).mean()).sqrt())


def project(G, images: torch.Tensor, distance: PerceptualDistance, steps: int = 200, lr: float = 0.1,
            noise_weight: float = 1e5, initial_w: torch.Tensor | None = None, w_noise: float = 0.05,
            fused: bool = False) -> dict[str, torch.Tensor]:
    """Project ``images`` [N, 3, H, W] in [0, 1] into G's W space; returns ``w`` [N, w_dim], the
    reconstructions in [0, 1], and ``distance`` [N] between them and the images, with ``history`` [steps]
    (the batch's mean distance at each step). G is left unchanged (its weights get no gradients)."""
    device = images.device
    was_training, flags = G.training, [p.requires_grad for p in G.parameters()]
    G.eval().requires_grad_(False)
    try:
        return _project(G, images, distance, steps, lr, noise_weight, initial_w, w_noise, fused, device)
    finally:
        G.train(was_training)
        for p, flag in zip(G.parameters(), flags):
            p.requires_grad_(flag)


def _project(G, images, distance, steps, lr, noise_weight, initial_w, w_noise, fused, device):
    w_avg, w_std = w_statistics(G)
    n = len(images)
    start = initial_w.detach().float() if initial_w is not None else w_avg.unsqueeze(0).repeat(n, 1)
    w = start.clone().to(device).requires_grad_(True)
    layers = G.synthesis.noise_layers()
    noises = [torch.randn(n, 1, layer.resolution, layer.resolution, device=device).requires_grad_(True)
              for layer in layers]
    optimiser = torch.optim.Adam([w, *noises], betas=(0.9, 0.999), lr=lr)
    target = images.float()
    with torch.no_grad():
        target_features = distance.features(target)
    history = []
    for step in range(steps):
        t = step / max(steps - 1, 1)
        ramp = min(1.0, (1 - t) / 0.25) * (0.5 - 0.5 * math.cos(min(1.0, t / 0.05) * math.pi))
        for group in optimiser.param_groups:
            group["lr"] = lr * ramp
        jitter = w_std * w_noise * max(0.0, 1 - t / 0.75) ** 2  # explore early, settle late
        ws = (w + torch.randn_like(w) * jitter).unsqueeze(1).repeat(1, G.num_ws, 1)
        out = (G.synthesis(ws, fused=fused, noises=noises) + 1) / 2
        d = distance(out, target, target_features)
        loss = d.sum() + noise_weight * noise_regularisation(noises).sum()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        with torch.no_grad():  # keep each noise map at zero mean, unit variance
            for noise in noises:
                noise.sub_(noise.mean((1, 2, 3), keepdim=True)).div_(noise.std((1, 2, 3), keepdim=True) + 1e-8)
        history.append(float(d.detach().mean()))
    with torch.no_grad():
        ws = w.detach().unsqueeze(1).repeat(1, G.num_ws, 1)
        final = ((G.synthesis(ws, fused=fused, noises=[x.detach() for x in noises]) + 1) / 2).clamp(0, 1)
        final_distance = distance(final, target, target_features)
    return {"w": w.detach(), "reconstruction": final, "distance": final_distance,
            "history": torch.tensor(history), "noises": [x.detach() for x in noises]}


class Encoder(nn.Module):
    """image [N, 3, R, R] in [0, 1] -> w [N, w_dim]: residual downsampling blocks to 4x4, then two fully
    connected layers; the output is w_avg plus a learned offset, so training starts at the average tile."""

    def __init__(self, resolution: int, w_dim: int, channel_base: int = 4096, channel_max: int = 256):
        super().__init__()
        from core.nets.stylegan2 import DiscriminatorBlock, block_resolutions, channels_at

        resolutions = block_resolutions(resolution)[::-1][:-1]
        self.blocks = nn.ModuleList(
            DiscriminatorBlock(channels_at(r, channel_base, channel_max), channels_at(r // 2, channel_base, channel_max),
                               3, first=(r == resolution)) for r in resolutions)
        channels = channels_at(4, channel_base, channel_max)
        self.conv = EqualConv2d(channels, channels, 3, act="lrelu")
        self.fc = EqualLinear(channels * 16, channels, act="lrelu")
        self.out = EqualLinear(channels, w_dim)
        self.register_buffer("w_avg", torch.zeros(w_dim))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images * 2 - 1
        for block in self.blocks:
            x = block(x)
        return self.w_avg + self.out(self.fc(self.conv(x).flatten(1)))
