"""``tessera synthesize``: a generator run's G_ema writes N tiles into a store's synthetic set.

Tile i is G_ema(z_i) with z_i drawn from seed ``seed0 + i`` alone, truncation ψ and the generator's
constant noise, so a tile never depends on which rank made it or in what order. Tiles are generated
in blocks of ``batch`` consecutive indices and rank r of W makes blocks r, r + W, … The block size
is part of the set: float kernels (MKL, cuBLAS) pick their summation order by batch shape, so the same
z in a batch of 1 and in a batch of 32 differ by ~1e-5, which moves some pixels by one grey level; a
set keeps its block size, and any number of ranks, order, kill and resume then give the same bytes.

Ranks need no communication: each writes its blocks' chunks and records them; whichever finds every
tile on disk completes the set (data_plane/synthetic.py). Rank and world come from torchrun (RANK,
WORLD_SIZE), a Slurm array (SLURM_ARRAY_TASK_ID, SLURM_ARRAY_TASK_COUNT), srun tasks (SLURM_PROCID,
SLURM_NTASKS) or ``--rank/--world``.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from pathlib import Path

import numpy as np
import torch


RECORD_EVERY = 64  # tiles per done-record: a kill loses at most this many tiles' records (they are remade)


def rank_and_world() -> tuple[int, int]:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        return int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0)), \
            int(env["SLURM_ARRAY_TASK_COUNT"])
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        return int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
    return 0, 1


def latents(seeds, z_dim: int) -> torch.Tensor:
    """z of each seed from its own generator: the same z whatever else is drawn with it."""
    return torch.stack([torch.randn(z_dim, generator=torch.Generator().manual_seed(int(s))) for s in seeds])


def load_generator(run_dir: Path):
    from trainers.export import load_method

    method, saved = load_method(run_dir)
    if not method.generates_tiles:
        raise ValueError(f"run '{run_dir}' trained '{method.method_name}', which generates no tiles: synthesize "
                         f"needs a generator run (stylegan2)")
    return method, saved


def set_spec(run_dir: Path, method, saved: dict, count: int, seed0: int, psi: float | None, batch: int,
             split: str, noise: str) -> dict:
    psi = float(method.config.truncation_psi if psi is None else psi)
    return {"count": int(count), "tile": int(method.config.resolution), "seed0": int(seed0), "psi": psi,
            "noise": noise, "batch": int(batch), "run": str(Path(run_dir).resolve()),
            "snapshot": snapshot_id(Path(run_dir)), "split": split}


def snapshot_id(run_dir: Path) -> str:
    """Which weights made the tiles: the generator file and its content hash (a retrained run differs)."""
    import hashlib

    path = run_dir / "final.pt" if run_dir.is_dir() else run_dir
    with open(path, "rb") as f:
        return f"{path.name} sha256:{hashlib.file_digest(f, 'sha256').hexdigest()[:16]}"


def default_batch(device: torch.device) -> int:
    # On a CPU a batch of one is as fast as larger ones (measured 49 vs 52 tiles/s at 64²): keep it, and
    # sets made on CPUs agree bit for bit whatever the batch; GPUs need batches.
    return 32 if device.type == "cuda" else 1


def synthesize(run_dir: str | Path, store: str | Path, count: int, name: str | None = None, seed0: int = 0,
               psi: float | None = None, batch: int | None = None, split: str = "train", noise: str = "const",
               resume: bool = False, rank: int | None = None, world: int | None = None,
               device: torch.device | None = None, log=print) -> dict:
    """This rank's share of the set; returns counts and seconds (generating vs writing)."""
    from data_plane.synthetic import SyntheticSet

    run_dir = Path(run_dir)
    if noise not in ("const", "none"):
        raise ValueError(f"noise {noise!r}: const (the generator's learned noise maps) or none; random noise "
                         f"would make tiles depend on the order they are made in")
    if rank is None or world is None:
        rank, world = rank_and_world()
    device = device or (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
                        else torch.device("cpu"))
    method, saved = load_generator(run_dir)
    method.to(device)
    batch = batch or default_batch(device)
    spec = set_spec(run_dir, method, saved, count, seed0, psi, batch, split, noise)
    name = name or run_dir.name
    synthetic = SyntheticSet.open(store, name, spec, resume=resume)
    synthetic.lock()
    done = synthetic.done()
    blocks = [b for b in range(math.ceil(count / batch)) if b % world == rank]
    todo = sum(int((~done[b * batch:(b + 1) * batch]).sum()) for b in blocks)
    log(f"synthesize '{name}' rank {rank}/{world}: {todo} of this rank's "
        f"{sum(min(batch, count - b * batch) for b in blocks)} tiles to make ({int(done.sum())} of {count} already "
        f"in the set), {spec['tile']}² px, ψ {spec['psi']}, batch {batch}, {device}")
    made = 0
    seconds = {"generate": 0.0, "write": 0.0}
    started = last_report = time.time()
    pending: list[int] = []  # written, not yet recorded: one record per ≥ RECORD_EVERY tiles, not per tile
    for block in blocks:
        indices = np.arange(block * batch, min((block + 1) * batch, count))
        missing = indices[~done[indices]]
        if len(missing) == 0:
            continue
        tick = time.perf_counter()
        with torch.no_grad():
            images = method.synthesize(latents(spec["seed0"] + indices, method.config.z_dim).to(device),
                                       psi=spec["psi"], noise_mode=noise)
            pixels = (images * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8).cpu().numpy()
        tock = time.perf_counter()
        for index in missing:
            synthetic.write(int(index), pixels[index - indices[0]])
        pending += missing.tolist()
        if len(pending) >= RECORD_EVERY or block == blocks[-1]:
            synthetic.record(rank, pending)
            pending = []
        synthetic.heartbeat()  # every block: another host judges this job alive by it
        seconds["generate"] += tock - tick
        seconds["write"] += time.perf_counter() - tock
        made += len(missing)
        if pending and time.time() - last_report > 30:
            synthetic.record(rank, pending)
            pending = []
        if time.time() - last_report > 30 or made == todo:
            rate = made / max(time.time() - started, 1e-9)
            log(f"  rank {rank}: {made}/{todo} tiles, {rate:.1f} tiles/s, "
                f"writing {seconds['write'] / max(sum(seconds.values()), 1e-9):.0%} of the time, "
                f"eta {(todo - made) / max(rate, 1e-9):.0f} s")
            last_report = time.time()
    if pending:
        synthetic.record(rank, pending)
    return {**_finish(synthetic, rank, world, made, started, log,
                      f"synthetic set '{name}' complete: {count} tiles in {synthetic.path} (streams as "
                      f"data.stream.synthetic: [{name}])"),
            "seconds_generate": seconds["generate"], "seconds_write": seconds["write"]}


