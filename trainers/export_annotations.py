"""``tessera export-annotations``: an evaluation's slide results as QuPath-importable GeoJSON.

Per slide, ``<eval>/annotations/<slide>.geojson`` (level-0 pixel coordinates, what QuPath's
File › Import objects expects) holds
- annotations: the regions where the stored heatmap reaches the threshold (class "Anomaly", holes
  kept, each with its peak score and area), and
- detections: one square per scored tile with its score as the measurement "anomaly score", so
  QuPath can colour tiles by score or re-threshold them itself.

The default threshold is the 95th percentile of the normal tiles' scores in the evaluation (about 5 %
of normal tissue flagged); give ``--threshold`` to choose another.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def default_threshold(scores: dict[str, tuple[int, str, float]]) -> float:
    normal = [s for label, _, s in scores.values() if label == 0]
    values = normal or [s for _, _, s in scores.values()]
    return float(np.percentile(values, 95 if normal else 50))


def export_annotations(folder: str | Path, out: str | Path | None = None, threshold: float | None = None,
                       split: str = "test") -> dict[str, Path]:
    """Write one GeoJSON per slide of the evaluation ``folder`` (or a run directory's eval-<split>)."""
    from data_plane.annotations import region_features, tile_features
    from data_plane.heatmap import read_heatmap
    from data_plane.store import atomic_write_text, read_tile_index
    from trainers.compare import _eval_folder, _read_scores, _run_name

    folder = _eval_folder(Path(folder), split)
    settings = json.loads((folder / "metrics.json").read_text()).get("settings", {})
    if "store" not in settings:
        raise ValueError(f"'{folder}' is not an evaluation of slides (its metrics.json names no store): "
                         f"annotations export slide heatmaps")
    store, heatmap = settings["store"], settings.get("heatmap") or _run_name(folder)
    scores = _read_scores(folder)
    per_slide: dict[str, list[tuple[int, int, float]]] = {}
    for case_id, (_, _, score) in scores.items():
        slide, _, yx = case_id.rpartition("@")
        y, x = (int(v) for v in yx.split(","))
        per_slide.setdefault(slide, []).append((y, x, score))
    if not per_slide:
        raise ValueError(f"'{folder / 'scores.csv'}' lists no slide tile (ids 'slide@y,x'): nothing to export")
    threshold = default_threshold(scores) if threshold is None else float(threshold)
    tiles = read_tile_index(store)
    out = Path(out) if out is not None else folder / "annotations"
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for slide, rows in sorted(per_slide.items()):
        first = tiles[tiles["slide_id"] == slide].iloc[0]
        footprint = float(first["size"] * 2 ** int(first["level"]))
        heat, downsample = read_heatmap(store, slide, heatmap)
        with np.errstate(invalid="ignore"):
            mask = np.nan_to_num(heat, nan=-np.inf) >= threshold
        features = region_features(mask, downsample, f"anomaly score ≥ {threshold:.4g}", heat) + \
            tile_features(rows, footprint)
        collection = {"type": "FeatureCollection", "features": features,
                      "properties": {"tessera": {"evaluation": str(folder), "heatmap": heatmap,
                                                 "threshold": threshold, "coordinates": "level-0 pixels (x, y)"}}}
        path = out / f"{slide}.geojson"
        atomic_write_text(path, json.dumps(collection))
        written[slide] = path
    return written
