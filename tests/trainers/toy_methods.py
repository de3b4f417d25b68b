"""Small GAN-shaped methods for the trainer's tests, importable by every rank
(TESSERA_METHOD_MODULES=tests.trainers.toy_methods)."""

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from core.config import StrictConfig
from core.methods import register_method
from core.methods.base import Method, Phase

PHASES = ("Gmain", "Greg", "Emain", "Dmain", "Dreg")


def fingerprint(module: nn.Module) -> torch.Tensor:
    return sum(p.detach().double().sum() for p in module.parameters())


@register_method("_toy_gan")
class ToyGAN(Method):
    """A generator and a critic; D steps every step, G every ``critic_steps``."""

    class Config(StrictConfig):
        critic_steps: int = Field(2, ge=1)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.G = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 3, 3, padding=1), nn.Sigmoid())
        self.D = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 4, 2, 1))

    def groups(self):
        return {"G": self.G, "D": self.D}

    def phases(self):
        return [Phase("Gmain", "G", self._g, self.config.critic_steps), Phase("Dmain", "D", self._d)]

    def _g(self, batch, state):
        return F.softplus(-self.D(self.G(torch.rand_like(batch["image"])))).mean()

    def _d(self, batch, state):
        real = batch["image"]
        fake = self.G(torch.rand_like(real))
        return F.softplus(self.D(fake)).mean() + F.softplus(-self.D(real)).mean()

    @torch.no_grad()
    def score(self, batch):
        return -self.D(batch["image"]).flatten(1).mean(1), None


@register_method("_toy_gan3")
class ToyGAN3(Method):
    """G, D and an encoder E, StyleGAN2-ADA's phase layout plus E's: Gmain, Greg (every g_reg_interval),
    Emain, Dmain, Dreg (every d_reg_interval, an R1 penalty). Buffers record each phase's calls and the
    fingerprint of G that D's last phase saw, so tests can check what ran on what."""

    class Config(StrictConfig):
        g_reg_interval: int = Field(2, ge=1)
        d_reg_interval: int = Field(3, ge=1)

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.G = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                               nn.Conv2d(8, 3, 3, padding=1), nn.Sigmoid())
        self.D = nn.Sequential(nn.Conv2d(3, 8, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(8, 1, 4, 2, 1))
        self.E = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(8, 3, 3, padding=1))
        self.register_buffer("calls", torch.zeros(len(PHASES), dtype=torch.int64))
        self.register_buffer("d_saw_g", torch.zeros((), dtype=torch.float64))

    def groups(self):
        return {"G": self.G, "D": self.D, "E": self.E}

    def ema_networks(self):
        return {"G": self.G, "E": self.E}

    def phases(self):
        c = self.config
        return [Phase("Gmain", "G", self._g_main), Phase("Greg", "G", self._g_reg, c.g_reg_interval, True),
                Phase("Emain", "E", self._e_main), Phase("Dmain", "D", self._d_main),
                Phase("Dreg", "D", self._d_reg, c.d_reg_interval, True)]

    def _count(self, name):
        self.calls[PHASES.index(name)] += 1

    def _g_main(self, batch, state):
        self._count("Gmain")
        fake = self.G(torch.randn_like(batch["image"]))
        return {"loss": F.softplus(-self.D(fake)).mean(), "G/fake_mean": fake.mean()}

    def _g_reg(self, batch, state):
        self._count("Greg")
        fake = self.G(torch.randn_like(batch["image"]))
        return (fake - 0.5).square().mean() * 0.1 * self.config.g_reg_interval

    def _e_main(self, batch, state):
        self._count("Emain")
        z = torch.randn_like(batch["image"])
        return (self.E(self.G(z)) - z).abs().mean()

    def _d_main(self, batch, state):
        self._count("Dmain")
        self.d_saw_g.copy_(fingerprint(self.G))
        real = batch["image"]
        logits = self.D(real)
        fake = self.G(torch.randn_like(real))
        return {"loss": F.softplus(self.D(fake)).mean() + F.softplus(-logits).mean(),
                "D/real_sign": logits.sign().mean()}

    def _d_reg(self, batch, state):
        self._count("Dreg")
        real = batch["image"].detach().requires_grad_(True)
        (gradient,) = torch.autograd.grad(self.D(real).sum(), real, create_graph=True)
        return gradient.square().sum((1, 2, 3)).mean() * 0.5 * self.config.d_reg_interval

    def snapshot(self, reals, state, networks):
        fakes = networks["G"](torch.randn_like(reals["image"][:4]))
        return {"images": {"fakes": fakes, "reals": reals["image"][:4]},
                "metrics": {"fake_mean": float(fakes.mean()), "step": float(state.step)}}

    @torch.no_grad()
    def score(self, batch):
        return -self.D(batch["image"]).flatten(1).mean(1), None
