"""The training loop: the method's phases, step after step, on one DeepSpeed engine per network group.

A step runs each phase whose interval divides the step number, in the method's order (a GAN's Gmain,
Greg, Dmain, Dreg): the phase fetches its own batches, runs its own forward under the run's precision,
backpropagates into its group only (the other groups' parameters are frozen for that phase) and steps
that group's optimiser, so a phase always sees the other networks as the previous phase left them.
Around that: learning rates per group (trainers/schedules.py), averages (trainers/averaging.py),
statistics on the device until the tick (trainers/stats.py), checkpoints (trainers/checkpoint.py) and
snapshots (trainers/snapshots.py). Rank logic is in trainers/dist.py; only the main rank writes logs,
metrics and the checkpoint index. The loop takes a validated config; reading YAML is the CLI's job.

At ~490 lines this is the one file of the package above 400, on purpose: the Trainer's state (engines,
averages, the running tick, resume points) is read by every part of a step, and what does not need it
already lives in the modules named above.
"""

from __future__ import annotations

import math
import resource
import time
from pathlib import Path

import numpy as np
import torch

from core.methods.base import check_phases
from core.schedule import StepState, growth_at
from data_plane.progress import ProgressLines, interactive
from data_plane.stream import on_device
from trainers import checkpoint
from trainers.averaging import NetworkEma, recompute_batchnorm, run_average
from trainers.checkpoint import STATISTICS_FILE, load_statistics, save_final, save_statistics
from trainers.dist import DistEnv
from trainers.engines import build_engines, group_optimiser, native_cpu_bf16, own_clipping, resolve_precision, set_lr
from trainers.run_dir import RunDir
from trainers.schedules import lr_factor, steps_of, swa_lr
from trainers.snapshots import due, first_batch, write_snapshot
from trainers.stats import NonFiniteWatch, TickStats


class TrainingDiverged(RuntimeError):
    """A loss or a weight became NaN or infinite; the run stopped and its last good checkpoint was kept."""


def _die_with_rank(worker_id: int) -> None:
    """A DataLoader worker ends with its rank, at once (not at its next liveness check, seconds later)."""
    from trainers.dist import die_with_parent

    die_with_parent()