def _finish(synthetic, rank: int, world: int, made: int, started: float, log, done_line: str) -> dict:
    """Complete the set if every rank's tiles are there (releasing the job's lock); this rank's counts."""
    complete = synthetic.complete()
    if complete:
        synthetic.unlock()
        log(done_line)
    return {"name": synthetic.name, "rank": rank, "world": world, "made": made, "complete": complete,
            "seconds": time.time() - started}


def project_spec(run_dir: Path, method, split: str, count: int, batch: int, options: dict) -> dict:
    return {"mode": "project", "count": int(count), "tile": int(method.config.resolution), "split": split,
            "batch": int(batch), "options": options, "run": str(Path(run_dir).resolve()),
            "snapshot": snapshot_id(Path(run_dir)), "psi": 1.0}


def projection_source(run_dir: Path, store, split: str, resolution: int):
    """The real tiles a projection inverts: the split's tiles through the run's stream filters, as eval
    selects them, centre-cropped to the generator's resolution when the run trained on crops of it."""
    from data_plane.store import read_tile_index
    from data_plane.stream import select_tiles
    from core.run_config import load_config

    config = load_config(run_dir / "config.yaml")
    stream = config.data.stream
    crop = stream.eval_crop if stream.eval_crop != "none" else ("center" if stream.crop_size == resolution else "none")
    stream_config = stream.model_copy(update={"splits": [split], "labels": None, "groups": None, "ids": None,
                                              "crop": crop, "augment": "none", "max_tiles_per_slide": None,
                                              "synthetic": [], "synthetic_share": 0.0})
    rows = select_tiles(read_tile_index(store), stream_config).reset_index(drop=True)
    if len(rows) == 0:
        raise ValueError(f"no tile of split '{split}' in store '{store}' passes the run's stream filters")
    size = resolution if crop != "none" else int(rows["out_size"].iloc[0])
    if size != resolution:
        raise ValueError(f"the store's tiles are {size} px and the generator makes {resolution} px: ingest at "
                         f"{resolution} px (data.tiles.size) or train with data.stream.crop_size={resolution}")
    return rows, stream_config, config.data.stain


