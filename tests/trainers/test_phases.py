"""The phase-based loop with real DeepSpeed engines: a three-group GAN (G, D, E) whose phases each run
their own forward on the latest weights, lazy regularisation every I steps with scaled lr and betas,
G_ema against a hand-computed half-life average, snapshots at the right image counts, statistics
reduced once per tick, and a 2-rank run killed with SIGKILL that resumes bit-identical."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tessera.config import load_config
from tests.trainers import toy_methods
from tests.trainers.killing import kill_after_checkpoint
from tests.trainers.toy_methods import PHASES, fingerprint
from trainers.dist import DistEnv
from trainers.files import load_file
from trainers.loop import Trainer
from trainers.run_dir import create_run_dir

ROOT = Path(__file__).resolve().parents[2]
GAN3 = ["method.name=_toy_gan3", "method.options={g_reg_interval: 2, d_reg_interval: 3}",
        "data.stream.crop=random", "data.stream.crop_size=16", "data.stream.min_tissue_fraction=0.3",
        "train.micro_batch=4", "train.num_workers=0", "train.clip_grad=null", "train.log_every=1",
        "train.groups={G: {lr: 0.002, betas: [0.0, 0.99]}, D: {lr: 0.002, betas: [0.0, 0.99]}, "
        "E: {lr: 0.001}}"]
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def make_trainer(sample_store, tmp_path):
    before = {key: os.environ.get(key) for key in LAUNCH_VARIABLES}

    def build(*overrides, name="run"):
        config = load_config(None, [f"data.store={sample_store}", *GAN3, *overrides])
        create_run_dir(config, name, path=tmp_path / name)
        env = DistEnv.from_env()
        return Trainer(config, tmp_path / name, env, env.init())

    yield build
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def calls(trainer):
    return dict(zip(PHASES, trainer.method.calls.tolist()))


def test_each_phase_runs_its_own_forward_on_its_interval_and_sees_the_latest_weights(make_trainer):
    trainer = make_trainer("train.steps=7", "train.grad_accum=2")
    batches = trainer._batches()
    consumed = []

    def next_batch():
        consumed.append(trainer.global_batch)
        return next(batches)

    for step in range(7):
        before = dict(calls(trainer))
        g_before = {k: v.clone() for k, v in trainer.method.G.state_dict().items()}
        trainer.train_step(next_batch)
        ran = {name: calls(trainer)[name] - before[name] for name in PHASES}
        # two micro-batches (grad_accum) per phase that is due: Greg every 2 steps, Dreg every 3
        assert ran == {"Gmain": 2, "Greg": 2 * (step % 2 == 0), "Emain": 2, "Dmain": 2,
                       "Dreg": 2 * (step % 3 == 0)}, step
        # D's last forward saw G as the G phases of this very step left it, not a stale G
        assert trainer.method.d_saw_g.item() == fingerprint(trainer.method.G).item()
        assert any(not torch.equal(v, trainer.method.G.state_dict()[k]) for k, v in g_before.items())
    assert len(consumed) == sum(calls(trainer).values())  # every phase call fetched its own batch
    assert trainer.group_steps == {"G": 7, "D": 7, "E": 7}  # reg phases do not advance the schedules


def test_lazy_regularisation_scales_lr_and_betas_of_its_group_only(make_trainer):
    trainer = make_trainer("train.steps=2")
    ratio_g, ratio_d = 2 / 3, 3 / 4
    g, d, e = (trainer.engines[k].optimizer.param_groups[0] for k in "GDE")
    assert g["betas"] == pytest.approx((0.0, 0.99 ** ratio_g)) and d["betas"] == pytest.approx((0.0, 0.99 ** ratio_d))
    assert e["betas"] == pytest.approx((0.9, 0.999))
    trainer.fit()
    first, second = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert first["lr/G"] == pytest.approx(0.002 * ratio_g) and first["lr/D"] == pytest.approx(0.002 * ratio_d)
    assert first["lr/E"] == pytest.approx(0.001)
    # every phase's loss and the scalars the method reports, reduced at the tick; step 1 runs no reg phase
    assert {f"loss/{p}" for p in PHASES} | {"G/fake_mean", "D/real_sign"} <= set(first)
    assert "loss/Greg" not in second and "loss/Dreg" not in second and "loss/Gmain" in second
    assert -1 <= first["D/real_sign"] <= 1

    unscaled = make_trainer("train.steps=1", "train.lazy_regularisation_scaling=false", name="unscaled")
    assert unscaled.engines["G"].optimizer.param_groups[0]["betas"] == (0.0, 0.99)


def test_g_ema_is_the_half_life_average_of_the_named_networks(make_trainer):
    trainer = make_trainer("train.steps=5", "train.ema_kimg=0.01", "train.ema_rampup=0.5")
    assert set(trainer.g_ema.networks) == {"G", "E"}  # not D
    batches = trainer._batches()
    expected = {name: {k: v.clone() for k, v in net.named_parameters()} for name, net in trainer.g_ema.networks.items()}
    for step in range(5):
        trainer.train_step(lambda: next(batches))
        images = trainer.step * 4
        half_life = min(10.0, images * 0.5)  # ema_kimg 0.01 = 10 images, ramped up over the first ones
        beta = 0.5 ** (4 / half_life)
        for name in expected:
            live = dict(trainer.method.groups()[name].named_parameters())
            expected[name] = {k: beta * v + (1 - beta) * live[k].detach() for k, v in expected[name].items()}
    for name, network in trainer.g_ema.networks.items():
        for key, value in network.named_parameters():
            torch.testing.assert_close(value, expected[name][key])
        for (key, value), live in zip(network.named_buffers(), trainer.method.groups()[name].buffers()):
            assert torch.equal(value, live), key  # BatchNorm statistics copied, not averaged
    trainer.finish()
    final = load_file(trainer.run_dir / "final.pt", "tessera-final")
    assert set(final["ema"]) == {"G", "E"}
    from trainers.export import load_method

    method, _ = load_method(trainer.run_dir)  # evaluation and export use G_ema
    for key, value in method.G.state_dict().items():
        assert torch.equal(value, trainer.g_ema.networks["G"].state_dict()[key])


def test_snapshots_at_the_right_image_counts_and_the_best_kept(make_trainer):
    # 4 images a step, a snapshot every 12 images: after steps 3, 6 and 9
    trainer = make_trainer("train.steps=10", "train.snapshot_kimg=0.012", "train.snapshot_metric=step",
                           "train.snapshot_mode=max", "train.checkpoint_every=100")
    trainer.fit()
    folders = sorted(p.name for p in (trainer.run_dir / "snapshots").iterdir() if p.is_dir())
    assert folders == ["kimg000000.012", "kimg000000.024", "kimg000000.036"]
    assert (trainer.run_dir / "snapshots" / "curves.png").stat().st_size > 1000  # the metrics over kimg
    for folder in folders:
        path = trainer.run_dir / "snapshots" / folder
        assert (path / "fakes.png").stat().st_size > 100 and (path / "reals.png").is_file()
        assert load_file(path / "model.pt", "tessera-final")["ema"]
    shots = [json.loads(line) for line in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()
             if "snapshot_kimg" in line]
    assert [(r["step"], r["snapshot_kimg"], r["snapshot/step"]) for r in shots] == \
        [(3, 0.012, 3.0), (6, 0.024, 6.0), (9, 0.036, 9.0)]
    assert json.loads((trainer.run_dir / "best.json").read_text())["snapshot"] == "kimg000000.036"
    assert (trainer.run_dir / "best.pt").read_bytes() == \
        (trainer.run_dir / "snapshots" / "kimg000000.036" / "model.pt").read_bytes()


def test_a_method_whose_groups_share_parameters_is_refused():
    from torch import nn

    from core.methods.base import Method, Phase, check_phases

    class Shared(Method):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(2, 2)
            self.head = nn.Sequential(self.body, nn.Linear(2, 1))

        def groups(self):
            return {"A": self.body, "B": self.head}

        def phases(self):
            return [Phase("a", "A", None), Phase("b", "B", None)]

    with pytest.raises(ValueError, match="share parameters"):
        check_phases(Shared())


def gan_command(store, run_dir, *overrides, resume=False):
    command = [sys.executable, "-m", "tessera.cli", "train", "--nproc", "2", "--run-dir", str(run_dir)]
    if resume:
        return command + ["--resume"]
    sets = [f"data.store={store}", *GAN3, "train.num_workers=1", "train.log_every=5", *overrides]
    return command + [arg for value in sets for arg in ("--set", value)]


def launch_env():
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "TESSERA_METHOD_MODULES": "tests.trainers.toy_methods"}


def test_two_rank_gan_killed_and_resumed_ends_bit_identical(sample_store, tmp_path):
    steps = ["train.steps=36", "train.checkpoint_every=6", "train.snapshot_kimg=0.096"]
    whole = tmp_path / "whole"
    done = subprocess.run(gan_command(sample_store, whole, *steps), cwd=ROOT, env=launch_env(), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    final = load_file(whole / "final.pt", "tessera-final")
    # rank 0's own count of phase calls: every phase on its interval, one forward each (grad_accum 1)
    assert dict(zip(PHASES, final["state"]["calls"].tolist())) == \
        {"Gmain": 36, "Greg": 18, "Emain": 36, "Dmain": 36, "Dreg": 12}
    g = {k[2:]: v for k, v in final["state"].items() if k.startswith("G.")}
    live = toy_methods.ToyGAN3(toy_methods.ToyGAN3.Config()).G
    live.load_state_dict(g)
    assert final["state"]["d_saw_g"].item() == fingerprint(live).item()  # the last D step saw the final G
    log = (whole / "log.txt").read_text()
    assert "phases: Gmain (G), Greg (G, every 2), Emain (E), Dmain (D), Dreg (D, every 3)" in log
    assert "2 rank(s)" in log

    cut = tmp_path / "cut"
    kill_after_checkpoint(gan_command(sample_store, cut, *steps), launch_env(), cut, 18)
    resumed = subprocess.run(gan_command(sample_store, cut, resume=True), cwd=ROOT, env=launch_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    again = load_file(cut / "final.pt", "tessera-final")
    for part in ("state", "ema"):
        a, b = (final[part], again[part]) if part == "state" else \
            ({f"{n}.{k}": v for n, sd in final["ema"].items() for k, v in sd.items()},
             {f"{n}.{k}": v for n, sd in again["ema"].items() for k, v in sd.items()})
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (part, key)
