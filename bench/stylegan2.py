"""StyleGAN2's cost: training and generation images/s per process, the trainer against a bare PyTorch
loop of the same networks, and (GPU mode) configs E/F at 512², torch.compile, and scaling over GPUs.

    python bench/stylegan2.py [--steps 40]                    # CPU, 64², the CPU recipe's networks
    python bench/stylegan2.py --gpu [--batch 32] [--scaling 1,2,4,8] [--steps 60]

1. Training on fixed in-memory batches: a step of tessera's phase loop (DeepSpeed engines for G and D;
   Gmain, Greg every 4, Dmain, Dreg every 16; G_ema; ADA's adjust every 4 steps) against the same four
   phases written by hand in bare PyTorch (two Adam optimisers with the lazy-regularisation scaling, D
   frozen for G's phases, an EMA copy of G), alternating step by step on the same batches. Median and
   interquartile range of wall time per step, CPU time beside it, and images/s = batch / median step.
2. Generation: G_ema's images/s (no gradients), one grouped convolution per layer ("fused") against the
   styles-on-activations form ("split").
3. (--stream) `tessera train` of configs/stylegan2_cpu.yaml, streaming from the sample slide's store,
   with --nproc 1 and 2: the images/s the trainer logs.

GPU mode (--gpu): sections 1-2 at 512² for configs E and F under bf16 autocast (train.precision
bf16-mixed), per GPU; torch.compile of the main phases' networks checked equal to the plain code within
tolerance, and its speed; then `tessera train` of configs/stylegan2_camelyon16.yaml's method on the
sample slide at 512² with --nproc N for each N of --scaling, images/s and efficiency against N x one
GPU. The goal (issue 23): >= 2.5x the 13.5 img/s of StyleGAN2-ADA on one V100 at 512², >= 90 % scaling
to 8 GPUs.
"""

from __future__ import annotations

import argparse
import copy
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

from bench.trainer import TrainerSteps, describe, interleaved  # noqa: E402

V100_IMG_S = 13.5  # StyleGAN2-ADA at 512² on one V100 (the reference)


class BareStyleGAN2:
    """The four phases by hand: what a user would write around the same networks and losses."""

    def __init__(self, options: dict, lr: float, betas, ema_kimg: float, device, autocast: bool):
        from core.methods import create_method
        from trainers.schedules import lazy_ratio

        torch.manual_seed(0)
        self.method = create_method("stylegan2", options).to(device).train()
        self.phases = self.method.phases()
        self.optimisers = {}
        for group, module in self.method.groups().items():
            interval = next((p.interval for p in self.phases if p.group == group and p.regularisation), None)
            ratio = lazy_ratio(interval) if interval else 1.0
            self.optimisers[group] = torch.optim.Adam(module.parameters(), lr=lr * ratio,
                                                      betas=tuple(b ** ratio for b in betas))
        self.g_ema = copy.deepcopy(self.method.G).eval().requires_grad_(False)
        self.ema_kimg, self.autocast, self.device = ema_kimg, autocast, device
        self.step, self.pending = 0, {}

    def micro_step(self, batch: dict):
        batch = {k: v.to(self.device) for k, v in batch.items()}
        n = len(batch["image"])
        losses = []
        for phase in self.phases:
            if self.step % phase.interval:
                continue
            for group, module in self.method.groups().items():
                module.requires_grad_(group == phase.group)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                out = phase.loss(batch if phase.data else {"batch_size": n}, None)
            optimiser = self.optimisers[phase.group]
            optimiser.zero_grad(set_to_none=True)
            out["loss"].backward()
            optimiser.step()
            losses.append(out["loss"].detach())
            for name, value in out.items():
                if name != "loss":
                    self.pending.setdefault(name, []).append(value.detach().float())
        for module in self.method.groups().values():
            module.requires_grad_(True)
        beta = 0.5 ** (n / (self.ema_kimg * 1000))
        with torch.no_grad():
            for a, p in zip(self.g_ema.parameters(), self.method.G.parameters()):
                a.copy_(p.lerp(a, beta))
        self.step += 1
        if self.step % self.method.adjust_interval == 0:
            stats = {k: torch.stack(v).mean(0) for k, v in self.pending.items()}
            self.method.adjust({k: (float(v) if v.numel() == 1 else v) for k, v in stats.items()}, None,
                               n * self.method.adjust_interval)
            self.pending = {}
        return float(torch.stack(losses).sum())  # read as the trainer's losses are read


