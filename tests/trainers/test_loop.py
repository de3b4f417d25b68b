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

from trainers.files import load_file

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


LAUNCHER = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def run(command, **kwargs):
    # in-process tests earlier in the session leave launcher variables behind; a user's shell has none
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER}, "OMP_NUM_THREADS": "1"}
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, **kwargs)


def final_weights(run_dir):
    return load_file(Path(run_dir) / "final.pt", "tessera-final")["state"]


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
                            env={**{k: v for k, v in os.environ.items() if k not in LAUNCHER}, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = cut / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.is_file() and json.loads(latest.read_text())["step"] >= 20):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and both ranks, mid-epoch
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline and _group_alive(proc.pid):  # the ranks hold the run's lock until they are gone
        time.sleep(0.1)
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
from trainers.worker import run
from trainers.loop import TrainingDiverged
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


def test_non_finite_weights_are_never_checkpointed_and_a_resume_at_a_lower_lr_recovers(sample_store, tmp_path):
    """At a huge learning rate BatchNorm's running_var overflows while the loss stays finite: the run must
    stop (exit 3) before that checkpoint, and `--resume --set train.lr=…`, as the message advises, recovers."""
    run_dir = tmp_path / "run"
    steps = ["train.steps=4", "train.checkpoint_every=2", "train.log_every=1"]
    assert run(train_command(sample_store, run_dir, *steps, nproc=1)).returncode == 0
    resume = train_command(sample_store, run_dir, nproc=1, resume=True)
    diverged = run(resume + ["--set", "train.lr=1e6", "--set", "train.steps=10"])
    assert diverged.returncode == 3, diverged.stderr[-2000:]
    assert "weights became NaN/inf" in diverged.stderr and "running_var" in diverged.stderr
    assert "--resume --set train.lr=" in diverged.stderr
    assert not (run_dir / "final.pt").exists()
    latest = json.loads((run_dir / "checkpoints" / "latest.json").read_text())
    assert latest["step"] == 4  # the step-6 checkpoint, which held inf, was never written
    from trainers.files import load_engine_weights

    weights = load_engine_weights(run_dir / "checkpoints" / "model" / latest["tag"])
    assert all(torch.isfinite(w).all() for w in weights.values() if w.is_floating_point())

    recovered = run(resume + ["--set", "train.lr=2e-3"])
    assert recovered.returncode == 0, recovered.stderr[-2000:]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["lr/model"] for r in records if r["step"] > 4][-6:] == [2e-3] * 6  # the new rate, not the saved one
    final = load_file(run_dir / "final.pt", "tessera-final")["state"]
    assert all(torch.isfinite(w).all() for w in final.values() if w.is_floating_point())
    overrides = [json.loads(line) for line in (run_dir / "overrides.jsonl").read_text().splitlines()]
    assert overrides == [{"time": overrides[0]["time"], "from_step": 4, "set": ["train.lr=1e6", "train.steps=10"]},
                         {"time": overrides[1]["time"], "from_step": 4, "set": ["train.lr=2e-3"]}]
    assert "lr: 0.002" in (run_dir / "config.yaml").read_text()
    refused = run(resume + ["--set", "train.micro_batch=3"])
    assert refused.returncode == 2 and "keys that leave the checkpoint valid" in refused.stderr


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def test_a_killed_launcher_takes_its_ranks_and_a_live_run_keeps_its_lock(sample_store, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_command(sample_store, run_dir, "train.steps=100000", "train.checkpoint_every=2"),
                            cwd=ROOT, start_new_session=True,
                            env={**{k: v for k, v in os.environ.items() if k not in LAUNCHER}, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        latest = run_dir / "checkpoints" / "latest.json"
        deadline = time.time() + 300
        while time.time() < deadline and not latest.is_file():
            time.sleep(0.1)
        assert latest.is_file(), "no checkpoint within 5 minutes"
        second = run(train_command(sample_store, run_dir, resume=True))
        assert second.returncode == 2 and "is being trained by pid" in second.stderr, second.stderr[-2000:]
        os.kill(proc.pid, signal.SIGKILL)  # only `tessera train`: torchrun and the ranks must follow
        proc.wait()
        deadline = time.time() + 60
        while time.time() < deadline and _group_alive(proc.pid):
            time.sleep(0.2)
        assert not _group_alive(proc.pid), "torchrun or a rank outlived the killed launcher"
    finally:
        if _group_alive(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    step = json.loads(latest.read_text())["step"]
    resumed = run(train_command(sample_store, run_dir, resume=True) + ["--set", f"train.steps={step + 2}"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from step{step:08d}" in (run_dir / "log.txt").read_text()


def test_auto_precision_uses_bf16_only_where_the_hardware_runs_it(monkeypatch, tmp_path):
    import builtins

    import trainers.engines as engines

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    real_open = builtins.open

    def cpuinfo(flags):
        (tmp_path / "cpuinfo").write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n")
        return lambda path, *a, **k: real_open(tmp_path / "cpuinfo" if path == "/proc/cpuinfo" else path, *a, **k)

    for flags, expected in (("avx2 avx512f", "fp32"), ("avx512f avx512_bf16", "bf16-mixed"),
                            ("amx_tile amx_bf16", "bf16-mixed")):
        monkeypatch.setattr(builtins, "open", cpuinfo(flags))
        assert engines.resolve_precision("auto") == expected, flags
    assert engines.resolve_precision("fp32") == "fp32"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert engines.resolve_precision("auto") == "fp32"  # an old GPU: no bf16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert engines.resolve_precision("auto") == "bf16"


def test_a_lone_cpu_rank_builds_no_deepspeed_op_and_prints_its_first_step(sample_store, tmp_path):
    """With an empty extension cache (a fresh machine, TORCH_EXTENSIONS_DIR unset) DeepSpeed would spend
    minutes compiling its shared-memory allreduce, which one process never uses."""
    extensions = tmp_path / "extensions"
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER}, "OMP_NUM_THREADS": "1",
           "TORCH_EXTENSIONS_DIR": str(extensions)}
    done = subprocess.run(train_command(sample_store, tmp_path / "run", "train.steps=2", nproc=1), cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "built successfully" not in done.stdout + done.stderr
    assert not extensions.exists() or not any(extensions.rglob("*.so"))
    assert "step: 1/2 (50%)" in done.stdout and "first step done" in done.stdout
