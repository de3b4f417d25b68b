"""Ingest cost against a plain decode of the same slide, and when the store pays for itself.

    python bench/ingest.py [--work DIR] [--sides 8192,20480] [--passes 5] [--tile 256] [--reads 400]

For each slide side (pyramidal JPEG TIFFs of real H&E texture over a disc of tissue, as bench/tiles.py
makes them), A and B alternate in every pass, each in its own process (CPU time and peak RSS from
wait4, wall time around it):
  (A) `tessera ingest SLIDE --store S` (one slide, in-process: pyramid, tissue mask, tile index);
  (B) a plain OpenSlide decode pass over the same tissue chunks: read_region of every level-0 chunk
      that A wrote, converted to RGB arrays, nothing kept — the least any reader of these tiles pays once.
Reported: median and spread (min-max) of CPU seconds, wall seconds and peak RSS per case, the store's
size against the slide file's, the bytes written per tissue tile, and the amortisation point: the
tile reads (OpenSlide read_region against the store's chunk read, interleaved, CPU time per tile,
`--reads` random tissue tiles a pass) after which the store's cheaper reads have paid its ingest, in
epochs over the slide's tissue tiles. The goals of issue 28 print as PASS/FAIL lines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # before bench/: bench/tune.py would shadow the tune package

DECODE = """
import sys, openslide, numpy as np
slide = openslide.OpenSlide(sys.argv[1]); chunk = int(sys.argv[2])
for line in open(sys.argv[3]):
    cy, cx = map(int, line.split())
    np.asarray(slide.read_region((cx * chunk, cy * chunk), 0, (chunk, chunk)).convert("RGB"))
"""


def measured(command: list[str]) -> dict:
    """Run ``command``; its CPU seconds (user + sys), wall seconds and peak RSS (MiB), from wait4."""
    import tempfile

    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: a chatty child cannot fill it and stall
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, text=True,
                                   env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        if status != 0:
            errors.seek(0)
            raise SystemExit(f"{' '.join(command)} failed: {errors.read()[-2000:]}")
    return {"cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall, "peak_mib": usage.ru_maxrss / 1024}


def tissue_chunks(store: Path) -> list[tuple[int, int]]:
    """(row, column) of every level-0 chunk the ingest wrote: the slide's tissue."""
    (level0,) = store.glob("slides/*/0/c/0")
    return sorted((int(p.parent.name), int(p.name)) for p in level0.glob("*/*"))


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def read_costs(slide: Path, store: Path, tile: int, count: int, passes: int) -> dict:
    """CPU seconds per tile: OpenSlide read_region + RGB against the store's chunk read, interleaved."""
    import openslide
    import zarr

    from data_plane.store import LevelReader

    (level,) = [p for p in store.glob("slides/*/0") if p.is_dir()]
    reader = LevelReader(zarr.open_array(str(level), mode="r"))
    cells = tissue_chunks(store)
    times = {"openslide": [], "store": []}
    with openslide.OpenSlide(str(slide)) as handle:
        for p in range(passes):
            pick = [cells[i] for i in np.random.default_rng(p).choice(len(cells), min(count, len(cells)), replace=False)]
            for name in ("openslide", "store") if p % 2 == 0 else ("store", "openslide"):
                started = time.process_time()
                for cy, cx in pick:
                    if name == "openslide":
                        np.asarray(handle.read_region((cx * tile, cy * tile), 0, (tile, tile)).convert("RGB"))
                    else:
                        reader.read(cy * tile, cx * tile, tile, tile)
                times[name].append((time.process_time() - started) / len(pick))
    return {name: float(np.median(values)) for name, values in times.items()}


