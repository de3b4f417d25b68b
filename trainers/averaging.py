"""Averages of the weights: G_ema (an EMA of the networks a method names, with a half-life in images),
the run-wide EMA (``train.ema``, a decay per step) and SWA's snapshot average."""

from __future__ import annotations

import copy

import torch
from torch import nn

from core.schedule import StepState


class NetworkEma:
    """G_ema: a copy of each of ``networks`` whose weights follow the trained ones with a half-life of
    ``ema_kimg`` thousand images (so the average means the same at any batch size), optionally ramped up
    over the first images (``rampup``: the half-life is at most ``rampup`` × images seen). Buffers are
    copied, not averaged. Only the named networks: never a frozen extractor nor a discriminator."""

    def __init__(self, networks: dict[str, nn.Module], ema_kimg: float, rampup: float | None):
        self.live = networks
        self.ema_kimg, self.rampup = ema_kimg, rampup
        self.networks = {name: copy.deepcopy(module).eval().requires_grad_(False) for name, module in networks.items()}

    def beta(self, batch_images: int, images_seen: int) -> float:
        """The decay for one step of ``batch_images`` images after ``images_seen`` images."""
        half_life = self.ema_kimg * 1000
        if self.rampup is not None:
            half_life = min(half_life, images_seen * self.rampup)
        return 0.5 ** (batch_images / max(half_life, 1e-8))

    @torch.no_grad()
    def update(self, batch_images: int, images_seen: int) -> None:
        beta = self.beta(batch_images, images_seen)
        for name, average in self.networks.items():
            live = self.live[name]
            for a, p in zip(average.parameters(), live.parameters()):
                a.copy_(p.detach().lerp(a, beta))
            for a, b in zip(average.buffers(), live.buffers()):
                a.copy_(b)

    def state_dict(self) -> dict:
        return {name: network.state_dict() for name, network in self.networks.items()}

    def load_state_dict(self, state: dict) -> None:
        for name, network in self.networks.items():
            network.load_state_dict(state[name])


def run_average(method: nn.Module, period: str, decay: float | None):
    """The run-wide average: an EMA of the whole method from the start (``train.ema``), or SWA's
    snapshot average in the SWA period; None when neither is configured."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    if period == "swa":
        return AveragedModel(method, use_buffers=False)  # BatchNorm statistics recomputed at the end
    if decay is not None:
        return AveragedModel(method, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)
    return None


@torch.no_grad()
def recompute_batchnorm(model, batches, count: int, state: StepState, device, dtype, to_device) -> None:
    """BatchNorm running statistics of averaged weights, from ``count`` training batches (as
    torch.optim.swa_utils.update_bn, but through the method's own phases so any method works)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    first = model.phases()[0]
    for _ in range(count):
        batch = to_device(next(batches), device, dtype)
        first.loss(batch if first.data else {"batch_size": len(batch["image"])}, state)
    for m, momentum in momenta.items():
        m.momentum = momentum
