"""The trainer's cost: against a bare PyTorch loop, waiting for data, and with 1 vs 2 processes.

    python bench/trainer.py [--steps 60] [--size 128]

1. Fixed in-memory batches, the reference method: a step of tessera's DeepSpeed trainer (one engine,
   the default ZeRO stage, fp32, gradient clipping, the NaN check) against a bare PyTorch loop (Adam,
   clip_grad_norm_) on the same model and batches, the two alternating step by step. Median step
   time of each, and the ratio.
2. `tessera train` of the default CPU recipe (configs/demo.yaml's method and train sections) streaming
   from a store built from the sample slide: the data-wait share and images/s it logs.
3. The same with --nproc 1 and --nproc 2: images/s (global batch grows with the ranks).
4. Section 1 again with `train.precision: bf16-mixed` against a bare loop under torch.autocast bf16,
   and its speed-up over fp32 (on CPUs, it pays where there is AVX512-BF16 or AMX).
5. A two-phase GAN step (the toy GAN of tests/trainers/toy_methods.py: Gmain, then Dmain on its own
   batch) in tessera's phase loop against the same two phases written by hand in bare PyTorch (two Adam
   optimisers, D frozen for G's loss), on the same networks and batches, alternating step by step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def fixed_batches(count: int, size: int, batch: int) -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(batch, 3, size, size, generator=generator)} for _ in range(count)]


class BareLoop:
    """What a user would write by hand: the method, torch Adam, clip_grad_norm_, one backward per step."""

    def __init__(self, options: dict, lr: float, clip: float, autocast: bool = False):
        from core.methods import create_method

        torch.manual_seed(0)
        self.method = create_method("reference_ae", options).train()
        self.optimizer = torch.optim.Adam(self.method.parameters(), lr=lr)
        self.clip, self.autocast = clip, autocast

    def micro_step(self, batch: dict) -> float:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast):
            loss = self.method.training_step(batch)["model"]
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.method.parameters(), self.clip)
        self.optimizer.step()
        return float(loss.detach())


class BareGAN:
    """A hand-written two-phase GAN step: G's update through a frozen D, then D's on fresh fakes."""

    def __init__(self, lr: float, betas):
        from tests.trainers.toy_methods import ToyGAN

        torch.manual_seed(0)
        self.method = ToyGAN(ToyGAN.Config(critic_steps=1)).train()
        self.g = torch.optim.Adam(self.method.G.parameters(), lr=lr, betas=betas)
        self.d = torch.optim.Adam(self.method.D.parameters(), lr=lr, betas=betas)

    def micro_step(self, batch: dict) -> float:
        losses = []
        for optimiser, net, other, loss_of in ((self.g, self.method.G, self.method.D, self.method._g),
                                               (self.d, self.method.D, self.method.G, self.method._d)):
            other.requires_grad_(False)
            loss = loss_of(batch, None)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            other.requires_grad_(True)
            losses.append(float(loss.detach()))
        return sum(losses)


class TrainerSteps:
    """The trainer fed one given batch per phase (the bare loops get the same batch)."""

    def __init__(self, trainer):
        self.trainer = trainer

    def micro_step(self, batch: dict):
        self.trainer.train_step(lambda: batch)
        return self.trainer.stats.sums  # tensors, read below as the bare loop reads its losses


def interleaved(batches, bare: BareLoop, trainer) -> tuple[list[float], list[float]]:
    """Step times of both loops, alternating on the same batches so that drift (clock, caches, other
    load) hits both alike."""
    times = ([], [])
    cpu = ([], [])
    for batch in batches:
        for loop, out, out_cpu in ((bare, times[0], cpu[0]), (trainer, times[1], cpu[1])):
            started, started_cpu = time.perf_counter(), time.process_time()
            losses = loop.micro_step(batch)
            if isinstance(losses, dict):
                [float(v) for v in losses.values()]  # the trainer's losses are tensors; read them as the bare loop does
            out.append(time.perf_counter() - started)
            out_cpu.append(time.process_time() - started_cpu)
    interleaved.cpu = cpu  # CPU seconds per step, beside the wall times returned
    return times


def describe(name: str, wall: list[float], cpu: list[float], skip: int) -> str:
    """Median wall and CPU ms per step with the interquartile range of the wall time."""
    q = statistics.quantiles(wall[skip:], n=4)
    return (f"{name} {statistics.median(wall[skip:]) * 1000:.1f} ms/step wall (IQR {q[0] * 1000:.1f}-{q[2] * 1000:.1f}), "
            f"{statistics.median(cpu[skip:]) * 1000:.1f} ms CPU")


def train_run(store: Path, run_dir: Path, nproc: int, steps: int) -> dict:
    command = [sys.executable, "-m", "tessera.cli", "train", str(ROOT / "configs" / "demo.yaml"),
               "--nproc", str(nproc), "--run-dir", str(run_dir), "--set", f"data.store={store}",
               "--set", f"train.steps={steps}", "--set", f"train.log_every={steps // 2}",
               "--set", f"train.checkpoint_every={steps}"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"tessera train failed:\n{done.stderr[-3000:]}")
    return json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-trainer")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--size", type=int, default=128)
    args = parser.parse_args()

    from data_plane.benchmarks import make_slide_benchmark
    from data_plane.ingest import ingest, resolve_sources
    from tessera.config import load_config

    torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does for the trained ranks
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    bench = work / "slide-benchmark"
    if not (bench / "manifest.csv").exists():
        make_slide_benchmark(bench)
    store = work / "store.zarr"
    recipe = load_config(bench / "recipe.yaml", [f"data.store={store}"])
    ingest(resolve_sources([], bench / "manifest.csv"), store, recipe.data, show_progress=False)
    # The trainer is built as for a real run (its stream exists) but is fed the fixed batches.
    config = load_config(ROOT / "configs" / "demo.yaml", [f"data.store={store}"])
    batches = fixed_batches(args.steps, args.size, config.train.micro_batch)
    from trainers.dist import DistEnv
    from trainers.loop import Trainer
    from tests.trainers import toy_methods  # noqa: F401  (registers the toy GANs)

    env = DistEnv.from_env()
    device = env.init()
    skip = max(3, args.steps // 10)  # warm-up steps excluded from both

    def fixed_run(precision: str) -> float:
        """Section 1 (fp32) or 4 (bf16-mixed): median ms/step of the trainer, printed beside the bare loop's."""
        config = load_config(ROOT / "configs" / "demo.yaml", [f"data.store={store}", f"train.precision={precision}"])
        (work / f"fixed-run-{precision}").mkdir(exist_ok=True)
        trainer = Trainer(config, work / f"fixed-run-{precision}", env, device)  # built as for a real run
        bare_loop = BareLoop(config.method.options, config.train.lr, config.train.clip_grad,
                             autocast=precision == "bf16-mixed")
        bare, ours = interleaved(batches, bare_loop, TrainerSteps(trainer))
        bare_ms, ours_ms = (statistics.median(t[skip:]) * 1000 for t in (bare, ours))
        print(f"fixed batches of {config.train.micro_batch} x 3 x {args.size}², reference_ae "
              f"{config.method.options}, {precision}:")
        print(f"  {describe('bare PyTorch loop' + (' (autocast bf16)' if bare_loop.autocast else ''), bare, interleaved.cpu[0], skip)}")
        print(f"  {describe('tessera trainer', ours, interleaved.cpu[1], skip)}; trainer/bare = {ours_ms / bare_ms:.3f}")
        return ours_ms

    fp32_ms = fixed_run("fp32")

    rows = {}
    for nproc in (1, 2):
        run_dir = work / f"run-{nproc}-{int(time.time())}"
        rows[nproc] = train_run(store, run_dir, nproc, args.steps)
    print(f"tessera train, demo recipe, streaming {args.steps} steps from {store.name} (num_workers "
          f"{config.train.num_workers}):")
    for nproc, record in rows.items():
        print(f"  --nproc {nproc}: {record['images_per_s']:.0f} images/s (global batch {record['global_batch']}), "
              f"data-wait share {record['data_wait_share']:.1%}, peak CPU {record['peak_cpu_mib']:.0f} MiB")
    print(f"  2 vs 1 processes: {rows[2]['images_per_s'] / rows[1]['images_per_s']:.2f}x images/s")

    mixed_ms = fixed_run("bf16-mixed")
    print(f"  bf16-mixed vs fp32 trainer: {fp32_ms / mixed_ms:.2f}x steps/s")

    # 5. two phases: the toy GAN at 64², G then D
    gan = load_config(None, [f"data.store={store}", "method.name=_toy_gan", "method.options={critic_steps: 1}",
                             "train.clip_grad=null", "train.micro_batch=16", "train.num_workers=0",
                             "train.groups={G: {betas: [0.0, 0.99]}, D: {betas: [0.0, 0.99]}}"])
    (work / "fixed-run-gan").mkdir(exist_ok=True)
    trainer = Trainer(gan, work / "fixed-run-gan", env, device)
    gan_batches = fixed_batches(args.steps, 64, 16)
    bare, ours = interleaved(gan_batches, BareGAN(gan.train.lr, (0.0, 0.99)), TrainerSteps(trainer))
    bare_ms, ours_ms = (statistics.median(t[skip:]) * 1000 for t in (bare, ours))
    print("two-phase GAN step (Gmain, Dmain), batches of 16 x 3 x 64², fp32:")
    print(f"  {describe('bare PyTorch two-optimiser loop', bare, interleaved.cpu[0], skip)}")
    print(f"  {describe('tessera phase loop', ours, interleaved.cpu[1], skip)}; trainer/bare = {ours_ms / bare_ms:.3f}")


if __name__ == "__main__":
    main()
