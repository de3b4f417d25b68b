"""Synthetic anomalies with exact masks, in 2D (C, H, W) and 3D (C, D, H, W), seeded and reproducible.

MOOD's five outlier kinds, each confined to a sphere (a disc in 2D) of random radius and centre:

- ``uniform_addition``  x' = x + c inside the sphere, c ~ ±U(c_lo, c_hi)
- ``noise_addition``    x' = x + n inside, n ~ N(0, σ²) per voxel, σ ~ U(σ_lo, σ_hi)
- ``sink_source``       x'(p) = x(c + (p − c)·d^(γ−1)), d = |p − c| / r, inside: a radial remapping that is the
                        identity on the sphere's surface; γ > 1 magnifies the centre (source), γ < 1 pulls
                        the surroundings in (sink); γ ~ U(1.5, 3) or its reciprocal
- ``uniform_shift``     x'(p) = x(p + s) inside: the sphere shows the anatomy displaced by a vector s, |s| ~ U(r/2, r)
- ``reflection``        x'(p) = x(R(p)) inside: the sphere shows its content mirrored across a plane through c

four more kinds of our own (``OTHER_KINDS``: a soft hyperintense ``lesion``, a fluid-filled ``cavity``,
a ``local_blur`` and an ``intensity_scale``), never used to choose settings, and Foreign Patch
Interpolation (Tan et al.): a box h with per-axis width ~ U(0.1·d, 0.4·d) and
centre ~ U(0.1·d, 0.9·d), x' = (1 − α)·x + α·y inside h for a second sample y; the label is α inside h
where x ≠ y and 0 elsewhere.

Intensities are assumed scaled to about [0, 1] (the volume ingest's normalisation); results are
not clipped, so the mask stays exact. Every function takes a ``numpy.random.Generator``: the same
seed gives the same anomaly.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

OUTLIER_KINDS = ("uniform_addition", "noise_addition", "sink_source", "uniform_shift", "reflection")


def _grid(shape: tuple[int, ...], device=None) -> list[torch.Tensor]:
    """Voxel coordinates per spatial axis, broadcastable to ``shape``."""
    axes = []
    for axis, size in enumerate(shape):
        view = [1] * len(shape)
        view[axis] = size
        axes.append(torch.arange(size, dtype=torch.float32, device=device).view(view))
    return axes


def sphere_mask(shape: tuple[int, ...], centre, radius: float, device=None) -> torch.Tensor:
    """Boolean sphere (disc) of ``radius`` voxels around ``centre`` in a grid of ``shape``."""
    distance = sum((axis - float(c)) ** 2 for axis, c in zip(_grid(shape, device), centre))
    return distance <= radius ** 2


def random_sphere(shape: tuple[int, ...], rng: np.random.Generator, radius_range=(0.05, 0.2),
                  foreground: torch.Tensor | None = None) -> tuple[np.ndarray, float]:
    """Centre and radius: radius ~ U(radius_range)·min(shape); centre inside ``foreground`` when given."""
    radius = float(rng.uniform(*radius_range) * min(shape))
    if foreground is not None and bool(foreground.any()):
        # A centre on the foreground's edge would put half the sphere on empty background: try a few
        # centres and keep the first whose sphere lies >= 90% inside (else the best one).
        foreground = foreground.reshape(shape)
        candidates = torch.nonzero(foreground).cpu().numpy()
        best, best_inside = None, -1.0
        for _ in range(30):
            centre = candidates[rng.integers(len(candidates))].astype(float)
            sphere = sphere_mask(shape, centre, radius, foreground.device)
            inside = float(foreground[sphere].float().mean())
            if inside > best_inside:
                best, best_inside = centre, inside
            if inside >= 0.9:
                break
        centre = best
    else:
        centre = np.array([rng.uniform(radius, size - radius) if size > 2 * radius else size / 2 for size in shape])
    return centre, radius


def _sample(image: torch.Tensor, coords: list[torch.Tensor], mode: str) -> torch.Tensor:
    """image (C, *S) sampled at voxel coordinates (one tensor per axis, shape S), border-clamped."""
    spatial = image.shape[1:]
    # grid_sample wants (x, y[, z]) = last axis first, normalised to [-1, 1] with align_corners=True.
    coords = torch.broadcast_tensors(*coords)
    normalised = [2 * c / max(size - 1, 1) - 1 for c, size in zip(coords, spatial)]
    grid = torch.stack(normalised[::-1], dim=-1)[None]
    return F.grid_sample(image[None].float(), grid, mode=mode, padding_mode="border", align_corners=True)[0]


def _apply(image: torch.Tensor, mask: torch.Tensor, altered: torch.Tensor) -> torch.Tensor:
    return torch.where(mask[None], altered.to(image.dtype), image)


def uniform_addition(image, mask, rng, low=0.2, high=0.5, **_):
    value = float(rng.uniform(low, high) * rng.choice([-1.0, 1.0]))
    return _apply(image, mask, image + value)


def noise_addition(image, mask, rng, low=0.05, high=0.2, **_):
    sigma = float(rng.uniform(low, high))
    generator = torch.Generator(device="cpu").manual_seed(int(rng.integers(2**62)))
    noise = torch.randn(image.shape, generator=generator).to(image.device) * sigma
    return _apply(image, mask, image + noise)


def sink_source(image, mask, rng, centre=None, radius=None, **_):
    gamma = float(rng.uniform(1.5, 3.0))
    gamma = gamma if rng.random() < 0.5 else 1 / gamma
    axes = _grid(image.shape[1:], image.device)
    offsets = [axis - float(c) for axis, c in zip(axes, centre)]
    distance = torch.sqrt(sum(o ** 2 for o in offsets)).clamp_min(1e-6) / radius
    factor = distance.clamp(max=1.0) ** (gamma - 1)
    coords = [float(c) + o * factor for o, c in zip(offsets, centre)]
    return _apply(image, mask, _sample(image, coords, "bilinear"))


def uniform_shift(image, mask, rng, centre=None, radius=None, **_):
    direction = rng.normal(size=len(centre))
    direction /= np.linalg.norm(direction) + 1e-12
    shift = direction * rng.uniform(radius / 2, radius)
    axes = _grid(image.shape[1:], image.device)
    coords = [axis + float(s) for axis, s in zip(axes, np.round(shift))]
    return _apply(image, mask, _sample(image, coords, "nearest"))


def reflection(image, mask, rng, centre=None, **_):
    axis_index = int(rng.integers(len(centre)))
    axes = _grid(image.shape[1:], image.device)
    coords = [2 * round(float(centre[i])) - axis if i == axis_index else axis for i, axis in enumerate(axes)]
    return _apply(image, mask, _sample(image, coords, "nearest"))


def _radial(image, centre, radius) -> torch.Tensor:
    """Distance to ``centre`` in units of ``radius`` over the image's grid (0 at the centre, 1 on the sphere)."""
    axes = _grid(image.shape[1:], image.device)
    return torch.sqrt(sum((axis - float(c)) ** 2 for axis, c in zip(axes, centre))) / radius


