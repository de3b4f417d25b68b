"""Tile reads: the store's stream against the readers a user would otherwise pick, interleaved.

    pip install -e ".[bench]"      # tiffslide, the tifffile-based alternative to OpenSlide
    python bench/tiles.py [--work DIR] [--slide-side 16384] [--passes 5] [--tiles 600]

Same tile coordinates (random chunk-aligned level-0 tissue tiles of a slide too large for OpenSlide's
tile cache to hold), 256² and 512², each reader handing over what a training step needs, a (3, t, t)
uint8 tensor (floats are made on the device by every reader alike):
  (a) tessera's TileStream over the store;
  (b) openslide.read_region in a map-style Dataset (the usual hand-written reader);
  (c) tiffslide.read_region, the same in pure Python over tifffile + imagecodecs;
  (d) MONAI's PatchWSIDataset with its openslide backend (float32 output: MONAI's own choice);
  (e) the decode limit: the same Blosc chunks, already in memory, decoded in a tight loop.
Every pass runs each reader once, in its own process, in an order rotated from pass to pass (so the
machine's other load falls on all readers alike), in-process (`readers 1`) and with 2 DataLoader
workers (`readers 2`). Reported per reader: CPU time per tile (process and workers) and tiles/s of wall
time, median and min-max over the passes; the ratios use medians. Pixels are checked equal first:
the store's tiles are OpenSlide's to the bit; tiffslide's decoder may round differently (reported).
The ingest cost and its amortisation are bench/ingest.py's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
MEMORY = None  # the PeakRSS sampler of a case process
sys.path.insert(0, str(ROOT))


class PeakRSS:
    """Peak resident memory of this process plus its children (dataloader workers), sampled.

    ``ru_maxrss`` cannot be used: Linux keeps it across fork and exec, so a case would inherit its
    parent's peak, and children report their maxima separately rather than their sum.
    """

    def __init__(self, interval: float = 0.02):
        import threading

        import psutil

        self.peak = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(interval,), daemon=True)
        self._thread.start()

    def _run(self, interval: float) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            for proc in [self._process, *self._process.children(recursive=True)]:
                try:
                    total += proc.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self._stop.wait(interval)

    def mib(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20


def make_slide(path: Path, side: int) -> Path:
    from PIL import Image

    from data_plane.sample_data import fetch_sample_data
    from data_plane.tiff_writer import texture_tile_fn, write_pyramidal_tiff

    if path.exists():
        return path
    with Image.open(fetch_sample_data().he_target) as image:
        texture = np.asarray(image.convert("RGB"))
    centre, radius = side / 2, side * 0.45
    tissue = texture_tile_fn(texture, lambda r, c: (r - centre) ** 2 + (c - centre) ** 2 < radius ** 2)
    partial = path.with_name("partial-" + path.name)
    write_pyramidal_tiff(partial, side, side, tissue)
    partial.replace(path)
    return path


def ingest_store(slide: Path, store: Path, size: int) -> None:
    from data_plane.ingest import ingest, resolve_sources
    from tessera.config import load_config

    config = load_config(None, ["data.tiles.magnification=null", f"data.tiles.size={size}",
                                "data.tiles.min_tissue_fraction=0.5"]).data
    report = ingest(resolve_sources([str(slide)]), store, config, show_progress=False)
    if report.failed:
        raise SystemExit(f"ingest failed: {report.failed}")


def coordinates(store: Path, count: int, seed: int = 0) -> np.ndarray:
    from data_plane.store import read_tile_index

    tiles = read_tile_index(store)
    pick = np.random.default_rng(seed).choice(len(tiles), size=min(count, len(tiles)), replace=False)
    return tiles.iloc[pick][["y", "x"]].to_numpy()


# ------------------------------------------------------------------------------------------ one case

class SlideTiles:
    """A map-style Dataset over OpenSlide or tiffslide: (3, t, t) uint8 tensors, as a user writes it."""

    def __init__(self, library: str, slide, yx, size):
        self.library, self.slide, self.yx, self.size, self.handle = library, str(slide), yx, size, None

    def __len__(self):
        return len(self.yx)

    def __getitem__(self, i):
        import torch

        y, x = (int(v) for v in self.yx[i])
        if self.library == "openslide":
            import openslide

            self.handle = self.handle or openslide.OpenSlide(self.slide)
            rgb = np.asarray(self.handle.read_region((x, y), 0, (self.size, self.size)).convert("RGB"))
        else:
            import tiffslide

            self.handle = self.handle or tiffslide.TiffSlide(self.slide)
            rgb = self.handle.read_region((x, y), 0, (self.size, self.size), as_array=True)[..., :3]
        return torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1)))


def cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (the DataLoader's workers)."""
    import resource

    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def run_case(method: str, slide: Path, store: Path, yx: np.ndarray, size: int, workers: int) -> dict:
    """One pass of one reader over the tiles: CPU seconds per tile and tiles per wall second."""
    import pandas as pd
    from torch.utils.data import DataLoader

    if method == "decode":
        import zarr
        from numcodecs import Blosc

        array = zarr.open_array(str(store / "slides" / slide.stem / "0"), mode="r")
        folder = Path(str(array.store.root)) / array.path
        ch, cw = array.chunks[1:]  # chunks are whole RGB tiles (3, t, t)
        blobs = [(folder / f"c/0/{y // ch}/{x // cw}").read_bytes() for y, x in yx]
        codec = Blosc()
        cpu, started = cpu_seconds(), time.perf_counter()
        for blob in blobs:
            codec.decode(blob)
        wall, cpu = time.perf_counter() - started, cpu_seconds() - cpu
        return {"cpu_ms": cpu / len(yx) * 1000, "tiles_per_s": len(yx) / wall, "peak_rss_mib": MEMORY.mib()}
    if method == "zarr":
        from data_plane.config import StreamConfig
        from data_plane.stream import TileStream

        dataset = TileStream(store, StreamConfig(min_tissue_fraction=0.0), shuffle=False)
        # Same tiles, same order as the other readers.
        index = pd.MultiIndex.from_frame(dataset.tiles[["y", "x"]])
        dataset.tiles = dataset.tiles.iloc[index.get_indexer(pd.MultiIndex.from_arrays([yx[:, 0], yx[:, 1]]))]
        dataset.tiles = dataset.tiles.reset_index(drop=True)
    elif method in ("openslide", "tiffslide"):
        dataset = SlideTiles(method, slide, yx, size)
    else:
        from monai.data import PatchWSIDataset

        data = [{"image": str(slide), "location": [int(y), int(x)], "label": 0} for y, x in yx]
        dataset = PatchWSIDataset(data, patch_size=size, patch_level=0, center_location=False, reader="openslide",
                                  include_label=False)
    loader = DataLoader(dataset, batch_size=16, num_workers=0 if workers == 1 else workers, persistent_workers=False)
    # In-process, the first batch is a warm-up left out of the figures (imports, opening the files, the
    # tile index), the same for every reader; with workers the whole pass counts, their start included,
    # because their CPU time is only known once they are reaped.
    batches = iter(loader)
    if workers == 1:
        next(batches)
    cpu, started, count = cpu_seconds(), time.perf_counter(), 0
    for batch in batches:
        count += len(batch["image"] if isinstance(batch, dict) else batch)
    del batches, loader  # its workers are reaped, so their CPU time reaches RUSAGE_CHILDREN
    wall = time.perf_counter() - started
    cpu = cpu_seconds() - cpu
    return {"cpu_ms": cpu / count * 1000, "tiles_per_s": count / wall, "peak_rss_mib": MEMORY.mib()}