class Trainer:
    """Builds the method, its engines and the stream from a validated run config, then trains for
    ``train.steps`` (plus ``train.swa.steps`` in a stochastic-weight-averaging period)."""

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
        self.phases = check_phases(self.method)
        self.reg_intervals = {p.group: p.interval for p in self.phases if p.regularisation}
        self.trainable = {g: [p for p in m.parameters() if p.requires_grad] for g, m in self.method.groups().items()}
        self.period = "main"  # "swa" in the stochastic-weight-averaging period
        self.engines = build_engines(self.method, self.train, self.precision, self.period, self.reg_intervals)
        self.average = run_average(self.method, self.period, self.train.ema)
        networks = self.method.ema_networks()
        self.g_ema = NetworkEma(networks, self.train.ema_kimg, self.train.ema_rampup) \
            if networks and self.train.ema_kimg is not None else None
        self.stream = self._stream()
        self.step, self.epoch, self.global_batch = 0, 0, 0  # global_batch: this rank's batches consumed
        self.group_steps = {g: 0 for g in self.engines}     # each group's main-phase optimiser steps
        self.images_per_step = self.train.micro_batch * self.train.grad_accum * env.world_size
        self.total_steps = self.train.steps + (self.train.swa.steps if self.train.swa else 0)
        self.stats, self.watch = TickStats(device), NonFiniteWatch(device)
        self.adjusting = TickStats(device, vectors=True)  # what method.adjust() gets, since its last call
        self.checkpoints = self.run_dir / "checkpoints"
        self._tensorboard = None  # created on the main rank at the first tick
        self._running = None

    # ------------------------------------------------------------------------------------ building

    def _stream(self):
        from data_plane.kinds import training_stream

        stream = training_stream(self.config.data, self.train.data, self.env.rank, self.env.world_size)
        return stream.batched(self.train.micro_batch)

    def enter_swa(self) -> None:
        for engine in self.engines.values():
            engine.destroy()  # removes ZeRO's gradient hooks before new engines wrap the same parameters
        self.period = "swa"
        self.engines = build_engines(self.method, self.train, self.precision, self.period, self.reg_intervals)
        self.average = run_average(self.method, self.period, self.train.ema)
        if self.log:
            swa = self.train.swa
            self.log.log(f"SWA period: {swa.steps} steps of {swa.optimizer}, learning rate cycling "
                         f"{swa.lr_max:g} -> {swa.lr_min:g} every {swa.cycle_steps} steps, snapshots averaged")

    def _batches(self):
        """Batches for the rest of the run from one DataLoader whose workers never restart (an endless
        stream), starting at the global batch a resumed run had reached."""
        from torch.utils.data import DataLoader

        # The loader's own generator: starting an iterator draws a seed from it, which from the global
        # generator would shift every random number after a resume (phases that draw noise then differ).
        loader = DataLoader(self.stream.endless(self.global_batch), batch_size=None,
                            num_workers=self.train.num_workers, pin_memory=self.device.type == "cuda",
                            worker_init_fn=_die_with_rank if self.train.num_workers else None,
                            generator=torch.Generator().manual_seed(self.config.seed))
        for batch in loader:
            self.global_batch = int(batch.pop("global_batch")) + 1
            self.epoch = int(batch.pop("epoch"))
            yield batch

    def state(self) -> StepState:
        """What methods may read about progress: step, images seen, growth stage, period."""
        images = self.step * self.images_per_step
        growing = self.train.growing
        if growing is None:
            return StepState(self.step, images, phase=self.period)
        resolution, alpha, stage = growth_at(images, growing.start_resolution, growing.target_resolution,
                                             growing.stable_images, growing.fade_images)
        return StepState(self.step, images, resolution, alpha, stage, self.period)

    def lr(self, group: str) -> float:
        """The group's learning rate for its next optimiser step: SWA's saw-tooth, or the peak (scaled for
        lazy regularisation) times the schedule at the group's own main-phase step count."""
        if self.period == "swa":
            return swa_lr(self.step - self.train.steps, self.train.swa)
        peak = group_optimiser(self.train, group, self.reg_intervals.get(group))["lr"]
        interval = min((p.interval for p in self.phases if p.group == group and not p.regularisation), default=1)
        return peak * lr_factor(self.group_steps[group], self.train.warmup_steps,
                                steps_of(interval, self.train.steps), self.train.lr_schedule)

    # ------------------------------------------------------------------------------------ one step

    def train_step(self, next_batch) -> None:
        """One optimiser step of the run: every phase due at this step, each on its own batches."""
        state = self.state()
        clip = own_clipping(self.train, self.precision)
        world, rank = self.env.world_size, self.env.rank
        for index, phase in enumerate(self.phases):
            if self.step % phase.interval:
                continue
            engine = self.engines[phase.group]
            self._only_train(phase.group)
            set_lr(engine, self.lr(phase.group))
            for micro in range(self.train.grad_accum):
                # micro-batch number micro * world + rank: the one that one rank accumulating W batches
                # gives this rank's batch (the stream hands batches out the same way)
                torch.manual_seed(micro_seed(self.config.seed, self.step, index, micro * world + rank))
                batch = on_device(next_batch(), self.device, self.dtype) if phase.data else \
                    {"batch_size": self.train.micro_batch}
                with self._autocast():
                    out = phase.loss(batch, state)
                loss = out["loss"] if isinstance(out, dict) else out
                self.watch.watch(phase.name, loss, self.step)
                self.stats.add(f"loss/{phase.name}", loss)
                for name, value in (out.items() if isinstance(out, dict) else ()):
                    if name == "loss":
                        continue
                    if value.numel() == 1:  # vectors (w's mean) go to adjust() only, not the tick's record
                        self.stats.add(name, value)
                    if self.method.adjust_interval:
                        self.adjusting.add(name, value)
                engine.backward(loss)
                if clip and engine.is_gradient_accumulation_boundary():
                    torch.nn.utils.clip_grad_norm_(self.trainable[phase.group], self.train.clip_grad, foreach=True)
                engine.step()
            if not phase.regularisation:
                self.group_steps[phase.group] += 1
        self._only_train(None)
        self.step += 1
        self._after_step()
        interval = self.method.adjust_interval
        if interval and self.step % interval == 0:
            # one collective on every rank at the same step; the same means reach every rank's method
            self.method.adjust(self.adjusting.reduce(world), self.state(), interval * self.images_per_step)
            self.adjusting.clear()

    def _only_train(self, group: str | None) -> None:
        """Gradients flow into ``group``'s parameters only (all groups with None): another group's networks
        in a phase's forward build no graph for their weights, and no stray gradient reaches them."""
        if len(self.trainable) == 1:
            return
        for name, parameters in self.trainable.items():
            for parameter in parameters:
                parameter.requires_grad_(group is None or name == group)

    def _autocast(self):
        """bf16-mixed: convolutions and matrix products in bf16, reductions and losses in fp32 (torch's
        autocast lists); the backward pass follows the forward's dtypes."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16-mixed")

    def _after_step(self) -> None:
        """The averages: G_ema and the run-wide EMA after every step, SWA at the end of every cycle."""
        if self.g_ema is not None:
            self.g_ema.update(self.images_per_step, self.step * self.images_per_step)
        if self.average is None:
            return
        if self.period == "main":
            self.average.update_parameters(self.method)
        elif (self.step - self.train.steps) % self.train.swa.cycle_steps == 0:
            self.average.update_parameters(self.method)

    # ------------------------------------------------------------------------------------ the run

    def fit(self) -> dict:
        self.advance(self.total_steps)
        self.finish()
        return {"step": self.step}

    def advance(self, until: int, show_progress: bool = True) -> None:
        """Train up to step ``until`` (at most the run's total). Callable repeatedly: a search reads the
        model between calls (tune reports validation AUROC every few steps) and the stream, tick and
        checkpoint clock carry on where the last call stopped."""
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        train = self.train
        if self._running is None:
            self._start_log()
            self._prepare_statistics()
            # the reals snapshots show: read now, before the training stream starts (reading later would
            # move the stream's epoch under a running in-process iterator)
            reals = first_batch(self.stream, self.device, on_device) if train.snapshot_kimg else None
            batches = self._batches()
            self._running = {"batches": batches, "last_checkpoint": time.time(), "tick_start": time.perf_counter(),
                             "wait": 0.0, "tick_steps": 0, "reals": reals}
        running = self._running

        def next_batch():
            waited = time.perf_counter()
            batch = next(running["batches"])
            running["wait"] += time.perf_counter() - waited
            return batch

        self.method.train()
        until = min(until, self.total_steps)
        columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                   TextColumn("{task.fields[status]}")]
        shown = self.env.is_main and show_progress
        # In a log file (Slurm, nohup) a live bar prints nothing until it ends: plain lines instead, one
        # after the first step (start-up done) and one per tick, with rate and ETA; other ranks are silent.
        lines = ProgressLines(f"train {self.config.name} step", self.total_steps, "steps", start=self.step) \
            if shown and not interactive() else None
        with Progress(*columns, disable=not shown or lines is not None) as bar:
            task = bar.add_task(f"train {self.config.name}", total=self.total_steps, completed=self.step, status="")
            first = self.step
            while self.step < until:
                if self.step == train.steps and train.swa is not None and self.period == "main":
                    self.enter_swa()
                images_before = self.step * self.images_per_step
                self.train_step(next_batch)
                running["tick_steps"] += 1
                bar.update(task, completed=self.step)
                late = False
                if lines is not None and self.step == first + 1:
                    lines.update(self.step, "first step done", force=True)
                if self.step % train.log_every == 0 or self.step == self.total_steps:
                    record, late = self._tick()
                    losses = " ".join(f"{k}={v:.4g}" for k, v in record.items() if k.startswith("loss"))
                    bar.update(task, status=losses)
                    if lines is not None:
                        lines.update(self.step, f"{record['images_per_s']:.3g} img/s {losses}", force=True)
                if due(images_before, self.step * self.images_per_step, train.snapshot_kimg):
                    self.snapshot()
                if late or self.step % train.checkpoint_every == 0 or self.step in (train.steps, self.total_steps):
                    self.save_checkpoint()
                    running["last_checkpoint"] = time.time()

    def _start_log(self) -> None:
        if not self.log:
            return
        train = self.train
        phases = ", ".join(f"{p.name} ({p.group}{f', every {p.interval}' if p.interval > 1 else ''})"
                           for p in self.phases)
        self.log.log(f"training {self.config.method.name} for {train.steps} steps"
                     f"{f' + {train.swa.steps} SWA steps' if train.swa else ''} on {self.env.world_size} "
                     f"rank(s), {self.device.type}, {self.precision}; global batch {self.images_per_step} = "
                     f"{train.micro_batch} micro x {train.grad_accum} accumulation x {self.env.world_size} ranks; "
                     f"phases: {phases}")
        if self.precision == "bf16-mixed" and self.device.type == "cpu" and not native_cpu_bf16():
            self.log.log("warning: this CPU has neither AVX512-BF16 nor AMX, so bf16-mixed is emulated "
                         "and slower than fp32; set train.precision=fp32")

    def finish(self) -> None:
        """final.pt: the run-wide average if there is one (SWA's with BatchNorm statistics recomputed on
        ``swa.bn_batches`` batches), else the last weights; with G_ema's networks beside them."""
        averaged = None
        model = self.method
        if self.average is not None:
            averaged = self.period if self.period == "swa" else "ema"
            model = self.average.module
            if self.period == "swa" and self.train.swa.bn_batches:
                with self._autocast():  # the statistics of the activations training produced
                    recompute_batchnorm(model, self._running["batches"], self.train.swa.bn_batches, self.state(),
                                        self.device, self.dtype, on_device)
        self._check_finite("final.pt")
        if self.env.is_main:
            save_final(self.config.method, model.state_dict(), averaged, self.run_dir / "final.pt",
                       self.g_ema.state_dict() if self.g_ema is not None else None)
            self.log.log(f"finished {self.total_steps} steps; {'averaged (' + averaged + ') ' if averaged else ''}"
                         f"{'G_ema and ' if self.g_ema is not None else ''}weights in {self.run_dir / 'final.pt'}")

    # ------------------------------------------------------------------------------------ checkpoints

    def save_checkpoint(self) -> None:
        self._check_finite("its checkpoint")
        checkpoint.save_checkpoint(self)

    def load_checkpoint(self) -> bool:
        return checkpoint.load_checkpoint(self)

    def _check_finite(self, before: str) -> None:
        """Stop before ``before`` is written if a loss was NaN/inf since the start, or any weight or buffer
        is now, on any rank: a finite loss does not prove finite weights (BatchNorm's running_var
        overflows first at a huge learning rate), and a non-finite checkpoint must never be resumed."""
        found = self.watch.check(self.env.world_size)
        if found is not None:
            phase, step = found
            self._diverged(f"loss became NaN/inf at step {step}" + (f" (phase {phase})" if len(self.phases) > 1 else ""))
        tensors = {name: t for name, t in [*self.method.named_parameters(), *self.method.named_buffers()]
                   if t.is_floating_point()}
        for prefix, module in (("average", self.average.module if self.average is not None else None),
                               *((f"ema.{n}", m) for n, m in (self.g_ema.networks.items() if self.g_ema else ()))):
            if module is not None:
                tensors.update({f"{prefix}.{n}": t for n, t in module.state_dict().items() if t.is_floating_point()})
        bad = (~torch.stack([t.detach().isfinite().all() for t in tensors.values()]).all()).float().reshape(1)
        if self.env.world_size > 1:
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)  # every rank stops together
        if bad.item() == 0:
            return
        names = [n for n, t in tensors.items() if not t.detach().isfinite().all()][:3]
        self._diverged(f"weights became NaN/inf by step {self.step} ({', '.join(names) or 'on another rank'}); "
                       f"{before} was not written")

    def _diverged(self, what: str) -> None:
        import json

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

    # ------------------------------------------------------------------------------------ ticks, snapshots

    def _tick(self) -> tuple[dict, bool]:
        """Reduce the tick's statistics across ranks (one collective, with the checkpoint clock: ranks must
        agree on a checkpoint, which is collective), check for NaN/inf losses, log. Returns the record and
        whether a time-based checkpoint is due."""
        running = self._running
        elapsed = time.perf_counter() - running["tick_start"]
        found = self.watch.check(self.env.world_size)
        if found is not None:
            self._check_finite("its checkpoint")  # raises, naming the phase and step
        late = self.train.checkpoint_minutes is not None and \
            (time.time() - running["last_checkpoint"]) / 60 >= self.train.checkpoint_minutes
        self.stats.add("_late", torch.tensor(float(late), device=self.device))
        reduced = self.stats.reduce(self.env.world_size)
        late = reduced.pop("_late", 0.0) > 0  # any rank late: all checkpoint
        self.stats.clear()
        record = {"step": self.step, "epoch": self.epoch, "phase": self.period, **reduced,
                  **{f"lr/{g}": float(e.optimizer.param_groups[0]["lr"]) for g, e in self.engines.items()},
                  "images_per_s": self.images_per_step * running["tick_steps"] / max(elapsed, 1e-9),
                  "data_wait_share": running["wait"] / max(elapsed, 1e-9),
                  "peak_cpu_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else 0.0,
                  "global_batch": self.images_per_step, "kimg": self.step * self.images_per_step / 1000}
        if len(self.phases) == 1:  # single-phase methods keep their loss/<group> name
            phase = self.phases[0]
            if f"loss/{phase.name}" in record:
                record[f"loss/{phase.group}"] = record.pop(f"loss/{phase.name}")
        growth = self.state()
        if growth.resolution is not None:
            record.update({"resolution": growth.resolution, "alpha": growth.alpha})
        self._write_record(record)
        running.update(tick_start=time.perf_counter(), wait=0.0, tick_steps=0)
        return record, late

    def _write_record(self, record: dict, images: dict | None = None) -> None:
        if not self.log:
            return
        self.log.metrics(record)
        if self._tensorboard is None:
            from torch.utils.tensorboard import SummaryWriter

            self._tensorboard = SummaryWriter(str(self.run_dir / "tensorboard"))
        for key, value in record.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)) and math.isfinite(value):
                self._tensorboard.add_scalar(key, value, self.step)
        for name, grid in (images or {}).items():
            from torchvision.utils import make_grid

            self._tensorboard.add_image(f"snapshot/{name}", make_grid(grid.float().clamp(0, 1).cpu()), self.step)
        self._tensorboard.flush()

    @torch.no_grad()
    def snapshot(self) -> None:
        """What the method shows now (on the main rank), with G_ema's networks where kept."""
        if not self.env.is_main:
            return
        networks = self.g_ema.networks if self.g_ema is not None else self.method.ema_networks()
        was_training = self.method.training
        self.method.eval()
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):  # a snapshot's noise must not change the training's
                shown = self.method.snapshot(self._running["reals"], self.state(), networks)
        finally:
            self.method.train(was_training)
        kimg = self.step * self.images_per_step / 1000

        def save_weights(path):
            model = self.average.module if self.average is not None else self.method
            save_final(self.config.method, model.state_dict(), None, path,
                       self.g_ema.state_dict() if self.g_ema is not None else None)

        record = write_snapshot(self.run_dir, kimg, shown, save_weights, self.train.snapshot_metric,
                                self.train.snapshot_mode, self.log.log)
        self._write_record({"step": self.step, **record}, (shown or {}).get("images"))
        self.log.log(f"snapshot at {kimg:g} kimg -> snapshots/")

    # ------------------------------------------------------------------------------------ statistics

    def _prepare_statistics(self) -> None:
        """A method with feature statistics (DPA's μ, σ) gets them from ``feature_stats.pt`` in the run dir,
        which the main rank computes on the first start; a resumed run, every rank and ``tessera eval``
        (through final.pt) use the same numbers."""
        import torch.distributed as dist

        if not self.method.uses_statistics:
            return
        path = self.run_dir / STATISTICS_FILE
        if self.env.is_main and not path.is_file():
            given = self.train.statistics_file
            if given is not None:
                self.log.log(f"feature statistics from {given} -> {path.name}")
                save_statistics(load_statistics(given, "train.statistics_file"), path)
            else:
                self.log.log(f"feature statistics over {self.train.statistics_batches} batches -> {path.name}")
                save_statistics(compute_statistics(self.method, self.stream, self.train.statistics_batches,
                                                   self.device), path)
        if self.env.world_size > 1:
            dist.barrier()
        self.method.set_statistics(load_statistics(path))


def micro_seed(seed: int, step: int, phase: int, micro: int) -> int:
    """The seed of one phase's micro-batch: a hash of (run seed, step, phase, micro-batch number), so the
    random numbers of a step depend on neither the rank count nor where a run was resumed."""
    return int(np.random.SeedSequence([seed, step, phase, micro]).generate_state(1, np.uint64)[0] >> 1)


def compute_statistics(method, stream, batches: int, device: torch.device) -> dict:
    """``method.statistics`` over the first ``batches`` batches of a (batched) training stream, leaving
    the global random states as they were, so training from here is the same as without it."""
    with torch.random.fork_rng(devices=[]):
        numpy_state = np.random.get_state()
        iterator = iter(stream.endless(0))
        chosen = [on_device(next(iterator), device, torch.float32) for _ in range(batches)]
        np.random.set_state(numpy_state)
    was_training = method.training
    method.eval()
    try:
        return method.statistics(chosen)
    finally:
        method.train(was_training)