def bench_side(work: Path, side: int, tile: int, passes: int, reads: int) -> dict:
    from bench.tiles import make_slide

    slide = make_slide(work / f"ingest-{side}.svs", side)
    store = work / f"ingest-{side}.zarr"
    chunks_file = work / f"ingest-{side}.chunks"
    ingest = [sys.executable, "-m", "tessera.cli", "ingest", str(slide), "--store", str(store),
              "--set", "data.tiles.magnification=null", "--set", f"data.tiles.size={tile}"]
    runs = {"ingest": [], "decode": []}
    for p in range(passes):
        order = ("ingest", "decode") if p % 2 == 0 else ("decode", "ingest")
        for name in order:
            if name == "ingest":
                shutil.rmtree(store, ignore_errors=True)
                runs["ingest"].append(measured(ingest))
                chunks_file.write_text("".join(f"{cy} {cx}\n" for cy, cx in tissue_chunks(store)))
            elif chunks_file.is_file():
                runs["decode"].append(measured([sys.executable, "-c", DECODE, str(slide), str(tile), str(chunks_file)]))
    tiles = len(tissue_chunks(store))
    summary = {name: {key: {"median": float(np.median([r[key] for r in values])),
                            "min": float(np.min([r[key] for r in values])), "max": float(np.max([r[key] for r in values]))}
                      for key in ("cpu_s", "wall_s", "peak_mib")} for name, values in runs.items()}
    costs = read_costs(slide, store, tile, reads, passes)
    saved = costs["openslide"] - costs["store"]
    ingest_cpu = summary["ingest"]["cpu_s"]["median"]
    return {"side": side, "tile": tile, "passes": passes, "tissue_tiles": tiles, **summary,
            "ratio_cpu": ingest_cpu / summary["decode"]["cpu_s"]["median"],
            "slide_mib": slide.stat().st_size / 2**20, "store_mib": folder_bytes(store) / 2**20,
            "bytes_per_tile": folder_bytes(store) / tiles, "read_cpu_ms": {k: v * 1000 for k, v in costs.items()},
            "break_even_epochs": ingest_cpu / (tiles * saved) if saved > 0 else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench")
    parser.add_argument("--sides", default="8192,20480")
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--tile", type=int, default=256)
    parser.add_argument("--reads", type=int, default=400)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"# bench/ingest.py, load average {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}, {os.cpu_count()} CPUs, "
          f"{args.passes} passes interleaved; figures median [min-max]", flush=True)
    results = []
    for side in map(int, args.sides.split(",")):
        r = bench_side(args.work, side, args.tile, args.passes, args.reads)
        results.append(r)

        def cell(case, key, unit=""):
            v = r[case][key]
            return f"{v['median']:.1f}{unit} [{v['min']:.1f}-{v['max']:.1f}]"

        print(f"\n{side}² slide ({r['slide_mib']:.0f} MiB JPEG), {r['tissue_tiles']} tissue tiles of {args.tile}²:")
        for case in ("ingest", "decode"):
            print(f"  {case:<7} CPU {cell(case, 'cpu_s', ' s')}, wall {cell(case, 'wall_s', ' s')}, "
                  f"peak RSS {cell(case, 'peak_mib', ' MiB')}")
        print(f"  ingest / decode CPU: {r['ratio_cpu']:.2f}x; store {r['store_mib']:.0f} MiB "
              f"({r['store_mib'] / r['slide_mib']:.1f}x the JPEG), {r['bytes_per_tile'] / 1024:.0f} KiB per tissue tile")
        ms = r["read_cpu_ms"]
        epochs = r["break_even_epochs"]
        print(f"  a tile read: OpenSlide {ms['openslide']:.2f} ms, store {ms['store']:.2f} ms CPU "
              f"({ms['openslide'] / ms['store']:.1f}x); the ingest pays for itself after "
              f"{'never' if epochs is None else f'{epochs:.1f} epochs'} of reads", flush=True)
    print()
    for r in results:
        print(f"{'PASS' if r['ratio_cpu'] <= 3 else 'FAIL'}: ingest <= 3x a plain decode pass, CPU "
              f"({r['side']}²: {r['ratio_cpu']:.2f}x)")
        peak = r["ingest"]["peak_mib"]["max"]
        print(f"{'PASS' if peak <= 300 else 'FAIL'}: ingest peak RSS <= 300 MB ({r['side']}²: {peak:.0f} MiB)")
    if len(results) > 1:
        low, high = results[0]["ingest"]["peak_mib"]["median"], results[-1]["ingest"]["peak_mib"]["median"]
        print(f"{'PASS' if high <= 1.25 * low else 'FAIL'}: peak RSS flat with slide size "
              f"({results[0]['side']}² {low:.0f} MiB, {results[-1]['side']}² {high:.0f} MiB)")
    (args.work / "ingest.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