def generation(method, g, batch: int, device, repeats: int, autocast: bool) -> dict[str, float]:
    """Images/s of ``g`` without gradients, fused and split modulated convolutions, alternating."""
    times = {"fused": [], "split": []}
    z = torch.randn(batch, method.config.z_dim, device=device)
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        for _ in range(repeats):
            for mode in times:
                started = time.perf_counter()
                g(z, noise_mode="const", fused=mode == "fused")
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times[mode].append(time.perf_counter() - started)
    skip = max(1, repeats // 5)
    return {mode: batch / statistics.median(t[skip:]) for mode, t in times.items()}


def sample_store(work: Path, tile: int) -> Path:
    from data_plane.ingest import ingest, resolve_sources
    from data_plane.sample_data import fetch_sample_data
    from tessera.config import load_config

    store = work / f"sample-{tile}.zarr"
    config = load_config(None, [f"data.tiles.size={tile}", "data.tiles.magnification=20"])
    ingest(resolve_sources([str(fetch_sample_data().slide)]), store, config.data, show_progress=False)
    return store


def train_section(store: Path, work: Path, recipe: Path, options: dict, batch: int, steps: int, device,
                  precision: str, label: str) -> float:
    """Section 1 for one configuration; returns the trainer's images/s."""
    from tessera.config import load_config
    from trainers.dist import DistEnv
    from trainers.loop import Trainer

    options_yaml = json.dumps(options)
    config = load_config(recipe, [f"data.store={store}", f"method.options={options_yaml}",
                                  f"train.micro_batch={batch}", f"train.precision={precision}",
                                  "data.stream.min_tissue_fraction=0.0", "train.snapshot_kimg=null",
                                  f"data.stream.crop_size={options['resolution']}"])
    run_dir = work / f"fixed-{label}-{int(time.time())}"
    run_dir.mkdir(parents=True)
    env = DistEnv.from_env()
    trainer = Trainer(config, run_dir, env, device)
    bare = BareStyleGAN2(config.method.options, config.train.lr, config.train.betas, config.train.ema_kimg,
                         device, autocast=precision == "bf16-mixed")
    generator = torch.Generator().manual_seed(0)
    res = options["resolution"]
    batches = [{"image": torch.rand(batch, 3, res, res, generator=generator)} for _ in range(steps)]
    if device.type == "cuda":
        batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    skip = max(4, steps // 8)
    bare_t, ours_t = interleaved(batches, bare, TrainerSteps(trainer))
    bare_ms, ours_ms = (statistics.median(t[skip:]) * 1000 for t in (bare_t, ours_t))
    print(f"{label}: training steps on fixed batches of {batch} x 3 x {res}², {precision} "
          f"(Gmain, Greg/4, Dmain, Dreg/16, G_ema, ADA):")
    print(f"  {describe('bare PyTorch four-phase loop', bare_t, interleaved.cpu[0], skip)}; "
          f"{batch / bare_ms * 1000:.1f} img/s")
    print(f"  {describe('tessera phase loop', ours_t, interleaved.cpu[1], skip)}; {batch / ours_ms * 1000:.1f} img/s; "
          f"trainer/bare = {ours_ms / bare_ms:.3f}")
    rates = generation(trainer.method, trainer.g_ema.networks["G"], batch, device, max(steps // 2, 6),
                       precision == "bf16-mixed")
    print(f"  generation (G_ema, no gradients): fused {rates['fused']:.1f} img/s, split {rates['split']:.1f} img/s")
    for engine in trainer.engines.values():
        engine.destroy()
    return batch / ours_ms * 1000


def compile_check(options: dict, batch: int, device) -> None:
    """torch.compile of G's synthesis and D equals the plain code within tolerance; and its speed."""
    from core.methods import create_method

    torch.manual_seed(0)
    method = create_method("stylegan2", options).to(device).train()
    ws = method.G.mapping(torch.randn(batch, method.config.z_dim, device=device))
    images = torch.rand(batch, 3, options["resolution"], options["resolution"], device=device) * 2 - 1
    synthesis, d = torch.compile(method.G.synthesis), torch.compile(method.D)
    with torch.no_grad():
        plain = (method.G.synthesis(ws, noise_mode="const", fused=False), method.D(images))
        compiled = (synthesis(ws, noise_mode="const", fused=False), d(images))
    for name, a, b in zip(("synthesis", "D"), plain, compiled):
        error = ((a - b).abs().max() / a.abs().max().clamp_min(1e-6)).item()
        print(f"  torch.compile {name}: max relative difference {error:.2e} ({'ok' if error < 1e-3 else 'TOO LARGE'})")
    times = {"plain": [], "compiled": []}
    for _ in range(12):
        for mode, (s, dd) in (("plain", (method.G.synthesis, method.D)), ("compiled", (synthesis, d))):
            torch.cuda.synchronize()
            started = time.perf_counter()
            loss = dd(s(ws.detach(), fused=False)).sum()
            loss.backward()
            torch.cuda.synchronize()
            times[mode].append(time.perf_counter() - started)
    plain_ms, compiled_ms = (statistics.median(t[3:]) * 1000 for t in times.values())
    print(f"  G+D forward/backward, batch {batch}: plain {plain_ms:.1f} ms, compiled {compiled_ms:.1f} ms "
          f"({plain_ms / compiled_ms:.2f}x)")


def stream_runs(store: Path, work: Path, recipe: Path, nprocs: list[int], steps: int, extra: list[str]) -> None:
    rows = {}
    for nproc in nprocs:
        run_dir = work / f"stream-{nproc}-{int(time.time())}"
        sets = [f"data.store={store}", f"train.steps={steps}", f"train.log_every={max(steps // 3, 1)}",
                f"train.checkpoint_every={steps}", "train.snapshot_kimg=null", *extra]
        command = [sys.executable, "-m", "tessera.cli", "train", str(recipe), "--nproc", str(nproc),
                   "--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")})
        if done.returncode:
            raise SystemExit(f"tessera train --nproc {nproc} failed:\n{done.stderr[-3000:]}")
        ticks = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        ticks = [t for t in ticks if "images_per_s" in t]
        rows[nproc] = ticks[-1]  # the last tick: past start-up
    base = rows[nprocs[0]]["images_per_s"] / nprocs[0]
    print(f"tessera train {recipe.name}, streaming {steps} steps:")
    for nproc, record in rows.items():
        rate = record["images_per_s"]
        print(f"  --nproc {nproc}: {rate:.1f} img/s ({rate / nproc:.1f} per process, global batch "
              f"{record['global_batch']}), data-wait share {record['data_wait_share']:.1%}, "
              f"scaling efficiency {rate / (base * nproc):.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=ROOT / ".cache" / "bench-stylegan2")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=None, help="batch per process (CPU 16, GPU 32)")
    parser.add_argument("--gpu", action="store_true", help="512², configs E and F, on CUDA")
    parser.add_argument("--stream", action="store_true", help="CPU: also tessera train --nproc 1 and 2")
    parser.add_argument("--scaling", default="1", help="GPU: process counts for tessera train, e.g. 1,2,4,8")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)

    if not args.gpu:
        torch.set_num_threads(1)  # as OMP_NUM_THREADS=1 does for the trained ranks
        store = sample_store(args.work, 256)
        recipe = ROOT / "configs" / "stylegan2_cpu.yaml"
        from tessera.config import load_config

        options = load_config(recipe).method.options
        device = torch.device("cpu")
        from trainers.dist import DistEnv

        DistEnv.from_env().init()
        train_section(store, args.work, recipe, options, args.batch or 16, args.steps, device, "fp32", "CPU 64²")
        if args.stream:
            stream_runs(store, args.work, recipe, [1, 2], max(args.steps, 40), [f"data.store={store}"])
        return

    if not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device is visible")
    from trainers.dist import DistEnv

    device = DistEnv.from_env().init()
    store = sample_store(args.work, 512)
    recipe = ROOT / "configs" / "stylegan2_camelyon16.yaml"
    from tessera.config import load_config

    batch = args.batch or 32
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    for config_name in ("E", "F"):
        options = {**load_config(recipe, [f"data.store={store}"]).method.options, "config": config_name,
                   "channel_base": None}
        rate = train_section(store, args.work, recipe, options, batch, args.steps, device, "bf16-mixed",
                             f"config {config_name} 512²")
        print(f"  config {config_name}: {rate:.1f} img/s per GPU = {rate / V100_IMG_S:.2f}x StyleGAN2-ADA's "
              f"{V100_IMG_S} img/s on a V100 (goal 2.5x)")
    options = {**load_config(recipe, [f"data.store={store}"]).method.options}
    print("torch.compile (config E, 512²):")
    compile_check(options, min(batch, 16), device)
    counts = [int(n) for n in args.scaling.split(",") if n]
    counts = [n for n in counts if n <= torch.cuda.device_count()]
    stream_runs(store, args.work, recipe, counts, args.steps,
                ["data.stream.min_tissue_fraction=0.0", f"train.micro_batch={batch}", "train.num_workers=6"])


if __name__ == "__main__":
    main()
