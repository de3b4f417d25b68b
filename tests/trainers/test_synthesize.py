"""`tessera synthesize` with a real (tiny, briefly trained) StyleGAN2 run: the same bytes whatever the
number of ranks and whether the job was killed and resumed; a second job on the same set is refused;
the set is NGFF-valid and streams into a short training run beside the real tiles."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TESSERA_JOB_ID",
                    "TESSERA_JOB_PID", "SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID")
GENERATOR = ["method.name=stylegan2",
             "method.options={resolution: 16, channel_base: 256, channel_max: 32, z_dim: 16, w_dim: 16, "
             "mapping_layers: 2, metrics: false}",
             "data.stream.crop=random", "data.stream.crop_size=16", "train.micro_batch=4", "train.steps=2",
             "train.num_workers=0", "train.precision=fp32", "train.checkpoint_every=2"]


def environment():
    return {**{k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}, "OMP_NUM_THREADS": "1"}


def tessera(*args, timeout=600, check=True):
    done = subprocess.run([sys.executable, "-m", "tessera.cli", *map(str, args)], cwd=ROOT, env=environment(),
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def generator(sample_store, tmp_path_factory):
    """A copy of the sample store (synthetic sets are added to it) and a 16² StyleGAN2 run trained on it."""
    folder = tmp_path_factory.mktemp("synth")
    store = folder / "store.zarr"
    shutil.copytree(sample_store, store)
    run = folder / "g16"
    tessera("train", "--run-dir", run, *[a for s in [f"data.store={store}", *GENERATOR] for a in ("--set", s)])
    return run, store


def pixels(store, name):
    return zarr.open_array(str(Path(store) / "synthetic" / name / "0"), mode="r")[:]


def test_the_same_tiles_bit_for_bit_with_one_and_two_ranks(generator, tmp_path):
    from data_plane.store import read_tile_index

    run, _ = generator
    tessera("synthesize", run, "--count", 30, "--store", tmp_path / "one.zarr", "--batch", 4, "--seed0", 100)
    tessera("synthesize", run, "--count", 30, "--store", tmp_path / "two.zarr", "--batch", 4, "--seed0", 100,
            "--nproc", 2)
    # Two shares started by a scheduler one after the other (as array tasks would be), batch 1.
    for rank in (1, 0):
        tessera("synthesize", run, "--count", 30, "--store", tmp_path / "shares.zarr", "--seed0", 100,
                "--rank", rank, "--world", 2, "--resume")
    tessera("synthesize", run, "--count", 30, "--store", tmp_path / "single.zarr", "--seed0", 100)
    one, two = pixels(tmp_path / "one.zarr", "g16"), pixels(tmp_path / "two.zarr", "g16")
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(pixels(tmp_path / "shares.zarr", "g16"), pixels(tmp_path / "single.zarr", "g16"))
    # Across block sizes float kernels differ by ~1e-5: at most one grey level, on few pixels.
    diff = np.abs(one.astype(int) - pixels(tmp_path / "single.zarr", "g16").astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.05
    rows = read_tile_index(tmp_path / "two.zarr")
    assert list(rows["seed"]) == list(range(100, 130)) and set(rows["kind"]) == {"synthetic"}
    assert one[:, :16, :16].std() > 0  # tiles hold an image, not the fill value
    # Tile i sits at its mosaic cell and is G_ema(z of seed seed0 + i).
    import torch

    from trainers.synthesize import latents, load_generator

    method, _ = load_generator(run)
    with torch.no_grad():
        direct = method.synthesize(latents([107], method.config.z_dim), psi=1.0, noise_mode="const")
    expected = (direct[0] * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8).numpy()
    columns = zarr.open_group(str(tmp_path / "single.zarr" / "synthetic" / "g16"), mode="r").attrs["tessera"]["columns"]
    y, x = divmod(7, columns)
    np.testing.assert_array_equal(pixels(tmp_path / "single.zarr", "g16")[:, y * 16:y * 16 + 16, x * 16:x * 16 + 16],
                                  expected)


def test_two_nodes_at_one_rendezvous_write_one_set(generator, tmp_path):
    """Two torchrun agents on this machine stand in for two nodes (--nnodes 2, c10d rendezvous)."""
    from trainers.dist import free_port

    run, _ = generator
    store = tmp_path / "nodes.zarr"
    args = [sys.executable, "-m", "tessera.cli", "synthesize", str(run), "--count", "30", "--store", str(store),
            "--batch", "4", "--seed0", "100", "--nnodes", "2", "--rdzv-endpoint", f"127.0.0.1:{free_port()}"]
    nodes = [subprocess.Popen(args, cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(o[-2000:] for o in outputs)
    assert "rank 0/2" in "".join(outputs) and "rank 1/2" in "".join(outputs)
    tessera("synthesize", run, "--count", 30, "--store", tmp_path / "one.zarr", "--batch", 4, "--seed0", 100)
    np.testing.assert_array_equal(pixels(store, "g16"), pixels(tmp_path / "one.zarr", "g16"))


def test_sigkill_then_resume_gives_the_store_of_an_uninterrupted_run(generator, tmp_path):
    from data_plane.config import StreamConfig
    from data_plane.store import read_tile_index
    from data_plane.stream import TileStream

    run, _ = generator
    store = tmp_path / "killed.zarr"
    args = [sys.executable, "-m", "tessera.cli", "synthesize", str(run), "--count", "4000", "--store", str(store),
            "--batch", "8"]
    proc = subprocess.Popen(args, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    done_folder = store / ".tessera" / "synthetic" / "g16" / "done"
    deadline = time.time() + 120
    while time.time() < deadline and not (done_folder.is_dir() and len(list(done_folder.glob("*.npy"))) >= 5):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    written = sum(len(np.load(p)) for p in done_folder.glob("*.npy"))  # tiles recorded (64 per record)
    assert 5 * 64 <= written < 4000, "the job finished or never started before it could be killed"
    # Killed: the set is not complete and no stream takes it for one.
    assert not zarr.open_group(str(store / "synthetic" / "g16"), mode="r").attrs["tessera"]["complete"]
    assert not (store / ".tessera" / "synthetic" / "g16.parquet").exists()
    with pytest.raises((ValueError, FileNotFoundError), match="not complete sets|no tiles.parquet"):
        TileStream(store, StreamConfig(synthetic=["g16"], synthetic_share=1.0))
    refused = tessera("synthesize", run, "--count", 4000, "--store", store, "--batch", 8, check=False)
    assert refused.returncode == 2 and "--resume" in refused.stderr
    resumed = tessera("synthesize", run, "--count", 4000, "--store", store, "--batch", 8, "--resume")
    assert f"({written} of 4000 already in the set)" in resumed.stdout
    tessera("synthesize", run, "--count", 4000, "--store", tmp_path / "clean.zarr", "--batch", 8)
    np.testing.assert_array_equal(pixels(store, "g16"), pixels(tmp_path / "clean.zarr", "g16"))
    assert len(read_tile_index(store)) == 4000


def test_a_second_job_on_the_same_set_is_refused(generator, tmp_path):
    run, _ = generator
    store = tmp_path / "busy.zarr"
    args = [sys.executable, "-m", "tessera.cli", "synthesize", str(run), "--count", "200000", "--store", str(store)]
    proc = subprocess.Popen(args, cwd=ROOT, env=environment(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = store / ".tessera" / "synthetic" / "g16" / "job.json"
        deadline = time.time() + 120
        while time.time() < deadline and not lock.is_file():
            time.sleep(0.05)
        assert lock.is_file()
        other = tessera("synthesize", run, "--count", 200000, "--store", store, "--resume", check=False)
        assert other.returncode == 2 and "is being written by job" in other.stderr and str(proc.pid) in other.stderr
    finally:
        proc.kill()
        proc.wait()
    # Its holder gone, the next job takes the lock over (here one share of two tiles: 200000 tiles, batch 1).
    tessera("synthesize", run, "--count", 200000, "--store", store, "--resume", "--rank", 0, "--world", 100000)
    assert json.loads(lock.read_text())["pid"] != proc.pid


def test_the_synthetic_set_is_ngff_valid_and_streams_into_training(generator, tmp_path):
    from data_plane.config import StreamConfig
    from data_plane.stream import TileStream
    from tests.data_plane.test_ngff import ngff_report

    run, store = generator
    tessera("synthesize", run, "--count", 40, "--store", store, "--name", "fake")
    report = ngff_report(store)
    assert report["images"]["synthetic/fake"]["model"].endswith("v05.image.Image"), report["images"]["synthetic/fake"]
    assert report["images"]["synthetic/fake"]["reader"]["."]["levels"] == [[3, 6 * 16, 7 * 16]]  # 40 tiles: 7 columns, 6 rows
    assert "synthetic" in report["root_members"] and report["warnings"] == []
    only = TileStream(store, StreamConfig(synthetic=["fake"], synthetic_share=1.0), shuffle=False)
    items = list(only)
    assert len(items) == 40 and all(i["slide_id"] == "fake" for i in items)
    np.testing.assert_array_equal(items[3]["image"].numpy(),
                                  pixels(store, "fake")[:, :16, 48:64])
    config = StreamConfig(synthetic=["fake"], synthetic_share=0.25, crop="random", crop_size=16,
                          min_tissue_fraction=0.5)
    mixed = TileStream(store, config)
    kinds = mixed.tiles["kind"].fillna("slide").value_counts()
    assert kinds["synthetic"] == round(kinds["slide"] / 3)  # a quarter of the stream
    sets = [f"data.store={store}", "data.stream.synthetic=[fake]", "data.stream.synthetic_share=0.25",
            "data.stream.crop=random", "data.stream.crop_size=16", "train.steps=3", "train.micro_batch=4",
            "train.num_workers=0", "method.options={width: 8, depth: 2, bottleneck: 8}"]
    tessera("train", "--run-dir", tmp_path / "mixed", *[a for s in sets for a in ("--set", s)])
    assert (tmp_path / "mixed" / "final.pt").is_file()


def test_project_mode_inverts_real_tiles_into_a_set_with_distances_and_heatmaps(generator, tmp_path):
    from data_plane.heatmap import read_heatmap
    from data_plane.store import read_tile_index

    run, sample = generator
    stores = {n: tmp_path / f"p{n}.zarr" for n in (1, 2)}
    for nproc, store in stores.items():
        shutil.copytree(sample, store)
        tessera("synthesize", run, "--project", "--split", "train", "--store", store, "--batch", 4,
                "--option", "projector_steps=3", "--nproc", nproc)
    one, two = (read_tile_index(s) for s in stores.values())
    rows = one[one["kind"] == "reconstruction"].reset_index(drop=True)
    real = one[one["kind"].isna()]
    assert len(rows) == len(real[real["tissue_fraction"] >= 0.5]) > 4  # the run's stream filter, split train
    assert rows["distance"].notna().all() and (rows["distance"] > 0).all()
    np.testing.assert_array_equal(pixels(stores[1], "g16-project-train"), pixels(stores[2], "g16-project-train"))
    np.testing.assert_array_equal(rows["distance"], two[two["kind"] == "reconstruction"]["distance"])
    heat, downsample = read_heatmap(stores[1], "cmu_small_region", "g16-project-train")
    first = rows.iloc[0]
    assert heat[int(first.source_y) // downsample + 1, int(first.source_x) // downsample + 1] == \
        pytest.approx(first.distance, rel=1e-6)


def test_a_lock_of_another_host_lives_while_its_heartbeat_moves(tmp_path):
    from data_plane.synthetic import STALE_S, _alive

    lock = tmp_path / "job.json"
    lock.write_text(json.dumps({"job": "other", "host": "node-elsewhere", "pid": 1}))
    held = json.loads(lock.read_text())
    assert _alive(held, lock.stat().st_mtime)                     # just touched: alive
    old = time.time() - STALE_S - 5
    os.utime(lock, (old, old))
    assert not _alive(held, lock.stat().st_mtime)                 # silent for longer than STALE_S: taken over
