"""The training loop: one DeepSpeed engine per optimised network group, for every method.

The method (core/methods) computes one loss per group; this loop owns devices, precision, ranks,
optimisers, schedules, checkpoints and logging. Rank logic is in trainers/dist.py; only the main
rank writes logs, metrics and the checkpoint index.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import random
import resource
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from core.schedule import StepState, growth_at
from trainers.config import TrainConfig
from trainers.dist import DistEnv
from trainers.files import load_engine_weights, load_file, load_safely, numpy_state_from_tensors, \
    numpy_state_to_tensors, python_state_from_plain, python_state_to_plain, save_file
from trainers.run_dir import RunDir, RunLock


class TrainingDiverged(RuntimeError):
    """A loss became NaN or infinite; the run stopped and its last good checkpoint was kept."""


def resolve_precision(precision: str) -> str:
    if precision != "auto":
        return precision
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def deepspeed_config(train: TrainConfig, precision: str, group: str | None = None, phase: str = "main") -> dict:
    """The DeepSpeed config of one engine: the run's optimiser settings with the group's overrides. The
    learning-rate schedule is a torch LambdaLR passed to deepspeed.initialize (lr_factor; in the SWA
    phase swa_lr, with a torch optimiser too)."""
    override = train.groups.get(group) if group else None
    lr = override.lr if override and override.lr is not None else train.lr
    betas = override.betas if override and override.betas is not None else train.betas
    decay = override.weight_decay if override and override.weight_decay is not None else train.weight_decay
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if phase == "main":
        # torch's Adam: DeepSpeed's fused CPU Adam would first compile for ~40 s.
        config["optimizer"] = {"type": "AdamW" if decay else "Adam",
                               "params": {"lr": lr, "betas": list(betas), "weight_decay": decay, "torch_adam": True}}
    if train.clip_grad is not None and not own_clipping(train, precision):
        config["gradient_clipping"] = train.clip_grad
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The main phase's learning rate over the peak: linear warm-up reaching 1 at step ``warmup_steps``,
    then constant or a cosine decay to 0 at ``total_steps``. ``step`` counts optimiser steps from 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)))
    return 1.0


def _native_cpu_bf16() -> bool:
    """Whether oneDNN runs bf16 natively on this CPU (AVX512-BF16 or AMX). The check is private torch API,
    so if it is missing the answer is yes (no warning)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return True


def own_clipping(train: TrainConfig, precision: str) -> bool:
    """fp32 weights without ZeRO: gradients are whole and already averaged after backward, so torch's
    fused (foreach) clip does the job; DeepSpeed's own clip walks the parameters one by one in Python."""
    return train.clip_grad is not None and train.zero_stage == 0 and precision in ("fp32", "bf16-mixed")


