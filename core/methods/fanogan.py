"""f-AnoGAN's izi_f encoder (Schlegl et al. 2019), the baseline pgan_enc is compared with.

The GAN is trained first, alone: a pgan_enc run with ``encoder_loss: none`` (progressive WGAN-GP, the
same networks as the joint method, so the comparison isolates how the encoder is trained). This method
then loads that run's G (its G_ema) and D, frozen, and trains an encoder E (D's layout, z_dim outputs) at
the target resolution on real training images:

    L(x) = ‖x − G(E(x))‖² / n_pixels + κ · ‖f_D(G(E(x))) − f_D(x)‖² / n_features,    κ = 1,

f_D the critic's 4×4 features (before its minibatch statistic). The score is pgan_enc's, λ·L_n + (1 − λ)·L_o,
with L_n, L_o and the combination reported apart, so the two encoders are compared on the same terms.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from core.config import StrictConfig
from core.methods import register_method
from core.methods.base import Phase, load_trained
from core.methods.pgan_enc import ProgressiveGANEncoder, resized
from core.nets.pgan import ProgressiveDiscriminator


class FAnoGANConfig(StrictConfig):
    generator: str                                     # a pgan_enc run dir (encoder_loss: none), or its final.pt
    kappa: float = Field(1.0, ge=0)                    # weight of the critic-feature term
    score: Literal["combined", "residual", "latent_norm"] = "combined"
    score_lambda: float = Field(0.05, ge=0, le=1)


@register_method("fanogan")
class FAnoGAN(ProgressiveGANEncoder):
    Config = FAnoGANConfig

    def __init__(self, config: FAnoGANConfig):
        torch.nn.Module.__init__(self)  # not pgan_enc's __init__: G and D come trained from the generator run
        self.config = c = config
        gan = load_trained(c.generator, ("pgan_enc",), "method.options.generator")
        g = gan.config
        self.resolution, self.z_dim = g.resolution, g.z_dim
        # frozen: in no group, never stepped; saved with this method so evaluation needs no other file
        self.G = gan.G.requires_grad_(False)
        self.D = gan.D.requires_grad_(False)
        self.E = ProgressiveDiscriminator(g.resolution, g.channel_base, g.channel_max, g.in_channels, g.z_dim,
                                          mbstd_group=0)

    def groups(self):
        return {"E": self.E}

    def phases(self):
        return [Phase("Emain", "E", self._izi_f)]

    def ema_networks(self):
        return {"E": self.E}

    def idle_parameters(self, state=None) -> set[str]:
        return super().idle_parameters(None)  # E trains at the target resolution only

    def train(self, mode: bool = True):
        super().train(mode)
        self.G.eval()
        self.D.eval()
        return self

    def _izi_f(self, batch: dict, state):
        x = resized(batch["image"].float(), self.resolution) * 2 - 1
        rebuilt = self.G(self.E(x))
        pixels = (rebuilt - x).square().mean()
        features = (self.D.features(rebuilt) - self.D.features(x)).square().mean()
        return {"loss": pixels + self.config.kappa * features, "E/pixels": pixels.detach(),
                "E/features": features.detach()}

    def snapshot(self, reals: dict, state, networks: dict):
        images = reals["image"][:8].float()
        return {"images": {"reals": images, "reconstructions": self.reconstruction(images)}}
