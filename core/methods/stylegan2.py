"""StyleGAN2 (config E or F) with adaptive discriminator augmentation, for synthesising tissue tiles.

Seed paper: Štepec & Skočaj, "High-resolution synthesis of histology images for anomaly detection":
StyleGAN2 config E on tissue tiles of normal Camelyon16 slides reaches FID 2.93 at 512². The networks
are in core/nets/stylegan2.py, ADA in core/ada.py. Training is four phases on the phase-based trainer,
StyleGAN2-ADA's layout:

- ``Gmain`` (G): non-saturating loss softplus(-D(aug(G(z)))), with style mixing (two latents, a random
  cut-over layer) in ``style_mixing`` of batches;
- ``Greg`` (G, every ``g_reg_interval`` = 4 steps): path-length regularisation: the norm of
  J_w^T y (y image-space noise of unit total variance) pulled towards its running mean ``pl_mean``,
  weight ``pl_weight``, on ``1/pl_batch_shrink`` of a batch;
- ``Dmain`` (D): softplus(D(aug(G(z)))) + softplus(-D(aug(x)));
- ``Dreg`` (D, every ``d_reg_interval`` = 16 steps): R1, (γ/2)·‖∇_x D(aug(x))‖² on reals.

The regularisation phases are lazy (the trainer scales their group's learning rate and betas by
I/(I+1), and the phases multiply their loss by I). ``adjust()`` runs every ``ada_interval`` steps with
statistics reduced over all ranks: ADA's p moves by the sign of (mean sign of D on reals − target),
``pl_mean`` follows the mean path length at ``pl_decay`` and the mapping's ``w_avg`` the mean w. All
three are buffers, the same on every rank (NVlabs' ranks each keep their own path-length mean and
w_avg), kept by checkpoints: a resumed run continues with the same p (NVlabs' ADA restarts at p = 0
unless told).

Scoring (``score``): ``discriminator``, −D(x), the discriminator's doubt that a tile is real (one pass,
weak); ``projector``, the distance between x and the best reconstruction the projector finds in G_ema's
W space (core/inversion.py), with its per-pixel map. core/methods/stylegan2_encoder.py trains an encoder
that inverts in one pass.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from core.ada import AugmentPipe, adjusted_p
from core.config import StrictConfig
from core.methods import register_method
from core.methods.base import Method, Phase
from core.nets.stylegan2 import CONFIGS, Discriminator, Generator


class StyleGAN2Config(StrictConfig):
    resolution: int = Field(64, ge=8, le=1024)         # tile edge in pixels, a power of two
    config: Literal["E", "F"] = "E"                    # the paper's configs: F has twice E's channels
    channel_base: int | None = Field(None, ge=64)      # channels at resolution r: min(channel_base // r,
                                                       # channel_max); None = the config's (E 16384, F 32768)
    channel_max: int = Field(512, ge=8)
    z_dim: int = Field(512, ge=1)
    w_dim: int = Field(512, ge=1)
    mapping_layers: int = Field(8, ge=1)
    mapping_lr_multiplier: float = Field(0.01, gt=0)
    style_mixing: float = Field(0.9, ge=0, le=1)       # share of batches generated from two latents
    r1_gamma: float = Field(10.0, ge=0)                # R1 weight γ; 0 turns Dreg off
    d_reg_interval: int = Field(16, ge=1)
    pl_weight: float = Field(2.0, ge=0)                # path-length weight; 0 turns Greg off
    pl_decay: float = Field(0.01, gt=0, le=1)
    pl_batch_shrink: int = Field(2, ge=1)
    g_reg_interval: int = Field(4, ge=1)
    mbstd_group: int = Field(4, ge=1)
    conv_clamp: float | None = Field(None, gt=0)       # clamp activations to ±this (256 for half precision)
    augment: Literal["ada", "fixed", "none"] = "ada"   # ada: p tuned to ada_target; fixed: p = augment_p
    augment_ops: str = "bgc"                           # groups: b blit, g geometric, c colour
    augment_p: float = Field(0.0, ge=0, le=1)          # starting (ada) or constant (fixed) probability
    ada_target: float = Field(0.6, gt=0, lt=1)         # wanted mean sign of D on reals
    ada_interval: int = Field(4, ge=1)                 # steps between adjustments
    ada_kimg: float = Field(500, gt=0)                 # thousands of images for p to go 0 -> 1
    truncation_psi: float = Field(1.0, ge=0)           # ψ of snapshot grids (1: no truncation)
    metrics: bool = True                               # FD/KD of G_ema at every snapshot, beside real vs real
    metrics_feature: Literal["efficientnet_lite0", "inception"] = "efficientnet_lite0"  # inception: real FID
                                                       # (weights from inception_weights or the hub cache)
    inception_weights: str | None = None
    metrics_images: int = Field(512, ge=4)             # generated images per snapshot (and at most as many
                                                       # reals: train.statistics_batches x micro_batch / 2)
    score: Literal["discriminator", "projector"] = "discriminator"  # projector: the distance of the best
                                                       # reconstruction G_ema finds (slow: projector_steps per batch)
    projector_steps: int = Field(100, ge=1)
    distance_net: Literal["efficientnet_lite0", "vgg16"] = "efficientnet_lite0"  # the projector's perceptual
    distance_weights: str = "imagenet"                 # distance (vgg16: LPIPS's backbone, from a local file)
    distance_pixel: float = Field(1.0, ge=0)           # weight of its pixel term
    fused_modconv: bool = False                        # one grouped convolution per layer instead of styles on
                                                       # the activations (same numbers; split measured faster
                                                       # on CPU for training and generation: bench/stylegan2.py)
    compile: bool = False                              # CUDA: torch.compile the main phases' networks

    @model_validator(mode="after")
    def _power_of_two(self):
        if self.resolution & (self.resolution - 1):
            raise ValueError(f"resolution must be a power of two, got {self.resolution}")
        if set(self.augment_ops) - set("bgc"):
            raise ValueError(f"augment_ops takes the groups b, g and c, got {self.augment_ops!r}")
        return self


@register_method("stylegan2")
class StyleGAN2(Method):
    generates_tiles = projects_tiles = True
    Config = StyleGAN2Config
    adjust_interval = 4
    uses_statistics = True  # the real images' features, for FD/KD at snapshots (empty when metrics is off)

    def __init__(self, config: StyleGAN2Config):
        super().__init__()
        self.config = c = config
        base = c.channel_base or CONFIGS[c.config]
        self.G = Generator(c.resolution, c.z_dim, c.w_dim, c.mapping_layers, c.mapping_lr_multiplier, base,
                           c.channel_max, clamp=c.conv_clamp)
        self.D = Discriminator(c.resolution, base, c.channel_max, mbstd_group=c.mbstd_group, clamp=c.conv_clamp)
        self.augment_pipe = AugmentPipe(c.augment_ops if c.augment != "none" else "", c.augment_p)
        self.register_buffer("pl_mean", torch.zeros(()))
        self.adjust_interval = c.ada_interval
        self._compiled: dict = {}
        # built when first needed, kept out of the module tree (object.__setattr__): never saved, never
        # moved or trained with the method
        object.__setattr__(self, "_embedder", None)
        object.__setattr__(self, "_distance", None)
        self.real_features: torch.Tensor | None = None

    def groups(self):
        return {"G": self.G, "D": self.D}

    def ema_networks(self):
        return {"G": self.G}

    def phases(self) -> list[Phase]:
        c = self.config
        phases = [Phase("Gmain", "G", self._g_main, data=False)]
        if c.pl_weight > 0:
            phases.append(Phase("Greg", "G", self._g_reg, c.g_reg_interval, regularisation=True, data=False))
        phases.append(Phase("Dmain", "D", self._d_main))
        if c.r1_gamma > 0:
            phases.append(Phase("Dreg", "D", self._d_reg, c.d_reg_interval, regularisation=True))
        return phases

    # ------------------------------------------------------------------------------------ pieces

    def _fused(self) -> bool:
        return self.config.fused_modconv

    def _net(self, name: str, module, device: torch.device):
        """The module, compiled on CUDA when asked (not for the regularisation phases: torch.compile does
        not take double backward)."""
        if not (self.config.compile and device.type == "cuda"):
            return module
        if name not in self._compiled:
            self._compiled[name] = torch.compile(module)
        return self._compiled[name]

    def latents(self, n: int, device: torch.device) -> torch.Tensor:
        return torch.randn(n, self.config.z_dim, device=device)

    def mapped(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(ws for a batch, the first latent's w): two latents with the cut-over at a random layer in
        ``style_mixing`` of batches (drawn on the CPU generator, which the trainer seeds: no device sync)."""
        mapping = self.G.mapping
        ws = mapping(self.latents(n, device))
        first = ws[:, 0]
        if self.config.style_mixing > 0 and torch.rand(()) < self.config.style_mixing:
            cut = int(torch.randint(1, ws.shape[1], ()))
            ws = torch.cat([ws[:, :cut], mapping(self.latents(n, device))[:, cut:]], 1)
        return ws, first

    def generate(self, n: int, device: torch.device, compiled: bool = False):
        synthesis = self._net("synthesis", self.G.synthesis, device) if compiled else self.G.synthesis
        ws, first = self.mapped(n, device)
        return synthesis(ws, fused=self._fused()), first

    def discriminate(self, images: torch.Tensor, compiled: bool = False) -> torch.Tensor:
        d = self._net("D", self.D, images.device) if compiled else self.D
        return d(self.augment_pipe(images)).flatten()

    def _reals(self, batch: dict) -> torch.Tensor:
        image = batch["image"]
        r = self.config.resolution
        if image.shape[-2:] != (r, r):
            raise ValueError(f"stylegan2 at resolution {r} got {tuple(image.shape[-2:])} tiles: set "
                             f"data.stream.crop=random with data.stream.crop_size={r}, or ingest with "
                             f"data.tiles.size={r}")
        return image * 2 - 1

    # ------------------------------------------------------------------------------------ phases

    def _g_main(self, batch: dict, state):
        device = self.G.mapping.w_avg.device
        fake, w = self.generate(batch["batch_size"], device, compiled=True)
        logits = self.discriminate(fake, compiled=True)
        # w's mean goes to adjust(), which moves w_avg with every rank's samples (truncation's centre)
        return {"loss": F.softplus(-logits).mean(), "G/fake_logit": logits.mean(), "G/w_mean": w.detach().mean(0)}

    def _g_reg(self, batch: dict, state):
        c = self.config
        device = self.G.mapping.w_avg.device
        n = max(batch["batch_size"] // c.pl_batch_shrink, 1)
        ws, _ = self.mapped(n, device)
        if not ws.requires_grad:
            ws.requires_grad_(True)
        lengths, images = path_lengths(self.G.synthesis, ws, fused=self._fused())
        penalty = (lengths - self.pl_mean).square().mean()
        # + 0 x an output: every parameter of G gets a gradient (zeros for ToRGB's biases, which the
        # Jacobian does not involve), so ranks reduce the same set of gradients
        loss = penalty * c.pl_weight * c.g_reg_interval + images[:, 0, 0, 0].sum() * 0
        return {"loss": loss, "G/path_length": lengths.mean()}

    def _d_main(self, batch: dict, state):
        reals = self._reals(batch)
        with torch.no_grad():
            fake, _ = self.generate(len(reals), reals.device, compiled=True)
        fake_logits = self.discriminate(fake, compiled=True)
        real_logits = self.discriminate(reals, compiled=True)
        loss = F.softplus(fake_logits).mean() + F.softplus(-real_logits).mean()
        return {"loss": loss, "D/real_logit": real_logits.mean(), "D/fake_logit": fake_logits.mean(),
                "D/real_sign": real_logits.detach().sign().mean(), "ada/p": self.augment_pipe.p}

    def _d_reg(self, batch: dict, state):
        c = self.config
        reals = self._reals(batch).detach().requires_grad_(True)
        penalty, logits = r1_penalty(lambda x: self.discriminate(x), reals)
        loss = penalty * (c.r1_gamma / 2) * c.d_reg_interval + logits.sum() * 0  # every D parameter in the graph
        return {"loss": loss, "D/r1": penalty}

    def adjust(self, stats: dict[str, float], state, images: int) -> None:
        c = self.config
        if c.augment == "ada" and "D/real_sign" in stats:
            p = adjusted_p(float(self.augment_pipe.p), stats["D/real_sign"], c.ada_target, images, c.ada_kimg)
            self.augment_pipe.p.fill_(p)
        if "G/path_length" in stats:
            self.pl_mean.lerp_(torch.tensor(stats["G/path_length"], device=self.pl_mean.device), c.pl_decay)
        if "G/w_mean" in stats:  # w_avg_beta per step, over the steps since the last call
            mapping = self.G.mapping
            beta = mapping.w_avg_beta ** self.adjust_interval
            mapping.w_avg.copy_(stats["G/w_mean"].to(mapping.w_avg.device).lerp(mapping.w_avg, beta))

    # ------------------------------------------------------------------------------------ use

    @torch.no_grad()
    def synthesize(self, z: torch.Tensor, psi: float | None = None, noise_mode: str = "const",
                   generator: torch.nn.Module | None = None) -> torch.Tensor:
        """Images in [0, 1] from latents ``z`` [N, z_dim], by ``generator`` (G_ema where the run kept it)."""
        g = generator if generator is not None else self.G
        psi = self.config.truncation_psi if psi is None else psi
        return ((g(z, psi, noise_mode, fused=self._fused()) + 1) / 2).clamp(0, 1)

    def distance(self):
        from core.inversion import PerceptualDistance

        if self._distance is None:
            c = self.config
            # Built on first use: its construction must not move the global RNG, or a seeded projection would
            # differ between the first call in a process and the next ones.
            with torch.random.fork_rng(devices=[]):
                object.__setattr__(self, "_distance", PerceptualDistance(c.distance_net, c.distance_weights,
                                                                         c.distance_pixel, size=max(c.resolution, 64)))
        return self._distance.to(self.pl_mean.device)

    @torch.no_grad()
    def generated(self, count: int, first_seed: int) -> torch.Tensor:
        """G's images (G_ema after load_method) for latents of seeds first_seed … first_seed + count − 1,
        ψ = 1, the noise maps drawn from first_seed: the same call gives the same images anywhere."""
        z = torch.stack([torch.randn(self.config.z_dim, generator=torch.Generator().manual_seed(first_seed + i))
                         for i in range(count)]).to(self.pl_mean.device)
        with torch.random.fork_rng(devices=[self.pl_mean.device] if self.pl_mean.is_cuda else []):
            torch.manual_seed(first_seed)
            return self.synthesize(z, psi=1.0, noise_mode="random")

    def inverted(self, images: torch.Tensor) -> dict:
        """The projector's w, reconstruction and distance for ``images`` in [0, 1] (whatever ``score`` is)."""
        from core.inversion import project

        with torch.enable_grad():
            return project(self.G, images.float(), self.distance(), steps=self.config.projector_steps,
                           fused=self._fused())

    def reconstruction(self, images: torch.Tensor) -> torch.Tensor:
        """The projector's reconstruction (whatever ``score`` is set to)."""
        return self.inverted(images)["reconstruction"]

    def score(self, batch: dict):
        """discriminator: −D(x) (one pass); projector: how far the projection of x into G's W space stays
        from x (perceptual + pixel), with its per-pixel map."""
        reals = self._reals(batch)
        if self.config.score == "discriminator":
            with torch.no_grad():
                return -self.D(reals).flatten().float(), None
        from core.inversion import project

        images = (reals + 1) / 2
        distance = self.distance()
        with torch.enable_grad():
            out = project(self.G, images, distance, steps=self.config.projector_steps, fused=self._fused())
        with torch.no_grad():
            return out["distance"].float(), distance.map(out["reconstruction"], images).float()

    def embedder(self):
        from core.generator_metrics import Embedder

        if self._embedder is None:
            object.__setattr__(self, "_embedder", Embedder(self.config.metrics_feature, self.config.inception_weights))
        return self._embedder.to(self.pl_mean.device)

    @torch.no_grad()
    def statistics(self, batches: list[dict]) -> dict:
        """The real tiles' features (FD/KD's reference), from the trainer's first statistics batches."""
        if not self.config.metrics:
            return {}
        embed = self.embedder()
        return {"real_features": torch.cat([embed(b["image"]) for b in batches]).float().cpu(),
                "feature": self.config.metrics_feature}

    def set_statistics(self, stats: dict) -> None:
        self.real_features = stats.get("real_features")

    def snapshot(self, reals: dict, state, networks: dict):
        """A grid of G_ema's images from the same 16 latents at every snapshot (seeded, constant noise),
        so snapshots show how one set of samples changes, and reals beside them; with ``metrics``, FD/KD
        of ``metrics_images`` of G_ema's images (ψ = 1) against the reals, and the reals' own baseline."""
        from core.generator_metrics import metric_names, with_baseline

        device = self.pl_mean.device
        z = torch.randn(16, self.config.z_dim, generator=torch.Generator().manual_seed(0)).to(device)
        fakes = self.synthesize(z, generator=networks["G"])
        shown = reals["image"][:16].float()
        metrics = {"ada_p": float(self.augment_pipe.p), "pl_mean": float(self.pl_mean)}
        if self.config.metrics and self.real_features is not None and len(self.real_features) >= 4:
            count = min(self.config.metrics_images, len(self.real_features) // 2)
            latents = torch.randn(count, self.config.z_dim, generator=torch.Generator().manual_seed(1))
            embed = self.embedder()
            features = torch.cat([embed(self.synthesize(chunk.to(device), psi=1.0, noise_mode="random",
                                                        generator=networks["G"]))
                                  for chunk in latents.split(64)])
            out = with_baseline(self.real_features.to(device), features, kid_subset_size=min(count, 1000))
            fd, kd = metric_names(self.config.metrics_feature)
            metrics.update({fd: out["fd"], f"{fd} real": out["fd_real"], kd: out["kd"], f"{kd} real": out["kd_real"]})
        return {"images": {"fakes": fakes, "reals": shown}, "metrics": metrics}


def path_lengths(synthesis, ws: torch.Tensor, noise: torch.Tensor | None = None, fused: bool = False):
    """(‖J_w^T y‖ per sample, the images): the gradient of ⟨G(w), y⟩ with respect to the ws, y
    image-shaped noise of variance 1/(H·W) (``noise`` when given), its squared norm summed over w's
    dimensions and averaged over layers, square-rooted. Built with create_graph, so the penalty on it
    trains the synthesis."""
    images = synthesis(ws, fused=fused)
    if noise is None:
        noise = torch.randn_like(images) / (images.shape[2] * images.shape[3]) ** 0.5
    (gradient,) = torch.autograd.grad((images * noise).sum(), ws, create_graph=True)
    return gradient.float().square().sum(2).mean(1).sqrt(), images


def r1_penalty(discriminator, reals: torch.Tensor):
    """(mean over samples of ‖∇_x D(x)‖² at the reals, the logits): R1 without its γ/2, built with
    create_graph so that it trains D. ``reals`` must require grad."""
    logits = discriminator(reals)
    (gradient,) = torch.autograd.grad(logits.sum(), reals, create_graph=True)
    return gradient.float().square().sum((1, 2, 3)).mean(), logits
