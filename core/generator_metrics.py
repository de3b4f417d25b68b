"""How close a generator's images are to real ones: Fréchet distance (FID) and kernel distance (KID) of
feature embeddings, computed by torchmetrics (its FrechetInceptionDistance / KernelInceptionDistance,
fed features we embed once for both), always beside a real-vs-real baseline.

Two feature networks:

- ``inception``: the real FID network, torch-fidelity's Inception-v3 port of the TF weights
  ``pt_inception-2015-12-05``. No package registry ships them: the file is read from
  ``inception_weights`` or the torch hub cache, never downloaded; a missing file is an error naming it
  and where to get it. Figures are called FID and KID.
- ``efficientnet_lite0``: the surrogate that ships offline (ImageNet EfficientNet-Lite0, its last stage
  average-pooled, 320 features). Its figures are FD-EffNetLite0 and KD-EffNetLite0: comparable with
  each other, never with published FIDs.

Images are [N, 3, H, W] in [0, 1], resized to the network's input size. Across ranks, each rank embeds
its share and torchmetrics reduces the sums (FD) and gathers the features (KD) at compute time.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE)
FEATURES = ("inception", "efficientnet_lite0")


def metric_names(feature: str) -> tuple[str, str]:
    """What the two figures are called for a feature network: FID/KID only for the real Inception."""
    return ("FID", "KID") if feature == "inception" else ("FD-EffNetLite0", "KD-EffNetLite0")


def inception_weights_path(given: str | None = None) -> Path:
    """The FID Inception file: ``given``, else the torch hub cache; a clear error when absent."""
    hub = Path(os.environ.get("TORCH_HOME", Path.home() / ".cache" / "torch")) / "hub" / "checkpoints" / INCEPTION_FILE
    path = Path(given).expanduser() if given else hub
    if not path.is_file():
        raise FileNotFoundError(
            f"the FID Inception-v3 weights are not at '{path}'. No package ships them and tessera never "
            f"downloads at run time: fetch {INCEPTION_URL} on a machine with internet and put it there "
            f"(or pass its path as metrics.inception_weights), or use the offline surrogate "
            f"feature 'efficientnet_lite0' (reported as FD-EffNetLite0, not FID)")
    return path


class Embedder(nn.Module):
    """images [N, 3, H, W] in [0, 1] -> features [N, F], frozen."""

    def __init__(self, feature: str = "efficientnet_lite0", inception_weights: str | None = None):
        super().__init__()
        if feature not in FEATURES:
            raise ValueError(f"unknown feature network '{feature}' (known: {', '.join(FEATURES)})")
        self.feature = feature
        if feature == "inception":
            from torchmetrics.image.fid import NoTrainInceptionV3

            self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                          feature_extractor_weights_path=str(inception_weights_path(inception_weights)))
            self.num_features, self.size = 2048, 299
        else:
            from core.nets import create_net

            self.net = create_net("efficientnet_lite0", "imagenet", ["reduction5"])
            self.num_features, self.size = self.net.channels["reduction5"], 224
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "Embedder":
        return super().train(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        images = images.as_subclass(torch.Tensor).float().clamp(0, 1)  # plain, whatever subclass came in
        if self.feature == "inception":  # torch-fidelity's port takes uint8 and resizes itself
            return self.net((images * 255).round().to(torch.uint8)).reshape(len(images), -1).double()
        if images.shape[-1] != self.size or images.shape[-2] != self.size:
            images = F.interpolate(images, size=(self.size, self.size), mode="bilinear", antialias=True,
                                   align_corners=False)
        return self.net(images)["reduction5"].mean((2, 3)).double()


class _Identity(nn.Module):
    """torchmetrics' feature hook for features we computed already."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def distances(real: torch.Tensor, fake: torch.Tensor, kid_subsets: int = 50, kid_subset_size: int = 1000,
              sync: bool = False) -> dict[str, float]:
    """{"fd", "kd", "kd_std"} between two feature sets [N, F] (each rank's share when ``sync``: the
    metric then reduces over all ranks, which must all call it). KD's subsets are at most the smaller
    set's size."""
    import warnings

    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    dim = real.shape[1]
    size = min(kid_subset_size, len(real), len(fake))
    if sync and torch.distributed.is_initialized():
        # every rank's smaller set, so that all ranks build KD with the same subset size
        counts = torch.tensor([len(real), len(fake)], device=real.device)
        counts_all = [torch.zeros_like(counts) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(counts_all, counts)
        size = min(kid_subset_size, int(torch.stack(counts_all).sum(0).min()))
    kwargs = {"sync_on_compute": sync}
    fid = FrechetInceptionDistance(feature=_Identity(dim), **kwargs).to(real.device)
    with warnings.catch_warnings():  # "saves all extracted features": these are the features, by design
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_Identity(dim), subsets=kid_subsets, subset_size=size,
                                      **kwargs).to(real.device)
    fid.set_dtype(torch.float64)
    for metric in (fid, kid):
        metric.update(real.double(), real=True)
        metric.update(fake.double(), real=False)
    kd_mean, kd_std = kid.compute()
    return {"fd": float(fid.compute()), "kd": float(kd_mean), "kd_std": float(kd_std)}


def with_baseline(real: torch.Tensor, fake: torch.Tensor, **kwargs) -> dict[str, float]:
    """Distances of ``fake`` to the first half of ``real``, and of the second half to the first (the
    real-vs-real baseline: what a perfect generator would score with this many images)."""
    half = len(real) // 2
    if half < 2 or len(fake) < 2:
        raise ValueError(f"FD/KD need at least 4 real and 2 generated images, got {len(real)} and {len(fake)}")
    a, b = real[:half], real[half:2 * half]
    fake = fake[:half]
    out = distances(a, fake, **kwargs)
    base = distances(a, b, **kwargs)
    return {**out, "fd_real": base["fd"], "kd_real": base["kd"], "images": half}