# Kinds beyond MOOD's, closer to what a radiologist meets, for judging settings on kinds that never chose
# them: soft-edged, as real lesions are, so a detector cannot find them by the sphere's edge alone.
def lesion(image, mask, rng, centre=None, radius=None, **_):
    """A hyperintense lesion (an MS plaque or a tumour on T2/FLAIR): a brightness bump, peak 0.3-0.6,
    falling off as a Gaussian to ~0.1 of its peak at the sphere's surface."""
    peak = float(rng.uniform(0.3, 0.6))
    return _apply(image, mask, image + peak * torch.exp(-2.3 * _radial(image, centre, radius) ** 2))


def cavity(image, mask, rng, centre=None, radius=None, **_):
    """A resection cavity or an infarct's core: tissue replaced by fluid (intensity 0-0.15), blending into
    the surrounding tissue over the outer third of the sphere."""
    fluid = float(rng.uniform(0.0, 0.15))
    weight = ((1 - _radial(image, centre, radius)) * 3).clamp(0, 1)
    return _apply(image, mask, image * (1 - weight) + fluid * weight)


def local_blur(image, mask, rng, **_):
    """Lost detail inside the sphere (partial volume, local motion): a Gaussian blur of 1-2.5 voxels."""
    from scipy import ndimage

    sigma = float(rng.uniform(1.0, 2.5))
    blurred = ndimage.gaussian_filter(image.detach().cpu().numpy(), (0,) + (sigma,) * (image.ndim - 1))
    return _apply(image, mask, torch.from_numpy(blurred).to(image.device))


def intensity_scale(image, mask, rng, **_):
    """Texture kept, contrast changed (oedema, demyelination): the intensities inside scaled by 0.5-0.75
    or 1.3-1.6."""
    scale = float(rng.uniform(0.5, 0.75) if rng.random() < 0.5 else rng.uniform(1.3, 1.6))
    return _apply(image, mask, image * scale)


OTHER_KINDS = ("lesion", "cavity", "local_blur", "intensity_scale")

OUTLIERS: dict[str, Callable] = {
    "uniform_addition": uniform_addition,
    "noise_addition": noise_addition,
    "sink_source": sink_source,
    "uniform_shift": uniform_shift,
    "reflection": reflection,
    "lesion": lesion,
    "cavity": cavity,
    "local_blur": local_blur,
    "intensity_scale": intensity_scale,
}