def case_in_subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--case", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise SystemExit(f"case {args[:5]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_same_pixels(slide: Path, store: Path, yx: np.ndarray, size: int) -> str:
    """The store's tiles must be OpenSlide's to the bit before any reader is timed; returns how far
    tiffslide's (another JPEG decoder) are."""
    import openslide
    import tiffslide

    from data_plane.config import StreamConfig
    from data_plane.stream import TileStream

    worst = 0
    stream = TileStream(store, StreamConfig(min_tissue_fraction=0.0), shuffle=False)
    with openslide.OpenSlide(str(slide)) as handle, tiffslide.TiffSlide(str(slide)) as other:
        for y, x in yx[:20]:
            y, x = int(y), int(x)
            row = stream.tiles.index[(stream.tiles["y"] == y) & (stream.tiles["x"] == x)][0]
            one = TileStream(store, StreamConfig(min_tissue_fraction=0.0), shuffle=False)
            one.tiles = stream.tiles.iloc[[row]].reset_index(drop=True)
            ours = next(iter(one))["image"].numpy().transpose(1, 2, 0)
            direct = np.asarray(handle.read_region((x, y), 0, (size, size)).convert("RGB"))
            assert np.array_equal(ours, direct), "store pixels differ from OpenSlide's"
            theirs = other.read_region((x, y), 0, (size, size), as_array=True)[..., :3]
            worst = max(worst, int(np.abs(theirs.astype(int) - direct).max()))
    return f"store == OpenSlide bit for bit on 20 tiles; tiffslide within {worst} grey levels of OpenSlide"


READERS = ("zarr", "openslide", "tiffslide", "monai-openslide", "decode")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--slide-side", type=int, default=16384)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--tiles", type=int, default=600, help="tiles per reader and pass")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        global MEMORY
        MEMORY = PeakRSS()
        method, slide, store, size, workers = args.case[:5]
        yx = np.array(json.loads(args.case[5]))
        print(json.dumps(run_case(method, Path(slide), Path(store), yx, int(size), int(workers))))
        return

    load = os.getloadavg()
    print(f"# bench/tiles.py: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs, "
          f"{args.passes} passes, readers interleaved (rotated order), {args.tiles} tiles each", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    slide = make_slide(args.work / f"bench-{args.slide_side}.svs", args.slide_side)
    table, verdicts = [], []
    for size in (256, 512):
        store = args.work / f"bench-{args.slide_side}-{size}.zarr"
        if not (store / ".tessera" / "tiles.parquet").exists():
            ingest_store(slide, store, size)
        yx = coordinates(store, args.tiles)
        print(f"{size}²: {check_same_pixels(slide, store, yx, size)}", flush=True)
        for workers in (1, 2):
            readers = [r for r in READERS if not (r == "decode" and workers == 2)]
            runs = {r: [] for r in readers}
            for p in range(args.passes):
                for method in readers[p % len(readers):] + readers[:p % len(readers)]:
                    case = [method, str(slide), str(store), str(size), str(workers), json.dumps(yx.tolist())]
                    runs[method].append(case_in_subprocess(case))
            stats = {r: {k: (float(np.median([v[k] for v in values])), float(np.min([v[k] for v in values])),
                             float(np.max([v[k] for v in values]))) for k in ("cpu_ms", "tiles_per_s", "peak_rss_mib")}
                     for r, values in runs.items()}
            table.append((size, workers, stats))
            print(f"[{size}² x{workers}] " + "  ".join(f"{r} {s['cpu_ms'][0]:.2f} ms CPU, {s['tiles_per_s'][0]:.0f}/s"
                                                        for r, s in stats.items()), flush=True)
            if workers == 1:
                for baseline, goal in (("openslide", 5), ("tiffslide", 3)):
                    ratio = stats[baseline]["cpu_ms"][0] / stats["zarr"]["cpu_ms"][0]
                    verdicts.append(f"{'PASS' if ratio >= goal else 'FAIL'}: stream items >= {goal}x {baseline} at "
                                    f"{size}², CPU per tile ({ratio:.2f}x)")

    print(f"\nslide {slide.name}: {args.slide_side}² level 0, tiles at random chunk-aligned tissue positions; "
          "figures: median [min-max] over the passes\n")
    print("| tile | readers | reader | CPU ms / tile | tiles/s (wall) | peak RSS MiB | CPU vs (a) |")
    print("|---|---|---|---|---|---|---|")
    for size, workers, stats in table:
        ours = stats["zarr"]["cpu_ms"][0]
        for reader, s in stats.items():
            cpu, rate, rss = s["cpu_ms"], s["tiles_per_s"], s["peak_rss_mib"]
            print(f"| {size}² | {workers} | {reader} | {cpu[0]:.2f} [{cpu[1]:.2f}-{cpu[2]:.2f}] | {rate[0]:.0f} "
                  f"[{rate[1]:.0f}-{rate[2]:.0f}] | {rss[0]:.0f} | {cpu[0] / ours:.2f}x |")
    print()
    print("\n".join(verdicts))
    (args.work / "tiles.json").write_text(json.dumps([{"size": s, "workers": w, "stats": st} for s, w, st in table]))


if __name__ == "__main__":
    main()
