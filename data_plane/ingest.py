"""Ingest: slides and volumes into the store, atomic per item, resumable, parallel across items.

Sources come from :mod:`data_plane.sources`. One slide goes through :func:`ingest_slide` (tissue mask →
annotations → pyramid (:mod:`data_plane.pyramid`) → tile index), one volume through
:func:`data_plane.volumes.ingest_volume`; each is built under ``.tessera/partial/<id>`` and renamed into
``slides/`` or ``volumes/`` only when complete. The driver, :func:`ingest`, decides what to (re)do from
``manifest.json``, runs items in-process or as Ray tasks (:mod:`data_plane.ingest_ray`), records each
outcome (done, or failed with its reason) and rebuilds ``tiles.parquet`` and ``volumes.parquet``.

It stays near 430 lines because one slide's ingest and the driver's bookkeeping (manifest, locks,
partial items, index rebuilds) are each one transaction; the pyramid, the sources and the Ray executor
live in their own modules.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from data_plane.config import DataConfig
from data_plane.heap import release_freed_memory
from data_plane.pyramid import write_level0, write_reduced
from data_plane.sources import (IngestError, Source, SourceError, read_manifest_csv, resolve_sources, sha256_of,
                                source_for)
from data_plane.store import BACKGROUND, Manifest, atomic_write_parquet, init_store, is_storage_error, own, \
    rebuild_tile_index, rebuild_volume_index

# the sources' names too (data_plane.sources): callers take the whole of ingest from here
__all__ = ["IngestError", "IngestReport", "Source", "SourceError", "ingest", "ingest_slide", "read_manifest_csv",
           "resolve_sources", "source_for"]


def config_digest(config: DataConfig, kind: str = "slide") -> str:
    """What decides an item's content in the store; a change means re-ingesting it."""
    dumped = config.model_dump(mode="json")
    if kind == "volume":
        relevant = {"volumes": dumped["volumes"]}
    else:
        relevant = {k: dumped[k] for k in ("tissue", "tiles", "annotations", "stain")}
        relevant["chunk"] = config.ingest.chunk or config.tiles.size
        relevant["max_levels"] = config.ingest.max_levels
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------- one slide

def _open_slide(path: Path):
    import openslide

    if not path.exists():
        raise IngestError(f"file '{path}' does not exist")
    try:
        slide = openslide.OpenSlide(str(path))
        if hasattr(slide, "set_cache"):  # openslide-python >= 1.3 with OpenSlide >= 4
            # ingest reads each region once, in order: OpenSlide's default 32 MiB tile cache would only
            # hold decoded tiles nobody asks for again (a quarter of the ingest's peak RSS)
            slide.set_cache(openslide.OpenSlideCache(4 << 20))
        return slide
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise IngestError(f"'{path.name}' is not readable by OpenSlide: not a slide format it knows, or a "
                          f"truncated or corrupt file (OpenSlide: {exc})") from exc
    except openslide.OpenSlideError as exc:
        raise IngestError(f"'{path.name}' is not readable by OpenSlide (truncated or corrupt file?): {exc}") from exc


def ome_tiff_mpp(path: Path) -> float | None:
    """Micrometres per pixel from an OME-TIFF's OME-XML (``Pixels@PhysicalSizeX`` and its unit), or None."""
    if not path.name.lower().endswith((".ome.tif", ".ome.tiff", ".tif", ".tiff")):
        return None
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            xml = tif.ome_metadata
    except Exception:  # not a TIFF tifffile reads: OpenSlide's own error is the one to show
        return None
    if not xml:
        return None
    import xml.etree.ElementTree as ET

    try:
        pixels = next(e for e in ET.fromstring(xml).iter() if e.tag.endswith("}Pixels") or e.tag == "Pixels")
    except (ET.ParseError, StopIteration):
        return None
    size = pixels.get("PhysicalSizeX")
    if size is None:
        return None
    to_um = {"µm": 1.0, "um": 1.0, "micron": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4, "m": 1e6, "Å": 1e-4}
    unit = pixels.get("PhysicalSizeXUnit", "µm")
    if unit not in to_um:
        return None
    return float(size) * to_um[unit]