def project(run_dir: str | Path, store: str | Path, split: str = "test", name: str | None = None,
            batch: int | None = None, options: dict | None = None, resume: bool = False, rank: int | None = None,
            world: int | None = None, device: torch.device | None = None, log=print) -> dict:
    """Invert the split's real tiles (StyleGAN2's projector, or the encoder with its refinement) in this
    rank's blocks; the reconstructions go into the set ``name``, each with its distance, and the set's
    completion stitches the distances into slide heatmaps ``heatmaps/<name>``."""
    from data_plane.stream import TileStream, on_device
    from data_plane.synthetic import SyntheticSet
    from trainers.export import load_method

    run_dir = Path(run_dir)
    if rank is None or world is None:
        rank, world = rank_and_world()
    device = device or (torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if torch.cuda.is_available()
                        else torch.device("cpu"))
    method, _ = load_method(run_dir, options)
    if not method.projects_tiles:
        raise ValueError(f"run '{run_dir}' trained '{method.method_name}', which cannot invert tiles: --project "
                         f"needs a stylegan2 or stylegan2_encoder run")
    method.to(device)
    batch = batch or default_batch(device)
    rows, stream_config, stain = projection_source(run_dir, store, split, method.config.resolution)
    name = name or f"{run_dir.name}-project-{split}"
    spec = project_spec(run_dir, method, split, len(rows), batch, options or {})
    synthetic = SyntheticSet.open(store, name, spec, resume=resume, source=rows)
    synthetic.lock()
    done = synthetic.done()
    blocks = [b for b in range(math.ceil(len(rows) / batch)) if b % world == rank]
    log(f"project '{name}' rank {rank}/{world}: {sum(int((~done[b * batch:(b + 1) * batch]).sum()) for b in blocks)} "
        f"of {len(rows)} '{split}' tiles to invert, batch {batch}, {device}")
    reader = TileStream(store, stream_config, stain=stain, shuffle=False)
    made, started = 0, time.time()
    for block in blocks:
        indices = np.arange(block * batch, min((block + 1) * batch, len(rows)))
        missing = indices[~done[indices]]
        if len(missing) == 0:
            continue
        reader.tiles = rows.iloc[missing].reset_index(drop=True)
        reader.__dict__.pop("_row_tuples", None)  # the stream caches its rows as tuples
        images = on_device({"image": torch.stack([item["image"] for item in reader])}, device)["image"]
        # The projector's starting noise and jitter come from the block's own seed: any rank, same result.
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(block)
            out = method.inverted(images)
        pixels = (out["reconstruction"].detach() * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8).cpu().numpy()
        for k, index in enumerate(missing):
            synthetic.write(int(index), pixels[k])
        synthetic.record(rank, missing.tolist(), out["distance"].detach().float().cpu().tolist())
        synthetic.heartbeat()
        made += len(missing)
    return _finish(synthetic, rank, world, made, started, log,
                   f"projection '{name}' complete: {len(rows)} reconstructions in {synthetic.path}, distances in "
                   f"the tile index and heatmaps/{name} of each slide")


def main() -> None:
    """Entry of each rank under torchrun / srun (``python -m trainers.synthesize``)."""
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--store", required=True)
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--name")
    parser.add_argument("--seed0", type=int, default=0)
    parser.add_argument("--truncation", type=float)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--split", default="train")
    parser.add_argument("--noise", default="const")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--project", action="store_true")
    parser.add_argument("--options", default="{}")
    args = parser.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    if args.project:
        import json

        project(args.run_dir, args.store, args.split, args.name, args.batch, json.loads(args.options), args.resume,
                log=lambda line: print(line, flush=True))
        return
    synthesize(args.run_dir, args.store, args.count, args.name, args.seed0, args.truncation, args.batch,
               args.split, args.noise, args.resume, log=lambda line: print(line, flush=True))


if __name__ == "__main__":
    main()
