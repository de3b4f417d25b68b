"""3D patch reads: the Zarr store against what a user would otherwise do, interleaved.

    python bench/volumes.py [--work DIR] [--patches 300] [--passes 5] [--skip-512]

Volume: the real MNI152 T1 template at 1 mm (197 x 233 x 189, float32), as .nii.gz and in the store
(chunks of 64³, Blosc-zstd). Random 64³ and 96³ patches as (1, s, s, s) float32 tensors, read by
  (a) tessera's patch reader with the volume cache (data.volume_stream.volume_cache_mb): the volume
      decoded once per process, each patch a crop in memory;
  (a') the same without the cache (volume_cache_mb 0): every patch decodes the chunks it crosses;
  (a'') (a') with patch_grid 32: corners on multiples of 32, fewer chunks crossed per patch;
  (c) MONAI's CacheDataset (LoadImaged + EnsureChannelFirstd cached) + RandSpatialCropd, the pipeline
      users pick for volumes that fit in memory;
  (b) nibabel: the volume loaded once into a numpy array, then sliced and copied.
Then the cache across DataLoader workers: two workers, the decoded volume shared through /dev/shm
against a private copy per worker (the workers' memory as summed PSS, and their CPU).
Every pass runs each reader once, in its own process, in an order rotated from pass to pass; CPU time
per patch (the first patch, a warm-up with the imports and the first decode, left out) and patches/s
of wall time, median and min-max over the passes. Then the peak RSS of streaming patches from a 512³
float32 volume, and 2D slices with and without the decoded-slab cache.
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
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose tune.py would hide the tune package


def prepare(work: Path, big: bool) -> dict:
    import nibabel

    from data_plane.ingest import ingest, resolve_sources
    from data_plane.sample_data import fetch_sample_data
    from tessera.config import load_config

    work.mkdir(parents=True, exist_ok=True)
    volume = work / "mni152.nii.gz"
    if not volume.exists():
        template = nibabel.load(fetch_sample_data().mni152_t1)
        nibabel.Nifti1Image(np.asarray(template.dataobj, np.float32), template.affine).to_filename(volume)
    paths = {"mni": volume}
    if big:
        huge = work / "big512.nii.gz"
        if not huge.exists():
            data = np.asarray(nibabel.load(volume).dataobj, np.float32)
            reps = [int(np.ceil(512 / s)) for s in data.shape]
            nibabel.Nifti1Image(np.tile(data, reps)[:512, :512, :512], np.eye(4)).to_filename(huge)
        paths["big"] = huge
    store = work / "volumes.zarr"
    config = load_config(None, ["data.volumes.nonzero_only=false", "data.volumes.percentiles=[0, 100]"]).data
    report = ingest(resolve_sources([str(p) for p in paths.values()]), store, config, show_progress=False)
    if report.failed:
        raise SystemExit(f"ingest failed: {report.failed}")
    return {"store": store, **paths}


def run_case(method: str, path: Path, store: Path, volume_id: str, size: int, origins: np.ndarray) -> dict:
    import torch

    from tiles import PeakRSS

    memory = PeakRSS()
    # Origins are (z, y, x) in the store's RAS grid; the MNI file is already RAS, so (i, j, k) = (x, y, z).
    if method.startswith("zarr"):
        from data_plane.volume_stream import _padded, _Volumes
        from data_plane.store import store_path

        volumes = _Volumes(store_path(store), volume_cache_mb=1024 if method == "zarr-cached" else 0)
        grid = 32 if method == "zarr-grid32" else 1
        read = lambda z, y, x: _padded(volumes.region(volume_id, "image", (
            slice(z // grid * grid, z // grid * grid + size), slice(y // grid * grid, y // grid * grid + size),
            slice(x // grid * grid, x // grid * grid + size))), size)[None]
    elif method == "nibabel-loaded":
        import nibabel

        data = np.asarray(nibabel.load(path).dataobj, np.float32)
        read = lambda z, y, x: torch.from_numpy(data[x:x + size, y:y + size, z:z + size].copy())[None]
    else:
        from monai.data import CacheDataset
        from monai.transforms import EnsureChannelFirstd, LoadImaged, RandSpatialCropd

        cached = CacheDataset([{"image": str(path)}], transform=[LoadImaged("image", image_only=True),
                                                                  EnsureChannelFirstd("image")],
                              cache_rate=1.0, progress=False, num_workers=0)[0]
        crop = RandSpatialCropd("image", roi_size=(size,) * 3, random_size=False)
        crop.set_random_state(0)
        read = lambda z, y, x: crop(dict(cached))["image"]
    read(*origins[0])  # warm-up: imports, first open, the cache's first fill
    cpu, started = time.process_time(), time.perf_counter()
    for origin in origins[1:]:
        read(*origin)
    wall, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"cpu_ms": cpu / (len(origins) - 1) * 1000, "patches_per_s": (len(origins) - 1) / wall,
            "peak_rss_mib": memory.mib()}


def chunks_crossed(origins: np.ndarray, size: int, chunk: int = 64, grid: int = 1) -> float:
    """Mean chunks a patch crosses along one axis."""
    corners = np.asarray(origins) // grid * grid
    return float(((corners + size - 1) // chunk - corners // chunk + 1).mean())


def stream_case(store: Path, volume_id: str, size: int, patches: int) -> dict:
    from torch.utils.data import DataLoader

    from data_plane.config import VolumeStreamConfig
    from data_plane.volume_stream import PatchStream
    from tiles import PeakRSS

    import psutil

    stream = PatchStream(store, VolumeStreamConfig(patch_size=size, patches_per_volume=patches))
    stream.volumes = stream.volumes[stream.volumes["volume_id"] == volume_id].reset_index(drop=True)
    before = psutil.Process().memory_info().rss / 2**20  # interpreter, torch, zarr, the stream's index
    memory = PeakRSS()
    started = time.perf_counter()
    count = sum(len(b["index"]) for b in DataLoader(stream, batch_size=4, num_workers=0))
    return {"patches_per_s": count / (time.perf_counter() - started), "patches": count,
            "peak_rss_mib": memory.mib(), "rss_before_mib": before}


def _pss_mib(pid: int) -> float:
    """Proportional set size: pages shared by n processes count 1/n in each, so the sum over processes
    is the memory they hold together."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    raise ValueError(f"no Pss line for process {pid}")


