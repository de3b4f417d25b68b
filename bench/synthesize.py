"""`tessera synthesize` throughput: tiles/s with 1 and 2 processes, the share of time spent writing,
and peak memory against the number of tiles; then a large set read back by the tile stream.

    python bench/synthesize.py [--work DIR] [--count 2000] [--repeats 3] [--big 0]
    python bench/synthesize.py --gpu [--resolution 512] [--config E] [--scaling 1,2,4,8]

CPU mode: a 64² generator of configs/stylegan2_cpu.yaml (trained one step: speed does not depend on
the weights), the same N tiles made by 1 and by 2 processes, A and B interleaved ``--repeats`` times
into fresh stores; wall time, CPU time of all processes, median and spread. Memory: peak RSS of one
process for N and 4N tiles (flat: tiles go to disk as they are made). ``--big N`` then makes N tiles
with 2 processes into one store and streams them back with TileStream, against the stream's rate on
the sample slide's ingested tiles of the same size.

GPU mode: one StyleGAN2 (config E or F) at ``--resolution`` synthesising with 1, 2, … GPUs (torchrun
ranks), tiles/s per GPU and scaling.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def tessera(*args, env=None) -> tuple[float, float, str]:
    """Run a tessera command; returns wall seconds, CPU seconds of it and its children, stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "tessera.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"tessera {' '.join(map(str, args[:3]))} failed:\n{done.stderr[-3000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def generator_run(work: Path, resolution: int = 64, gpu: bool = False, config: str = "E") -> Path:
    run = work / f"g{resolution}{'-gpu' if gpu else ''}"
    if (run / "final.pt").is_file():
        return run
    from data_plane.sample_data import fetch_sample_data

    store = work / "sample.zarr"
    if not (store / ".tessera" / "tiles.parquet").exists():
        tessera("ingest", fetch_sample_data().slide, "--store", store)
    recipe = ROOT / "configs" / ("stylegan2_cpu.yaml" if not gpu else "stylegan2_camelyon16.yaml")
    sets = [f"data.store={store}", "train.steps=1", "train.num_workers=0", "train.checkpoint_every=1",
            "method.options.metrics=false", f"method.options.resolution={resolution}",
            "data.stream.crop=random", f"data.stream.crop_size={min(resolution, 256)}", "data.stream.min_tissue_fraction=0.5",
            "train.micro_batch=2"]
    if gpu:
        sets += [f"method.options.config={config}"]
    tessera("train", recipe, "--run-dir", run, *[a for s in sets for a in ("--set", s)])
    return run


def rank_lines(stdout: str) -> dict[int, tuple[int, float, float]]:
    """Each rank's last progress line: tiles made, its loop's tiles/s and writing share (%)."""
    last = {}
    for line in stdout.splitlines():
        if line.strip().startswith("rank ") and "tiles/s" in line and "% of the time" in line:
            rank = int(line.split()[1].rstrip(":"))
            made = int(line.split(":")[1].split("/")[0])
            rate = float(line.split(",")[1].split()[0])
            share = float(line.split("writing ")[1].split("%")[0])
            last[rank] = (made, rate, share)
    return last


def rate_line(stdout: str) -> float | None:
    ranks = rank_lines(stdout)
    return statistics.mean(share for _, _, share in ranks.values()) if ranks else None


def steady_rate(stdout: str) -> float | None:
    """Tiles per second of the generating loops, process start and model load left out: all tiles over
    the longest rank's loop time."""
    ranks = rank_lines(stdout)
    if not ranks:
        return None
    return sum(made for made, _, _ in ranks.values()) / max(made / rate for made, rate, _ in ranks.values())


def peak_rss_mib(run: Path, store: Path, count: int) -> float:
    """Peak RSS of one synthesizing process (a fresh child, so its own)."""
    code = ("import resource, sys; sys.path.insert(0, sys.argv[4]); from trainers.synthesize import synthesize; "
            "synthesize(sys.argv[1], sys.argv[2], int(sys.argv[3]), log=lambda s: None); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)")
    done = subprocess.run([sys.executable, "-c", code, str(run), str(store), str(count), str(ROOT)],
                          capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return float(done.stdout.strip().splitlines()[-1])


def stream_rate(store: Path, config, tiles: int) -> float:
    """Tiles/s of a shuffled TileStream over ``tiles`` tiles (epoch after epoch if it has fewer)."""
    from itertools import islice

    from torch.utils.data import DataLoader

    from data_plane.stream import TileStream

    stream = TileStream(store, config, shuffle=True)
    batches = iter(DataLoader(stream.batched(64).endless(0), batch_size=None, num_workers=0))
    next(batches)  # warm-up: opening arrays
    started, count = time.perf_counter(), 0
    for batch in islice(batches, max(1, tiles // 64)):
        count += len(batch["image"])
    return count / (time.perf_counter() - started)


def cpu_mode(args) -> None:
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    run = generator_run(work)
    if args.repeats:
        compare_processes(args, run)
    if args.big:
        big_set(args, run)


def compare_processes(args, run: Path) -> None:
    work = args.work
    results = {1: [], 2: []}
    for repeat in range(args.repeats):
        for nproc in (1, 2):  # interleaved: A, B, A, B, …
            store = work / f"s{nproc}-{repeat}.zarr"
            shutil.rmtree(store, ignore_errors=True)
            wall, cpu, out = tessera("synthesize", run, "--count", args.count, "--store", store, "--nproc", nproc)
            results[nproc].append({"wall": wall, "cpu": cpu, "write_pct": rate_line(out), "steady": steady_rate(out)})
            shutil.rmtree(store, ignore_errors=True)
            print(f"  repeat {repeat} x{nproc}: {args.count / wall:.1f} tiles/s wall ({wall:.1f} s, CPU {cpu:.1f} s)",
                  flush=True)
    print(f"\nsynthesize {args.count} tiles of 64² (configs/stylegan2_cpu.yaml G_ema), {args.repeats} interleaved "
          f"repeats, process start and model load included\n")
    print("| processes | generating tiles/s (median, min–max) | end to end tiles/s (median, min–max) | wall s "
          "| CPU s (all processes) | writing share |")
    print("|---|---|---|---|---|---|")
    median, steady = {}, {}
    for nproc, rows in results.items():
        rates = [args.count / r["wall"] for r in rows]
        loops = [r["steady"] for r in rows]
        median[nproc], steady[nproc] = statistics.median(rates), statistics.median(loops)
        shares = [r["write_pct"] for r in rows if r["write_pct"] is not None]
        print(f"| {nproc} | {steady[nproc]:.1f} ({min(loops):.1f}–{max(loops):.1f}) | {median[nproc]:.1f} "
              f"({min(rates):.1f}–{max(rates):.1f}) | {statistics.median(r['wall'] for r in rows):.1f} "
              f"| {statistics.median(r['cpu'] for r in rows):.1f} | {statistics.median(shares):.0f} % |")
    print(f"\n2 processes / 1: {steady[2] / steady[1]:.2f}x generating, {median[2] / median[1]:.2f}x end to end "
          f"(torchrun and two model loads cost ~{results[2][0]['wall'] - args.count / steady[2]:.0f} s)")
    small, large = args.count // 4, args.count
    memory = {}
    for count in (small, large):
        store = work / f"mem-{count}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        memory[count] = peak_rss_mib(run, store, count)
        shutil.rmtree(store, ignore_errors=True)
    print(f"peak RSS of one process: {memory[small]:.0f} MiB for {small} tiles, {memory[large]:.0f} MiB for {large}")


def big_set(args, run: Path) -> None:
    from data_plane.config import StreamConfig

    store = args.work / "big.zarr"
    shutil.rmtree(store, ignore_errors=True)
    shutil.copytree(args.work / "sample.zarr", store)  # synthetic tiles beside real ones, as users mix them
    wall, cpu, out = tessera("synthesize", run, "--count", args.big, "--store", store, "--nproc", 2)
    size = sum(p.stat().st_size for p in (store / "synthetic").rglob("*") if p.is_file())
    print(f"\n{args.big} tiles of 64² with 2 processes: {wall:.0f} s end to end ({args.big / wall:.1f} tiles/s; "
          f"generating {steady_rate(out):.1f} tiles/s, writing {rate_line(out):.0f} % of the time), CPU {cpu:.0f} s, "
          f"{size / 2**20:.0f} MiB on disk")
    tiles = min(args.big, 20000)
    synthetic = stream_rate(store, StreamConfig(synthetic=[run.name], synthetic_share=1.0), tiles)
    real = stream_rate(store, StreamConfig(crop="random", crop_size=64, min_tissue_fraction=0.0), tiles)
    print(f"TileStream read-back ({tiles} tiles, 1 process, batches of 64): {synthetic:.0f} tiles/s of the synthetic "
          f"64² tiles; {real:.0f} tiles/s of 64² crops of the sample slide's ingested tiles")


def gpu_mode(args) -> None:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA")
    run = generator_run(args.work, args.resolution, gpu=True, config=args.config)
    rows = []
    for gpus in [int(g) for g in args.scaling.split(",")]:
        if gpus > torch.cuda.device_count():
            break
        store = args.work / f"gpu{gpus}.zarr"
        shutil.rmtree(store, ignore_errors=True)
        count = args.count * gpus
        wall, _, out = tessera("synthesize", run, "--count", count, "--store", store, "--nproc", gpus, "--batch", 32)
        rows.append((gpus, count / wall, rate_line(out)))
        shutil.rmtree(store, ignore_errors=True)
    base = rows[0][1]
    print(f"| GPUs | tiles/s | per GPU | scaling | writing share |   ({args.resolution}², config {args.config})")
    for gpus, rate, share in rows:
        print(f"| {gpus} | {rate:.0f} | {rate / gpus:.0f} | {rate / base:.2f} | {share or 0:.0f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-synthesize")
    parser.add_argument("--count", type=int, default=2000, help="tiles per measurement (per GPU in --gpu mode)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--big", type=int, default=0, help="then make this many tiles and stream them back")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--config", default="E")
    parser.add_argument("--scaling", default="1,2,4,8")
    args = parser.parse_args()
    gpu_mode(args) if args.gpu else cpu_mode(args)


if __name__ == "__main__":
    main()
