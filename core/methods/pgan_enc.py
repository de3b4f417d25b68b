"""Progressive WGAN-GP with a jointly trained encoder (Berg, Ahlberg & Felsberg, "Unsupervised Learning of
Anomaly Detection from Contaminated Image Data using Simultaneous Encoder Training").

G, D (core/nets/pgan.py) and an encoder E with D's layout grow together through the trainer's
schedule (``train.growing``; the networks run at ``StepState.resolution`` with the newest layers faded
in by α, real images blended the same way). Four phases per step, each its own forward:

- ``Dmain`` (D): WGAN-GP, D(G(z)) − D(x) + 10·(‖∇D(x̂)‖ − 1)² on x̂ between x and G(z), plus the drift
  term ε·D(x)² (ε = 0.001) that keeps the critic near zero;
- ``Gmain`` (G): −D(G(z)) plus the encoder loss (with E fixed);
- ``Emain`` (E): the encoder loss (with G fixed). The encoder loss is the paper's eq. 1, image space
  ‖G(z) − G(E(G(z)))‖₁ (``encoder_loss: image``) or latent space ‖z − E(G(z))‖₁ (``latent``), means
  over elements; ``none`` trains the plain progressive GAN (what core/methods/fanogan.py inverts).

z is drawn N(0, I) and normalised to unit root mean square (norm √z_dim, pGAN's pixel norm of the
latent); G normalises what it is given, so E's output can keep a norm of its own, and that norm is the
signal: images unlike the training data map nearer the origin.

Score of a query Q (eq. 2–5), at the target resolution with G_ema and E_ema:
L_n = ‖w(Q) − w(G(E(Q)))‖₂ / N (w: per-image min-max normalisation to [0, 1], N pixels),
L_o = −‖E(Q)‖₂ / √z_dim, and A = λ·L_n + (1 − λ)·L_o (λ = 0.05). ``score`` picks the image score;
:meth:`score_terms` gives all three, which evaluation reports side by side. The pixel map is the
normalised residual's per-pixel norm, upsampled to the input. Images of another size than the
resolution are resized (area) to it: a 128² tile trains a 64² GAN at half the magnification.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from core.config import StrictConfig
from core.methods import register_method
from core.methods.base import Method, Phase
from core.nets.pgan import ProgressiveDiscriminator, ProgressiveGenerator, idle_parameter_names, pixel_norm


class ProgressiveGANConfig(StrictConfig):
    in_channels: int = Field(3, ge=1)                  # 1 for slices of volumes
    resolution: int = Field(64, ge=4, le=1024)         # target resolution (train.growing's target when growing)
    z_dim: int = Field(512, ge=1)                      # N_z
    channel_base: int = Field(8192, ge=16)             # channels at r: min(channel_base // r, channel_max)
    channel_max: int = Field(512, ge=1)
    mbstd_group: int = Field(4, ge=0)                  # D's minibatch-std group (0: off)
    gp_weight: float = Field(10.0, ge=0)               # WGAN-GP's λ
    drift: float = Field(0.001, ge=0)                  # ε·D(x)²
    encoder_loss: Literal["image", "latent", "none"] = "image"  # the paper's eq. 1 in image or latent space
    encoder_weight: float = Field(1.0, ge=0)           # weight of the encoder loss in G's objective
    score: Literal["combined", "residual", "latent_norm"] = "combined"  # A, L_n or L_o
    score_lambda: float = Field(0.05, ge=0, le=1)      # λ of A = λ·L_n + (1 − λ)·L_o

    @model_validator(mode="after")
    def _checks(self):
        if self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two, got {self.resolution}")
        return self


def gradient_penalty(critic, reals: torch.Tensor, fakes: torch.Tensor, mix: torch.Tensor) -> torch.Tensor:
    """WGAN-GP's (‖∇_x̂ D(x̂)‖₂ − 1)² per sample, x̂ = mix·x + (1 − mix)·G(z), with a graph for D's update."""
    blend = (mix * reals + (1 - mix) * fakes).detach().requires_grad_(True)
    grad, = torch.autograd.grad(critic(blend).sum(), blend, create_graph=True)
    return (grad.flatten(1).norm(dim=1) - 1).square()


def minmax(images: torch.Tensor) -> torch.Tensor:
    """Each image scaled to [0, 1] by its own minimum and maximum (the paper's w)."""
    flat = images.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    shape = (-1,) + (1,) * (images.ndim - 1)
    return (images - low.view(shape)) / (high - low).clamp_min(1e-8).view(shape)


def resized(images: torch.Tensor, resolution: int) -> torch.Tensor:
    if images.shape[-2:] == (resolution, resolution):
        return images
    return F.interpolate(images, size=(resolution, resolution), mode="area" if images.shape[-1] > resolution
                         else "bilinear", align_corners=None if images.shape[-1] > resolution else False)


TERMS = ("combined", "residual", "latent_norm")


@register_method("pgan_enc")
class ProgressiveGANEncoder(Method):
    Config = ProgressiveGANConfig

    def __init__(self, config: ProgressiveGANConfig):
        super().__init__()
        self.config = c = config
        self.resolution, self.z_dim = c.resolution, c.z_dim
        self.G = ProgressiveGenerator(c.resolution, c.z_dim, c.channel_base, c.channel_max, c.in_channels)
        self.D = ProgressiveDiscriminator(c.resolution, c.channel_base, c.channel_max, c.in_channels, 1,
                                          c.mbstd_group)
        self.E = ProgressiveDiscriminator(c.resolution, c.channel_base, c.channel_max, c.in_channels, c.z_dim,
                                          mbstd_group=0) if c.encoder_loss != "none" else None

    # ------------------------------------------------------------------------------------ training

    def groups(self):
        groups = {"G": self.G, "D": self.D}
        if self.E is not None:
            groups["E"] = self.E
        return groups

    def phases(self):
        phases = [Phase("Dmain", "D", self._d_main), Phase("Gmain", "G", self._g_main, data=False)]
        if self.E is not None:
            phases.append(Phase("Emain", "E", self._e_main, data=False))
        return phases

    def ema_networks(self):
        return {name: net for name, net in (("G", self.G), ("E", self.E)) if net is not None}

    def idle_parameters(self, state=None) -> set[str]:
        """Names, within each group's network, of the parameters a step at ``state`` leaves unused."""
        resolution, alpha = self._growth(state)
        return {p for net in self.groups().values() for p in idle_parameter_names(net, resolution, alpha)}

    def _growth(self, state) -> tuple[int, float]:
        if state is not None and state.resolution:
            if state.resolution > self.resolution:
                raise ValueError(f"train.growing reaches {state.resolution} px, beyond the method's resolution "
                                 f"{self.resolution}: set train.growing.target_resolution to it")
            return state.resolution, state.alpha
        return self.resolution, 1.0

    def latents(self, count: int, device) -> torch.Tensor:
        return pixel_norm(torch.randn(count, self.z_dim, device=device))

    def _reals(self, batch: dict, state) -> torch.Tensor:
        """The batch at the growing resolution in [-1, 1]; while fading in, blended with its half-resolution
        version as the networks blend their paths."""
        resolution, alpha = self._growth(state)
        x = resized(batch["image"].float(), resolution)
        if alpha < 1 and resolution > 4:
            x = alpha * x + (1 - alpha) * F.interpolate(F.avg_pool2d(x, 2), scale_factor=2, mode="nearest")
        return x * 2 - 1

    def _fakes(self, count: int, device, state, z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        resolution, alpha = self._growth(state)
        z = self.latents(count, device) if z is None else z
        return z, self.G(z, resolution, alpha)

    def _d_main(self, batch: dict, state):
        c = self.config
        _, alpha = self._growth(state)
        reals = self._reals(batch, state)
        with torch.no_grad():
            _, fakes = self._fakes(len(reals), reals.device, state)
        real_scores = self.D(reals, alpha).squeeze(1)
        fake_scores = self.D(fakes, alpha).squeeze(1)
        loss = fake_scores.mean() - real_scores.mean()
        out = {"D/wasserstein": (real_scores - fake_scores).mean().detach()}
        if c.gp_weight:
            mix = torch.rand(len(reals), 1, 1, 1, device=reals.device)
            penalty = gradient_penalty(lambda x: self.D(x, alpha), reals, fakes, mix)
            loss = loss + c.gp_weight * penalty.mean()
            out["D/gradient_penalty"] = penalty.mean().detach()
        if c.drift:
            loss = loss + c.drift * real_scores.square().mean()
        return {"loss": loss, **out}

    def _encoder_loss(self, z: torch.Tensor, fakes: torch.Tensor, state) -> torch.Tensor:
        resolution, alpha = self._growth(state)
        code = self.E(fakes, alpha)
        if self.config.encoder_loss == "latent":
            return (z - code).abs().mean()
        return (fakes - self.G(code, resolution, alpha)).abs().mean()

    def _g_main(self, batch: dict, state):
        _, alpha = self._growth(state)
        z, fakes = self._fakes(batch["batch_size"], self._device(), state)
        adversarial = -self.D(fakes, alpha).mean()
        out = {"G/adversarial": adversarial.detach()}
        loss = adversarial
        if self.E is not None and self.config.encoder_weight:
            encoder = self._encoder_loss(z, fakes, state)
            loss = loss + self.config.encoder_weight * encoder
            out["G/encoder"] = encoder.detach()
        return {"loss": loss, **out}

    def _e_main(self, batch: dict, state):
        with torch.no_grad():
            z, fakes = self._fakes(batch["batch_size"], self._device(), state)
        encoder = self._encoder_loss(z, fakes, state)
        return {"loss": encoder, "E/encoder": encoder.detach()}

    def _device(self) -> torch.device:
        return next(self.G.parameters()).device

    # ------------------------------------------------------------------------------------- scoring

    @torch.no_grad()
    def inverted(self, images: torch.Tensor) -> dict:
        """E's code of images in [0, 1] (any size; resized to the resolution), G's rebuild in [0, 1] and the
        score's terms."""
        if self.E is None:
            raise ValueError("this pgan_enc run was trained with encoder_loss: none, so it has no encoder to "
                             "score with; invert its generator with method fanogan (generator: this run)")
        x = resized(images.float(), self.resolution) * 2 - 1
        code = self.E(x)
        rebuilt = self.G(code)
        return {"code": code, "rebuilt": ((rebuilt + 1) / 2).clamp(0, 1),
                **score_terms(x, rebuilt, code, self.config.score_lambda)}

    def score_with_terms(self, batch: dict):
        """The chosen image score, the residual map at the input's size and all three terms, from one
        inversion."""
        images = batch["image"]
        out = self.inverted(images)
        maps = resized(out["map"], images.shape[-1]) if images.shape[-2:] != out["map"].shape[-2:] else out["map"]
        return out[self.config.score].float(), maps.float(), {name: out[name] for name in TERMS}

    def score_terms(self, batch: dict) -> dict[str, torch.Tensor]:
        return self.score_with_terms(batch)[2]

    def score(self, batch: dict):
        return self.score_with_terms(batch)[:2]

    def reconstruction(self, images: torch.Tensor) -> torch.Tensor:
        return resized(self.inverted(images)["rebuilt"], images.shape[-1])

    def generated(self, count: int, first_seed: int) -> torch.Tensor:
        z = torch.stack([torch.randn(self.z_dim, generator=torch.Generator().manual_seed(first_seed + i))
                         for i in range(count)])
        with torch.no_grad():
            return ((self.G(pixel_norm(z).to(self._device())) + 1) / 2).clamp(0, 1)

    def snapshot(self, reals: dict, state, networks: dict):
        resolution, alpha = self._growth(state)
        z = pixel_norm(torch.randn(16, self.z_dim, generator=torch.Generator().manual_seed(0)))
        G = networks.get("G", self.G)
        with torch.no_grad():
            fakes = ((G(z.to(self._device()), resolution, alpha) + 1) / 2).clamp(0, 1)
        images = {"fakes": fakes}
        if self.E is not None:
            images["reals"] = reals["image"][:8].float()
            images["reconstructions"] = self.reconstruction(images["reals"])
        return {"images": images}


def score_terms(x: torch.Tensor, rebuilt: torch.Tensor, code: torch.Tensor, lam: float) -> dict[str, torch.Tensor]:
    """The paper's scores from the query x and its rebuild (both in G's range) and E's code: L_n
    (``residual``), L_o (``latent_norm``), their combination (``combined``) and the residual's map."""
    difference = minmax(x) - minmax(rebuilt)
    pixels = difference[0].numel() // difference.shape[1]
    residual = difference.flatten(1).norm(dim=1) / pixels
    latent_norm = -code.norm(dim=1) / math.sqrt(code.shape[1])
    return {"residual": residual, "latent_norm": latent_norm, "combined": lam * residual + (1 - lam) * latent_norm,
            "map": difference.norm(dim=1, keepdim=True)}