def workers_case(store: Path, volume_id: str, shared: bool, patches: int, workers: int = 2) -> dict:
    """One epoch of 64³ patches through a DataLoader with ``workers`` workers, the volume cache shared
    (one decoded copy in /dev/shm, mapped by every worker) or private (each worker decodes its own)."""
    import resource

    from torch.utils.data import DataLoader

    import data_plane.volume_stream as volume_stream
    from data_plane.config import VolumeStreamConfig

    if not shared:
        volume_stream.shared_folder = lambda owner: None
    stream = volume_stream.PatchStream(store, VolumeStreamConfig(patch_size=64, patches_per_volume=patches))
    stream.volumes = stream.volumes[stream.volumes["volume_id"] == volume_id].reset_index(drop=True)
    started = time.perf_counter()
    loader = iter(DataLoader(stream, batch_size=8, num_workers=workers, persistent_workers=False))
    count, pss = 0, 0.0
    for batch in loader:
        count += len(batch["index"])
        if count >= patches // 2 and not pss:  # mid-epoch: every worker alive, each holding what it read
            pss = sum(_pss_mib(w.pid) for w in loader._workers)
    wall = time.perf_counter() - started
    del loader
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"patches_per_s": count / wall, "workers_cpu_s": children.ru_utime + children.ru_stime,
            "workers_pss_mib": pss, "shared_mib": sum(p.stat().st_size for p in stream._shared.glob("*.npy")) / 2**20
            if stream._shared is not None and stream._shared.exists() else 0.0}


def slice_case(store: Path, volume_id: str, cache_mb: float) -> dict:
    from data_plane.config import VolumeStreamConfig
    from data_plane.volume_stream import SliceStream
    from data_plane.volumes import volume_index
    from tiles import PeakRSS

    splits = sorted(set(volume_index(store)["split"]))
    config = VolumeStreamConfig(splits=splits, ids=[volume_id], slice_axis=0, slice_size=192, min_foreground=0,
                                slab_cache_mb=cache_mb)
    stream = SliceStream(store, config)
    memory = PeakRSS()
    started = time.perf_counter()
    count = sum(1 for _ in stream)
    return {"slices_per_s": count / (time.perf_counter() - started), "slices": count, "peak_rss_mib": memory.mib()}


