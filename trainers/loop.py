"""The training loop: one DeepSpeed engine per optimised network group, for every method.

The method (core/methods) computes one loss per group; this loop owns devices, precision, ranks,
optimisers, schedules, checkpoints and logging. Rank logic is in trainers/dist.py; only the main
rank writes logs, metrics and the checkpoint index.
"""

from __future__ import annotations

import json
import math
import random
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from trainers.config import TrainConfig
from trainers.dist import DistEnv
from trainers.run_dir import RunDir


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(train: TrainConfig, precision: str) -> dict:
    """The DeepSpeed config of one engine (every group gets the same optimiser settings)."""
    total = train.steps
    scheduler = {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr,
                                                "warmup_num_steps": max(train.warmup_steps, 1),
                                                "warmup_type": "linear"}}
    if train.lr_schedule == "cosine":
        scheduler = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": train.lr,
                                                         "warmup_num_steps": max(train.warmup_steps, 1),
                                                         "total_num_steps": max(total, train.warmup_steps + 1),
                                                         "warmup_type": "linear"}}
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        # torch's Adam: DeepSpeed's fused CPU Adam would first compile for ~40 s.
        "optimizer": {"type": "AdamW" if train.weight_decay else "Adam",
                      "params": {"lr": train.lr, "weight_decay": train.weight_decay, "torch_adam": True}},
        "scheduler": scheduler,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if train.clip_grad is not None:
        config["gradient_clipping"] = train.clip_grad
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def _to_device(batch: dict, device: torch.device, dtype: torch.dtype) -> dict:
    out = {}
    for key, value in batch.items():
        if torch.is_tensor(value):
            value = value.to(device, non_blocking=True)
            if value.is_floating_point():
                value = value.to(dtype)
        out[key] = value
    return out


