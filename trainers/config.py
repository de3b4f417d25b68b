"""The trainer's config: what the loop does, independent of any method."""

from typing import Literal

from pydantic import Field

from core.config import StrictConfig


class TrainConfig(StrictConfig):
    """One training run. Steps count optimiser steps; a step is `grad_accum` micro-batches on every rank."""

    data: Literal["tiles", "slices"] = "tiles"        # stream: tiles of data.stream, or slices of data.volume_stream
    steps: int = Field(1000, ge=1)                    # optimiser steps in the whole run
    micro_batch: int = Field(16, ge=1)                # images per rank per forward pass
    grad_accum: int = Field(1, ge=1)                  # micro-batches accumulated per optimiser step
    lr: float = Field(1e-3, gt=0)                     # peak learning rate
    weight_decay: float = Field(0.0, ge=0)            # Adam(W) weight decay
    lr_schedule: Literal["constant", "cosine"] = "constant"  # after warm-up: constant, or cosine decay to 0
    warmup_steps: int = Field(0, ge=0)                # linear warm-up from 0 over this many steps
    clip_grad: float | None = Field(1.0, gt=0)        # global gradient-norm clip; None = no clipping
    zero_stage: int = Field(1, ge=0, le=2)            # DeepSpeed ZeRO stage (0/1 suit these convnets)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"  # auto: bf16 on GPUs that have it, else fp32
    num_workers: int = Field(2, ge=0)                 # dataloader workers per rank
    log_every: int = Field(10, ge=1)                  # steps between metric ticks
    checkpoint_every: int = Field(200, ge=1)          # steps between checkpoints (and one at the end)
    checkpoint_minutes: float | None = Field(30.0, gt=0)  # also checkpoint after this many minutes; None = off
    keep_checkpoints: int = Field(2, ge=1)            # newest checkpoints kept on disk