def in_subprocess(args: list[str]) -> dict:
    done = subprocess.run([sys.executable, __file__, "--case", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"})
    if done.returncode != 0:
        raise SystemExit(f"case {args[:4]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-volumes")
    parser.add_argument("--patches", type=int, default=300)
    parser.add_argument("--passes", type=int, default=5)
    parser.add_argument("--skip-512", action="store_true")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        method, path, store, volume_id, size, origins = args.case
        if method == "stream":
            print(json.dumps(stream_case(Path(store), volume_id, int(size), int(origins))))
        elif method == "workers":
            print(json.dumps(workers_case(Path(store), volume_id, size == "shared", int(origins))))
        elif method == "slices":
            print(json.dumps(slice_case(Path(store), volume_id, float(size))))
        else:
            print(json.dumps(run_case(method, Path(path), Path(store), volume_id, int(size),
                                      np.array(json.loads(origins)))))
        return

    paths = prepare(args.work, big=not args.skip_512)
    shape = (189, 233, 197)  # stored (z, y, x)
    load = os.getloadavg()
    print(f"# bench/volumes.py: load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}, {os.cpu_count()} CPUs, "
          f"{args.passes} passes, readers interleaved (rotated order), {args.patches} patches each; "
          "figures: median [min-max]", flush=True)
    readers = ["zarr-cached", "zarr-chunks", "zarr-grid32", "monai-cachedataset", "nibabel-loaded"]
    verdicts = []
    print("| patch | reader | CPU ms / patch | patches/s (wall) | peak RSS MiB | CPU vs MONAI CacheDataset |")
    print("|---|---|---|---|---|---|")
    for size in (64, 96):
        rng = np.random.default_rng(size)
        origins = np.stack([rng.integers(0, s - size, args.patches) for s in shape], axis=1).tolist()
        runs = {m: [] for m in readers}
        for p in range(args.passes):
            for method in readers[p % len(readers):] + readers[:p % len(readers)]:
                runs[method].append(in_subprocess([method, str(paths["mni"]), str(paths["store"]), "mni152",
                                                   str(size), json.dumps(origins)]))
        med = {m: {k: (float(np.median([r[k] for r in v])), float(np.min([r[k] for r in v])),
                       float(np.max([r[k] for r in v]))) for k in ("cpu_ms", "patches_per_s", "peak_rss_mib")}
               for m, v in runs.items()}
        monai = med["monai-cachedataset"]["cpu_ms"][0]
        for m, r in med.items():
            cpu, rate = r["cpu_ms"], r["patches_per_s"]
            print(f"| {size}³ | {m} | {cpu[0]:.3f} [{cpu[1]:.3f}-{cpu[2]:.3f}] | {rate[0]:.0f} [{rate[1]:.0f}-{rate[2]:.0f}] "
                  f"| {r['peak_rss_mib'][0]:.0f} | {cpu[0] / monai:.2f}x |", flush=True)
        ours = med["zarr-cached"]["cpu_ms"][0]
        verdicts.append(f"{'PASS' if ours <= monai else 'FAIL'}: {size}³ patches from a cached volume at least as fast "
                        f"as MONAI CacheDataset + RandSpatialCropd, CPU per patch ({ours:.3f} vs {monai:.3f} ms)")
        crossed = chunks_crossed(origins, size, grid=32)
        verdicts.append(f"{'PASS' if crossed <= 2 else 'FAIL'}: {size}³ uncached patches with patch_grid 32 cross "
                        f"{crossed:.2f} chunks of 64 per axis on average ({chunks_crossed(origins, size):.2f} without)")
    print("\n".join(verdicts))
    if "big" in paths:
        big = in_subprocess(["stream", "", str(paths["store"]), "big512", "96", "64"])
        print(f"\nstreaming 96³ patches from a 512³ float32 volume (512 MiB) in one process: "
              f"{big['patches_per_s']:.0f} patches/s, peak RSS {big['peak_rss_mib']:.0f} MiB "
              f"({big['rss_before_mib']:.0f} MiB before the first patch: interpreter, torch, zarr)")
    runs = {"shared": [], "private": []}
    for p in range(args.passes):
        for how in (["shared", "private"] if p % 2 == 0 else ["private", "shared"]):
            runs[how].append(in_subprocess(["workers", "", str(paths["store"]), "mni152", how, str(args.patches)]))
    med = {how: {k: float(np.median([r[k] for r in v])) for k in v[0]} for how, v in runs.items()}
    print(f"\n64³ patches through a DataLoader with 2 workers, one epoch of {args.patches} from the 1 mm volume "
          f"(35 MiB decoded), median of {args.passes}:")
    for how, r in med.items():
        print(f"  volume cache {how:7s}: {r['patches_per_s']:.0f} patches/s, workers' CPU {r['workers_cpu_s']:.2f} s, "
              f"workers' memory together (PSS) {r['workers_pss_mib']:.0f} MiB"
              + (f", of which {r['shared_mib']:.0f} MiB one shared decoded copy" if r["shared_mib"] else ""))
    saved = med["private"]["workers_pss_mib"] - med["shared"]["workers_pss_mib"]
    print(f"{'PASS' if saved > 0.5 * 35 else 'FAIL'}: DataLoader workers share one decoded copy of a cached volume "
          f"({saved:.0f} MiB less held by 2 workers than with private copies)")
    cached, direct = (in_subprocess(["slices", "", str(paths["store"]), "mni152", str(mb), "0"]) for mb in (1024, 0))
    print(f"\naxial slices of the 1 mm volume, one shuffled epoch ({cached['slices']}), resized to 192²: "
          f"slab cache {cached['slices_per_s']:.0f}/s (peak RSS {cached['peak_rss_mib']:.0f} MiB), direct plane reads "
          f"{direct['slices_per_s']:.0f}/s ({direct['peak_rss_mib']:.0f} MiB): {cached['slices_per_s'] / direct['slices_per_s']:.1f}x")


if __name__ == "__main__":
    main()
