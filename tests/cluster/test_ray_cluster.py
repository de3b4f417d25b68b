"""Against a real Ray cluster on loopback: a head node (with the dashboard, which serves the Jobs API)
and a second worker node process. A tessera ingest submitted through the Jobs API spreads its Ray
tasks over that cluster; its logs stream back; it succeeds; the cluster is torn down."""

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from trainers.dist import free_port

ROOT = Path(__file__).resolve().parents[2]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]


@pytest.fixture
def ray_cluster():
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}  # both sides agree: no token on loopback
    temp = os.environ.get("RAY_TMPDIR") or tempfile.mkdtemp(prefix="tray.", dir="/tmp")
    port, dashboard = free_port(), free_port()
    head = subprocess.run(RAY + ["start", "--head", f"--port={port}", "--num-cpus=1", "--node-ip-address=127.0.0.1",
                                 "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                                 f"--dashboard-port={dashboard}", f"--temp-dir={temp}", "--disable-usage-stats"],
                          capture_output=True, text=True, env=env, timeout=120)
    try:
        assert head.returncode == 0, head.stderr[-2000:]
        worker = subprocess.run(RAY + ["start", f"--address=127.0.0.1:{port}", "--num-cpus=1",
                                       "--node-ip-address=127.0.0.1", "--disable-usage-stats"],
                                capture_output=True, text=True, env=env, timeout=120)
        assert worker.returncode == 0, worker.stderr[-2000:]
        deadline = time.time() + 60
        while time.time() < deadline:
            status = subprocess.run(RAY + ["status", f"--address=127.0.0.1:{port}"], capture_output=True, text=True,
                                    env=env, timeout=60).stdout
            if len(re.findall(r"\d+ node_[0-9a-f]+", status)) == 2:
                break
            time.sleep(1)
        else:
            raise AssertionError(f"the worker node did not join:\n{status}")
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env, "gcs": f"127.0.0.1:{port}"}
    finally:
        subprocess.run(RAY + ["stop", "--force"], capture_output=True, env=env, timeout=120)


def test_ingest_through_the_ray_jobs_api_on_a_two_node_cluster(ray_cluster, sample_data, tmp_path):
    env = {**ray_cluster["env"], "TESSERA_JOBS": str(tmp_path / "jobs")}
    store = tmp_path / "store.zarr"
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "submit", "--backend", "ray", "--ray-address",
                           ray_cluster["address"], "--workdir", str(ROOT), "--env", "OMP_NUM_THREADS=1", "--",
                           "ingest", str(sample_data.slide), "--store", str(store), "--workers", "2"],
                          cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    job_id = re.search(r"submitted (\S+)", done.stdout).group(1)
    followed = subprocess.run([sys.executable, "-m", "tessera.cli", "jobs", "logs", "--follow", job_id], cwd=ROOT,
                              capture_output=True, text=True, env=env, timeout=600)
    assert "ingested 1" in followed.stdout, followed.stdout[-2000:] + followed.stderr[-2000:]
    status = subprocess.run([sys.executable, "-m", "tessera.cli", "jobs", "status", job_id], cwd=ROOT,
                            capture_output=True, text=True, env=env, timeout=60)
    assert status.stdout.strip() == "COMPLETED"
    assert (store / "slides" / "cmu_small_region" / "zarr.json").is_file()
