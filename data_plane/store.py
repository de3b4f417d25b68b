"""The store: one Zarr v3 hierarchy of OME-NGFF 0.5 images holding every ingested slide and volume.

Layout (see ../shared/DESIGN.md; NGFF metadata in data_plane/ngff.py)::

    store.zarr/                 group; attrs["tessera"]["store_version"]
      slides/                   group of slides
        <slide_id>/             NGFF multiscale image; attrs: ome, tessera (source, sha256, mpp, label, split, …)
          0 1 2 …               RGB uint8 (c, y, x) pyramid, level l = 2**l downsample of level 0, chunks of
                                one whole RGB tile (3, t, t); chunks with no tissue are not written and read
                                back as white (fill value 255)
          labels/tissue         NGFF label pyramid (uint8), attrs["tessera"]["downsample"] at its level 0
          labels/<annotation>   NGFF label pyramids rasterised from ASAP XML / GeoJSON regions
          heatmaps/<run>        float32 score image (y, x) written by evaluation, in the slide's µm space
      synthetic/<name>/         tiles written by `tessera synthesize`: a mosaic image, one chunk per tile
                                (data_plane/synthetic.py); its rows join tiles.parquet when complete
      volumes/                  group of volumes
        <volume_id>/            NGFF image (z, y, x) float32 in mm, RAS (see data_plane/volumes.py)
          0                     the voxels; labels/mask the optional voxel mask; scores/<run> score images
      .tessera/                 tessera's own files (a zarr group, so walking the store does not warn):
        tiles.parquet           every complete slide's tile rows (rebuilt after each ingest)
        volumes.parquet         one row per complete volume
        index/, volume_index/   each item's rows; manifest.json (per-item status); partial/ items being built

**Coordinates are level-0 pixels (y, x) everywhere**: in tiles.parquet, in stream outputs
(``level0_yx``) and in heatmaps' attrs. A pixel (y, x) of level l covers level-0 pixels
(y·2**l, x·2**l) … ((y+1)·2**l − 1, (x+1)·2**l − 1).

An item is built under ``.tessera/partial/<id>`` and renamed into ``slides/`` or ``volumes/`` when
complete, so every item there is whole. Stores of an older layout are refused with the command that
migrates them (:mod:`data_plane.migrate`).
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

STORE_VERSION = 2  # 2: NGFF 0.5 images (c, y, x), labels, tessera's files under .tessera/
OWN = ".tessera"
BACKGROUND = 255  # fill value of pyramid levels: unwritten chunks read as white glass


def store_path(store: str | Path) -> Path:
    # fsspec URLs would go through zarr's FsspecStore; atomic renames need a local filesystem.
    text = str(store)
    if "://" in text and not text.startswith("file://"):
        raise ValueError(f"store '{text}': only local stores are supported for ingest so far")
    return Path(text.removeprefix("file://"))


def own(store: str | Path, *parts: str) -> Path:
    """A path among tessera's own files of the store (tile index, manifest, partial items)."""
    return store_path(store).joinpath(OWN, *parts)


class StoreVersionError(RuntimeError):
    """A store written in a layout this tessera does not read; the message gives the command to migrate."""


def store_version(store: str | Path) -> int | None:
    """The layout version recorded at the store's root (1 for stores that predate the record)."""
    path = store_path(store) / "zarr.json"
    if not path.is_file():
        return None
    attrs = json.loads(path.read_text()).get("attributes", {})
    return int(attrs.get("tessera", {}).get("store_version", 1))


def check_store(store: str | Path) -> Path:
    """The store's path, after checking it is in this tessera's layout."""
    root = store_path(store)
    version = store_version(root)
    if version is not None and version < STORE_VERSION:
        raise StoreVersionError(
            f"store '{root}' is in store layout {version}, written by an older tessera; this tessera reads "
            f"layout {STORE_VERSION} (OME-NGFF 0.5). Migrate it once, in place, without re-ingesting: "
            f"`tessera store migrate {root}`")
    if version is not None and version > STORE_VERSION:
        raise StoreVersionError(f"store '{root}' is in store layout {version}, newer than this tessera reads "
                                f"({STORE_VERSION}): upgrade tessera")
    return root


