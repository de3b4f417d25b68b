"""``tessera store migrate``: a store of layout 1 (tessera ≤ 0.2) rewritten into layout 2 (OME-NGFF 0.5).

Layout 1 kept slide pyramids as (y, x, c), masks as plain arrays (``tissue``, ``annotations/<name>``,
``heatmaps/<run>``; volumes' ``image``, ``mask``, ``scores/<run>``) and tessera's files at the root.
Nothing is re-read from the source slides or volumes: each item is rebuilt from the store itself
under ``.tessera/partial/<id>`` (pixels re-chunked as (c, y, x), chunk by chunk, only the chunks that
exist; masks written as NGFF labels) and swapped in whole, so an interrupted migration leaves every
item either old or new, and a rerun carries on with the old ones. The root's version is raised last.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import numpy as np

from data_plane.store import OWN, STORE_VERSION, atomic_write_text, own, store_path, store_version


def _is_new_slide(group) -> bool:
    return "0" in group and group["0"].ndim == 3 and group["0"].metadata.dimension_names == ("c", "y", "x")


def _swap(root: Path, kind: str, item_id: str, partial: Path) -> None:
    final = root / kind / item_id
    stale = own(root, "partial", f"{item_id}.old")
    shutil.rmtree(stale, ignore_errors=True)
    final.rename(stale)
    partial.rename(final)
    shutil.rmtree(stale)


def _migrate_slide(root: Path, slide_id: str) -> bool:
    import zarr

    from data_plane.ngff import LABEL_COLOURS, float_image_ome, plane_axes, plane_transform, slide_ome, write_label

    old = zarr.open_group(str(root / "slides" / slide_id), mode="r")
    if _is_new_slide(old):
        return False
    info = dict(old.attrs["tessera"])
    mpp = info.get("mpp")
    levels = sorted(int(k) for k in old.array_keys() if k.isdigit())
    partial = own(root, "partial", slide_id)
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    new = zarr.open_group(str(partial), mode="w")
    compressor = old["0"].compressors
    for level in levels:
        source = old[str(level)]
        height, width, channels = source.shape
        chunk = source.chunks[0]
        target = new.create_array(str(level), shape=(channels, height, width), chunks=(channels, chunk, chunk),
                                  dtype=source.dtype, fill_value=source.fill_value, compressors=compressor,
                                  dimension_names=["c", "y", "x"])
        # Only the chunks that exist: background stays unwritten (and reads back white) as at ingest.
        folder = root / "slides" / slide_id / str(level) / "c"
        for path in sorted(folder.glob("*/*/0")) if folder.is_dir() else []:
            cy, cx = int(path.parent.parent.name), int(path.parent.name)
            y, x = cy * chunk, cx * chunk
            block = source[y:y + chunk, x:x + chunk]
            target[:, y:y + block.shape[0], x:x + block.shape[1]] = block.transpose(2, 0, 1)
    tissue = old["tissue"]
    write_label(new, "tissue", tissue[:], tissue.attrs["downsample"], mpp, len(levels), compressor,
                LABEL_COLOURS["tissue"], {"kind": "tissue"})
    names = []
    if "annotations" in old:
        for name, array in old["annotations"].arrays():
            label = "tissue-annotation" if name == "tissue" else name
            write_label(new, label, array[:], array.attrs["downsample"], mpp, len(levels), compressor,
                        LABEL_COLOURS["annotation"], {"kind": "annotation", "source": array.attrs.get("source")})
            names.append(label)
    if "heatmaps" in old:
        for run, array in old["heatmaps"].arrays():
            image = new.require_group("heatmaps").create_group(run)
            image.create_array("0", data=array[:], chunks=array.chunks, fill_value=float("nan"),
                               dimension_names=["y", "x"])
            step, offset = plane_transform(mpp, array.attrs["downsample"], channel=False)
            image.attrs.update({"ome": float_image_ome(f"{slide_id} {run}", plane_axes(mpp, False), step, offset),
                                "tessera": {"downsample": array.attrs["downsample"], "run": run, "kind": "heatmap"}})
    info["annotations"] = sorted(names)
    new.attrs.update({"ome": slide_ome(slide_id, len(levels), mpp), "tessera": info})
    _swap(root, "slides", slide_id, partial)
    return True


def _migrate_volume(root: Path, volume_id: str) -> bool:
    import zarr

    from data_plane.ngff import LABEL_COLOURS, NGFF_VERSION, float_image_ome, multiscales, volume_axes, \
        volume_ome, volume_transform

    old = zarr.open_group(str(root / "volumes" / volume_id), mode="r")
    if "image" not in old:
        return False
    info = dict(old.attrs["tessera"])
    affine = np.asarray(info["affine"])
    step, offset = volume_transform(affine)
    partial = own(root, "partial", volume_id)
    shutil.rmtree(partial, ignore_errors=True)
    partial.parent.mkdir(parents=True, exist_ok=True)
    new = zarr.open_group(str(partial), mode="w")
    image = old["image"]
    new.create_array("0", data=image[:], chunks=image.chunks, compressors=image.compressors,
                     dimension_names=["z", "y", "x"])
    if "mask" in old:
        label = new.create_group("labels").create_group("mask")
        label.create_array("0", data=old["mask"][:], chunks=image.chunks, compressors=image.compressors,
                           dimension_names=["z", "y", "x"])
        label.attrs["ome"] = {"version": NGFF_VERSION,
                              "multiscales": [multiscales("mask", volume_axes(), [step], [offset])],
                              "image-label": {"version": NGFF_VERSION, "source": {"image": "../../"},
                                              "colors": [{"label-value": 1, "rgba": LABEL_COLOURS["mask"]}]}}
        new["labels"].attrs["ome"] = {"version": NGFF_VERSION, "labels": ["mask"]}
    if "scores" in old:
        for run, array in old["scores"].arrays():
            scores = new.require_group("scores").create_group(run)
            scores.create_array("0", data=array[:], chunks=array.chunks, dimension_names=["z", "y", "x"])
            scores.attrs.update({"ome": float_image_ome(f"{volume_id} {run}", volume_axes(), step, offset),
                                 "tessera": {**dict(array.attrs), "kind": "scores"}})
    new.attrs.update({"ome": volume_ome(volume_id, affine), "tessera": info})
    _swap(root, "volumes", volume_id, partial)
    return True


def migrate_store(store: str | Path, progress: Callable[[str], None] | None = None) -> str:
    """Migrate ``store`` in place to layout :data:`STORE_VERSION`; returns a one-line summary."""
    import zarr

    from data_plane.store import rebuild_tile_index, rebuild_volume_index

    root = store_path(store)
    say = progress or (lambda line: None)
    version = store_version(root)
    if version is None:
        raise FileNotFoundError(f"'{root}' is not a store (no zarr.json): nothing to migrate")
    if version == STORE_VERSION:
        return f"store '{root}' is already in layout {STORE_VERSION}: nothing to do"
    if version > STORE_VERSION:
        raise RuntimeError(f"store '{root}' is in layout {version}, newer than this tessera ({STORE_VERSION})")
    if (root / ".ingest.lock").exists():
        raise RuntimeError(f"store '{root}' has an ingest lock ({root / '.ingest.lock'}): let that ingest finish "
                           f"(or remove the lock if no ingest runs) before migrating")
    # tessera's own files first: they only move, and the partial folder is needed for the items.
    zarr.open_group(str(root / OWN), mode="a").attrs["tessera"] = {
        "contents": "tessera's tile index, manifest and items being written; not image data"}
    for name in ("tiles.parquet", "volumes.parquet", "manifest.json", "index", "volume_index"):
        if (root / name).exists() and not own(root, name).exists():
            (root / name).rename(own(root, name))
    shutil.rmtree(root / ".partial", ignore_errors=True)  # leftovers of an interrupted layout-1 ingest
    counts = {"slides": 0, "volumes": 0}
    for kind, migrate in (("slides", _migrate_slide), ("volumes", _migrate_volume)):
        folder = root / kind
        if not folder.is_dir():
            zarr.open_group(str(folder), mode="a")
            continue
        for path in sorted(p for p in folder.iterdir() if (p / "zarr.json").is_file()):
            if migrate(root, path.name):
                counts[kind] += 1
                say(f"  {kind[:-1]} {path.name}: migrated")
    rebuild_tile_index(root)
    rebuild_volume_index(root)
    manifest = own(root, "manifest.json")
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        data["store_version"] = STORE_VERSION
        atomic_write_text(manifest, json.dumps(data, indent=1, sort_keys=True))
    group = zarr.open_group(str(root), mode="a")
    group.attrs["tessera"] = {**dict(group.attrs.get("tessera", {})), "store_version": STORE_VERSION}
    return (f"store '{root}' migrated from layout {version} to {STORE_VERSION}: {counts['slides']} slide(s), "
            f"{counts['volumes']} volume(s) rewritten; pixels were re-chunked from the store, no source was re-read")
