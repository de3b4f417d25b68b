"""The DeepSpeed loop for real: 2 processes on gloo, checkpoints, kill-and-resume, NaN stop."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["data.stream.crop=random", "data.stream.crop_size=32", "data.stream.min_tissue_fraction=0.3",
         "train.micro_batch=4", "train.num_workers=1", "train.log_every=5",
         "method.options={width: 8, depth: 3, bottleneck: 8}"]


def train_command(store, run_dir, *overrides, nproc=2, resume=False):
    command = [sys.executable, "-m", "tessera.cli", "train", "--nproc", str(nproc), "--run-dir", str(run_dir)]
    if resume:
        return command + ["--resume"]
    sets = [f"data.store={store}", *SMALL, *overrides]
    return command + [arg for value in sets for arg in ("--set", value)]


def run(command, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def final_weights(run_dir):
    return torch.load(Path(run_dir) / "final.pt", weights_only=False)["state"]


@pytest.mark.parametrize("zero_stage,precision", [(1, "fp32"), (2, "fp32"), (0, "bf16-mixed")])
def test_two_process_deepspeed_training(sample_store, tmp_path, zero_stage, precision):
    run_dir = tmp_path / "run"
    done = run(train_command(sample_store, run_dir, "train.steps=12", "train.checkpoint_every=6",
                             f"train.zero_stage={zero_stage}", "train.grad_accum=2", f"train.precision={precision}"))
    assert done.returncode == 0, done.stderr[-3000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [5, 10, 12]
    assert all(r["global_batch"] == 4 * 2 * 2 for r in records)
    assert all(torch.isfinite(torch.tensor(r["loss/model"])) for r in records)
    assert records[-1]["loss/model"] < records[0]["loss/model"]  # it learns to reconstruct
    assert 0 <= records[-1]["data_wait_share"] <= 1 and records[-1]["images_per_s"] > 0
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 12
    log = (run_dir / "log.txt").read_text()
    assert "2 rank(s)" in log and "global batch 16" in log and f"cpu, {precision};" in log
    assert all(w.dtype == torch.float32 for w in final_weights(run_dir).values() if w.is_floating_point())
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_killed_run_resumes_to_the_same_weights(sample_store, tmp_path):
    steps = ["train.steps=60", "train.checkpoint_every=10"]
    whole = tmp_path / "whole"
    assert run(train_command(sample_store, whole, *steps)).returncode == 0
    cut = tmp_path / "cut"
    proc = subprocess.Popen(train_command(sample_store, cut, *steps), cwd=ROOT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = cut / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.is_file() and json.loads(latest.read_text())["step"] >= 20):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-epoch
    proc.wait()
    assert not (cut / "final.pt").exists(), "the run finished before it could be killed"
    resumed = run(train_command(sample_store, cut, resume=True))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from step" in (cut / "log.txt").read_text()
    a, b = final_weights(whole), final_weights(cut)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


NAN_SCRIPT = """
import sys, torch
from core.methods.reference_ae import ReferenceAutoencoder
from tessera.config import load_config
from trainers.loop import TrainingDiverged, run
from trainers.run_dir import create_run_dir

original = ReferenceAutoencoder.training_step
def poisoned(self, batch, state):
    losses = original(self, batch, state)
    return {k: v * float("nan") for k, v in losses.items()} if state.step >= 3 else losses
ReferenceAutoencoder.training_step = poisoned
config = load_config(None, sys.argv[2:])
path = create_run_dir(config, "nan", path=sys.argv[1]).path
try:
    run(path, resume=False)
except TrainingDiverged as exc:
    print("DIVERGED", exc)
"""


def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(sample_store, tmp_path):
    run_dir = tmp_path / "nan"
    sets = [f"data.store={sample_store}", *SMALL, "train.steps=10", "train.checkpoint_every=2"]
    done = run([sys.executable, "-c", NAN_SCRIPT, str(run_dir), *sets])
    assert "DIVERGED loss became NaN/inf at step 3" in done.stdout, done.stderr[-2000:]
    assert json.loads((run_dir / "checkpoints" / "latest.json").read_text())["step"] == 2
    assert not (run_dir / "final.pt").exists()
    assert "NaN/inf" in (run_dir / "log.txt").read_text()