def init_store(store: str | Path) -> Path:
    """Create the root, ``slides``, ``volumes`` and ``.tessera`` groups if missing; returns the store's path."""
    root = check_store(store)
    ensure_group(root, {"store_version": STORE_VERSION})
    ensure_group(root / "slides")
    ensure_group(root / "volumes")
    ensure_group(root / OWN, {"contents": "tessera's tile index, manifest and items being written; not image data"})
    return root


def ensure_group(path: Path, tessera: dict | None = None) -> None:
    """Create the zarr v3 group at ``path`` (with ``attrs["tessera"]``) unless it exists. Its zarr.json is
    written whole under a temporary name and renamed, so processes starting together (array tasks,
    ranks) never read a half-written one, and one that loses the race rewrites the same document."""
    if (path / "zarr.json").exists():
        return
    path.mkdir(parents=True, exist_ok=True)
    document = {"zarr_format": 3, "node_type": "group", "attributes": {"tessera": tessera} if tessera else {}}
    atomic_write_text(path / "zarr.json", json.dumps(document, indent=2))


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


def arrow_numbers(values: np.ndarray):
    """A numpy array as an Arrow array, zero-copy. ``pa.array`` would import pandas to check its input's
    type (~0.2 CPU-s and ~40 MB in every ingest process, which otherwise never needs pandas)."""
    import pyarrow as pa

    values = np.ascontiguousarray(values)
    return pa.Array.from_buffers(pa.from_numpy_dtype(values.dtype), len(values), [None, pa.py_buffer(values)])


def arrow_strings(values):
    """Python strings as an Arrow string array, built from buffers for the same reason as :func:`arrow_numbers`."""
    import pyarrow as pa

    data = [str(v).encode() for v in values]
    offsets = np.zeros(len(data) + 1, np.int32)
    np.cumsum([len(d) for d in data], out=offsets[1:])
    return pa.StringArray.from_buffers(len(data), pa.py_buffer(offsets), pa.py_buffer(b"".join(data)))


def read_parquet(path: Path):
    """One parquet file as an Arrow table. ``pq.read_table`` goes through pyarrow.dataset, which imports
    pandas: the ingest's closing index rebuild would pay its ~40 MB and 0.2 CPU-s for a few rows."""
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as handle:
        return handle.read()


def atomic_write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda partial: pq.write_table(table, partial))


class Manifest:
    """``manifest.json``: per-item status, written atomically by the one process driving an ingest."""

    def __init__(self, root: Path):
        self.path = own(root, "manifest.json")
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


def slide_ids(store: str | Path) -> list[str]:
    """Slides present (complete) in the store."""
    slides = store_path(store) / "slides"
    if not slides.is_dir():
        return []
    return sorted(p.name for p in slides.iterdir() if (p / "zarr.json").is_file())


def rebuild_tile_index(store: str | Path) -> int:
    """Concatenate every complete slide's index rows into the store's ``tiles.parquet``; returns the row count."""
    import pyarrow as pa

    from data_plane.synthetic import KIND, complete_sets

    root = store_path(store)
    tables = [read_parquet(own(root, "index", f"{sid}.parquet")) for sid in slide_ids(root)
              if own(root, "index", f"{sid}.parquet").is_file()]
    tables += [read_parquet(own(root, KIND, f"{name}.parquet")) for name in complete_sets(root)]
    # Synthetic rows carry extra columns (kind, seed, psi, run, snapshot): null for slides' rows.
    table = pa.concat_tables(tables, promote_options="default") if tables else pa.table({})
    atomic_write_parquet(table, own(root, "tiles.parquet"))
    return table.num_rows


