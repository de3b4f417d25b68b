"""The trainer's config: what the loop does, independent of any method."""

from typing import Literal

from pydantic import Field, model_validator

from core.config import StrictConfig


class GroupConfig(StrictConfig):
    """Optimiser settings of one network group that differ from the run's (GANs: G, D and E)."""

    lr: float | None = Field(None, gt=0)              # this group's peak learning rate; None = train.lr
    betas: tuple[float, float] | None = None          # Adam betas; None = train.betas (GANs often use (0, 0.99))
    weight_decay: float | None = Field(None, ge=0)    # None = train.weight_decay


class SWAConfig(StrictConfig):
    """Stochastic weight averaging after the main phase: SGD with a cyclic (saw-tooth) learning rate that
    falls from ``lr_max`` to ``lr_min`` over each cycle; the weights at every minimum are averaged."""

    steps: int = Field(..., ge=1)                     # extra optimiser steps after train.steps
    cycle_steps: int = Field(..., ge=1)               # steps per cycle (one snapshot at the end of each)
    lr_max: float = Field(1e-3, gt=0)
    lr_min: float = Field(1e-4, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"         # the phase's optimiser (the FPI paper: SGD)
    momentum: float = Field(0.9, ge=0, lt=1)          # SGD momentum
    bn_batches: int = Field(32, ge=0)                 # batches to recompute BatchNorm statistics of the average


class GrowingConfig(StrictConfig):
    """Progressive growing: the resolution methods should train at, and the fade-in α of the newest
    layers, as a function of images seen (all ranks together)."""

    start_resolution: int = Field(16, ge=4)           # first resolution (a power of two times the target's odd part)
    target_resolution: int = Field(256, ge=4)         # final resolution; doubling from start
    stable_images: int = Field(60_000, ge=1)          # images at each resolution with α = 1
    fade_images: int = Field(60_000, ge=1)            # images over which α rises 0 -> 1 after each doubling

    @model_validator(mode="after")
    def _doubles(self):
        ratio = self.target_resolution / self.start_resolution
        if ratio < 1 or ratio != 2 ** round(__import__("math").log2(ratio)):
            raise ValueError(f"target_resolution {self.target_resolution} must be start_resolution "
                             f"{self.start_resolution} times a power of two")
        return self


class TrainConfig(StrictConfig):
    """One training run. Steps count optimiser steps; a step is `grad_accum` micro-batches on every rank."""

    data: Literal["tiles", "slices", "slice_pairs"] = "tiles"  # stream: tiles of data.stream, or slices of
                                                      # data.volume_stream (pairs: slice k of two volumes, for FPI)
    steps: int = Field(1000, ge=1)                    # optimiser steps in the main phase
    micro_batch: int = Field(16, ge=1)                # images per rank per forward pass
    grad_accum: int = Field(1, ge=1)                  # micro-batches accumulated per optimiser step
    lr: float = Field(1e-3, gt=0)                     # peak learning rate
    betas: tuple[float, float] = (0.9, 0.999)         # Adam betas
    weight_decay: float = Field(0.0, ge=0)            # Adam(W) weight decay
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up: constant, or cosine decay to 0
    warmup_steps: int = Field(0, ge=0)                # linear warm-up from 0 over this many steps
    clip_grad: float | None = Field(1.0, gt=0)        # global gradient-norm clip; None = no clipping
    zero_stage: int = Field(0, ge=0, le=2)            # DeepSpeed ZeRO stage; 0 = plain data parallel (fastest
                                                      # for these small convnets), 1/2 shard optimiser state/gradients
    precision: Literal["auto", "fp32", "bf16", "bf16-mixed", "fp16"] = "auto"  # auto: bf16 on GPUs that have it,
                                                      # bf16-mixed on CPUs with AVX512-BF16/AMX, else fp32.
                                                      # bf16: DeepSpeed's (bf16 weights, fp32 master copy);
                                                      # bf16-mixed: fp32 weights, forward under torch.autocast bf16
    groups: dict[str, GroupConfig] = {}               # per-group optimiser overrides, by the method's group names
    ema: float | None = Field(None, gt=0, lt=1)       # keep an exponential moving average of weights (decay, e.g.
                                                      # 0.999); final.pt then holds the average
    ema_kimg: float | None = Field(10.0, gt=0)        # G_ema of the networks a method names (ema_networks(): a
                                                      # GAN's G, E): half-life in thousands of images; None = off
    ema_rampup: float | None = Field(0.05, gt=0)      # the half-life is at most this times the images seen
                                                      # (a fast start); None = the full half-life from image 0
    lazy_regularisation_scaling: bool = True          # a group regularised every I steps (a phase with
                                                      # regularisation=True) gets lr x I/(I+1), betas ** (I/(I+1))
    snapshot_kimg: float | None = Field(None, gt=0)   # every this many thousand images: the method's snapshot
                                                      # (image grids, metrics) and the weights, in snapshots/
    snapshot_metric: str | None = None                # keep the best snapshot by this metric as best.pt
    snapshot_mode: Literal["min", "max"] = "min"      # best = lowest (FID) or highest (AUROC)
    swa: SWAConfig | None = None                      # stochastic weight averaging period; final.pt holds the average
    growing: GrowingConfig | None = None              # progressive-growing schedule methods can read
    num_workers: int = Field(2, ge=0)                 # dataloader workers per rank
    statistics_batches: int = Field(16, ge=1)         # batches for a method's feature statistics (DPA's μ, σ)
    statistics_file: str | None = None                # use these (from `tessera features stats`) instead; copied
                                                      # into the run dir
    log_every: int = Field(10, ge=1)                  # steps between metric ticks
    checkpoint_every: int = Field(200, ge=1)          # steps between checkpoints (and one at the end)
    checkpoint_minutes: float | None = Field(30.0, gt=0)  # also checkpoint after this many minutes; None = off
    keep_checkpoints: int = Field(2, ge=1)            # newest checkpoints kept on disk

    @model_validator(mode="after")
    def _no_both_averages(self):
        if self.ema is not None and self.swa is not None:
            raise ValueError("train.ema and train.swa both average the weights; choose one")
        return self


# Keys a resumed run may change (`tessera train --resume --set KEY=VALUE`): none changes a tensor's shape,
# the stream's order or the optimiser's kind, so the checkpoint still fits. `*` is any group name.
RESUMABLE_KEYS = ("train.lr", "train.groups.*.lr", "train.clip_grad", "train.steps", "train.warmup_steps",
                  "train.lr_schedule", "train.log_every", "train.checkpoint_every", "train.checkpoint_minutes",
                  "train.keep_checkpoints", "train.num_workers")

