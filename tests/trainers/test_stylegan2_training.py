"""StyleGAN2 on the trainer with real DeepSpeed (gloo) on the real sample slide's tiles: two ranks give
what one rank accumulating two micro-batches gives (same global batch), and a 2-rank run killed with
SIGKILL resumes with its kimg, ticks, ADA p and path-length mean, ending bit-identical to a run that
was never interrupted."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from tests.trainers.killing import kill_after_checkpoint
from trainers.files import load_engine_weights, load_file

ROOT = Path(__file__).resolve().parents[2]
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
# 24 tiles have >= 90 % tissue: three global batches of 8, so one rank's and two ranks' epochs align
SETTINGS = ["method.name=stylegan2",
            "method.options={resolution: 16, channel_base: 256, channel_max: 32, z_dim: 16, w_dim: 16, "
            "mapping_layers: 2, d_reg_interval: 4, g_reg_interval: 2, r1_gamma: 1.0, augment_p: 0.2, "
            "ada_kimg: 0.5, ada_interval: 2, metrics: false}",
            "data.stream.min_tissue_fraction=0.9", "data.stream.crop=random", "data.stream.crop_size=16",
            "data.stream.augment=flips", "train.micro_batch=4", "train.lr=0.0025", "train.betas=[0.0, 0.99]",
            "train.clip_grad=null", "train.precision=fp32", "train.num_workers=1", "train.log_every=2",
            "train.ema_kimg=0.05", "train.keep_checkpoints=10"]


def command(store, run_dir, nproc, *overrides, resume=False):
    base = [sys.executable, "-m", "tessera.cli", "train", "--nproc", str(nproc), "--run-dir", str(run_dir)]
    if resume:
        return base + ["--resume"]
    sets = [f"data.store={store}", *SETTINGS, *overrides]
    return base + [arg for value in sets for arg in ("--set", value)]


def environment():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1"}


def train(store, run_dir, nproc, *overrides):
    done = subprocess.run(command(store, run_dir, nproc, *overrides), cwd=ROOT, env=environment(),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def records(run_dir):
    """The last metrics record written for each step (a killed run may have written some twice)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/Gmain" in record:
            out[record["step"]] = record
    return out


def test_stylegan2_two_ranks_equal_one_rank_and_resume_bit_identical(sample_store, tmp_path):
    from data_plane.stream import read_tile_index

    assert (read_tile_index(sample_store)["tissue_fraction"] >= 0.9).sum() == 24

    steps = ["train.steps=36", "train.checkpoint_every=6"]
    whole = tmp_path / "whole"
    train(sample_store, whole, 2, *steps)
    final = load_file(whole / "final.pt", "tessera-final")
    log = (whole / "log.txt").read_text()
    assert "phases: Gmain (G), Greg (G, every 2), Dmain (D), Dreg (D, every 4)" in log and "2 rank(s)" in log
    ticks = records(whole)
    assert sorted(ticks) == list(range(2, 37, 2))
    assert all(r["kimg"] == r["step"] * 8 / 1000 for r in ticks.values())
    assert ticks[36]["ada/p"] != 0.2  # ADA moved p

    # one rank accumulating two micro-batches of 4: the same global batch of 8, the same micro-batches
    # (the stream hands rank r the r-th micro-batch of each global batch) and the same random numbers
    single = tmp_path / "single"
    train(sample_store, single, 1, "train.steps=6", "train.checkpoint_every=6", "train.grad_accum=2")
    one = load_file(single / "final.pt", "tessera-final")
    tag = "step00000006"
    two = load_file(whole / "checkpoints" / "state" / tag / "rank0.pt", "tessera-rank-state")
    for group in ("G", "D"):
        weights = load_engine_weights(whole / "checkpoints" / group / tag)
        for key, value in weights.items():
            torch.testing.assert_close(one["state"][f"{group}.{key}"], value, rtol=1e-4, atol=2e-5,
                                       msg=lambda m, k=key, g=group: f"{g}.{k}: {m}")
    for name in ("augment_pipe.p", "pl_mean"):
        torch.testing.assert_close(one["state"][name], two["buffers"][name], rtol=1e-5, atol=1e-7)
    for key, value in two["g_ema"]["G"].items():
        torch.testing.assert_close(one["ema"]["G"][key], value, rtol=1e-4, atol=2e-5)

    # killed with SIGKILL after a checkpoint, resumed: the same weights, G_ema, p and ticks as `whole`
    cut = tmp_path / "cut"
    killed_at = kill_after_checkpoint(command(sample_store, cut, 2, *steps), environment(), cut, 18)
    resumed = subprocess.run(command(sample_store, cut, 2, resume=True), cwd=ROOT, env=environment(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from step{killed_at:08d} (step {killed_at}" in (cut / "log.txt").read_text()
    again = load_file(cut / "final.pt", "tessera-final")
    assert again["state"].keys() == final["state"].keys()
    for key in final["state"]:
        assert torch.equal(final["state"][key], again["state"][key]), key
    for key in final["ema"]["G"]:
        assert torch.equal(final["ema"]["G"][key], again["ema"]["G"][key]), key
    after = records(cut)
    for step in range(killed_at + 2, 37, 2):  # the ticks after the resume: same kimg, losses and p
        for key in ("kimg", "ada/p", "loss/Gmain", "loss/Dmain", "G/path_length", "D/real_sign"):
            if key in ticks[step]:
                assert after[step][key] == ticks[step][key], (step, key)
