"""The loop's options, in-process on one rank with real DeepSpeed engines: a two-engine GAN-style
method with its own optimiser settings and update ratio, EMA and SWA weight averages (SWA resumed
mid-phase), and the progressive-growing state handed to methods."""

import json
import os

import pytest
import torch
from core.schedule import growth_at
from tessera.config import load_config
from trainers.dist import DistEnv
from trainers.files import load_file
from trainers.loop import Trainer
from trainers.run_dir import create_run_dir

from tests.trainers import toy_methods  # noqa: F401  (registers the toy GANs)

SMALL = ["data.stream.crop=random", "data.stream.crop_size=32", "data.stream.min_tissue_fraction=0.3",
         "train.micro_batch=4", "train.num_workers=0", "train.log_every=1",
         "method.options={width: 8, depth: 3, bottleneck: 8}"]
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def make_trainer(sample_store, tmp_path):
    before = {key: os.environ.get(key) for key in LAUNCH_VARIABLES}

    def build(*overrides, name="run", cls=Trainer):
        config = load_config(None, [f"data.store={sample_store}", *SMALL, *overrides])
        path = tmp_path / name
        if not (path / "config.yaml").exists():
            create_run_dir(config, name, path=path)
        env = DistEnv.from_env()
        return cls(config, path, env, env.init())

    yield build
    for key, value in before.items():  # leave no launcher variables behind for later in-process runs
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_engines_with_their_own_optimisers_and_update_ratio(make_trainer):
    gan = ["method.name=_toy_gan", "method.options={critic_steps: 2}", "train.clip_grad=null",
           "train.groups={G: {lr: 0.002, betas: [0.0, 0.99]}, D: {lr: 0.005}}"]
    trainer = make_trainer(*gan, "train.steps=4")
    assert set(trainer.engines) == {"G", "D"}
    assert trainer.engines["G"].optimizer.param_groups[0]["betas"] == (0.0, 0.99)
    assert trainer.engines["D"].optimizer.param_groups[0]["betas"] == (0.9, 0.999)
    batches = trainer._batches()
    for step in range(4):
        before = {g: snapshot(m) for g, m in trainer.method.groups().items()}
        trainer.train_step(lambda: next(batches))
        changed = {g: any(not torch.equal(v, snapshot(m)[k]) for k, v in before[g].items())
                   for g, m in trainer.method.groups().items()}
        assert changed == {"D": True, "G": step % 2 == 0}, step
    assert trainer.engines["G"].get_lr()[0] == pytest.approx(0.002)
    assert trainer.engines["D"].get_lr()[0] == pytest.approx(0.005)
    assert trainer.group_steps == {"G": 2, "D": 4}

    fitted = make_trainer(*gan, "train.steps=4", "train.log_every=2", name="fit")
    fitted.fit()
    logged = records(fitted.run_dir)
    assert [r["step"] for r in logged] == [2, 4]
    assert all({"loss/Gmain", "loss/Dmain", "lr/G", "lr/D"} <= set(r) for r in logged)


def test_ema_is_the_exponential_average_of_the_weights_after_each_step(make_trainer):
    trainer = make_trainer("train.ema=0.8", "train.steps=3", "train.clip_grad=null")
    batches = trainer._batches()
    expected = None
    for _ in range(3):
        trainer.train_step(lambda: next(batches))
        now = snapshot(trainer.method)
        expected = now if expected is None else {k: 0.8 * expected[k] + 0.2 * now[k] for k in now}
    averaged = snapshot(trainer.average.module)
    assert averaged.keys() == expected.keys()
    for key in expected:
        torch.testing.assert_close(averaged[key], expected[key])
    assert not torch.equal(averaged[key], now[key])


class RecordingTrainer(Trainer):
    """Keeps the weights at every SWA snapshot, and can be cut off after a given step."""

    stop_after: int | None = None

    def _after_step(self):
        super()._after_step()
        if self.period == "swa" and (self.step - self.train.steps) % self.train.swa.cycle_steps == 0:
            self.snapshots = getattr(self, "snapshots", []) + [snapshot(self.method)]
        if self.stop_after is not None and self.step == self.stop_after:
            raise KeyboardInterrupt("cut off")


SWA = ["train.steps=2", "train.checkpoint_every=3",
       "train.swa={steps: 4, cycle_steps: 2, lr_max: 0.01, lr_min: 0.001, bn_batches: 2}"]


def test_swa_averages_the_cycle_minima_and_resumes_mid_phase(make_trainer):
    whole = make_trainer(*SWA, name="whole", cls=RecordingTrainer)
    whole.fit()
    assert isinstance(whole.engines["model"].client_optimizer, torch.optim.SGD)
    assert len(whole.snapshots) == 2
    final = load_file(whole.run_dir / "final.pt", "tessera-final")
    assert final["averaged"] == "swa"
    for key in whole.snapshots[0]:
        torch.testing.assert_close(final["state"][key], (whole.snapshots[0][key] + whole.snapshots[1][key]) / 2)
    tracked = [v for k, v in final["state"].items() if k.endswith("num_batches_tracked")]
    assert tracked and all(int(v) == 2 for v in tracked)  # BatchNorm statistics recomputed on 2 batches
    # lr of each SWA step: the saw-tooth from lr_max down to lr_min per 2-step cycle
    swa_lrs = [r["lr/model"] for r in records(whole.run_dir) if r["phase"] == "swa"]
    assert swa_lrs == pytest.approx([0.01, 0.001, 0.01, 0.001])  # the rate each step used

    cut = make_trainer(*SWA, name="cut", cls=RecordingTrainer)
    cut.stop_after = 5  # the last checkpoint is at step 3, inside the SWA phase
    with pytest.raises(KeyboardInterrupt):
        cut.fit()
    assert json.loads((cut.run_dir / "checkpoints" / "latest.json").read_text()) == \
        {"tag": "step00000003", "step": 3, "phase": "swa"}
    resumed = make_trainer(*SWA, name="cut")
    assert resumed.load_checkpoint() and resumed.period == "swa"
    resumed.fit()
    again = load_file(resumed.run_dir / "final.pt", "tessera-final")["state"]
    for key, value in final["state"].items():
        assert torch.equal(value, again[key]), key


def test_methods_receive_the_progressive_growing_state(make_trainer):
    growing = {"start_resolution": 8, "target_resolution": 32, "stable_images": 8, "fade_images": 8}
    trainer = make_trainer("train.steps=10", "train.growing=" + json.dumps(growing))
    seen = []
    original = trainer.method.training_step
    trainer.method.training_step = lambda batch, state: (seen.append(state), original(batch, state))[1]
    trainer.fit()
    assert [s.step for s in seen] == list(range(10))
    for state in seen:
        assert state.images_seen == state.step * 4
        assert (state.resolution, state.alpha, state.stage) == growth_at(state.images_seen, *growing.values())
    assert {s.resolution for s in seen} == {8, 16, 32}
    logged = records(trainer.run_dir)
    assert logged[-1]["resolution"] == 32 and 0 <= logged[-1]["alpha"] <= 1


def test_learning_rate_schedule_warms_up_then_holds_or_decays():
    from trainers.schedules import lr_factor

    assert lr_factor(0, 0, 100, "constant") == 1.0  # no warm-up: the first step already uses the peak
    assert [lr_factor(s, 4, 100, "constant") for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    cosine = [lr_factor(s, 10, 110, "cosine") for s in range(10, 111)]
    assert cosine[0] == 1.0 and cosine[50] == pytest.approx(0.5) and cosine[-1] == pytest.approx(0.0)
    assert all(a >= b for a, b in zip(cosine, cosine[1:]))