def target_downsample(config: DataConfig, mpp0: float | None, power0: float | None, name: str) -> float:
    """Level-0 pixels per tile pixel for the configured magnification / mpp."""
    tiles = config.tiles
    if tiles.mpp is not None:
        if mpp0 is None:
            raise IngestError(f"'{name}' records no microns-per-pixel; set data.tiles.mpp: null and use "
                              f"data.tiles.magnification, or tile level 0 with both null")
        factor, wanted = tiles.mpp / mpp0, f"{tiles.mpp} um/px"
    elif tiles.magnification is not None:
        if power0 is not None:
            factor = power0 / tiles.magnification
        elif mpp0 is not None:
            factor = (10.0 / tiles.magnification) / mpp0  # 10x objective ~ 1 um/px
        else:
            raise IngestError(f"'{name}' records neither objective power nor microns-per-pixel, so "
                              f"{tiles.magnification}x cannot be located; set data.tiles.magnification: null "
                              f"to tile level 0")
        wanted = f"{tiles.magnification}x"
    else:
        return 1.0
    if factor < 0.99:
        raise IngestError(f"'{name}' was scanned at {power0 or '?'}x / {mpp0 or '?'} um/px, coarser than the "
                          f"requested {wanted}: tiles would be upsampled. Lower data.tiles.magnification.")
    return factor


def _tile_rows(source: Source, shape0: tuple[int, int], levels: int, factor: float, config: DataConfig,
               tissue: np.ndarray, tissue_ds: int, anomaly: np.ndarray | None, anomaly_ds: int):
    import pyarrow as pa

    from data_plane.store import arrow_numbers, arrow_strings
    from data_plane.tissue import box_fractions

    tiles = config.tiles
    level = int(min(max(math.floor(math.log2(factor) + 1e-6), 0), levels - 1))
    size0 = tiles.size * factor
    stride0 = (tiles.stride or tiles.size) * factor
    ys = np.arange(0, shape0[0] - size0 + 1, stride0)
    xs = np.arange(0, shape0[1] - size0 + 1, stride0)
    yy, xx = [a.ravel() for a in np.meshgrid(ys, xs, indexing="ij")]
    fraction = box_fractions(tissue, tissue_ds, yy, xx, size0)
    keep = fraction >= tiles.min_tissue_fraction
    yy, xx, fraction = yy[keep], xx[keep], fraction[keep]
    if anomaly is not None:
        covered = box_fractions(anomaly, anomaly_ds, yy, xx, size0)
        label = np.where(covered >= config.annotations.anomalous_fraction, "anomalous",
                         np.where(covered > 0, "uncertain", "normal"))
    else:
        covered = np.full(len(yy), np.nan)
        label = np.full(len(yy), source.label)
    n = len(yy)
    return pa.table({
        "slide_id": arrow_strings([source.item_id] * n),
        "level": arrow_numbers(np.full(n, level, np.int8)),
        "y": arrow_numbers(np.round(yy).astype(np.int64)),                   # level-0 pixels
        "x": arrow_numbers(np.round(xx).astype(np.int64)),                   # level-0 pixels
        "size": arrow_numbers(np.full(n, round(size0 / 2**level), np.int32)),  # pixels read at `level`
        "out_size": arrow_numbers(np.full(n, tiles.size, np.int32)),       # pixels after resizing
        "tissue_fraction": arrow_numbers(fraction.astype(np.float32)),
        "annotation_fraction": arrow_numbers(covered.astype(np.float32)),
        "label": arrow_strings(label.tolist()),
        "split": arrow_strings([source.split] * n),
        "group": arrow_strings([source.group] * n),
    })


