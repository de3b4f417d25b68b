"""Synthetic tile sets in the store: ``synthetic/<name>``, written by ``tessera synthesize``.

A set of N generated tiles of side T is one NGFF image (c, y, x): a mosaic whose chunks are the tiles
(chunk (3, T, T) at grid cell (i // columns, i % columns) holds tile i). So
- each tile is written by exactly one rank, as one chunk file, atomically (written under a temporary
  name and renamed): no two ranks touch a chunk, and a killed job leaves no half-written tile;
- the tile stream reads synthetic tiles exactly as ingested ones (level 0 of an image, one chunk per
  tile), and a viewer shows the set as one browsable mosaic.

Bookkeeping lives in ``.tessera/synthetic/<name>/``: ``job.json`` (the lock: which job writes the
set), ``done/<rank>-<first>.npy`` (indices of tiles whose chunks are on disk, one file per written
batch) and, when every tile is there, the set's rows of the tile index (``<name>.parquet`` beside
the folder), which is when the set joins ``tiles.parquet`` and its attrs say ``complete``. Until then
no stream sees it: a partial set is never taken for a complete one.
"""

from __future__ import annotations

import json
import math
import os
import socket
import time
from pathlib import Path

import numpy as np

from data_plane.store import BACKGROUND, atomic_write, atomic_write_parquet, atomic_write_text, ensure_group, \
    init_store, own, store_path

KIND = "synthetic"
STALE_S = 120  # a lock of another host whose heartbeat is older than this is taken over


class SyntheticError(RuntimeError):
    """A synthesis that cannot start (settings differ from the set's, a set is being written, …)."""


def job_identity() -> dict:
    """Who writes: ranks of one job (torchrun children, Slurm array tasks or srun tasks) share the job id."""
    job = os.environ.get("TESSERA_JOB_ID") or os.environ.get("SLURM_ARRAY_JOB_ID") or os.environ.get("SLURM_JOB_ID")
    pid = int(os.environ.get("TESSERA_JOB_PID", os.getpid()))
    return {"job": job or f"pid-{pid}@{socket.gethostname()}", "host": socket.gethostname(), "pid": pid}


def _alive(lock: dict, touched: float | None = None) -> bool:
    """Whether the job holding a lock runs: its pid on this host; elsewhere, whether the lock file was
    touched (``touched``, its mtime, moved by every batch's heartbeat) within STALE_S."""
    if lock.get("host") == socket.gethostname():
        try:
            os.kill(int(lock["pid"]), 0)
            return True
        except (ProcessLookupError, ValueError, KeyError):
            return False
        except PermissionError:
            return True
    return touched is not None and time.time() - touched < STALE_S


