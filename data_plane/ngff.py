"""OME-NGFF 0.5 metadata for what the store holds: slide pyramids, volumes, labels and score images.

Every image group carries ``attrs["ome"]`` that ome-zarr-models validates and OME-Zarr readers
(ome-zarr-py, napari-ome-zarr, vizarr, QuPath) open:

- slides: axes (c, y, x), µm scales from the slide's mpp, ``omero`` rendering for RGB;
- volumes: axes (z, y, x), mm scales, RAS anatomical orientation per axis (RFC-4's ``orientation``);
- masks: NGFF ``labels`` of their image with as many levels as the image (the spec's rule), each at
  its own scale; float score maps (heatmaps, score volumes) as images of their own, in the same
  physical space, so a viewer lays them over the image.

**Pixel centres.** NGFF places pixel i of a level at ``translation + i·scale``. A pixel of a map at
downsample d covers level-0 pixels i·d … i·d + d − 1, so its centre is at level-0 pixel
i·d + (d − 1)/2: the translation is (d − 1)/2 level-0 pixels. Levels whose shape was rounded up keep
that scale; their last pixel reaches past the image.
"""

from __future__ import annotations

import math

import numpy as np

NGFF_VERSION = "0.5"
RAS_ORIENTATION = {"x": "left-to-right", "y": "posterior-to-anterior", "z": "inferior-to-superior"}
LABEL_COLOURS = {"tissue": [0, 200, 0, 96], "annotation": [255, 40, 40, 160], "mask": [255, 40, 40, 160]}


def _axis(name: str, kind: str, unit: str | None = None, orientation: str | None = None) -> dict:
    axis = {"name": name, "type": kind}
    if unit:
        axis["unit"] = unit
    if orientation:
        axis["orientation"] = {"type": "anatomical", "value": orientation}
    return axis


def multiscales(name: str, axes: list[dict], steps: list[list[float]], offsets: list[list[float]],
                paths: list[str] | None = None) -> dict:
    """One NGFF ``multiscales`` entry: dataset i has scale ``steps[i]`` and translation ``offsets[i]``."""
    paths = paths or [str(i) for i in range(len(steps))]
    return {"name": name, "axes": axes, "datasets": [
        {"path": path, "coordinateTransformations": [
            {"type": "scale", "scale": [float(v) for v in step]},
            {"type": "translation", "translation": [float(v) for v in offset]}]}
        for path, step, offset in zip(paths, steps, offsets)]}


def plane_axes(mpp: float | None, channel: bool) -> list[dict]:
    unit = "micrometer" if mpp else None
    space = [_axis("y", "space", unit), _axis("x", "space", unit)]
    return [_axis("c", "channel"), *space] if channel else space


def plane_transform(mpp: float | None, downsample: float, channel: bool) -> tuple[list[float], list[float]]:
    """Scale and translation of a 2D map at ``downsample`` level-0 pixels per pixel (module doc)."""
    step = (mpp or 1.0) * downsample
    offset = (mpp or 1.0) * (downsample - 1) / 2
    return ([1.0, step, step], [0.0, offset, offset]) if channel else ([step, step], [offset, offset])


def slide_ome(name: str, levels: int, mpp: float | None) -> dict:
    """``ome`` of a slide pyramid: (c, y, x), level l at downsample 2**l, RGB rendering."""
    transforms = [plane_transform(mpp, 2**level, True) for level in range(levels)]
    colours = (("red", "FF0000"), ("green", "00FF00"), ("blue", "0000FF"))
    return {
        "version": NGFF_VERSION,
        "multiscales": [multiscales(name, plane_axes(mpp, True), [t[0] for t in transforms],
                                    [t[1] for t in transforms])],
        "omero": {"rdefs": {"model": "color"}, "channels": [
            {"label": label, "color": colour, "active": True, "coefficient": 1.0, "family": "linear",
             "inverted": False, "window": {"start": 0, "end": 255, "min": 0, "max": 255}}
            for label, colour in colours]},
    }


def pooled_levels(mask: np.ndarray, levels: int) -> list[np.ndarray]:
    """The mask and its 2×2 max-pooled halvings (rounded up): ``levels`` arrays in all."""
    out = [mask]
    for _ in range(levels - 1):
        m = out[-1]
        h, w = math.ceil(m.shape[0] / 2), math.ceil(m.shape[1] / 2)
        padded = np.zeros((h * 2, w * 2), m.dtype)
        padded[: m.shape[0], : m.shape[1]] = m
        out.append(padded.reshape(h, 2, w, 2).max(axis=(1, 3)))
    return out


def write_label(image_group, name: str, mask: np.ndarray, downsample: float, mpp: float | None, levels: int,
                compressor, colour: list[int], attrs: dict | None = None) -> None:
    """``labels/<name>`` of an image group: a uint8 label pyramid of ``levels`` levels (as many as the
    image, which NGFF requires), level l at ``downsample·2**l`` level-0 pixels per pixel; the
    ``labels`` group lists it."""
    labels = image_group.require_group("labels")
    group = labels.create_group(name, overwrite=True)
    arrays = pooled_levels(np.asarray(mask, np.uint8), levels)
    transforms = [plane_transform(mpp, downsample * 2**level, False) for level in range(levels)]
    for level, array in enumerate(arrays):
        group.create_array(str(level), data=array, chunks=tuple(min(1024, s) for s in array.shape),
                           compressors=compressor, dimension_names=["y", "x"])
    group.attrs.update({
        "ome": {"version": NGFF_VERSION,
                "multiscales": [multiscales(name, plane_axes(mpp, False), [t[0] for t in transforms],
                                            [t[1] for t in transforms])],
                "image-label": {"version": NGFF_VERSION, "source": {"image": "../../"},
                                "colors": [{"label-value": 1, "rgba": colour}]}},
        "tessera": {"downsample": downsample, **(attrs or {})},
    })
    listed = list(labels.attrs.get("ome", {}).get("labels", []))
    labels.attrs["ome"] = {"version": NGFF_VERSION, "labels": sorted({*listed, name})}


def float_image_ome(name: str, axes: list[dict], step: list[float], offset: list[float]) -> dict:
    """``ome`` of a one-level float image (a heatmap or a score volume) placed over its image."""
    return {"version": NGFF_VERSION, "multiscales": [multiscales(name, axes, [step], [offset])]}


def volume_axes() -> list[dict]:
    return [_axis(a, "space", "millimeter", RAS_ORIENTATION[a]) for a in ("z", "y", "x")]


def volume_transform(affine: np.ndarray) -> tuple[list[float], list[float]]:
    """Scale and translation (z, y, x) in mm of a RAS-oriented voxel grid; the rotation of an oblique
    acquisition is not expressible in NGFF 0.5 and stays in tessera's attributes (the full affine)."""
    affine = np.asarray(affine, np.float64)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(0))  # along i, j, k
    return zooms[::-1].tolist(), affine[:3, 3][::-1].tolist()


def volume_ome(name: str, affine: np.ndarray, path: str = "0") -> dict:
    step, offset = volume_transform(affine)
    return {"version": NGFF_VERSION, "multiscales": [multiscales(name, volume_axes(), [step], [offset], [path])]}
