"""The store: one Zarr v3 group (OME-NGFF 0.5 metadata) holding every ingested slide.

Layout (see ../shared/DESIGN.md)::

    store.zarr/
      slides/<slide_id>/        attrs: source, sha256, vendor, mpp, objective_power, label, split, group
          0 1 2 …               RGB uint8 (y, x, c) pyramid, level l = 2**l downsample of level 0,
                                chunks of one tile; chunks with no tissue are not written and read
                                back as white (fill value 255)
          tissue                uint8 mask, attrs["downsample"] level-0 pixels per mask pixel
          annotations/<name>    uint8 masks, attrs["downsample"]
          heatmaps/<run>        float32 score maps written by evaluation
      index/<slide_id>.parquet  each slide's rows of the tile index (outside the Zarr hierarchy)
      tiles.parquet             every complete slide's rows (rebuilt after each ingest)
      volumes/<volume_id>/      image (z, y, x) float32, mask, scores/<run> (see data_plane/volumes.py)
      volume_index/<id>.parquet, volumes.parquet   one row per volume (shape, spacing, label, split, group)
      manifest.json             ingest version, config, per-slide status (done / failed + reason)

**Coordinates are level-0 pixels (y, x) everywhere**: in tiles.parquet, in stream outputs
(``level0_yx``) and in heatmaps' attrs. A pixel (y, x) of level l covers level-0 pixels
(y·2**l, x·2**l) … ((y+1)·2**l − 1, (x+1)·2**l − 1).

A slide is built under ``.partial/<slide_id>`` and renamed into ``slides/`` when complete, so every
slide under ``slides/`` is whole.
"""

from __future__ import annotations

import errno
import json
import os
import threading
from pathlib import Path
from typing import Any

import numpy as np

# Errors of the place written to, not of one item: every later write would fail the same way, so the
# whole command stops with one line saying where and what to do (tessera/cli.py), instead of each item
# failing in turn.
STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}

STORE_VERSION = 1
BACKGROUND = 255  # fill value of pyramid levels: unwritten chunks read as white glass


def store_path(store: str | Path) -> Path:
    # fsspec URLs would go through zarr's FsspecStore; atomic renames need a local filesystem.
    text = str(store)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"store '{text}': only local stores are supported for ingest so far")
    return Path(text.removeprefix("file://"))


def init_store(store: str | Path) -> Path:
    """Create the root and ``slides`` groups if missing; returns the store's path."""
    import zarr

    root = store_path(store)
    if not (root / "zarr.json").exists():
        group = zarr.open_group(str(root), mode="a")
        group.attrs["tessera"] = {"store_version": STORE_VERSION}
    if not (root / "slides" / "zarr.json").exists():
        zarr.open_group(str(root / "slides"), mode="a")
    return root


def atomic_write(path: str | Path, write) -> Path:
    """``write(partial_path)`` into a private partial name beside ``path``, then renamed over it: a reader
    never sees a half-written file under the final name, and a write cut short (a kill, a full disk)
    leaves nothing behind."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.partial")
    try:
        write(partial)
        partial.replace(path)
    finally:
        partial.unlink(missing_ok=True)
    return path


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda partial: partial.write_text(text))


def atomic_write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda partial: pq.write_table(table, partial))


class Manifest:
    """``manifest.json``: per-item status, written atomically by the one process driving an ingest."""

    def __init__(self, root: Path):
        self.path = root / "manifest.json"
        self.data: dict[str, Any] = {"store_version": STORE_VERSION, "config": {}, "items": {}}
        if self.path.exists():
            self.data = json.loads(self.path.read_text())

    @property
    def items(self) -> dict[str, dict]:
        return self.data["items"]

    def record(self, item_id: str, entry: dict) -> None:
        self.items[item_id] = entry
        self.save()

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True))


def ome_multiscales(name: str, levels: int, mpp: float | None) -> dict:
    """OME-NGFF 0.5 ``multiscales`` for a (y, x, c) pyramid; scales in micrometres when mpp is known.

    NGFF puts channels before space; tessera keeps (y, x, c) so one chunk holds one whole RGB tile.
    """
    unit = {"unit": "micrometer"} if mpp else {}
    step = mpp or 1.0
    return {
        "version": "0.5",
        "multiscales": [{
            "name": name,
            "axes": [{"name": "y", "type": "space", **unit}, {"name": "x", "type": "space", **unit},
                     {"name": "c", "type": "channel"}],
            "datasets": [{"path": str(level), "coordinateTransformations": [
                {"type": "scale", "scale": [step * 2**level, step * 2**level, 1.0]}]}
                for level in range(levels)],
        }],
    }


def slide_ids(store: str | Path) -> list[str]:
    """Slides present (complete) in the store."""
    slides = store_path(store) / "slides"
    if not slides.is_dir():
        return []
    return sorted(p.name for p in slides.iterdir() if (p / "zarr.json").is_file())


def rebuild_tile_index(store: str | Path) -> int:
    """Concatenate every complete slide's ``tiles.parquet`` into the store's; returns the row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = store_path(store)
    tables = [pq.read_table(root / "index" / f"{sid}.parquet") for sid in slide_ids(root)
              if (root / "index" / f"{sid}.parquet").is_file()]
    table = pa.concat_tables(tables) if tables else pa.table({})
    atomic_write_parquet(table, root / "tiles.parquet")
    return table.num_rows


