"""Learning-rate schedules, as pure functions of a step count: the loop sets each group's rate before
each of its optimiser steps, so nothing but the counters needs checkpointing."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str) -> float:
    """The main phase's learning rate over the peak: linear warm-up reaching 1 at step ``warmup_steps``,
    then constant or a cosine decay to 0 at ``total_steps``. ``step`` counts the group's optimiser steps
    from 0."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)))
    return 1.0


def swa_lr(step_in_phase: int, swa) -> float:
    """The saw-tooth learning rate of the SWA phase: lr_max at the start of each cycle down to lr_min at
    its last step, where the snapshot is taken."""
    position = step_in_phase % swa.cycle_steps
    return swa.lr_max - (swa.lr_max - swa.lr_min) * position / max(swa.cycle_steps - 1, 1)


def steps_of(interval: int, steps: int) -> int:
    """How many of ``steps`` trainer steps a phase of this interval runs on (steps 0, I, 2I, …)."""
    return -(-steps // interval)


def lazy_ratio(interval: int) -> float:
    """mb_ratio of lazy regularisation (StyleGAN2, Appendix B): a group regularised every I steps takes
    I + 1 optimiser steps per I, so its learning rate is scaled by I / (I + 1) and its Adam betas raised
    to that power, keeping the effective optimiser the same as without the extra steps."""
    return interval / (interval + 1)
