"""Against a real Slurm (the session fixture): tessera jobs submitted with sbatch run to COMPLETED with
their logs and outputs; a cancelled job ends CANCELLED; an unknown partition is refused by name."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cluster.backends import BackendError, get_backend
from cluster.spec import JobSpec

ROOT = Path(__file__).resolve().parents[2]


def submit(tmp_path, *args):
    command = [sys.executable, "-m", "tessera.cli", "submit", "--backend", "slurm", "--log-dir", str(tmp_path / "logs"),
               "--workdir", str(ROOT), "--mem-per-task", "500M", *args]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TESSERA_JOBS": str(tmp_path / "jobs")})
    assert done.returncode == 0, done.stderr
    job_id = done.stdout.split()[1]
    return json.loads((tmp_path / "jobs" / f"{job_id}.json").read_text())


def wait_for(record, states, timeout=600):
    backend = get_backend("slurm")
    deadline = time.time() + timeout
    state = None
    while time.time() < deadline:
        state = backend.status(record)
        if state in states:
            return state
        time.sleep(1)
    raise AssertionError(f"job {record['backend_id']} still {state} after {timeout} s:\n{backend.logs(record)[-2000:]}")


def test_ingest_job_completes_with_its_log_and_store(slurm, sample_data, tmp_path):
    store = tmp_path / "store.zarr"
    record = submit(tmp_path, "--name", "ingest-sample", "--cpus-per-task", "1", "--",
                    "ingest", str(sample_data.slide), "--store", str(store))
    assert wait_for(record, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED", \
        get_backend("slurm").logs(record)[-3000:]
    log = get_backend("slurm").logs(record)
    assert "ingested 1" in log and record["backend_id"] in log  # the script's banner names the job
    assert (store / "slides" / "cmu_small_region" / "zarr.json").is_file()


def test_two_process_training_job_completes(slurm, sample_store, tmp_path):
    run_dir = tmp_path / "run"
    sets = [f"data.store={sample_store}", "data.stream.crop=random", "data.stream.crop_size=32",
            "train.micro_batch=4", "train.num_workers=0", "train.steps=6",
            "method.options={width: 8, depth: 3, bottleneck: 8}"]
    record = submit(tmp_path, "--name", "train-2", "--tasks-per-node", "2", "--cpus-per-task", "1", "--",
                    "train", "--run-dir", str(run_dir), *[a for s in sets for a in ("--set", s)])
    assert wait_for(record, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED", \
        get_backend("slurm").logs(record)[-3000:]
    assert "on 2 rank(s)" in (run_dir / "log.txt").read_text()
    assert (run_dir / "final.pt").is_file()
    assert "#SBATCH --nodes=1" in Path(record["script"]).read_text()


def test_synthesize_as_a_job_array_writes_each_tasks_share(slurm, sample_store, tmp_path):
    import numpy as np
    import zarr

    from tests.trainers.test_synthesize import GENERATOR, environment

    run = tmp_path / "g16"
    train = subprocess.run([sys.executable, "-m", "tessera.cli", "train", "--run-dir", str(run),
                            *[a for s in [f"data.store={sample_store}", *GENERATOR] for a in ("--set", s)]],
                           cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=600)
    assert train.returncode == 0, train.stderr[-3000:]
    store = tmp_path / "synth.zarr"
    record = submit(tmp_path, "--name", "synth", "--array", "2", "--cpus-per-task", "1", "--",
                    "synthesize", str(run), "--count", "20", "--store", str(store), "--batch", "2")
    assert "#SBATCH --array=0-1" in Path(record["script"]).read_text()
    assert wait_for(record, {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"}) == "COMPLETED", \
        get_backend("slurm").logs(record)[-3000:]
    log = get_backend("slurm").logs(record)
    assert "== task 0 ==" in log and "== task 1 ==" in log
    assert "rank 0/2" in log and "rank 1/2" in log and "complete: 20 tiles" in log
    local = subprocess.run([sys.executable, "-m", "tessera.cli", "synthesize", str(run), "--count", "20", "--store",
                            str(tmp_path / "local.zarr"), "--batch", "2"], cwd=ROOT, env=environment(),
                           capture_output=True, text=True, timeout=600)
    assert local.returncode == 0, local.stderr[-2000:]
    read = lambda s: zarr.open_array(str(s / "synthetic" / "g16" / "0"), mode="r")[:]
    np.testing.assert_array_equal(read(store), read(tmp_path / "local.zarr"))


def test_cancelled_job_ends_cancelled(slurm, sample_store, tmp_path):
    sets = [f"data.store={sample_store}", "train.steps=100000", "train.num_workers=0", "train.micro_batch=2",
            "data.stream.crop=random", "data.stream.crop_size=32"]
    record = submit(tmp_path, "--name", "long", "--cpus-per-task", "1", "--",
                    "train", "--run-dir", str(tmp_path / "long"), *[a for s in sets for a in ("--set", s)])
    assert wait_for(record, {"RUNNING", "COMPLETED", "FAILED"}) == "RUNNING"
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "jobs", "cancel", record["id"]], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "TESSERA_JOBS": str(tmp_path / "jobs")})
    assert done.returncode == 0, done.stderr
    assert wait_for(record, {"CANCELLED", "COMPLETED", "FAILED"}, timeout=120) == "CANCELLED"


def test_unknown_partition_is_refused_with_the_known_ones(slurm, tmp_path):
    spec = JobSpec(command=["doctor"], partition="gpu-nope", log_dir=tmp_path)
    with pytest.raises(BackendError, match=r"partition 'gpu-nope' does not exist .*debug"):
        get_backend("slurm").submit(spec)
