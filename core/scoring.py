"""Scores pooled from maps, the same in evaluation, validation and `tessera score`: a volume's sample
score from its voxel scores, a score term pooled over a volume's slices, and the 3D smoothing of a
reassembled score volume. A method's default ``sample_score`` (core.methods.base) is ``volume_score``."""

from __future__ import annotations

import numpy as np


def volume_score(voxel_scores: np.ndarray, top_fraction: float = 0.001) -> float:
    """Mean of the highest 0.1% voxel scores (at least 10): a focal outlier lifts the whole volume."""
    flat = np.sort(voxel_scores.ravel())[::-1]
    return float(flat[: max(10, int(top_fraction * flat.size))].mean())


def share_of_top_inside(voxel_scores: np.ndarray, mask: np.ndarray, top_fraction: float = 0.001) -> float:
    """The share of a volume's highest voxel scores (the top ``top_fraction``, at least 10) that lie inside
    ``mask``: 1 when the map's peak is the anomaly, about the mask's volume share when it is elsewhere."""
    flat = np.asarray(voxel_scores, np.float32).ravel()
    k = min(flat.size, max(10, int(round(top_fraction * flat.size))))
    top = np.argpartition(flat, flat.size - k)[flat.size - k:]
    return float(np.asarray(mask).ravel()[top].astype(bool).mean())


def pooled_slice_term(values: list[tuple[float, float]], min_foreground: float, top_fraction: float = 0.1) -> float:
    """A volume's value of a per-slice score term: the mean of the highest tenth over the slices with as
    much foreground as training used (empty slices, never trained on, would otherwise dominate)."""
    kept = np.sort([v for f, v in values if f >= min_foreground] or [v for _, v in values])[::-1]
    return float(kept[: max(1, int(round(top_fraction * len(kept))))].mean())


def smooth_scores(voxel_scores: np.ndarray, sigma: float) -> np.ndarray:
    """A reassembled score volume smoothed by a 3D Gaussian of ``sigma`` voxels (0: unchanged)."""
    if not sigma:
        return voxel_scores
    from scipy import ndimage

    return ndimage.gaussian_filter(np.asarray(voxel_scores, np.float32), sigma, mode="nearest")


def slide_score(tile_scores: np.ndarray, top_fraction: float = 0.05) -> float:
    """Mean of the highest ``top_fraction`` of tile scores: one focal lesion still lifts the slide."""
    ranked = np.sort(np.asarray(tile_scores))[::-1]
    return float(ranked[: max(1, int(np.ceil(top_fraction * len(ranked))))].mean())