class SyntheticSet:
    """One synthetic set of a store; :meth:`open` creates it or checks a rerun matches it."""

    def __init__(self, store, name: str):
        import zarr

        self.root = store_path(store)
        self.name = name
        self.path = self.root / KIND / name
        self.books = own(self.root, KIND, name)
        self.group = zarr.open_group(str(self.path), mode="a")
        self.array = self.group["0"]
        self.spec = dict(self.group.attrs["tessera"])
        self.tile, self.columns = int(self.spec["tile"]), int(self.spec["columns"])
        self._encoder = None

    # ------------------------------------------------------------------------------ creation and checks

    @classmethod
    def open(cls, store, name: str, spec: dict, resume: bool, source=None) -> "SyntheticSet":
        """``spec``: count, tile, seed0, psi, noise, batch, run, snapshot, split (generated tiles), or mode
        "project" with ``source`` the real tiles' index rows (tile i reconstructs source row i). A new set
        is created; an existing one is continued with ``resume`` when its spec matches, else refused."""
        import zarr
        from zarr.codecs import BloscCodec, BloscShuffle

        from data_plane.ngff import slide_ome

        root = init_store(store)
        if (root / "slides" / name).exists():
            raise SyntheticError(f"'{name}' is a slide of store '{root}': give the synthetic set another --name")
        path = root / KIND / name
        if (path / "zarr.json").is_file():
            existing = {k: v for k, v in zarr.open_group(str(path), mode="r").attrs["tessera"].items() if k in spec}
            if existing != spec:
                differ = ", ".join(f"{k} {existing.get(k)!r} (asked {spec[k]!r})" for k in spec
                                   if existing.get(k) != spec[k])
                raise SyntheticError(f"synthetic set '{name}' of store '{root}' was made with other settings: "
                                     f"{differ}. Give another --name, or the same settings to resume it")
            created_by = zarr.open_group(str(path), mode="r").attrs["tessera"].get("created_by")
            if not resume and created_by != job_identity()["job"]:  # ranks of the creating job carry on
                raise SyntheticError(f"synthetic set '{name}' already exists in store '{root}': add --resume to "
                                     f"complete it (tiles already written are kept), or give another --name")
            return cls(root, name)
        ensure_group(root / KIND)
        count, tile = int(spec["count"]), int(spec["tile"])
        columns = math.ceil(math.sqrt(count))
        rows = math.ceil(count / columns)
        import shutil

        partial = own(root, "partial", f"{KIND}-{name}.{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        group = zarr.open_group(str(partial), mode="w")
        group.create_array("0", shape=(3, rows * tile, columns * tile), chunks=(3, tile, tile), dtype="uint8",
                           fill_value=BACKGROUND, dimension_names=["c", "y", "x"],
                           compressors=BloscCodec(cname="zstd", clevel=5, shuffle=BloscShuffle.bitshuffle))
        group.attrs.update({"ome": slide_ome(name, 1, None),
                            "tessera": {**spec, "kind": KIND, "columns": columns, "complete": False,
                                        "created_by": job_identity()["job"]}})
        if source is not None:
            books = own(root, KIND, name)
            books.mkdir(parents=True, exist_ok=True)
            import pyarrow as pa

            atomic_write_parquet(pa.Table.from_pandas(source, preserve_index=False), books / "source.parquet")
        try:
            partial.rename(path)  # the set appears whole (metadata and empty array) or not at all
        except OSError:  # another rank of this job created it first
            shutil.rmtree(partial, ignore_errors=True)
            return cls.open(store, name, spec, resume)
        return cls(root, name)

    # ------------------------------------------------------------------------------ the lock

    def lock(self) -> None:
        """Take the set for this job; another live job holding it is refused."""
        self.books.mkdir(parents=True, exist_ok=True)
        path = self.books / "job.json"
        me = job_identity()
        if path.is_file():
            try:
                held, touched = json.loads(path.read_text()), path.stat().st_mtime
            except (json.JSONDecodeError, FileNotFoundError):
                held, touched = {}, None
            if held.get("job") not in (None, me["job"]) and _alive(held, touched):
                raise SyntheticError(
                    f"synthetic set '{self.name}' of store '{self.root}' is being written by job {held['job']} "
                    f"(host {held.get('host')}, pid {held.get('pid')}): wait for it to finish, or stop it; if it is "
                    f"gone, remove {path}")
            if held.get("job") == me["job"]:
                return
        atomic_write_text(path, json.dumps(me))

    def heartbeat(self) -> None:
        try:
            os.utime(self.books / "job.json")
        except FileNotFoundError:
            pass  # another rank completed the set and released the lock: nothing left to guard

    def unlock(self) -> None:
        path = self.books / "job.json"
        try:
            if json.loads(path.read_text()).get("job") == job_identity()["job"]:
                path.unlink()
        except (FileNotFoundError, json.JSONDecodeError):
            pass

    # ------------------------------------------------------------------------------ tiles

    def _chunk_path(self, index: int) -> Path:
        key = self.array.metadata.chunk_key_encoding.encode_chunk_key((0, index // self.columns, index % self.columns))
        return self.path / "0" / key

    def write(self, index: int, pixels: np.ndarray) -> None:
        """Tile ``index`` ((3, T, T) uint8) as its chunk file, atomically."""
        if self._encoder is None:
            from numcodecs import Blosc

            # The same bytes zarr's BloscCodec(zstd, 5, bitshuffle) writes for uint8: zarr reads them back.
            self._encoder = Blosc(cname="zstd", clevel=5, shuffle=Blosc.BITSHUFFLE)
        path = self._chunk_path(index)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self._encoder.encode(np.ascontiguousarray(pixels, np.uint8))
        atomic_write(path, lambda partial: partial.write_bytes(data))

    def record(self, rank: int, indices: list[int], values: list[float] | None = None) -> None:
        """Mark tiles whose chunks are on disk; after :meth:`write`, never before. ``values``: a number per
        tile kept with it (a projection's distance), written before the mark."""
        if values is not None:
            folder = self.books / "values"
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / f"{rank}-{indices[0]}.npy",
                         lambda p: np.save(open(p, "wb"), np.stack([np.asarray(indices, np.float64),
                                                                   np.asarray(values, np.float64)])))
        folder = self.books / "done"
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write(folder / f"{rank}-{indices[0]}.npy", lambda p: np.save(open(p, "wb"), np.asarray(indices, np.int64)))

    def done(self) -> np.ndarray:
        """Boolean per tile: recorded and its chunk file present (both, so neither a lost record nor a lost
        chunk passes for a tile)."""
        count = int(self.spec["count"])
        flags = np.zeros(count, bool)
        folder = self.books / "done"
        for path in folder.glob("*.npy") if folder.is_dir() else []:
            try:
                flags[np.load(path).astype(np.int64)] = True
            except (ValueError, OSError):
                continue  # a record cut short by a kill: its tiles are redone
        for index in np.flatnonzero(flags):
            if not self._chunk_path(int(index)).is_file():
                flags[index] = False
        return flags

    def values(self) -> np.ndarray:
        """The number kept with each tile (NaN where none)."""
        out = np.full(int(self.spec["count"]), np.nan)
        folder = self.books / "values"
        for path in folder.glob("*.npy") if folder.is_dir() else []:
            indices, values = np.load(path)
            out[indices.astype(np.int64)] = values
        return out

    # ------------------------------------------------------------------------------ completion

    def rows(self):
        """The set's rows of the tile index: where each tile sits in the mosaic, then what it is (a seed's
        generated tile, or the reconstruction of a source tile with its distance)."""
        import pyarrow as pa

        count, tile = int(self.spec["count"]), self.tile
        index = np.arange(count)
        n = count
        columns = {
            "slide_id": pa.array([self.name] * n, pa.string()),
            "level": pa.array(np.zeros(n), pa.int8()),
            "y": pa.array((index // self.columns) * tile, pa.int64()),
            "x": pa.array((index % self.columns) * tile, pa.int64()),
            "size": pa.array(np.full(n, tile), pa.int32()),
            "out_size": pa.array(np.full(n, tile), pa.int32()),
        }
        if self.spec.get("mode") == "project":
            import pyarrow.parquet as pq

            source = pq.read_table(self.books / "source.parquet").to_pandas()
            columns.update({
                "tissue_fraction": pa.array(source["tissue_fraction"].to_numpy(np.float32)),
                "annotation_fraction": pa.array(source["annotation_fraction"].to_numpy(np.float32)),
                "label": pa.array(source["label"].tolist(), pa.string()),
                "split": pa.array(source["split"].tolist(), pa.string()),
                "group": pa.array(source["group"].tolist(), pa.string()),
                "kind": pa.array(["reconstruction"] * n, pa.string()),
                "source_slide_id": pa.array(source["slide_id"].tolist(), pa.string()),
                "source_y": pa.array(source["y"].to_numpy(np.int64)),
                "source_x": pa.array(source["x"].to_numpy(np.int64)),
                "distance": pa.array(self.values().astype(np.float32)),
            })
        else:
            columns.update({
                "tissue_fraction": pa.array(np.ones(n, np.float32)),
                "annotation_fraction": pa.array(np.full(n, np.nan, np.float32)),
                "label": pa.array(["normal"] * n, pa.string()),
                "split": pa.array([self.spec["split"]] * n, pa.string()),
                "group": pa.array([KIND] * n, pa.string()),
                "kind": pa.array([KIND] * n, pa.string()),
                "seed": pa.array(int(self.spec["seed0"]) + index, pa.int64()),
                "psi": pa.array(np.full(n, float(self.spec["psi"])), pa.float32()),
            })
        columns["run"] = pa.array([self.spec["run"]] * n, pa.string())
        columns["snapshot"] = pa.array([self.spec["snapshot"]] * n, pa.string())
        return pa.table(columns)

    def complete(self) -> bool:
        """When every tile is on disk: write the set's index rows (and a projection's heatmaps), mark it
        complete and rebuild the store's tile index; returns whether the set is complete. Idempotent."""
        if self.spec.get("complete"):
            return True
        if not self.done().all():
            return False
        # One rank completes; another that found every tile at the same moment leaves it to that one.
        marker = self.books / "completing"
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder = marker.read_text().strip()
            if holder and _alive({"host": socket.gethostname(), "pid": holder}):
                return False
            marker.unlink(missing_ok=True)  # left by a completer that died: take over
            return self.complete()
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        try:
            self._finish()
        finally:
            marker.unlink(missing_ok=True)
        return True

    def _finish(self) -> None:
        from data_plane.store import rebuild_tile_index

        rows = self.rows()
        if self.spec.get("mode") == "project":
            _heatmaps_of(self.root, self.name, rows.to_pandas())
        atomic_write_parquet(rows, own(self.root, KIND, f"{self.name}.parquet"))
        self.group.attrs["tessera"] = {**self.spec, "complete": True}
        self.spec["complete"] = True
        rebuild_tile_index(self.root)


def _heatmaps_of(store, name: str, rows) -> None:
    """Per source slide, the projection distances stitched into ``heatmaps/<name>`` (eval's heatmaps)."""
    from data_plane.heatmap import write_heatmap
    from data_plane.store import read_tile_index

    index = read_tile_index(store)
    for slide, part in rows.groupby("source_slide_id"):
        first = index[(index["slide_id"] == slide)].iloc[0]
        footprint = float(first["size"] * 2 ** int(first["level"]))
        write_heatmap(store, slide, name, part[["source_y", "source_x"]].to_numpy(), footprint,
                      scores=part["distance"].to_numpy(float))


def complete_sets(store) -> list[str]:
    """Names of the store's complete synthetic sets (their rows are part of tiles.parquet)."""
    root = store_path(store)
    folder = root / KIND
    if not folder.is_dir():
        return []
    names = []
    for path in sorted(p for p in folder.iterdir() if (p / "zarr.json").is_file()):
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("tessera", {})
        if attrs.get("complete") and own(root, KIND, f"{path.name}.parquet").is_file():
            names.append(path.name)
    return names