def ingest_slide(source: Source, store: str, config: DataConfig,
                 progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Ingest one slide; returns its manifest entry. Raises IngestError with a reason on failure."""
    import openslide
    import zarr
    from scipy import ndimage
    from zarr.codecs import BloscCodec, BloscShuffle

    from data_plane.annotations import annotation_label_names, rasterise, read_annotations
    from data_plane.ngff import LABEL_COLOURS, slide_ome, write_label
    from data_plane.tissue import box_fractions, read_downsampled, tissue_mask

    started = time.time()
    root = Path(store)
    progress = progress or (lambda slide_id, done, total: None)
    slide = _open_slide(source.path)
    stat = source.path.stat()
    with ThreadPoolExecutor(1) as hasher:
        digest = hasher.submit(sha256_of, source.path)  # overlaps with the pixel work
        props = slide.properties
        mpp0 = float(props[openslide.PROPERTY_NAME_MPP_X]) if openslide.PROPERTY_NAME_MPP_X in props else None
        if mpp0 is None:
            mpp0 = ome_tiff_mpp(source.path)  # OpenSlide does not read OME-XML's physical sizes
        power_text = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER)
        power0 = float(power_text) if power_text else None
        width0, height0 = slide.dimensions
        factor = target_downsample(config, mpp0, power0, source.path.name)

        tissue_ds = config.tissue.mask_downsample
        try:
            low = read_downsampled(slide, tissue_ds)
        except openslide.OpenSlideError as exc:
            raise IngestError(f"'{source.path.name}' could not be decoded (truncated or corrupt file?): {exc}") from exc
        tissue = tissue_mask(low, config.tissue)
        del low
        release_freed_memory()  # the mask's float copies of the thumbnail: gone before the pyramid starts
        if not tissue.any():
            raise IngestError(f"no tissue found in '{source.path.name}' (Otsu on {config.tissue.channel} of a "
                              f"1/{tissue_ds} image): blank slide, or lower data.tissue.min_saturation")

        annotation_masks, anomaly, skipped = {}, None, {}
        if source.annotation is not None:
            classes, skipped = read_annotations(source.annotation, with_skipped=True)
            annotation_masks = rasterise(classes, (height0, width0), config.annotations.downsample,
                                         source=f"annotation '{source.annotation.name}' of '{source.path.name}'")
            anomaly = np.logical_or.reduce(list(annotation_masks.values())) if annotation_masks else None
            annotation_masks = annotation_label_names(annotation_masks)  # a class may not be named 'tissue'

        partial = own(root, "partial", source.item_id)
        shutil.rmtree(partial, ignore_errors=True)
        partial.parent.mkdir(parents=True, exist_ok=True)
        group = zarr.open_group(str(partial), mode="w")
        chunk = config.ingest.chunk or config.tiles.size  # one tile, one chunk: a tile read is one decode
        compressor = BloscCodec(cname="lz4", clevel=9, shuffle=BloscShuffle.noshuffle) \
            if config.ingest.codec == "lz4" else \
            BloscCodec(cname="zstd", clevel=config.ingest.compression_level, shuffle=BloscShuffle.bitshuffle)

        shapes = [(height0, width0)]
        while len(shapes) < config.ingest.max_levels and max(shapes[-1]) > chunk:
            shapes.append((math.ceil(shapes[-1][0] / 2), math.ceil(shapes[-1][1] / 2)))
        # Chunks to write at level 0: those touching tissue (mask dilated by one pixel for its edges).
        grown = ndimage.binary_dilation(tissue, iterations=1)
        cy, cx = np.meshgrid(np.arange(math.ceil(height0 / chunk)), np.arange(math.ceil(width0 / chunk)),
                             indexing="ij")
        grid = box_fractions(grown, tissue_ds, cy.ravel() * chunk, cx.ravel() * chunk, chunk).reshape(cy.shape) > 0
        total = int(grid.sum()) * 2  # reduced levels add about as many chunks again (1/4 + 1/16 + …)
        done = 0

        def advance(n: int) -> None:
            nonlocal done
            done += n
            progress(source.item_id, min(done, total), total)

        stain = None
        if config.stain.method != "none" and config.stain.apply == "ingest":
            from data_plane.stain import StainNormalizer

            stain = StainNormalizer.from_config(config.stain)
        arrays = []
        for level, shape in enumerate(shapes):
            arrays.append(group.create_array(
                str(level), shape=(3, *shape), chunks=(3, chunk, chunk), dtype="uint8", fill_value=BACKGROUND,
                compressors=compressor, dimension_names=["c", "y", "x"]))
            if level == 0:
                write_level0(slide, arrays[0], grid, chunk, config.ingest.threads, stain, advance)
            else:
                grid = write_reduced(arrays[level - 1], arrays[level], grid, chunk, config.ingest.threads, advance)

        write_label(group, "tissue", tissue, tissue_ds, mpp0, len(shapes), compressor, LABEL_COLOURS["tissue"],
                    {"kind": "tissue"})
        for name, mask in annotation_masks.items():
            write_label(group, name, mask, config.annotations.downsample, mpp0, len(shapes), compressor,
                        LABEL_COLOURS["annotation"], {"kind": "annotation", "source": str(source.annotation)})

        release_freed_memory()
        rows = _tile_rows(source, (height0, width0), len(shapes), factor, config, tissue, tissue_ds,
                          anomaly, config.annotations.downsample)
        sha256 = digest.result()
        group.attrs.update({
            "ome": slide_ome(source.item_id, len(shapes), mpp0),
            "tessera": {"source": str(source.path), "sha256": sha256,
                        "vendor": props.get(openslide.PROPERTY_NAME_VENDOR), "mpp": mpp0,
                        "objective_power": power0, "label": source.label, "split": source.split,
                        "group": source.group, "level0_shape": [height0, width0],
                        "tile_downsample": factor, "annotations": sorted(annotation_masks),
                        "annotation_skipped": skipped},
        })
    slide.close()

    final = root / "slides" / source.item_id
    if final.exists():  # a changed source file replaces its old version, which is removed after the swap
        stale = own(root, "partial", f"{source.item_id}.replaced")
        shutil.rmtree(stale, ignore_errors=True)
        final.rename(stale)
        partial.rename(final)
        shutil.rmtree(stale)
    else:
        partial.rename(final)
    # The slide's index rows follow its pixels; until the driver records it done, a rerun redoes it.
    own(root, "index").mkdir(exist_ok=True)
    atomic_write_parquet(rows, own(root, "index", f"{source.item_id}.parquet"))
    progress(source.item_id, total, total)
    entry = {"status": "done", "source": str(source.path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns,
             "sha256": sha256, "tiles": rows.num_rows, "levels": len(shapes),
             "seconds": round(time.time() - started, 2)}
    if skipped:
        entry["warnings"] = [f"annotation '{source.annotation.name}': skipped {count} {kind} geometr"
                             f"{'y' if count == 1 else 'ies'} (only polygons mark regions)"
                             for kind, count in sorted(skipped.items())]
    return entry


def ingest_item_safely(source: Source, store: str, config: DataConfig, progress=None) -> dict:
    """Ingest one slide or volume, never raising: failures come back as entries with a reason."""
    try:
        if source.kind == "volume":
            from data_plane.volumes import ingest_volume

            entry = ingest_volume(source, store, config, progress)
        else:
            entry = ingest_slide(source, store, config, progress)
        return {**entry, "kind": source.kind, "config": config_digest(config, source.kind)}
    except Exception as exc:
        if is_storage_error(exc, store):  # the store cannot be written: stop, the other items would fail too
            shutil.rmtree(own(store, "partial", source.item_id), ignore_errors=True)
            raise
        reason = str(exc) if isinstance(exc, (IngestError, ValueError)) else \
            f"unexpected {type(exc).__name__}: {exc}\n{traceback.format_exc(limit=4)}"
        shutil.rmtree(own(store, "partial", source.item_id), ignore_errors=True)
        return {"status": "failed", "kind": source.kind, "source": str(source.path), "reason": reason}


# ---------------------------------------------------------------------------------------------- the driver

@dataclass
class IngestReport:
    done: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    warnings: dict[str, list[str]] = field(default_factory=dict)   # done items with something skipped
    tiles: int = 0
    volumes: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _unchanged(entry: dict | None, source: Source, root: Path, digest: str) -> bool:
    if not entry or entry.get("status") != "done" or entry.get("config") != digest:
        return False
    folder, index = ("volumes", "volume_index") if source.kind == "volume" else ("slides", "index")
    complete = (root / folder / source.item_id / "zarr.json").is_file() and \
        own(root, index, f"{source.item_id}.parquet").is_file()
    if not complete or not source.path.exists():
        return False
    stat = source.path.stat()
    if entry.get("mtime_ns") == stat.st_mtime_ns and (source.path.is_dir() or entry.get("size") == stat.st_size):
        return True
    return source.path.is_file() and entry.get("size") == stat.st_size and sha256_of(source.path) == entry.get("sha256")


class _Lock:
    """One ingest per store at a time; a lock left by a killed process is taken over."""

    def __init__(self, root: Path):
        self.path = own(root, "ingest.lock")

    def __enter__(self):
        if self.path.exists():
            try:
                pid = int(self.path.read_text().strip() or 0)
                os.kill(pid, 0)
                if pid != os.getpid():
                    raise IngestError(f"store '{self.path.parent}' is being written by process {pid}; "
                                      f"wait for it or stop it (remove {self.path} if that process is gone)")
            except (ValueError, ProcessLookupError):
                pass  # stale lock of a dead process
        self.path.write_text(str(os.getpid()))
        return self

    def __exit__(self, *exc):
        self.path.unlink(missing_ok=True)


def ingest(sources: list[Source], store: str | Path, config: DataConfig, workers: int | None = None,
           ray_address: str | None = None, show_progress: bool = True) -> IngestReport:
    """Ingest every source not already in the store; failures are recorded, the others finish."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    root = init_store(store)
    workers = workers or config.ingest.workers
    ray_address = ray_address or config.ingest.ray_address
    digests = {kind: config_digest(config, kind) for kind in ("slide", "volume")}
    report = IngestReport()
    with _Lock(root):
        shutil.rmtree(own(root, "partial"), ignore_errors=True)  # leftovers of an interrupted run
        manifest = Manifest(root)
        manifest.data["config"] = config.model_dump(mode="json")
        seen: dict[str, Path] = {}
        todo: list[Source] = []
        manifest.data["rejected"] = {}  # sources this ingest refused before reading them, by path
        for source in sources:
            if source.item_id in seen:
                reason = (f"id '{source.item_id}' is already used by '{seen[source.item_id]}'; "
                          f"rename one file or give it an id in the manifest CSV")
                report.failed[f"{source.item_id} ({source.path})"] = reason
                manifest.data["rejected"][str(source.path)] = {"id": source.item_id, "status": "failed",
                                                               "reason": reason}
                continue
            seen[source.item_id] = source.path
            if _unchanged(manifest.items.get(source.item_id), source, root, digests[source.kind]):
                report.skipped.append(source.item_id)
            else:
                todo.append(source)

        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
        with Progress(*columns, disable=not show_progress, transient=False) as bar:
            overall = bar.add_task(f"ingest -> {root.name}", total=len(todo))
            per_slide: dict[str, int] = {}

            def item_progress(item_id: str, done: int, total: int) -> None:
                if item_id not in per_slide:
                    per_slide[item_id] = bar.add_task(f"  {item_id}", total=total)
                bar.update(per_slide[item_id], completed=done, total=total)

            def finish(source: Source, entry: dict) -> None:
                if entry["status"] != "done" and _remove_item(root, source):
                    entry = {**entry, "reason": f"{entry['reason']} (its earlier version was removed from the "
                                                f"store, so the index holds no tiles of a failed item)"}
                manifest.record(source.item_id, entry)
                if entry["status"] == "done":
                    report.done.append(source.item_id)
                    if entry.get("warnings"):
                        report.warnings[source.item_id] = entry["warnings"]
                else:
                    report.failed[source.item_id] = entry["reason"]
                bar.advance(overall)

            if workers <= 1 or len(todo) <= 1 and ray_address is None:
                for source in todo:
                    finish(source, ingest_item_safely(source, str(root), config, item_progress))
            else:
                from data_plane.ingest_ray import ingest_with_ray

                ingest_with_ray(todo, root, config, workers, ray_address, finish, item_progress)

        report.tiles = rebuild_tile_index(root)
        report.volumes = rebuild_volume_index(root)
        manifest.save()
    return report


def _remove_item(root: Path, source: Source) -> bool:
    """Drop an item's earlier version (pixels and index rows) after its re-ingest failed: the manifest now
    says failed, and the tile index, rebuilt from what is present, must agree. Returns whether one existed."""
    folder, index = ("volumes", "volume_index") if source.kind == "volume" else ("slides", "index")
    existed = (root / folder / source.item_id).exists()
    own(root, index, f"{source.item_id}.parquet").unlink(missing_ok=True)
    shutil.rmtree(root / folder / source.item_id, ignore_errors=True)
    return existed
