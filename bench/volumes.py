"""3D patch reads: the Zarr store against what a user would otherwise do, on the same patches.

    python bench/volumes.py [--work DIR] [--patches 200] [--skip-512]

Volume: the real MNI152 T1 template at 1 mm (197 x 233 x 189, float32), as .nii.gz. Random 64³ and
96³ patches at the same positions, read by
  (a) tessera's PatchStream over the store (chunks of 64³, Blosc-zstd),
  (b) nibabel: slicing the image's array proxy on the .nii.gz (no whole-volume load),
  (b2) nibabel: the whole volume loaded once into memory, then sliced (fast, memory = volume),
  (c) MONAI: LoadImage + SpatialCrop per patch (what a Dataset without caching does).
Each case runs in its own process; peak RSS is sampled (process and children). Then the peak RSS
of streaming patches from a 512³ float32 volume. Last, 2D slices: one shuffled epoch of the axial
slices of the 1 mm volume through SliceStream, with the decoded-slab cache (slab_cache_mb 1024) and
without it (each plane read decodes the chunks it crosses), in slices/s and peak RSS.
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
    from tiles import PeakRSS

    memory = PeakRSS()
    # Origins are (z, y, x) in the store's RAS grid; the MNI file is already RAS, so (i, j, k) = (x, y, z).
    if method == "zarr":
        from data_plane.volumes import volume_array

        array = volume_array(store, volume_id)
        read = lambda z, y, x: array[z:z + size, y:y + size, x:x + size]
    elif method == "nibabel-proxy":
        import nibabel

        proxy = nibabel.load(path).dataobj
        read = lambda z, y, x: np.asarray(proxy[x:x + size, y:y + size, z:z + size], np.float32)
    elif method == "nibabel-loaded":
        import nibabel

        data = np.asarray(nibabel.load(path).dataobj, np.float32)
        read = lambda z, y, x: data[x:x + size, y:y + size, z:z + size].copy()
    else:
        from monai.transforms import LoadImage, SpatialCrop

        load = LoadImage(image_only=True, ensure_channel_first=True)
        read = lambda z, y, x: SpatialCrop(roi_start=(x, y, z), roi_end=(x + size, y + size, z + size))(load(str(path)))
    read(*origins[0])  # warm-up: imports, first open
    started = time.perf_counter()
    for origin in origins[1:]:
        read(*origin)
    rate = (len(origins) - 1) / (time.perf_counter() - started)
    return {"patches_per_s": rate, "peak_rss_mib": memory.mib()}


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
    parser.add_argument("--patches", type=int, default=200)
    parser.add_argument("--skip-512", action="store_true")
    parser.add_argument("--case", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        method, path, store, volume_id, size, origins = args.case
        if method == "stream":
            print(json.dumps(stream_case(Path(store), volume_id, int(size), int(origins))))
        elif method == "slices":
            print(json.dumps(slice_case(Path(store), volume_id, float(size))))
        else:
            print(json.dumps(run_case(method, Path(path), Path(store), volume_id, int(size),
                                      np.array(json.loads(origins)))))
        return

    paths = prepare(args.work, big=not args.skip_512)
    shape = (189, 233, 197)  # stored (z, y, x)
    print("| patch | (a) zarr store | (b) nibabel proxy .nii.gz | (b2) nibabel loaded once | (c) MONAI LoadImage+crop "
          "| a/b | a/b2 | a/c | peak RSS a / b / b2 / c MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for size in (64, 96):
        rng = np.random.default_rng(size)
        origins = np.stack([rng.integers(0, s - size, args.patches) for s in shape], axis=1).tolist()
        results = {}
        for method in ("zarr", "nibabel-proxy", "nibabel-loaded", "monai"):
            count = origins if method in ("zarr", "nibabel-loaded") else origins[: max(6, args.patches // 20)]
            results[method] = in_subprocess([method, str(paths["mni"]), str(paths["store"]), "mni152",
                                             str(size), json.dumps(count)])
        a, b, b2, c = (results[m]["patches_per_s"] for m in ("zarr", "nibabel-proxy", "nibabel-loaded", "monai"))
        rss = " / ".join(f"{results[m]['peak_rss_mib']:.0f}" for m in results)
        print(f"| {size}³ | {a:.0f}/s | {b:.1f}/s | {b2:.0f}/s | {c:.1f}/s | {a / b:.0f} | {a / b2:.2f} | {a / c:.0f} "
              f"| {rss} |", flush=True)
    if "big" in paths:
        big = in_subprocess(["stream", "", str(paths["store"]), "big512", "96", "64"])
        print(f"\nstreaming 96³ patches from a 512³ float32 volume (512 MiB) in one process: "
              f"{big['patches_per_s']:.0f} patches/s, peak RSS {big['peak_rss_mib']:.0f} MiB "
              f"({big['rss_before_mib']:.0f} MiB before the first patch: interpreter, torch, zarr)")
    cached, direct = (in_subprocess(["slices", "", str(paths["store"]), "mni152", str(mb), "0"]) for mb in (1024, 0))
    print(f"\naxial slices of the 1 mm volume, one shuffled epoch ({cached['slices']}), resized to 192²: "
          f"slab cache {cached['slices_per_s']:.0f}/s (peak RSS {cached['peak_rss_mib']:.0f} MiB), direct plane reads "
          f"{direct['slices_per_s']:.0f}/s ({direct['peak_rss_mib']:.0f} MiB): {cached['slices_per_s'] / direct['slices_per_s']:.1f}x")


if __name__ == "__main__":
    main()
