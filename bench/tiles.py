"""Tile read throughput: the Zarr stream against what a user would otherwise use.

    python bench/tiles.py [--work DIR] [--slide-side 16384] [--big-side 50000] [--skip-big]

Same tile coordinates (random access, chunk-aligned level-0 tiles from the tile index), 256² and
512², with 1 reader (in-process) and 2 dataloader workers:
  (a) tessera's TileStream over the store,
  (b) openslide.read_region directly (a map-style Dataset),
  (c) MONAI PatchWSIDataset with its openslide and tifffile backends,
  (d) the decode limit: the same Blosc chunks, already in memory, decoded in a tight loop.
Each case runs in its own process, so its peak RSS (process + dataloader workers) is its own, and
reports the best of 3 passes (MONAI's tifffile backend: one pass, it is ~1000x slower).
Then ingests a --big-side² pyramidal TIFF and reports its peak RSS.

The slides are made from real H&E pixels (tiatoolbox's target image, via `tessera sample-data`)
tiled over a disc of tissue, written as Aperio-style JPEG pyramidal TIFFs that OpenSlide reads.
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
REPEATS = 3    # passes per case; the best counts (the machine's other load only ever slows a pass)
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

class OpenSlideTiles:
    def __init__(self, slide, yx, size, tuned=False):
        self.slide, self.yx, self.size, self.handle = str(slide), yx, size, None
        self.tuned = tuned  # the same allocator setting the tessera stream applies (keep_freed_memory)

    def __len__(self):
        return len(self.yx)

    def __getitem__(self, i):
        import openslide
        import torch

        if self.handle is None:
            self.handle = openslide.OpenSlide(self.slide)
            if self.tuned:
                from data_plane.stream import keep_freed_memory

                keep_freed_memory()
        y, x = self.yx[i]
        rgb = np.asarray(self.handle.read_region((int(x), int(y)), 0, (self.size, self.size)).convert("RGB"))
        return torch.from_numpy(rgb.transpose(2, 0, 1).copy()).float().div_(255)


def run_case(method: str, slide: Path, store: Path, yx: np.ndarray, size: int, workers: int) -> dict:
    import pandas as pd
    from torch.utils.data import DataLoader

    if method == "decode":
        import zarr
        from numcodecs import Blosc

        array = zarr.open_array(str(store / "slides" / slide.stem / "0"), mode="r")
        folder = Path(str(array.store.root)) / array.path
        blobs = []
        ch, cw = array.chunks[1:]  # chunks are whole RGB tiles (3, t, t)
        for y, x in yx:
            for cy in range(y // ch, (y + size - 1) // ch + 1):
                for cx in range(x // cw, (x + size - 1) // cw + 1):
                    path = folder / f"c/0/{cy}/{cx}"
                    if path.exists():
                        blobs.append(path.read_bytes())
        codec = Blosc()
        seconds = float("inf")
        for _ in range(REPEATS):
            started = time.perf_counter()
            for blob in blobs:
                codec.decode(blob)
            seconds = min(seconds, time.perf_counter() - started)
        return {"tiles_per_s": len(yx) / seconds, "tiles": len(yx), "peak_rss_mib": MEMORY.mib()}
    if method == "zarr":
        from data_plane.config import StreamConfig
        from data_plane.stream import TileStream

        dataset = TileStream(store, StreamConfig(min_tissue_fraction=0.0), shuffle=False)
        # Same tiles, same order as the other readers.
        index = pd.MultiIndex.from_frame(dataset.tiles[["y", "x"]])
        dataset.tiles = dataset.tiles.iloc[index.get_indexer(pd.MultiIndex.from_arrays([yx[:, 0], yx[:, 1]]))]
        dataset.tiles = dataset.tiles.reset_index(drop=True)
    elif method.startswith("openslide"):
        dataset = OpenSlideTiles(slide, yx, size, tuned=method == "openslide-tuned")
    else:
        from monai.data import PatchWSIDataset

        backend = method.split("-")[1]
        data = [{"image": str(slide), "location": [int(y), int(x)], "label": 0} for y, x in yx]
        dataset = PatchWSIDataset(data, patch_size=size, patch_level=0, center_location=False, reader=backend,
                                  include_label=False)
    loader = DataLoader(dataset, batch_size=16, num_workers=0 if workers == 1 else workers,
                        persistent_workers=False)
    best = 0.0
    for _ in range(1 if method == "monai-tifffile" else REPEATS):  # best of N passes, for every reader alike
        batches = iter(loader)
        next(batches)  # warm-up, the same for every reader: worker start, opening files, first decode
        started = time.perf_counter()
        count = 0
        for batch in batches:
            images = batch["image"] if isinstance(batch, dict) else batch
            count += len(images)
        best = max(best, count / (time.perf_counter() - started))
    return {"tiles_per_s": best, "tiles": count, "peak_rss_mib": MEMORY.mib()}


def case_in_subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--case", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise SystemExit(f"case {args[:5]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_same_pixels(slide: Path, store: Path, yx: np.ndarray, size: int) -> None:
    """All readers must return the same pixels (up to JPEG decoder rounding) before any is timed."""
    from monai.data import WSIReader

    from data_plane.config import StreamConfig
    from data_plane.stream import TileStream

    import openslide

    y, x = (int(v) for v in yx[0])
    stream = TileStream(store, StreamConfig(min_tissue_fraction=0.0), shuffle=False)
    row = stream.tiles.index[(stream.tiles["y"] == y) & (stream.tiles["x"] == x)][0]
    stream.tiles = stream.tiles.iloc[[row]].reset_index(drop=True)
    ours = (next(iter(stream))["image"].numpy().transpose(1, 2, 0) * 255).round()
    with openslide.OpenSlide(str(slide)) as handle:
        direct = np.asarray(handle.read_region((x, y), 0, (size, size)).convert("RGB")).astype(float)
    assert np.abs(ours - direct).max() == 0, "store pixels differ from OpenSlide's"
    for backend in ("openslide", "tifffile"):
        reader = WSIReader(backend=backend)
        patch, _ = reader.get_data(reader.read(str(slide)), location=(y, x), size=(size, size), level=0)
        assert np.abs(np.asarray(patch).transpose(1, 2, 0) - direct).mean() < 2, backend


def measure_big_ingest(work: Path, side: int) -> dict:
    slide = work / f"big-{side}.svs"
    started = time.perf_counter()
    make_slide(slide, side)
    made = time.perf_counter() - started
    store = work / f"big-{side}.zarr"
    subprocess.run(["rm", "-rf", str(store)], check=True)
    result = case_in_subprocess(["ingest", str(slide), str(store), "256", "1"])
    result["make_slide_s"] = made
    result["slide_gib"] = slide.stat().st_size / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--slide-side", type=int, default=16384)
    parser.add_argument("--big-side", type=int, default=50000)
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--tiles", type=int, default=1500, help="tiles per case (fewer for slow readers)")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.case:
        global MEMORY
        MEMORY = PeakRSS()
        method, slide, store, size, workers = args.case[:5]
        if method == "ingest":
            started = time.perf_counter()
            ingest_store(Path(slide), Path(store), int(size))
            print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mib": MEMORY.mib()}))
            return
        yx = np.array(json.loads(args.case[5]))
        print(json.dumps(run_case(method, Path(slide), Path(store), yx, int(size), int(workers))))
        return

    args.work.mkdir(parents=True, exist_ok=True)
    slide = make_slide(args.work / f"bench-{args.slide_side}.svs", args.slide_side)
    rows = []
    slow = {"monai-tifffile": 48}  # decodes the whole level per patch: a few batches tell its rate
    for size in (256, 512):
        store = args.work / f"bench-{args.slide_side}-{size}.zarr"
        if not (store / ".tessera" / "tiles.parquet").exists():
            ingest_store(slide, store, size)
        yx = coordinates(store, args.tiles)
        check_same_pixels(slide, store, yx, size)
        for workers in (1, 2):
            result = {}
            for method in ("zarr", "openslide", "openslide-tuned", "monai-openslide", "monai-tifffile", "decode"):
                if method == "decode" and workers == 2:
                    continue
                count = slow.get(method, args.tiles)
                case = [method, str(slide), str(store), str(size), str(workers), json.dumps(yx[:count].tolist())]
                result[method] = case_in_subprocess(case)
            rows.append((size, workers, result))
            line = "  ".join(f"{m} {r['tiles_per_s']:.0f}/s" for m, r in result.items())
            print(f"[{size}² x{workers}] {line}", flush=True)

    decode = {size: r["decode"]["tiles_per_s"] for size, w, r in rows if w == 1}
    print(f"\nslide {slide.name}: {args.slide_side}² level 0, tiles at random chunk-aligned positions\n")
    print("(b') is (b) with the allocator setting the tessera stream applies (keep_freed_memory).\n")
    print("| tile | readers | (a) zarr stream | (b) openslide | (b') openslide tuned | (c) MONAI openslide "
          "| (c) MONAI tifffile | (d) decode limit | a/b | a/b' | a/c openslide | a/c tifffile | a/d "
          "| peak RSS a / b / c-os MiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, workers, r in rows:
        a, b = r["zarr"]["tiles_per_s"], r["openslide"]["tiles_per_s"]
        bt = r["openslide-tuned"]["tiles_per_s"]
        co, ct = r["monai-openslide"]["tiles_per_s"], r["monai-tifffile"]["tiles_per_s"]
        print(f"| {size}² | {workers} | {a:.0f}/s | {b:.0f}/s | {bt:.0f}/s | {co:.0f}/s | {ct:.1f}/s "
              f"| {decode[size]:.0f}/s | {a / b:.2f} | {a / bt:.2f} | {a / co:.2f} | {a / ct:.0f} | {a / decode[size]:.2f} "
              f"| {r['zarr']['peak_rss_mib']:.0f} / {r['openslide']['peak_rss_mib']:.0f} / "
              f"{r['monai-openslide']['peak_rss_mib']:.0f} |")
    if not args.skip_big:
        big = measure_big_ingest(args.work, args.big_side)
        print(f"\ningest of a {args.big_side}² pyramidal TIFF ({big['slide_gib']:.2f} GiB JPEG, made in "
              f"{big['make_slide_s']:.0f} s): {big['seconds']:.0f} s, peak RSS {big['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