class Trainer:
    """Builds the method, its engines and the stream from a run config, then trains for ``train.steps``."""

    def __init__(self, config, run_dir: Path, env: DistEnv, device: torch.device):
        from core.methods import create_method

        self.config, self.train, self.env, self.device = config, config.train, env, device
        self.run_dir = Path(run_dir)
        self.log = RunDir(self.run_dir) if env.is_main else None
        self.precision = resolve_precision(self.train.precision)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]
        torch.manual_seed(config.seed)  # same initial weights everywhere (DeepSpeed also broadcasts rank 0's)
        self.method = create_method(config.method.name, config.method.options).to(device)
        self.engines = self._engines()
        self.stream = self._stream()
        self.step, self.epoch, self.global_batch = 0, 0, 0  # global_batch: this rank's batches consumed
        self.checkpoints = self.run_dir / "checkpoints"
        self._tensorboard = None  # created on the main rank at the first tick

    def _engines(self) -> dict:
        import deepspeed

        engines = {}
        for group, module in self.method.groups().items():
            params = [p for p in module.parameters() if p.requires_grad]
            engine, *_ = deepspeed.initialize(model=module, model_parameters=params,
                                              config=deepspeed_config(self.train, self.precision))
            engines[group] = engine
        return engines

    def _stream(self):
        data = self.config.data
        if self.train.data == "slices":
            from data_plane.volume_stream import SliceStream

            stream = SliceStream(data.store, data.volume_stream, rank=self.env.rank, world_size=self.env.world_size)
        else:
            from data_plane.stream import TileStream

            stream = TileStream(data.store, data.stream, stain=data.stain, rank=self.env.rank,
                                world_size=self.env.world_size)
        return stream.batched(self.train.micro_batch)

    def _batches(self):
        """Batches for the rest of the run from one DataLoader whose workers never restart (an endless
        stream), starting at the global batch a resumed run had reached."""
        from torch.utils.data import DataLoader

        loader = DataLoader(self.stream.endless(self.global_batch), batch_size=None,
                            num_workers=self.train.num_workers, pin_memory=self.device.type == "cuda")
        for batch in loader:
            self.global_batch = int(batch.pop("global_batch")) + 1
            self.epoch = int(batch.pop("epoch"))
            yield batch

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        """Engines, optimiser and scheduler states (DeepSpeed), then this rank's stream position and RNG
        states; ``latest.json`` is replaced last, so a checkpoint cut short is never the one resumed."""
        import torch.distributed as dist

        tag = f"step{self.step:08d}"
        for group, engine in self.engines.items():
            engine.save_checkpoint(str(self.checkpoints / group), tag=tag, save_latest=False)
        state_dir = self.checkpoints / "state" / tag
        state_dir.mkdir(parents=True, exist_ok=True)
        torch.save({"step": self.step, "epoch": self.epoch, "global_batch": self.global_batch,
                    "torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   state_dir / f"rank{self.env.rank}.pt")
        dist.barrier()
        if self.env.is_main:
            latest = self.checkpoints / "latest.json"
            partial = latest.with_suffix(".partial")
            partial.write_text(json.dumps({"tag": tag, "step": self.step}))
            partial.replace(latest)
            self._prune(keep=tag)
            self.log.log(f"checkpoint {tag} written")
        dist.barrier()

    def _prune(self, keep: str) -> None:
        tags = sorted(p.name for p in (self.checkpoints / "state").iterdir() if p.name.startswith("step"))
        for tag in tags[: max(len(tags) - self.train.keep_checkpoints, 0)]:
            if tag == keep:
                continue
            for folder in [self.checkpoints / "state" / tag] + [self.checkpoints / g / tag for g in self.engines]:
                shutil.rmtree(folder, ignore_errors=True)

    def load_checkpoint(self) -> bool:
        """Continue from ``latest.json`` if there is one; returns whether it did."""
        latest = self.checkpoints / "latest.json"
        if not latest.is_file():
            return False
        tag = json.loads(latest.read_text())["tag"]
        for group, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(self.checkpoints / group), tag=tag)
            if path is None:
                raise RuntimeError(f"checkpoint {tag} of group '{group}' in {self.checkpoints} could not be loaded")
        state = torch.load(self.checkpoints / "state" / tag / f"rank{self.env.rank}.pt", weights_only=False)
        self.step, self.epoch, self.global_batch = state["step"], state["epoch"], state["global_batch"]
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if self.log:
            self.log.log(f"resumed from {tag} (step {self.step}, epoch {self.epoch}, batch {self.global_batch})")
        return True

    # ------------------------------------------------------------------------------------ the loop

    def _all_finite(self, losses: dict) -> bool:
        import torch.distributed as dist

        bad = torch.tensor([0.0 if all(torch.isfinite(l).item() for l in losses.values()) else 1.0])
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank stops together
        return bad.item() == 0

    def micro_step(self, batch: dict) -> dict[str, float]:
        """Forward, NaN check, backward and (at accumulation boundaries) optimiser step of every group."""
        batch = _to_device(batch, self.device, self.dtype)
        losses = self.method.training_step(batch, self.step)
        if not self._all_finite(losses):
            message = (f"loss became NaN/inf at step {self.step} "
                       f"({', '.join(f'{g}={float(l):.4g}' for g, l in losses.items())}); stopped. The last "
                       f"good checkpoint is kept in {self.checkpoints}: lower train.lr or enable "
                       f"train.clip_grad, then rerun with --resume")
            if self.log:
                self.log.log(message)
            raise TrainingDiverged(message)
        names = list(losses)
        for i, group in enumerate(names):
            self.engines[group].backward(losses[group], retain_graph=i < len(names) - 1)
        for group in names:
            self.engines[group].step()
        return {group: float(losses[group].detach()) for group in names}

    def fit(self) -> dict:
        import torch.distributed as dist
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        train = self.train
        global_batch = train.micro_batch * train.grad_accum * self.env.world_size
        if self.log:
            self.log.log(f"training {self.config.method.name} for {train.steps} steps on {self.env.world_size} "
                         f"rank(s), {self.device.type}, {self.precision}; global batch {global_batch} = "
                         f"{train.micro_batch} micro x {train.grad_accum} accumulation x {self.env.world_size} ranks")
        self.method.train()
        batches = self._batches()
        last_checkpoint = time.time()
        tick = {"start": time.perf_counter(), "wait": 0.0, "steps": 0, "losses": {g: 0.0 for g in self.engines}}
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[status]}")]
        with Progress(*columns, disable=not self.env.is_main) as bar:
            task = bar.add_task(f"train {self.config.name}", total=train.steps, completed=self.step, status="")
            while self.step < train.steps:
                for _ in range(train.grad_accum):
                    waited = time.perf_counter()
                    batch = next(batches)
                    tick["wait"] += time.perf_counter() - waited
                    for group, loss in self.micro_step(batch).items():
                        tick["losses"][group] += loss / train.grad_accum
                self.step += 1
                tick["steps"] += 1
                bar.update(task, completed=self.step)
                if self.step % train.log_every == 0 or self.step == train.steps:
                    record = self._tick(tick, global_batch)
                    bar.update(task, status=" ".join(f"{k}={v:.4g}" for k, v in record.items() if k.startswith("loss")))
                    tick = {"start": time.perf_counter(), "wait": 0.0, "steps": 0,
                            "losses": {g: 0.0 for g in self.engines}}
                minutes = (time.time() - last_checkpoint) / 60
                due_by_time = torch.tensor([float(train.checkpoint_minutes is not None and
                                                  minutes >= train.checkpoint_minutes)])
                dist.all_reduce(due_by_time, op=dist.ReduceOp.MAX)  # ranks must agree: saving is collective
                if self.step % train.checkpoint_every == 0 or self.step == train.steps or due_by_time.item():
                    self.save_checkpoint()
                    last_checkpoint = time.time()
        if self.env.is_main:
            torch.save({"method": self.config.method.model_dump(), "state": self.method.state_dict()},
                       self.run_dir / "final.pt")
            self.log.log(f"finished {train.steps} steps; weights in {self.run_dir / 'final.pt'}")
        return {"step": self.step}

    def _tick(self, tick: dict, global_batch: int) -> dict:
        import torch.distributed as dist

        elapsed = time.perf_counter() - tick["start"]
        losses = torch.tensor([tick["losses"][g] / max(tick["steps"], 1) for g in self.engines], dtype=torch.float64)
        dist.all_reduce(losses)
        losses /= self.env.world_size
        record = {"step": self.step, "epoch": self.epoch,
                  **{f"loss/{g}": float(v) for g, v in zip(self.engines, losses)},
                  "lr": float(next(iter(self.engines.values())).get_lr()[0]),
                  "images_per_s": global_batch * tick["steps"] / max(elapsed, 1e-9),
                  "data_wait_share": tick["wait"] / max(elapsed, 1e-9),
                  "peak_cpu_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
                  "global_batch": global_batch}
        if self.log:
            self.log.metrics(record)
            if self._tensorboard is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, float) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, self.step)
            self._tensorboard.flush()
        return record


def run(run_dir: str | Path, resume: bool) -> dict:
    """Train the run in ``run_dir`` (its config.yaml) as this process's rank; the launcher's entry point."""
    from tessera.config import load_config

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    env = DistEnv.from_env()
    device = env.init()
    trainer = Trainer(config, run_dir, env, device)
    if resume:
        trainer.load_checkpoint()
    return trainer.fit()
