"""Scores back onto slides: heatmaps stitched into the store, and PNG overlays to look at.

A heatmap lives at ``slides/<id>/heatmaps/<run>``: an NGFF image whose array ``0`` is float32 (y, x)
at ``attrs["tessera"]["downsample"]`` level-0 pixels per pixel, NaN where nothing was scored
(overlapping tiles are averaged), placed in the slide's µm space so a viewer overlays it.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from data_plane.store import store_path


def _slide_group(store, slide_id: str):
    import zarr

    path = store_path(store) / "slides" / slide_id
    if not (path / "zarr.json").is_file():
        raise KeyError(f"slide '{slide_id}' is not in store '{store}'")
    return zarr.open_group(str(path), mode="a")


def stitch(level0_shape: tuple[int, int], level0_yx: np.ndarray, footprint0: float, downsample: int,
           scores: np.ndarray | None = None, maps: np.ndarray | None = None) -> np.ndarray:
    """Average per-tile scores (N,) or pixel maps (N, h, w) into a (H/ds, W/ds) map, NaN where unscored."""
    import torch
    import torch.nn.functional as F

    shape = (math.ceil(level0_shape[0] / downsample), math.ceil(level0_shape[1] / downsample))
    total, count = np.zeros(shape, np.float64), np.zeros(shape, np.float64)
    side = max(1, round(footprint0 / downsample))
    for i, (y, x) in enumerate(np.asarray(level0_yx)):
        top, left = int(y) // downsample, int(x) // downsample
        bottom, right = min(top + side, shape[0]), min(left + side, shape[1])
        if bottom <= top or right <= left:
            continue
        if maps is not None:
            patch = F.interpolate(torch.as_tensor(maps[i], dtype=torch.float32)[None, None], size=(side, side),
                                  mode="area")[0, 0].numpy()
            total[top:bottom, left:right] += patch[: bottom - top, : right - left]
        else:
            total[top:bottom, left:right] += float(scores[i])
        count[top:bottom, left:right] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan).astype(np.float32)


def write_heatmap(store, slide_id: str, run: str, level0_yx, footprint0: float, scores=None, maps=None,
                  downsample: int | None = None) -> np.ndarray:
    """Stitch scores of one slide and store them under ``heatmaps/<run>``; returns the map."""
    from data_plane.ngff import float_image_ome, plane_axes, plane_transform

    group = _slide_group(store, slide_id)
    info = group.attrs["tessera"]
    downsample = downsample or int(group["labels/tissue"].attrs["tessera"]["downsample"])
    heat = stitch(tuple(info["level0_shape"]), level0_yx, footprint0, downsample, scores, maps)
    image = group.require_group("heatmaps").create_group(run, overwrite=True)
    array = image.create_array("0", shape=heat.shape, dtype="float32", chunks=(1024, 1024),
                               fill_value=float("nan"), dimension_names=["y", "x"])
    array[:] = heat
    step, offset = plane_transform(info.get("mpp"), downsample, channel=False)
    image.attrs.update({"ome": float_image_ome(f"{slide_id} {run}", plane_axes(info.get("mpp"), False), step, offset),
                        "tessera": {"downsample": downsample, "run": run, "kind": "heatmap"}})
    return heat


def read_heatmap(store, slide_id: str, run: str) -> tuple[np.ndarray, int]:
    """A stored heatmap and its downsample (level-0 pixels per heatmap pixel)."""
    group = _slide_group(store, slide_id)
    if f"heatmaps/{run}" not in group:
        raise KeyError(f"slide '{slide_id}' has no heatmap '{run}' (evaluate a run on it first)")
    image = group[f"heatmaps/{run}"]
    return image["0"][:], int(image.attrs["tessera"]["downsample"])


def thumbnail(store, slide_id: str, max_side: int = 1536) -> tuple[np.ndarray, int]:
    """The finest pyramid level no larger than ``max_side`` (else the coarsest), and its downsample."""
    group = _slide_group(store, slide_id)
    levels = sorted(int(k) for k in group.array_keys() if k.isdigit())
    level = next((lv for lv in levels if max(group[str(lv)].shape[1:]) <= max_side), levels[-1])
    return np.ascontiguousarray(group[str(level)][:].transpose(1, 2, 0)), 2**level


def render_overlay(store, slide_id: str, out: str | Path, heatmap: str | None = None, title: str | None = None) -> Path:
    """A PNG of the slide thumbnail with the tissue mask outline, or a heatmap, laid over it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    group = _slide_group(store, slide_id)
    image, _ = thumbnail(store, slide_id)
    height, width = image.shape[:2]
    fig, ax = plt.subplots(figsize=(8, 8 * height / width + 0.6), dpi=110)
    ax.imshow(image)
    if heatmap is None:
        mask = np.asarray(Image.fromarray(group["labels/tissue/0"][:] * 255).resize((width, height), Image.NEAREST)) > 0
        ax.imshow(np.ma.masked_where(~mask, mask), cmap="winter", alpha=0.35, interpolation="nearest")
        ax.contour(mask, levels=[0.5], colors="lime", linewidths=1.0)
        title = title or f"{slide_id}: tissue mask ({mask.mean():.0%} of the slide)"
    else:
        heat, _ = read_heatmap(store, slide_id, heatmap)
        big = np.asarray(Image.fromarray(heat).resize((width, height), Image.NEAREST))
        shown = ax.imshow(np.ma.masked_invalid(big), cmap="inferno", alpha=0.55, interpolation="nearest")
        fig.colorbar(shown, ax=ax, fraction=0.035, pad=0.02, label="anomaly score")
        title = title or f"{slide_id}: {heatmap}"
    ax.set_title(title, fontsize=10)
    ax.set_axis_off()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, bbox_inches="tight")
    plt.close(fig)
    return out
