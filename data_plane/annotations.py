"""Region annotations: ASAP XML (Camelyon16) and GeoJSON (QuPath) polygons, rasterised to masks.

Polygons are grouped by class (ASAP ``PartOfGroup``, QuPath ``classification.name``), lower-cased.
Exclusion classes (Camelyon16's ``_2``, or any class named ``exclusion``) are cut out of every mask.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

EXCLUSION_CLASSES = {"_2", "exclusion", "exclude", "ignore"}


class AnnotationError(ValueError):
    """An annotation file that cannot be read or does not fit its slide."""


Polygon = list[np.ndarray]  # outer ring first, then holes; each ring an (N, 2) array of level-0 (x, y)


def read_asap(path: Path) -> dict[str, list[Polygon]]:
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise AnnotationError(f"annotation '{path}' is not valid XML: {exc}") from exc
    classes: dict[str, list[Polygon]] = {}
    for annotation in root.iter("Annotation"):
        coords = sorted(annotation.iter("Coordinate"), key=lambda c: float(c.get("Order", 0)))
        ring = np.array([[float(c.get("X")), float(c.get("Y"))] for c in coords])
        if len(ring) >= 3:
            name = (annotation.get("PartOfGroup") or "annotation").lower()
            classes.setdefault(name, []).append([ring])
    return classes


def read_geojson(path: Path) -> dict[str, list[Polygon]]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"annotation '{path}' is not valid JSON: {exc}") from exc
    features = data.get("features", []) if isinstance(data, dict) else data
    if isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    classes: dict[str, list[Polygon]] = {}
    for feature in features:
        geometry = feature.get("geometry") or {}
        props = feature.get("properties") or {}
        klass = props.get("classification") or {}
        name = (klass.get("name") if isinstance(klass, dict) else klass) or props.get("name") or "annotation"
        if geometry.get("type") == "Polygon":
            polygons = [geometry["coordinates"]]
        elif geometry.get("type") == "MultiPolygon":
            polygons = geometry["coordinates"]
        else:
            continue
        for rings in polygons:
            classes.setdefault(str(name).lower(), []).append([np.asarray(r, float)[:, :2] for r in rings])
    return classes


def read_annotations(path: str | Path) -> dict[str, list[Polygon]]:
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file '{path}' does not exist")
    reader = read_asap if path.suffix.lower() == ".xml" else read_geojson
    classes = reader(path)
    if not classes:
        raise AnnotationError(f"annotation '{path}' holds no polygons")
    return classes


def rasterise(classes: dict[str, list[Polygon]], slide_hw: tuple[int, int], downsample: int,
              source: str = "annotation") -> dict[str, np.ndarray]:
    """One boolean mask per class at ``downsample``; exclusion classes cut out of all the others."""
    from skimage.draw import polygon as fill_polygon

    height0, width0 = slide_hw
    shape = (math.ceil(height0 / downsample), math.ceil(width0 / downsample))
    outside = [name for name, polys in classes.items() for poly in polys
               if poly[0][:, 0].min() >= width0 or poly[0][:, 1].min() >= height0
               or poly[0][:, 0].max() < 0 or poly[0][:, 1].max() < 0]
    if outside:
        first = next(p for polys in classes.values() for p in polys)[0]
        raise AnnotationError(
            f"{source}: {len(outside)} polygon(s) of class '{outside[0]}' lie entirely outside the slide "
            f"({width0} x {height0} px; first polygon starts at x={first[0, 0]:.0f}, y={first[0, 1]:.0f}). "
            f"Is it the annotation of another slide, or in other units than level-0 pixels?")
    masks = {}
    for name, polys in classes.items():
        mask = np.zeros(shape, bool)
        for rings in polys:
            # Fill each polygon in its own bounding box so its holes cut only itself, not its neighbours.
            outer = rings[0] / downsample
            top, left = max(int(outer[:, 1].min()), 0), max(int(outer[:, 0].min()), 0)
            bottom = min(int(math.ceil(outer[:, 1].max())) + 1, shape[0])
            right = min(int(math.ceil(outer[:, 0].max())) + 1, shape[1])
            if bottom <= top or right <= left:
                continue
            local = np.zeros((bottom - top, right - left), bool)
            for index, ring in enumerate(rings):
                rr, cc = fill_polygon(ring[:, 1] / downsample - top, ring[:, 0] / downsample - left, local.shape)
                local[rr, cc] = index == 0  # rings after the first are holes
            mask[top:bottom, left:right] |= local
        masks[name] = mask
    exclusion = np.zeros(shape, bool)
    for name in EXCLUSION_CLASSES & masks.keys():
        exclusion |= masks.pop(name)
    return {name: mask & ~exclusion for name, mask in masks.items()}