def mood_outlier(image: torch.Tensor, kind: str, rng: np.random.Generator, foreground: torch.Tensor | None = None,
                 radius_range=(0.05, 0.2)) -> tuple[torch.Tensor, torch.Tensor]:
    """One outlier of ``kind`` in ``image`` (C, *spatial); returns (altered image, boolean mask (*spatial))."""
    if kind not in OUTLIERS:
        raise ValueError(f"outlier kind '{kind}' is not one of {', '.join(OUTLIERS)}")
    spatial = tuple(image.shape[1:])
    centre, radius = random_sphere(spatial, rng, radius_range, foreground)
    mask = sphere_mask(spatial, centre, radius, image.device)
    return OUTLIERS[kind](image, mask, rng, centre=centre, radius=radius), mask


FPI_ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)  # the discrete mode's α levels (5 classes)


def fpi_boxes(count: int, shape: tuple[int, ...], generator: torch.Generator | None = None,
              device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` FPI patches in an image of ``shape``: per axis of size d, width ~ U(0.1·d, 0.4·d) and
    centre ~ U(0.1·d, 0.9·d), clipped to the image. Returns (start, stop), each (count, len(shape)) long."""
    size = torch.tensor(shape, dtype=torch.float32, device=device)
    u = torch.rand((count, len(shape), 2), generator=generator, device=device)
    width = (0.1 + 0.3 * u[..., 0]) * size
    centre = (0.1 + 0.8 * u[..., 1]) * size
    start = (centre - width / 2).clamp(min=0).round().long()
    stop = torch.maximum((centre + width / 2).clamp(max=size).round().long(), start + 1)
    return start, stop


def zoomed_copies(images: torch.Tensor, scale_range: tuple[float, float] = (0.5, 2.0),
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Each 2D image (B, C, H, W) resampled by a zoom about a random point: its own content at a wrong scale
    and place. Scale s is log-uniform in ``scale_range`` (s > 1 magnifies), the fixed point uniform in the
    middle 80 % of each axis; samples outside the image read 0 (background after the volume ingest)."""
    if images.dim() != 4:
        raise ValueError(f"zoomed copies are made of 2D images (B, C, H, W), got shape {tuple(images.shape)}")
    count, device = images.shape[0], images.device
    low, high = np.log(scale_range[0]), np.log(scale_range[1])
    scale = torch.exp(low + (high - low) * torch.rand(count, generator=generator, device=device))
    fixed = 0.8 * (torch.rand(count, 2, generator=generator, device=device) * 2 - 1)  # in [-0.8, 0.8], (x, y)
    # affine_grid maps output coordinates to input ones: p_in = fixed + (p_out - fixed) / s
    theta = torch.zeros(count, 2, 3, device=device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / scale
    theta[:, :, 2] = fixed * (1 - 1 / scale[:, None])
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).to(images.dtype)


def foreign_patch_interpolation(image: torch.Tensor, other: torch.Tensor, alpha: torch.Tensor | None = None,
                                discrete: bool = False, boxes: tuple[torch.Tensor, torch.Tensor] | None = None,
                                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blend a patch of ``other`` into ``image``, batched on their device: both (B, C, *spatial).

    Returns (image', label (B, 1, *spatial), α (B,)). α ~ U(0, 1), or one of FPI_ALPHAS when ``discrete``.
    The label is α where the patch changed the image (x ≠ y in any channel) and 0 elsewhere.
    """
    if image.shape != other.shape:
        raise ValueError(f"FPI needs two batches of one shape, got {tuple(image.shape)} and {tuple(other.shape)}")
    count, spatial, device = image.shape[0], tuple(image.shape[2:]), image.device
    if alpha is None:
        if discrete:
            levels = torch.tensor(FPI_ALPHAS, device=device)
            alpha = levels[torch.randint(len(FPI_ALPHAS), (count,), generator=generator, device=device)]
        else:
            alpha = torch.rand(count, generator=generator, device=device)
    start, stop = boxes if boxes is not None else fpi_boxes(count, spatial, generator, device)
    inside = torch.ones((count, 1, *spatial), dtype=torch.bool, device=device)
    for axis, size in enumerate(spatial):
        coords = torch.arange(size, device=device)
        along = (coords >= start[:, axis, None]) & (coords < stop[:, axis, None])  # (B, size)
        view = [count, 1] + [size if a == axis else 1 for a in range(len(spatial))]
        inside = inside & along.view(view)
    weight = alpha.to(image.dtype).view(count, *[1] * (image.dim() - 1))
    blended = torch.where(inside, (1 - weight) * image + weight * other, image)
    changed = inside & (image != other).any(dim=1, keepdim=True)
    label = changed.to(torch.float32) * alpha.to(torch.float32).view(count, *[1] * (image.dim() - 1))
    return blended, label, alpha
