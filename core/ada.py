"""Adaptive discriminator augmentation (ADA; Karras et al. 2020, "Training Generative Adversarial
Networks with Limited Data"), differentiable, in plain PyTorch.

Every image the discriminator sees, real or generated, goes through the same random augmentations,
each applied with probability ``p``: then D cannot tell reals from fakes by the augmentations, and
G learns the un-augmented distribution as long as each augmentation is invertible in distribution
("non-leaking", which the paper shows holds for p below about 0.8). The operations, in the paper's
groups:

- ``b`` pixel blitting: x-flip, rotation by a multiple of 90°, integer translation (up to 1/8 of the size);
- ``g`` geometric: isotropic scaling, arbitrary rotation (before and after an anisotropic scaling,
  each with probability 1 - √(1 - p) so that some rotation happens with probability p), and
  fractional translation;
- ``c`` colour: brightness, contrast, luma flip, hue rotation, saturation.

All geometric operations compose into one affine matrix per image and one bilinear resampling with
reflected borders (blits alone land exactly on pixel centres); the colour operations compose into one
4x4 matrix. Gradients flow to the images (G learns through the augmented fakes). ``p`` is a buffer: the
method adjusts it from D's sign on reals (see core/methods/stylegan2.py) and checkpoints keep it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = {"b": ("xflip", "rotate90", "xint"), "g": ("scale", "rotate", "aniso", "xfrac"),
          "c": ("brightness", "contrast", "lumaflip", "hue", "saturation")}
# the paper's strengths (StyleGAN2-ADA's defaults)
SCALE_STD, ANISO_STD, XFRAC_STD, XINT_MAX = 0.2, 0.2, 0.125, 0.125
BRIGHTNESS_STD, CONTRAST_STD, HUE_MAX, SATURATION_STD = 0.2, 0.5, 1.0, 1.0


def _rotation(theta: torch.Tensor) -> torch.Tensor:
    c, s = theta.cos(), theta.sin()
    z, o = torch.zeros_like(theta), torch.ones_like(theta)
    return torch.stack([torch.stack([c, -s, z], -1), torch.stack([s, c, z], -1), torch.stack([z, z, o], -1)], -2)


def _scaling(sx: torch.Tensor, sy: torch.Tensor) -> torch.Tensor:
    z, o = torch.zeros_like(sx), torch.ones_like(sx)
    return torch.stack([torch.stack([sx, z, z], -1), torch.stack([z, sy, z], -1), torch.stack([z, z, o], -1)], -2)


def _translation(tx: torch.Tensor, ty: torch.Tensor) -> torch.Tensor:
    z, o = torch.zeros_like(tx), torch.ones_like(tx)
    return torch.stack([torch.stack([o, z, tx], -1), torch.stack([z, o, ty], -1), torch.stack([z, z, o], -1)], -2)


def _colour_translation(b: torch.Tensor) -> torch.Tensor:
    m = torch.eye(4, device=b.device).repeat(len(b), 1, 1)
    m[:, :3, 3] = b.unsqueeze(1)
    return m


class AugmentPipe(nn.Module):
    """Augments a batch of images in [-1, 1], each operation with probability ``p`` (a buffer)."""

    def __init__(self, ops: str = "bgc", p: float = 0.0):
        super().__init__()
        unknown = set(ops) - set(GROUPS)
        if unknown:
            raise ValueError(f"unknown augmentation groups {sorted(unknown)} (b: blit, g: geometric, c: colour)")
        self.ops = {op for group in ops for op in GROUPS[group]}
        self.register_buffer("p", torch.tensor(float(p)))

    def _chosen(self, n: int, device, probability=None) -> torch.Tensor:
        p = self.p if probability is None else probability
        return (torch.rand(n, device=device) < p).float()

    def geometric(self, n: int, size: int, device) -> torch.Tensor:
        """Per-image 3x3 matrices mapping output to input coordinates (grid_sample's [-1, 1] units)."""
        m = torch.eye(3, device=device).repeat(n, 1, 1)
        pixel = 2.0 / size
        if "xflip" in self.ops:
            flip = torch.randint(2, (n,), device=device) * self._chosen(n, device)
            m = m @ _scaling(1 - 2 * flip, torch.ones_like(flip))
        if "rotate90" in self.ops:
            quarter = torch.randint(4, (n,), device=device) * self._chosen(n, device)
            m = m @ _rotation(quarter * (math.pi / 2))
        if "xint" in self.ops:
            shift = (torch.rand(n, 2, device=device) * 2 - 1) * XINT_MAX * size
            shift = shift.round() * pixel * self._chosen(n, device).unsqueeze(1)
            m = m @ _translation(shift[:, 0], shift[:, 1])
        if "scale" in self.ops:
            s = torch.exp2(torch.randn(n, device=device) * SCALE_STD * self._chosen(n, device))
            m = m @ _scaling(s, s)
        rotation_p = 1 - torch.sqrt((1 - self.p).clamp(0, 1))
        if "rotate" in self.ops:
            m = m @ _rotation((torch.rand(n, device=device) * 2 - 1) * math.pi * self._chosen(n, device, rotation_p))
        if "aniso" in self.ops:
            s = torch.exp2(torch.randn(n, device=device) * ANISO_STD * self._chosen(n, device))
            m = m @ _scaling(s, 1 / s)
        if "rotate" in self.ops:
            m = m @ _rotation((torch.rand(n, device=device) * 2 - 1) * math.pi * self._chosen(n, device, rotation_p))
        if "xfrac" in self.ops:
            shift = torch.randn(n, 2, device=device) * XFRAC_STD * 2 * self._chosen(n, device).unsqueeze(1)
            m = m @ _translation(shift[:, 0], shift[:, 1])
        return m

    def colour(self, n: int, device) -> torch.Tensor:
        """Per-image 4x4 matrices acting on (r, g, b, 1)."""
        m = torch.eye(4, device=device).repeat(n, 1, 1)
        luma = torch.tensor([1.0, 1.0, 1.0, 0.0], device=device) / math.sqrt(3)
        axis = torch.outer(luma, luma)
        if "brightness" in self.ops:
            m = _colour_translation(torch.randn(n, device=device) * BRIGHTNESS_STD * self._chosen(n, device)) @ m
        if "contrast" in self.ops:
            c = torch.exp2(torch.randn(n, device=device) * CONTRAST_STD * self._chosen(n, device))
            m = torch.diag_embed(torch.stack([c, c, c, torch.ones_like(c)], -1)) @ m
        if "lumaflip" in self.ops:
            flip = (torch.randint(2, (n,), device=device) * self._chosen(n, device)).view(n, 1, 1)
            m = (torch.eye(4, device=device) - 2 * axis * flip) @ m  # Householder reflection about the luma axis
        if "hue" in self.ops:
            theta = (torch.rand(n, device=device) * 2 - 1) * math.pi * HUE_MAX * self._chosen(n, device)
            m = _rotation_about(luma[:3], theta) @ m
        if "saturation" in self.ops:
            s = torch.exp2(torch.randn(n, device=device) * SATURATION_STD * self._chosen(n, device)).view(n, 1, 1)
            m = (axis + (torch.eye(4, device=device) - axis) * s) @ m
        return m

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if not self.ops:
            return images
        n, c, h, w = images.shape
        device = images.device
        geometric = self.ops & set(GROUPS["b"] + GROUPS["g"])
        colour = self.ops & set(GROUPS["c"])
        out = images
        if geometric:
            matrix = self.geometric(n, h, device)
            grid = F.affine_grid(matrix[:, :2, :].to(images.dtype), [n, c, h, w], align_corners=False)
            out = F.grid_sample(out, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        if colour:
            if c != 3:
                raise ValueError(f"colour augmentation needs RGB images, got {c} channels")
            matrix = self.colour(n, device).to(images.dtype)
            out = torch.einsum("nij,njhw->nihw", matrix[:, :3, :3], out) + matrix[:, :3, 3].reshape(n, 3, 1, 1)
        return out


def _rotation_about(axis: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """4x4 rotations by ``theta`` [N] about the unit 3-vector ``axis`` (Rodrigues' formula)."""
    x, y, z = axis.tolist()
    k = torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], device=theta.device)
    c, s = theta.cos().view(-1, 1, 1), theta.sin().view(-1, 1, 1)
    r = torch.eye(3, device=theta.device) + s * k + (1 - c) * (k @ k)
    m = torch.eye(4, device=theta.device).repeat(len(theta), 1, 1)
    m[:, :3, :3] = r
    return m


def adjusted_p(p: float, real_sign: float, target: float, images: int, speed_kimg: float) -> float:
    """ADA's update: p moves towards more augmentation when D is over-confident on reals (the mean sign
    of its real logits, r_t, above ``target``) and towards less below it, by at most ``images`` /
    (``speed_kimg`` x 1000): p can go from 0 to 1 in ``speed_kimg`` thousand images. Kept in [0, 1]."""
    step = math.copysign(images / (speed_kimg * 1000), real_sign - target) if real_sign != target else 0.0
    return min(max(p + step, 0.0), 1.0)
