"""Region annotations: ASAP XML (Camelyon16) and GeoJSON (QuPath) polygons, rasterised to masks;
and scores back out as QuPath-importable GeoJSON.

Polygons are grouped by class (ASAP ``PartOfGroup``, QuPath ``classification.name``), lower-cased.
Exclusion classes (Camelyon16's ``_2``, any class named ``exclusion``, and QuPath's ``Ignore*``) are
cut out of every mask. GeoJSON geometry goes through shapely: a bare geometry, a Feature, a
FeatureCollection or a list of features; Polygon, MultiPolygon (with holes) and the polygons inside a
GeometryCollection. Lines and points mark no region: they are counted and reported, not dropped
silently.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections import Counter
from pathlib import Path

import numpy as np

EXCLUSION_CLASSES = {"_2", "exclusion", "exclude", "ignore"}


class AnnotationError(ValueError):
    """An annotation file that cannot be read or does not fit its slide."""


Polygon = list[np.ndarray]  # outer ring first, then holes; each ring an (N, 2) array of level-0 (x, y)


def is_exclusion(name: str) -> bool:
    return name in EXCLUSION_CLASSES or name.startswith("ignore")  # QuPath: "Ignore*"


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


def _polygons(geometry, skipped: Counter) -> list[Polygon]:
    """The polygons of a shapely geometry as ring lists; other kinds counted in ``skipped``."""
    kind = geometry.geom_type
    if kind == "Polygon":
        if geometry.is_empty:
            return []
        rings = [geometry.exterior, *geometry.interiors]
        return [[np.asarray(r.coords, float)[:, :2] for r in rings]]
    if kind in ("MultiPolygon", "GeometryCollection"):
        return [p for part in geometry.geoms for p in _polygons(part, skipped)]
    skipped[kind] += 1
    return []


def _class_name(props: dict) -> str:
    klass = props.get("classification") or {}
    name = (klass.get("name") if isinstance(klass, dict) else klass) or props.get("name") or "annotation"
    return str(name).lower()


def read_geojson(path: Path, skipped: Counter | None = None) -> dict[str, list[Polygon]]:
    import shapely.geometry

    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AnnotationError(f"annotation '{path}' is not valid JSON: {exc}") from exc
    skipped = Counter() if skipped is None else skipped
    if isinstance(data, list):
        features = data
    elif isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features") or []
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, dict) and "coordinates" in data or isinstance(data, dict) and "geometries" in data:
        features = [{"type": "Feature", "geometry": data, "properties": {}}]  # a bare geometry (QuPath writes these)
    else:
        raise AnnotationError(f"annotation '{path}' is neither a GeoJSON geometry, a Feature, a FeatureCollection "
                              f"nor a list of features")
    classes: dict[str, list[Polygon]] = {}
    for number, feature in enumerate(features):
        geometry = (feature or {}).get("geometry")
        if not geometry:
            skipped["feature without geometry"] += 1
            continue
        try:
            shape = shapely.geometry.shape(geometry)
        except Exception as exc:
            raise AnnotationError(f"annotation '{path}', feature {number}: invalid {geometry.get('type')} "
                                  f"geometry ({exc})") from exc
        polygons = _polygons(shape, skipped)
        if polygons:
            classes.setdefault(_class_name(feature.get("properties") or {}), []).extend(polygons)
    return classes


def read_annotations(path: str | Path, with_skipped: bool = False):
    """Polygons by class; with ``with_skipped`` also the count of geometries skipped, by kind."""
    path = Path(path)
    if not path.is_file():
        raise AnnotationError(f"annotation file '{path}' does not exist")
    skipped: Counter = Counter()
    classes = read_asap(path) if path.suffix.lower() == ".xml" else read_geojson(path, skipped)
    if not classes:
        found = f" (it holds only {', '.join(f'{n} {k}' for k, n in skipped.items())})" if skipped else ""
        raise AnnotationError(f"annotation '{path}' holds no polygons{found}")
    return (classes, dict(skipped)) if with_skipped else classes


def annotation_label_names(masks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Masks keyed by NGFF label name: 'tissue' is the tissue mask's, so a class of that name is renamed."""
    return {("tissue-annotation" if name == "tissue" else name.replace("/", "-")): mask
            for name, mask in masks.items()}


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
                # Mask pixel (r, c) covers level-0 [c·ds, (c+1)·ds): it is inside when its centre is.
                rr, cc = fill_polygon(ring[:, 1] / downsample - 0.5 - top, ring[:, 0] / downsample - 0.5 - left,
                                      local.shape)
                local[rr, cc] = index == 0  # rings after the first are holes
            mask[top:bottom, left:right] |= local
        masks[name] = mask
    exclusion = np.zeros(shape, bool)
    for name in [n for n in masks if is_exclusion(n)]:
        exclusion |= masks.pop(name)
    return {name: mask & ~exclusion for name, mask in masks.items()}


# ---------------------------------------------------------------------------------------------- export

def mask_polygons(mask: np.ndarray, downsample: float):
    """The regions of a boolean map as a shapely (Multi)Polygon in level-0 pixels (holes kept): pixel
    (r, c) is the square [c·ds, (c+1)·ds) × [r·ds, (r+1)·ds). Built from each row's runs, merged."""
    import shapely
    from shapely.geometry import box

    boxes = []
    for r, row in enumerate(np.asarray(mask, bool)):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.view(np.int8), [0]])))
        boxes += [box(start * downsample, r * downsample, end * downsample, (r + 1) * downsample)
                  for start, end in zip(edges[::2], edges[1::2])]
    return shapely.union_all(boxes) if boxes else shapely.geometry.MultiPolygon()


def region_features(mask: np.ndarray, downsample: float, name: str, heat: np.ndarray | None = None) -> list[dict]:
    """QuPath annotations (one per connected region) of a thresholded map, with the region's peak score."""
    from shapely.geometry import mapping

    geometry = mask_polygons(mask, downsample)
    parts = list(getattr(geometry, "geoms", [geometry])) if not geometry.is_empty else []
    features = []
    for part in parts:
        properties = {"objectType": "annotation", "name": name,
                      "classification": {"name": "Anomaly", "color": [230, 40, 40]}, "isLocked": False}
        if heat is not None:
            x0, y0, x1, y1 = (int(round(v / downsample)) for v in part.bounds)
            window = heat[y0:y1, x0:x1][mask[y0:y1, x0:x1]]
            if window.size:
                properties["measurements"] = {"max score": float(np.nanmax(window)),
                                              "area (level-0 px²)": float(part.area)}
        features.append({"type": "Feature", "geometry": mapping(part), "properties": properties})
    return features


def tile_features(tiles: list[tuple[int, int, float]], footprint: float) -> list[dict]:
    """QuPath detections: one square per scored tile (level-0 (y, x) of its corner) with its score."""
    from shapely.geometry import box, mapping

    return [{"type": "Feature", "geometry": mapping(box(x, y, x + footprint, y + footprint)),
             "properties": {"objectType": "detection", "classification": {"name": "Tile", "color": [90, 90, 200]},
                            "measurements": {"anomaly score": float(score)}}}
            for y, x, score in tiles]
