"""Training-progress state that methods read: the step, images seen, and the progressive-growing stage.

The trainer computes a :class:`StepState` before every micro-batch from its own counters (so it is
restored exactly on resume); methods only read it. Growth follows Karras et al.'s progressive GAN:
``stable_images`` at the start resolution, then per doubling ``fade_images`` with the new layers'
weight α rising linearly from 0 to 1 followed by ``stable_images`` at α = 1.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepState:
    step: int = 0                      # optimiser steps done before this one
    images_seen: int = 0               # images trained on so far, all ranks together
    resolution: int | None = None      # current training resolution; None when not growing
    alpha: float = 1.0                 # fade-in weight of the newest resolution's layers
    stage: int = 0                     # doublings done (0 at the start resolution)
    phase: str = "main"                # "main", or "swa" during stochastic weight averaging


def growth_at(images_seen: int, start_resolution: int, target_resolution: int, stable_images: int,
              fade_images: int) -> tuple[int, float, int]:
    """(resolution, alpha, stage) after ``images_seen`` images."""
    stages = (target_resolution // start_resolution).bit_length() - 1  # doublings to reach the target
    seen = max(images_seen - stable_images, 0)
    period = fade_images + stable_images
    stage = min(seen // period + (1 if images_seen >= stable_images else 0), stages)
    if images_seen < stable_images or stage == 0:
        return start_resolution, 1.0, 0
    into = seen - (stage - 1) * period
    alpha = min(into / fade_images, 1.0)
    return start_resolution * 2 ** stage, float(alpha), int(stage)
