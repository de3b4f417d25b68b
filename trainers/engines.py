"""DeepSpeed engines and precision: one engine (and optimiser) per network group of a method."""

from __future__ import annotations

import torch

from trainers.config import TrainConfig
from trainers.schedules import lazy_ratio


def resolve_precision(precision: str) -> str:
    """``auto``: bf16 where the hardware runs it natively, fp32 elsewhere. A GPU with bf16: DeepSpeed's bf16.
    A CPU with AVX512-BF16 or AMX: bf16-mixed (fp32 weights, bf16 autocast; 1.5x FPI's slices/s). Any other
    CPU emulates bf16 about 10x slower than fp32, so it gets fp32."""
    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16-mixed" if native_cpu_bf16() else "fp32"


def native_cpu_bf16() -> bool:
    """Whether this CPU runs bf16 natively (AVX512-BF16 or AMX-BF16): its /proc/cpuinfo flags on Linux,
    elsewhere oneDNN's own check (private torch API; if it is missing, no)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split()}
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def own_clipping(train: TrainConfig, precision: str) -> bool:
    """fp32 weights without ZeRO: gradients are whole and already averaged after backward, so torch's
    fused (foreach) clip does the job; DeepSpeed's own clip walks the parameters one by one in Python."""
    return train.clip_grad is not None and train.zero_stage == 0 and precision in ("fp32", "bf16-mixed")


def group_optimiser(train: TrainConfig, group: str | None, reg_interval: int | None = None) -> dict:
    """A group's peak lr, betas and weight decay: the run's, the group's overrides, then the lazy
    regularisation scaling when one of its phases regularises every ``reg_interval`` steps."""
    override = train.groups.get(group) if group else None
    lr = override.lr if override and override.lr is not None else train.lr
    betas = override.betas if override and override.betas is not None else train.betas
    decay = override.weight_decay if override and override.weight_decay is not None else train.weight_decay
    if reg_interval is not None and train.lazy_regularisation_scaling:
        ratio = lazy_ratio(reg_interval)
        lr, betas = lr * ratio, tuple(b ** ratio for b in betas)
    return {"lr": lr, "betas": tuple(betas), "weight_decay": decay}


def deepspeed_config(train: TrainConfig, precision: str, group: str | None = None, phase: str = "main",
                     reg_interval: int | None = None) -> dict:
    """The DeepSpeed config of one engine: the run's optimiser settings with the group's overrides. The
    learning rate is set by the loop before every step (trainers/schedules.py); DeepSpeed keeps none."""
    settings = group_optimiser(train, group, reg_interval)
    config = {
        "train_micro_batch_size_per_gpu": train.micro_batch,
        "gradient_accumulation_steps": train.grad_accum,
        "zero_optimization": {"stage": train.zero_stage},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if phase == "main":
        # torch's Adam: DeepSpeed's fused CPU Adam would first compile for ~40 s.
        config["optimizer"] = {"type": "AdamW" if settings["weight_decay"] else "Adam",
                               "params": {"lr": settings["lr"], "betas": list(settings["betas"]),
                                          "weight_decay": settings["weight_decay"], "torch_adam": True}}
    # Always said: DeepSpeed's default is to clip at 1.0, so leaving the key out when clip_grad is null (or
    # when the loop clips itself) would clip anyway.
    config["gradient_clipping"] = train.clip_grad if train.clip_grad is not None and \
        not own_clipping(train, precision) else 0.0
    if precision == "bf16":
        config["bf16"] = {"enabled": True}
    elif precision == "fp16":
        config["fp16"] = {"enabled": True, "initial_scale_power": 16}
    return config


def build_engines(method, train: TrainConfig, precision: str, period: str, reg_intervals: dict[str, int]) -> dict:
    """One DeepSpeed engine per group of ``method``: Adam in the main period, SGD/Adam in SWA's. Each reads
    its checkpoints with weights_only=True (trainers/files.py)."""
    import deepspeed

    from trainers.files import load_safely

    engines = {}
    for group, module in method.groups().items():
        params = [p for p in module.parameters() if p.requires_grad]
        config = deepspeed_config(train, precision, group, period, reg_intervals.get(group))
        if period == "swa":
            swa = train.swa
            optimizer = torch.optim.SGD(params, lr=swa.lr_max, momentum=swa.momentum) if swa.optimizer == "sgd" \
                else torch.optim.Adam(params, lr=swa.lr_max, betas=train.betas)
            engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config)
        else:
            engine, *_ = deepspeed.initialize(model=module, model_parameters=params, config=config)
        load_safely(engine)
        if engine.dp_world_size == 1:
            engine.enable_backward_allreduce = False  # one rank: averaging gradients over it only copies them
        engines[group] = engine
    return engines


def set_lr(engine, lr: float) -> None:
    for param_group in engine.optimizer.param_groups:
        param_group["lr"] = lr