def rebuild_volume_index(store: str | Path) -> int:
    """Concatenate every complete volume's row into the store's ``volumes.parquet``; returns the count."""
    import pyarrow as pa

    root = store_path(store)
    folder = root / "volumes"
    ids = sorted(p.name for p in folder.iterdir() if (p / "zarr.json").is_file()) if folder.is_dir() else []
    tables = [read_parquet(own(root, "volume_index", f"{vid}.parquet")) for vid in ids
              if own(root, "volume_index", f"{vid}.parquet").is_file()]
    if not tables:
        own(root, "volumes.parquet").unlink(missing_ok=True)
        return 0
    # Rows written by an older tessera lack the spacing columns: they read as null, not as an error.
    table = pa.concat_tables(tables, promote_options="default")
    atomic_write_parquet(table, own(root, "volumes.parquet"))
    return table.num_rows


def read_tile_index(store: str | Path):
    """The store's tile index as a pandas DataFrame."""
    import pandas as pd

    path = own(check_store(store), "tiles.parquet")
    if not path.is_file():
        raise FileNotFoundError(f"store '{store}' has no tiles.parquet: ingest slides into it first "
                                f"(`tessera ingest SLIDES --store {store}`)")
    return pd.read_parquet(path)


class LevelReader:
    """Reads regions of one pyramid level as (c, height, width) uint8.

    On a local store it reads the chunk files and decodes them with Blosc directly: zarr's
    synchronous API costs ~0.6 ms of event-loop overhead per call, which is most of the time for a
    256² tile (measured: 1070 tiles/s through zarr vs 3500/s decoding the same chunks directly).
    A chunk holds one whole RGB tile (3, t, t), so an aligned tile is one file and one decode into the
    output. Other stores, or arrays with other codecs, go through zarr.
    """

    def __init__(self, array):
        self.array = array
        self.shape = array.shape                 # (c, H, W)
        self.channels = array.shape[0]
        self.chunk = array.chunks[1:]
        self.fill = array.fill_value
        self._dir = None
        self._codec = None
        codecs = [c.to_dict() for c in array.metadata.codecs]
        local = type(array.store).__name__ == "LocalStore"
        whole_channels = array.chunks[0] == self.channels
        if local and whole_channels and [c["name"] for c in codecs] == ["bytes", "blosc"] and array.dtype == np.uint8:
            from numcodecs import Blosc

            self._dir = str(Path(str(array.store.root)) / array.path)
            self._codec = Blosc()  # blosc frames carry their own compressor/shuffle settings
            self._sep = array.metadata.chunk_key_encoding.separator

    def read(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        """Pixels [y, y+height) × [x, x+width) of this level, (c, height, width); outside reads as fill."""
        if self._dir is None or y < 0 or x < 0:
            return self._read_zarr(y, x, height, width)
        ch, cw = self.chunk
        channels = self.channels
        sep = self._sep
        out = np.empty((channels, height, width), dtype=np.uint8)
        for cy in range(y // ch, (y + height - 1) // ch + 1):
            for cx in range(x // cw, (x + width - 1) // cw + 1):
                y0, x0 = cy * ch, cx * cw
                sy, sx = max(y, y0), max(x, x0)
                ey, ex = min(y + height, y0 + ch), min(x + width, x0 + cw)
                target = out[:, sy - y:ey - y, sx - x:ex - x]
                try:
                    with open(f"{self._dir}/c{sep}0{sep}{cy}{sep}{cx}", "rb") as f:
                        raw = f.read()
                except FileNotFoundError:
                    target[...] = self.fill  # background chunk (never written) or outside the level
                    continue
                if (sy, sx, ey, ex) == (y0, x0, y0 + ch, x0 + cw) and target.flags.c_contiguous:
                    self._codec.decode(raw, out=target)  # a whole aligned chunk: decode in place
                else:
                    chunk = np.frombuffer(self._codec.decode(raw), np.uint8).reshape(channels, ch, cw)
                    target[...] = chunk[:, sy - y0:ey - y0, sx - x0:ex - x0]
        return out

    def _read_zarr(self, y: int, x: int, height: int, width: int) -> np.ndarray:
        out = np.full((self.channels, height, width), self.fill, dtype=self.array.dtype)
        sy, sx = max(y, 0), max(x, 0)
        ey, ex = min(y + height, self.shape[1]), min(x + width, self.shape[2])
        if ey > sy and ex > sx:
            out[:, sy - y:ey - y, sx - x:ex - x] = self.array[:, sy:ey, sx:ex]
        return out


class LevelWriter:
    """Writes whole chunks of one pyramid level from (c, h, w) uint8 blocks at chunk-aligned corners.

    As LevelReader for writes: on a local store whose codecs are bytes + Blosc it encodes with the
    array's own Blosc settings and writes the chunk file itself (the same bytes zarr writes, checked in
    tests/data_plane/test_ingest.py), skipping zarr's ~2 ms of per-call overhead; a chunk that is all
    fill value is not written, as zarr does not. Edge chunks are padded with the fill value, as zarr pads
    them. Other stores go through zarr.
    """

    def __init__(self, array):
        self.array = array
        self.shape = array.shape
        self.chunk = array.chunks[1:]
        self.fill = array.fill_value
        self._dir = None
        codecs = [c.to_dict() for c in array.metadata.codecs]
        local = type(array.store).__name__ == "LocalStore"
        if (local and array.chunks[0] == array.shape[0] and array.dtype == np.uint8
                and [c["name"] for c in codecs] == ["bytes", "blosc"]):
            from numcodecs import Blosc

            blosc = codecs[1]["configuration"]
            shuffle = {"noshuffle": Blosc.NOSHUFFLE, "shuffle": Blosc.SHUFFLE, "bitshuffle": Blosc.BITSHUFFLE}
            self._codec = Blosc(cname=blosc["cname"], clevel=blosc["clevel"], shuffle=shuffle[blosc["shuffle"]],
                                blocksize=blosc.get("blocksize", 0))
            self._dir = Path(str(array.store.root)) / array.path
            self._sep = array.metadata.chunk_key_encoding.separator
            self._made: set[Path] = set()

    def write(self, y: int, x: int, block: np.ndarray) -> None:
        """``block`` (c, h, w) at (y, x): a chunk's corner, h and w up to the chunk's edge."""
        ch, cw = self.chunk
        if self._dir is None or y % ch or x % cw:
            self.array[:, y:y + block.shape[1], x:x + block.shape[2]] = block
            return
        if block.shape[1:] != (ch, cw):
            padded = np.full((block.shape[0], ch, cw), self.fill, np.uint8)
            padded[:, :block.shape[1], :block.shape[2]] = block
            block = padded
        if (block == self.fill).all():
            return
        sep = self._sep
        path = self._dir / f"c{sep}0{sep}{y // ch}{sep}{x // cw}"
        if path.parent not in self._made:  # one mkdir per chunk row, not per chunk
            path.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(path.parent)
        # a fresh array in a partial folder: a half-written chunk is never read as complete, because
        # the whole slide only becomes visible by the folder's rename
        path.write_bytes(self._codec.encode(np.ascontiguousarray(block)))


def is_storage_error(exc: BaseException, root: str | Path | None = None) -> bool:
    """An OSError of writing (read-only, no permission, disk full), under ``root`` when given (a source
    file that cannot be read is the item's own failure)."""
    if not isinstance(exc, OSError) or exc.errno not in STORAGE_ERRNOS:
        return False
    if root is None or exc.filename is None:
        return exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS) or root is None
    return Path(str(exc.filename)).resolve().is_relative_to(Path(root).resolve())