def rebuild_volume_index(store: str | Path) -> int:
    """Concatenate every complete volume's row into the store's ``volumes.parquet``; returns the count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = store_path(store)
    folder = root / "volumes"
    ids = sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file()) if folder.is_dir() else []
    tables = [pq.read_table(root / "volume_index" / f"{vid}.parquet") for vid in ids
              if (root / "volume_index" / f"{vid}.parquet").is_file()]
    if not tables:
        (root / "volumes.parquet").unlink(missing_ok=True)
        return 0
    # Rows written by an older tessera lack the spacing columns: they read as null, not as an error.
    table = pa.concat_tables(tables, promote_options="default")
    atomic_write_parquet(table, root / "volumes.parquet")
    return table.num_rows


def read_tile_index(store: str | Path):
    """The store's tile index as a pandas DataFrame."""
    import pandas as pd

    path = store_path(store) / "tiles.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"store '{store}' has no tiles.parquet: ingest slides into it first "
                                f"(`tessera ingest SLIDES --store {store}`)")
    return pd.read_parquet(path)


class LevelReader:
    """Reads regions of one pyramid level.

    On a local store it reads the chunk files and decodes them with Blosc directly: zarr's
    synchronous API costs ~0.6 ms of event-loop overhead per call, which is most of the time for a
    256² tile (measured: 1070 tiles/s through zarr vs 3500/s decoding the same chunks directly).
    Other stores, or arrays with other codecs, go through zarr.
    """

    def __init__(self, array):
        self.array = array
        self.shape = array.shape
        self.chunk = array.chunks[:2]
        self.fill = array.fill_value
        self._dir = None
        self._codec = None
        codecs = [c.to_dict() for c in array.metadata.codecs]
        local = type(array.store).__name__ == "LocalStore"
        if local and [c["name"] for c in codecs] == ["bytes", "blosc"] and array.dtype == np.uint8:
            from numcodecs import Blosc

            self._dir = str(Path(str(array.store.root)) / array.path)
            self._codec = Blosc()  # blosc frames carry their own compressor/shuffle settings
            self._sep = array.metadata.chunk_key_encoding.separator

    def read(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Pixels [y, y+height) × [x, x+width) of this level; outside the level reads as fill."""
        if self._dir is None or y < 0 or x < 0:
            return self._read_zarr(y, x, height, width)
        ch, cw = self.chunk
        channels = self.shape[2]
        sep = self._sep
        out = np.empty((height, width, channels), dtype=np.uint8)
        for cy in range(y // ch, (y + height - 1) // ch + 1):
            for cx in range(x // cw, (x + width - 1) // cw + 1):
                y0, x0 = cy * ch, cx * cw
                sy, sx = max(y, y0), max(x, x0)
                ey, ex = min(y + height, y0 + ch), min(x + width, x0 + cw)
                target = out[sy - y:ey - y, sx - x:ex - x]
                try:
                    with open(f"{self._dir}/c{sep}{cy}{sep}{cx}{sep}0", "rb") as f:
                        raw = f.read()
                except FileNotFoundError:
                    target[...] = self.fill  # background chunk (never written) or outside the level
                    continue
                if (sy, sx, ey, ex) == (y0, x0, y0 + ch, x0 + cw) and target.flags.c_contiguous:
                    self._codec.decode(raw, out=target)  # a whole aligned chunk: decode in place
                else:
                    chunk = np.frombuffer(self._codec.decode(raw), np.uint8).reshape(ch, cw, channels)
                    target[...] = chunk[sy - y0:ey - y0, sx - x0:ex - x0]
        return out

    def _read_zarr(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        out = np.full((height, width, self.shape[2]), self.fill, dtype=self.array.dtype)
        sy, sx = max(y, 0), max(x, 0)
        ey, ex = min(y + height, self.shape[0]), min(x + width, self.shape[1])
        if ey > sy and ex > sx:
            out[sy - y:ey - y, sx - x:ex - x] = self.array[sy:ey, sx:ex]
        return out


def is_storage_error(exc: BaseException, root: str | Path | None = None) -> bool:
    """An OSError of writing (read-only, no permission, disk full), under ``root`` when given (a source
    file that cannot be read is the item's own failure)."""
    if not isinstance(exc, OSError) or exc.errno not in STORAGE_ERRNOS:
        return False
    if root is None or exc.filename is None:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or root is None
    return Path(str(exc.filename)).resolve().is_relative_to(Path(root).resolve())