def swa_lr(step_in_phase: int, swa) -> float:
    """The saw-tooth learning rate of the SWA phase: lr_max at the start of each cycle down to lr_min at
    its last step, where the snapshot is taken."""
    position = step_in_phase % swa.cycle_steps
    return swa.lr_max - (swa.lr_max - swa.lr_min) * position / max(swa.cycle_steps - 1, 1)


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
    """Builds the method, its engines and the stream from a run config, then trains for ``train.steps``
    (plus ``train.swa.steps`` in a stochastic-weight-averaging phase)."""

    def __init__(self, config, run_dir: Path, env: DistEnv, device: torch.device):
        from core.methods import create_method

        self.config, self.train, self.env, self.device = config, config.train, env, device
        self.run_dir = Path(run_dir)
        self.log = RunDir(self.run_dir) if env.is_main else None
        self.precision = resolve_precision(self.train.precision)
        # the dtype batches are cast to: the weights' dtype (bf16-mixed keeps fp32 weights and inputs and
        # lets autocast choose per operation)
        self.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "bf16-mixed": torch.float32,
                      "fp16": torch.float16}[self.precision]
        torch.manual_seed(config.seed)  # same initial weights everywhere (DeepSpeed also broadcasts rank 0's)
        self.method = create_method(config.method.name, config.method.options).to(device)
        unknown = set(self.train.groups) - set(self.method.groups())
        if unknown:
            raise ValueError(f"train.groups names {sorted(unknown)}, but method '{config.method.name}' optimises "
                             f"{sorted(self.method.groups())}")
        self.phase = "main"
        self.engines = self._engines()
        self.average = self._averager()
        self.stream = self._stream()
        self.step, self.epoch, self.global_batch = 0, 0, 0  # global_batch: this rank's batches consumed
        self.images_per_step = self.train.micro_batch * self.train.grad_accum * env.world_size
        self.total_steps = self.train.steps + (self.train.swa.steps if self.train.swa else 0)
        self.checkpoints = self.run_dir / "checkpoints"
        self._tensorboard = None  # created on the main rank at the first tick

    def _engines(self) -> dict:
        import deepspeed

        engines = {}
        for group, module in self.method.groups().items():
            params = [p for p in module.parameters() if p.requires_grad]
            config = deepspeed_config(self.train, self.precision, group, self.phase)
            if self.phase == "swa":
                swa = self.train.swa
                optimizer = torch.optim.SGD(params, lr=swa.lr_max, momentum=swa.momentum) if swa.optimizer == "sgd" \
                    else torch.optim.Adam(params, lr=swa.lr_max, betas=self.train.betas)
                schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: swa_lr(s, swa) / swa.lr_max)
                engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=schedule,
                                                  config=config)
            else:
                factor = functools.partial(lr_factor, warmup_steps=self.train.warmup_steps,
                                           total_steps=self.train.steps, schedule=self.train.lr_schedule)
                engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=config,
                                                  lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor))
            load_safely(engine)
            engines[group] = engine
        return engines

    def _averager(self):
        """The running average of the weights: an EMA from the start, or SWA's snapshot average."""
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        if self.phase == "swa":
            return AveragedModel(self.method, use_buffers=False)  # BatchNorm statistics recomputed at the end
        if self.train.ema is not None:
            return AveragedModel(self.method, multi_avg_fn=get_ema_multi_avg_fn(self.train.ema), use_buffers=True)
        return None

    def _enter_swa(self) -> None:
        for engine in self.engines.values():
            engine.destroy()  # removes ZeRO's gradient hooks before new engines wrap the same parameters
        self.phase = "swa"
        self.engines = self._engines()
        self.average = self._averager()
        if self.log:
            swa = self.train.swa
            self.log.log(f"SWA phase: {swa.steps} steps of {swa.optimizer}, learning rate cycling "
                         f"{swa.lr_max:g} -> {swa.lr_min:g} every {swa.cycle_steps} steps, snapshots averaged")

    def _stream(self):
        data = self.config.data
        if self.train.data in ("slices", "slice_pairs"):
            from data_plane.volume_stream import PairedSliceStream, SliceStream

            kind = PairedSliceStream if self.train.data == "slice_pairs" else SliceStream
            stream = kind(data.store, data.volume_stream, rank=self.env.rank, world_size=self.env.world_size)
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

    def state(self) -> StepState:
        """What methods may read about progress: step, images seen, growth stage, phase."""
        images = self.step * self.images_per_step
        growing = self.train.growing
        if growing is None:
            return StepState(self.step, images, phase=self.phase)
        resolution, alpha, stage = growth_at(images, growing.start_resolution, growing.target_resolution,
                                             growing.stable_images, growing.fade_images)
        return StepState(self.step, images, resolution, alpha, stage, self.phase)

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        """Engines, optimiser and scheduler states (DeepSpeed), then this rank's stream position, RNG
        states and weight average; ``latest.json`` is replaced last, so a checkpoint cut short is never
        the one resumed."""
        import torch.distributed as dist

        self._check_weights_finite("its checkpoint")
        tag = f"step{self.step:08d}"
        for group, engine in self.engines.items():
            engine.save_checkpoint(str(self.checkpoints / group), tag=tag, save_latest=False)
        state_dir = self.checkpoints / "state" / tag
        state_dir.mkdir(parents=True, exist_ok=True)
        save_file({"step": self.step, "epoch": self.epoch, "global_batch": self.global_batch, "phase": self.phase,
                   "average": self.average.state_dict() if self.average is not None else None,
                   "torch": torch.get_rng_state(), "numpy": numpy_state_to_tensors(np.random.get_state()),
                   "python": python_state_to_plain(random.getstate()),
                   "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                  state_dir / f"rank{self.env.rank}.pt", "tessera-rank-state")
        dist.barrier()
        if self.env.is_main:
            latest = self.checkpoints / "latest.json"
            partial = latest.with_suffix(".partial")
            partial.write_text(json.dumps({"tag": tag, "step": self.step, "phase": self.phase}))
            partial.replace(latest)
            self._prune(keep=tag)
            self.log.log(f"checkpoint {tag} written")
        dist.barrier()

    def _check_weights_finite(self, before: str) -> None:
        """Stop before ``before`` is written if any weight or buffer is NaN/inf on any rank: a finite loss
        does not prove finite weights (BatchNorm's running_var overflows first at a huge learning rate), and
        a non-finite checkpoint must never become the one resumed."""
        tensors = {name: t for name, t in [*self.method.named_parameters(), *self.method.named_buffers()]
                   if t.is_floating_point()}
        if self.average is not None:
            tensors.update({f"average.{n}": t for n, t in self.average.module.state_dict().items()
                            if t.is_floating_point()})
        finite = torch.stack([t.detach().isfinite().all() for t in tensors.values()]).all()
        bad = (~finite).float().reshape(1).cpu()
        if self.env.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank stops together
        if bad.item() == 0:
            return
        names = [n for n, t in tensors.items() if not t.detach().isfinite().all()][:3]
        self._diverged(f"weights became NaN/inf by step {self.step} ({', '.join(names) or 'on another rank'}); "
                       f"{before} was not written")

    def _diverged(self, what: str) -> None:
        latest = self.checkpoints / "latest.json"
        step = json.loads(latest.read_text())["step"] if latest.is_file() else None
        lower = f"{self.train.lr / 10:g}"
        advice = (f"the last good checkpoint (step {step}) is kept in {self.checkpoints}: resume it with a lower "
                  f"learning rate than train.lr={self.train.lr:g} (or a smaller train.clip_grad), e.g. "
                  f"`tessera train --run-dir {self.run_dir} --resume --set train.lr={lower}`"
                  if step is not None else
                  f"no checkpoint was written yet: start again with a lower train.lr (e.g. {lower}) or "
                  f"train.clip_grad")
        message = f"{what}; stopped. {advice}"
        if self.log:
            self.log.log(message)
        raise TrainingDiverged(message)

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
        index = json.loads(latest.read_text())
        tag = index["tag"]
        if index.get("phase", "main") == "swa" and self.phase != "swa":
            self._enter_swa()  # the checkpoint holds the SWA optimiser's state
        for group, engine in self.engines.items():
            path, _ = engine.load_checkpoint(str(self.checkpoints / group), tag=tag)
            if path is None:
                raise RuntimeError(f"checkpoint {tag} of group '{group}' in {self.checkpoints} could not be loaded")
        if self.phase == "main":
            self._apply_configured_lr()
        state = load_file(self.checkpoints / "state" / tag / f"rank{self.env.rank}.pt", "tessera-rank-state",
                          f"checkpoint {tag}")
        self.step, self.epoch, self.global_batch = state["step"], state["epoch"], state["global_batch"]
        if self.average is not None and state.get("average") is not None:
            self.average.load_state_dict(state["average"])
        torch.set_rng_state(state["torch"])
        np.random.set_state(numpy_state_from_tensors(state["numpy"]))
        random.setstate(python_state_from_plain(state["python"]))
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
        if self.log:
            self.log.log(f"resumed from {tag} (step {self.step}, epoch {self.epoch}, batch {self.global_batch})")
            if self.step < self.total_steps and (self.run_dir / "final.pt").exists():
                # a finished run extended with --set train.steps: its final.pt no longer is the end of it
                (self.run_dir / "final.pt").unlink()
                self.log.log(f"final.pt removed: the run continues to step {self.total_steps}")
        return True

    def _apply_configured_lr(self) -> None:
        """DeepSpeed restores each scheduler's peak learning rate from the checkpoint; the config's wins, so
        a run resumed with `--set train.lr=…` (after a divergence, say) continues at the new rate."""
        for group, engine in self.engines.items():
            scheduler = engine.lr_scheduler
            peak = deepspeed_config(self.train, self.precision, group)["optimizer"]["params"]["lr"]
            scheduler.base_lrs = [peak] * len(scheduler.optimizer.param_groups)
            rates = [factor(scheduler.last_epoch) * base for factor, base in zip(scheduler.lr_lambdas, scheduler.base_lrs)]
            for param_group, lr in zip(scheduler.optimizer.param_groups, rates):
                param_group["lr"] = lr
            scheduler._last_lr = rates

    # ------------------------------------------------------------------------------------ the loop

    def _all_finite(self, losses: dict) -> bool:
        finite = torch.stack([loss.detach().float() for loss in losses.values()]).isfinite().all()
        if self.env.world_size == 1:
            return bool(finite)
        import torch.distributed as dist

        bad = (~finite).float().reshape(1).cpu()
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank stops together
        return bad.item() == 0

    def micro_step(self, batch: dict, state: StepState | None = None) -> dict[str, torch.Tensor]:
        """Forward, NaN check, backward and (at accumulation boundaries) optimiser step of every group
        the method returned a loss for (a GAN may skip a group on some steps: its update ratio).
        Returns the detached losses."""
        batch = _to_device(batch, self.device, self.dtype)
        with self._autocast():
            losses = self.method.training_step(batch, state or self.state())
        if not self._all_finite(losses):
            self._diverged(f"loss became NaN/inf at step {self.step} "
                           f"({', '.join(f'{g}={float(l):.4g}' for g, l in losses.items())})")
        names = list(losses)
        for i, group in enumerate(names):
            self.engines[group].backward(losses[group], retain_graph=i < len(names) - 1)
        clip = own_clipping(self.train, self.precision)
        for group in names:
            engine = self.engines[group]
            if clip and engine.is_gradient_accumulation_boundary():
                torch.nn.utils.clip_grad_norm_(engine.module.parameters(), self.train.clip_grad, foreach=True)
            engine.step()
        return {group: losses[group].detach() for group in names}

    def _autocast(self):
        """bf16-mixed: convolutions and matrix products in bf16, reductions and losses in fp32 (torch's
        autocast lists); the backward pass follows the forward's dtypes."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed")

    def _after_step(self) -> None:
        """Update the weight average: the EMA after every step, SWA at the end of every cycle (lowest LR)."""
        if self.average is None:
            return
        if self.phase == "main":
            self.average.update_parameters(self.method)
        elif (self.step - self.train.steps) % self.train.swa.cycle_steps == 0:
            self.average.update_parameters(self.method)

    def _new_tick(self) -> dict:
        return {"start": time.perf_counter(), "wait": 0.0, "steps": 0,
                "losses": {g: torch.zeros((), dtype=torch.float64) for g in self.engines},
                "counts": {g: 0 for g in self.engines}}

    def fit(self) -> dict:
        self.advance(self.total_steps)
        self.finish()
        return {"step": self.step}

    def finish(self) -> None:
        """Write final.pt after the last step (see _finish)."""
        self._finish(self._running["batches"])

    def advance(self, until: int, show_progress: bool = True) -> None:
        """Train up to step ``until`` (at most the run's total). Callable repeatedly: a search reads the
        model between calls (tune reports validation AUROC every few steps) and the stream, tick and
        checkpoint clock carry on where the last call stopped."""
        import torch.distributed as dist
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        train = self.train
        if getattr(self, "_running", None) is None:
            if self.log:
                self.log.log(f"training {self.config.method.name} for {train.steps} steps"
                             f"{f' + {train.swa.steps} SWA steps' if train.swa else ''} on {self.env.world_size} "
                             f"rank(s), {self.device.type}, {self.precision}; global batch {self.images_per_step} = "
                             f"{train.micro_batch} micro x {train.grad_accum} accumulation x {self.env.world_size} ranks")
                if self.precision == "bf16-mixed" and self.device.type == "cpu" and not _native_cpu_bf16():
                    self.log.log("warning: this CPU has neither AVX512-BF16 nor AMX, so bf16-mixed is emulated "
                                 "and slower than fp32; set train.precision=fp32")
            self._prepare_statistics()
            self._running = {"batches": self._batches(), "last_checkpoint": time.time(), "tick": self._new_tick()}
        running = self._running
        batches = running["batches"]
        self.method.train()
        until = min(until, self.total_steps)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[status]}")]
        with Progress(*columns, disable=not (self.env.is_main and show_progress)) as bar:
            task = bar.add_task(f"train {self.config.name}", total=self.total_steps, completed=self.step, status="")
            while self.step < until:
                if self.step == train.steps and train.swa is not None and self.phase == "main":
                    self._enter_swa()
                    running["tick"] = self._new_tick()
                tick = running["tick"]
                state = self.state()
                for _ in range(train.grad_accum):
                    waited = time.perf_counter()
                    batch = next(batches)
                    tick["wait"] += time.perf_counter() - waited
                    for group, loss in self.micro_step(batch, state).items():
                        tick["losses"][group] += loss.double().cpu()
                        tick["counts"][group] += 1
                self.step += 1
                self._after_step()
                tick["steps"] += 1
                bar.update(task, completed=self.step)
                if self.step % train.log_every == 0 or self.step == self.total_steps:
                    record = self._tick(tick)
                    bar.update(task, status=" ".join(f"{k}={v:.4g}" for k, v in record.items() if k.startswith("loss")))
                    running["tick"] = self._new_tick()
                due = self.step % train.checkpoint_every == 0 or self.step in (train.steps, self.total_steps)
                if train.checkpoint_minutes is not None:
                    late = (time.time() - running["last_checkpoint"]) / 60 >= train.checkpoint_minutes
                    late = torch.tensor([float(late)])
                    if self.env.world_size > 1:
                        dist.all_reduce(late, op=dist.ReduceOp.MAX)  # ranks must agree: saving is collective
                    due = due or bool(late.item())
                if due:
                    self.save_checkpoint()
                    running["last_checkpoint"] = time.time()

    def _prepare_statistics(self) -> None:
        """A method with feature statistics (``statistics``/``set_statistics``: DPA's μ, σ) gets them from
        ``feature_stats.pt`` in the run dir, which the main rank computes on the first start; a resumed
        run, every rank and ``tessera eval`` (through final.pt) use the same numbers."""
        import torch.distributed as dist

        if not hasattr(self.method, "statistics"):
            return
        path = self.run_dir / STATISTICS_FILE
        if self.env.is_main and not path.is_file():
            given = self.train.statistics_file
            if given is not None:
                if not Path(given).is_file():
                    raise FileNotFoundError(f"train.statistics_file '{given}' does not exist: make it with "
                                            f"`tessera features stats CONFIG --out {given}`")
                self.log.log(f"feature statistics from {given} -> {path.name}")
                save_statistics(load_statistics(given, "train.statistics_file"), path)
            else:
                self.log.log(f"feature statistics over {self.train.statistics_batches} batches -> {path.name}")
                save_statistics(compute_statistics(self.method, self.stream, self.train.statistics_batches,
                                                   self.device), path)
        if self.env.world_size > 1:
            dist.barrier()
        self.method.set_statistics(load_statistics(path))

    def _finish(self, batches) -> None:
        """final.pt: the weight average if there is one (SWA's with BatchNorm statistics recomputed on
        ``swa.bn_batches`` batches), else the last weights."""
        averaged = None
        model = self.method
        if self.average is not None:
            averaged = self.phase if self.phase == "swa" else "ema"
            model = self.average.module
            if self.phase == "swa" and self.train.swa.bn_batches:
                with self._autocast():  # the statistics of the activations training produced
                    _recompute_batchnorm(model, batches, self.train.swa.bn_batches, self.state(), self.device,
                                         self.dtype)
        self._check_weights_finite("final.pt")
        if self.env.is_main:
            save_final(self.config.method, model.state_dict(), averaged, self.run_dir / "final.pt")
            self.log.log(f"finished {self.total_steps} steps; {'averaged (' + averaged + ') ' if averaged else ''}"
                         f"weights in {self.run_dir / 'final.pt'}")

    def _tick(self, tick: dict) -> dict:
        import torch.distributed as dist

        elapsed = time.perf_counter() - tick["start"]
        losses = torch.stack([tick["losses"][g] / max(tick["counts"][g], 1) for g in self.engines])
        if self.env.world_size > 1:
            dist.all_reduce(losses)
            losses /= self.env.world_size
        record = {"step": self.step, "epoch": self.epoch, "phase": self.phase,
                  **{f"loss/{g}": float(v) for g, v in zip(self.engines, losses) if tick["counts"][g]},
                  **{f"lr/{g}": float(e.get_lr()[0]) for g, e in self.engines.items()},
                  "images_per_s": self.images_per_step * tick["steps"] / max(elapsed, 1e-9),
                  "data_wait_share": tick["wait"] / max(elapsed, 1e-9),
                  "peak_cpu_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
                  "global_batch": self.images_per_step}
        growth = self.state()
        if growth.resolution is not None:
            record.update({"resolution": growth.resolution, "alpha": growth.alpha})
        if self.log:
            self.log.metrics(record)
            if self._tensorboard is None:
                from torch.utils.tensorboard import SummaryWriter

                self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
            for key, value in record.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tensorboard.add_scalar(key, value, self.step)
            self._tensorboard.flush()
        return record


@torch.no_grad()
def _recompute_batchnorm(model, batches, count: int, state: StepState, device, dtype) -> None:
    """BatchNorm running statistics of averaged weights, from ``count`` training batches (as
    torch.optim.swa_utils.update_bn, but through the method's own training_step so any method works)."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    momenta = {m: m.momentum for m in norms}
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the batches
    model.train()
    for _ in range(count):
        model.training_step(_to_device(next(batches), device, dtype), state)
    for m, momentum in momenta.items():
        m.momentum = momentum


STATISTICS_FILE = "feature_stats.pt"


def compute_statistics(method, stream, batches: int, device: torch.device) -> dict:
    """``method.statistics`` over the first ``batches`` batches of a (batched) training stream, leaving
    the global random states as they were, so training from here is the same as without it."""
    with torch.random.fork_rng(devices=[]):
        numpy_state = np.random.get_state()
        iterator = iter(stream.endless(0))
        chosen = [_to_device(next(iterator), device, torch.float32) for _ in range(batches)]
        np.random.set_state(numpy_state)
    was_training = method.training
    method.eval()
    try:
        return method.statistics(chosen)
    finally:
        method.train(was_training)


def save_statistics(stats: dict, path: Path) -> None:
    save_file({"statistics": stats}, path, "tessera-statistics")  # never a half-written file under the final name


def load_statistics(path: str | Path, what: str = "feature statistics") -> dict:
    return load_file(path, "tessera-statistics", what)["statistics"]


def save_final(method_config, state: dict, averaged: str | None, path: Path) -> Path:
    """``final.pt``: the method's config as JSON text (never a pickled object) and its weights."""
    return save_file({"method_json": json.dumps(method_config.model_dump(mode="json")), "state": state,
                      "averaged": averaged}, path, "tessera-final")


def run(run_dir: str | Path, resume: bool, until: int | None = None) -> dict:
    """Train the run in ``run_dir`` (its config.yaml) as this process's rank; the launcher's entry point.
    With ``until``, stop at that step with a checkpoint (final.pt only once the run is complete): a
    search trains a multi-rank trial segment by segment and validates in between."""
    from tessera.config import load_config

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    env = DistEnv.from_env()
    # One trainer per run directory, held by the main rank for the whole run (and dropped by the kernel
    # if it dies): a second `--resume` beside a live run is refused instead of writing the same checkpoints.
    with RunLock(run_dir) if env.is_main else contextlib.nullcontext():
        device = env.init()
        trainer = Trainer(config, run_dir, env, device)
        if resume:
            trainer.load_checkpoint()
        if until is None or until >= trainer.total_steps:
            return trainer.fit()
        trainer.advance(until, show_progress=False)
        latest = trainer.checkpoints / "latest.json"
        if not latest.is_file() or json.loads(latest.read_text())["step"] != trainer.step:
            trainer.save_checkpoint()
        return {"step": trainer.step}


def load_latest(run_dir: str | Path, device: torch.device = torch.device("cpu")):
    """The method of a run as of its latest checkpoint (each group's weights from DeepSpeed's model
    states, the feature statistics from the run dir), in eval mode: to validate between segments."""
    from core.methods import create_method
    from tessera.config import load_config

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    tag = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["tag"]
    torch.manual_seed(config.seed)
    method = create_method(config.method.name, config.method.options)
    for group, module in method.groups().items():
        module.load_state_dict(load_engine_weights(run_dir / "checkpoints" / group / tag))
    if hasattr(method, "set_statistics") and (run_dir / STATISTICS_FILE).is_file():
        method.set_statistics(load_statistics(run_dir / STATISTICS_FILE))
    return config, method.to(device).eval()
