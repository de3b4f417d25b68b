"""Third-party check of a store: run by the NGFF tools' own interpreter (.venv-ngff, see Makefile), so
ome-zarr-models and ome-zarr-py read the store exactly as a user's viewer stack would.

    .venv-ngff/bin/python tests/data_plane/ngff_check.py STORE  ->  one JSON object on stdout

For every image group under slides/, volumes/ and synthetic/ (and each one's labels, heatmaps and score images):
the ome-zarr-models class it validates as (or the validation error), and what ome-zarr-py's Reader
finds there: axes, per-level scales and translations, label names. Also whether walking the store's
groups makes zarr warn about objects it does not recognise.
"""

import json
import os
import sys
import warnings
from pathlib import Path

import zarr


def validate(group) -> str:
    import ome_zarr_models

    try:
        model = ome_zarr_models.open_ome_zarr(group)
        return f"{type(model).__module__}.{type(model).__name__}"
    except Exception as exc:  # the report carries the reason; the test asserts on it
        return f"INVALID: {type(exc).__name__}: {exc}"


def read(path: Path) -> dict:
    """Every node ome-zarr-py's Reader finds from ``path`` (the image, its labels), by path relative to it."""
    from ome_zarr.io import parse_url
    from ome_zarr.reader import Reader

    location = parse_url(str(path))
    if location is None:
        return {"error": "ome-zarr-py does not recognise this as OME-Zarr"}
    nodes = {}
    for node in Reader(location)():
        where = os.path.relpath(str(node.zarr.path), str(path))
        axes = node.metadata.get("axes") or []
        nodes[where] = {
            "specs": sorted(type(s).__name__ for s in node.specs),
            "axes": [a["name"] for a in axes],
            "units": [a.get("unit") for a in axes],
            "transforms": node.metadata.get("coordinateTransformations") or [],
            "levels": [list(d.shape) for d in node.data],
            "channel_names": node.metadata.get("channel_names"),
        }
    return nodes or {"error": "ome-zarr-py found no node"}


def main(store: str) -> None:
    root = Path(store)
    report = {"images": {}, "warnings": []}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        top = zarr.open_group(str(root), mode="r")
        names = sorted(name for name, _ in top.members())
        for kind in ("slides", "volumes", "synthetic"):
            if kind in names:
                list(top[kind].members(max_depth=None))
    report["root_members"] = names
    report["warnings"] = [str(w.message) for w in caught if "not recognized" in str(w.message)]
    for kind in ("slides", "volumes", "synthetic"):
        folder = root / kind
        for item in sorted(p for p in folder.iterdir() if (p / "zarr.json").is_file()) if folder.is_dir() else []:
            group = zarr.open_group(str(item), mode="r")
            report["images"][f"{kind}/{item.name}"] = {"model": validate(group), "reader": read(item)}
            for sub in ("labels", "heatmaps", "scores"):
                if sub not in group:
                    continue
                for name, child in group[sub].groups():
                    report["images"][f"{kind}/{item.name}/{sub}/{name}"] = {
                        "model": validate(child), "reader": read(item / sub / name)}
    json.dump(report, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1])
