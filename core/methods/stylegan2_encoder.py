"""An encoder into a trained StyleGAN2's W space, so the generator scores anomalies in one pass.

f-AnoGAN's izi_f idea (Schlegl et al.) applied to StyleGAN2, as Štepec & Skočaj propose: with G (the
run's G_ema) frozen, an encoder E learns x -> w such that G(E(x)) reproduces real normal tiles (pixel
and perceptual distance), and E(G(w)) returns w on generated ones (a latent cycle, which keeps E inside
the region of W that G was trained on). Tiles that G cannot produce (tumour, artefacts) come back
different; the distance is the score and its per-pixel map the localisation. ``refine_steps`` > 0
polishes E's w with that many projector steps (core/inversion.py) at scoring time.

The generator comes from ``generator``: a StyleGAN2 run directory (its final.pt) or a final.pt /
snapshot model.pt; it is copied into this method's weights, so evaluation does not need the file.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from core.config import StrictConfig
from core.inversion import Encoder, PerceptualDistance, project
from core.methods import register_method
from core.methods.base import Method, Phase, load_trained
from core.nets import ignore_saved_extractors


class EncoderConfig(StrictConfig):
    generator: str                                    # a StyleGAN2 run dir, or its final.pt / a snapshot's model.pt
    distance_net: Literal["efficientnet_lite0", "vgg16"] = "efficientnet_lite0"  # vgg16: LPIPS's backbone
    distance_weights: str = "imagenet"                # "imagenet" (local files only) or a state-dict path
    pixel_weight: float = Field(1.0, ge=0)            # weight of the mean squared pixel difference
    cycle_weight: float = Field(1.0, ge=0)            # weight of ‖E(G(w)) − w‖² on generated tiles
    channel_base: int = Field(4096, ge=64)
    channel_max: int = Field(256, ge=8)
    refine_steps: int = Field(0, ge=0)                # projector steps after E at scoring (0: E alone)


def _load_generator(path: str):
    """The StyleGAN2 method of a run with its G_ema, read with weights_only=True (never code)."""
    return load_trained(path, ("stylegan2",), "method.options.generator")


@register_method("stylegan2_encoder")
class StyleGAN2Encoder(Method):
    projects_tiles = True
    Config = EncoderConfig

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = c = config
        gan = _load_generator(c.generator)
        self.G = gan.G.requires_grad_(False)  # frozen: belongs to no group, never stepped
        self.gan_config = gan.config
        resolution = gan.config.resolution
        self.E = Encoder(resolution, gan.config.w_dim, c.channel_base, c.channel_max)
        self.E.w_avg.copy_(self.G.mapping.w_avg)
        self.distance = PerceptualDistance(c.distance_net, c.distance_weights, c.pixel_weight,
                                           size=max(resolution, 64))
        ignore_saved_extractors(self, ("distance.net.",))  # pretrained weights reload from their file

    def groups(self):
        return {"E": self.E}

    def phases(self):
        return [Phase("Emain", "E", self._e_main)]

    def train(self, mode: bool = True):
        super().train(mode)
        self.G.eval()  # constant noise, frozen statistics
        return self

    def reconstruct(self, images: torch.Tensor, w: torch.Tensor | None = None) -> torch.Tensor:
        w = self.E(images) if w is None else w
        ws = w.unsqueeze(1).repeat(1, self.G.num_ws, 1)
        return ((self.G.synthesis(ws, noise_mode="const", fused=self.gan_config.fused_modconv) + 1) / 2)

    def _e_main(self, batch: dict, state):
        c = self.config
        reals = batch["image"]
        rebuilt = self.reconstruct(reals)
        image_term = self.distance(rebuilt, reals).mean()
        loss, out = image_term, {"E/distance": image_term.detach()}
        if c.cycle_weight:
            with torch.no_grad():
                w = self.G.mapping(torch.randn(len(reals), self.G.z_dim, device=reals.device))[:, 0]
                fakes = self.reconstruct(None, w).clamp(0, 1)
            cycle = (self.E(fakes) - w).square().sum(1).mean() / w.shape[1]
            loss = loss + c.cycle_weight * cycle
            out["E/cycle"] = cycle.detach()
        return {"loss": loss, **out}

    def inverted(self, images: torch.Tensor) -> dict:
        """E's w (refined by the projector when ``refine_steps``), the reconstruction and its distance."""
        with torch.no_grad():
            w = self.E(images)
        if self.config.refine_steps:
            with torch.enable_grad():
                out = project(self.G, images, self.distance, steps=self.config.refine_steps, initial_w=w,
                              lr=0.02, w_noise=0.0, fused=self.gan_config.fused_modconv)
            return {"w": out["w"], "reconstruction": out["reconstruction"], "distance": out["distance"]}
        with torch.no_grad():
            rebuilt = self.reconstruct(images, w).clamp(0, 1)
            return {"w": w, "reconstruction": rebuilt, "distance": self.distance(rebuilt, images)}

    def reconstruction(self, images: torch.Tensor) -> torch.Tensor:
        return self.inverted(images.float())["reconstruction"]

    def score(self, batch: dict):
        images = batch["image"].float()
        out = self.inverted(images)
        with torch.no_grad():
            return out["distance"].float(), self.distance.map(out["reconstruction"], images).float()

    def snapshot(self, reals: dict, state, networks: dict):
        images = reals["image"][:8].float()
        out = self.inverted(images)
        return {"images": {"reals": images, "reconstructions": out["reconstruction"]},
                "metrics": {"reconstruction_distance": float(out["distance"].mean())}}
