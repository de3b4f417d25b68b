"""The contract between a method and the trainer, said once (STYLE 14).

A method is a :class:`Method`: single-device PyTorch that builds its networks and computes losses and
scores. The trainer owns devices, precision, ranks, optimisers, schedules, averages, statistics and
checkpoints, and calls only what is named here:

- ``Config``                    the method's pydantic config (unknown keys refused),
- ``groups()``                  the networks optimised separately, by name (``{"model": …}``; a GAN's
                                ``G``, ``D``, ``E``); each gets one optimiser, shared by its phases,
- ``phases()``                  what one training step does, as data: a list of :class:`Phase`, run in
                                order, each with its own batch, forward, backward and optimiser step.
                                A single-network method only writes ``training_step`` and gets one phase,
- ``score(batch)``              ``(image_scores [B], pixel_maps [B, 1, H, W] or None)``,
- ``ema_networks()``            the networks to keep an exponential moving average of (G_ema): never a
                                frozen extractor nor a discriminator; evaluation and export use the average,
- ``snapshot(reals, state, networks)``  what the method shows every ``train.snapshot_kimg`` (image grids,
                                metrics); ``None`` when it shows nothing,
- ``adjust(stats, state, images)`` every ``adjust_interval`` steps: settings the method tunes from the
                                run's own statistics, reduced over ranks (ADA's augmentation strength, the
                                path-length mean); every rank gets the same numbers, so they stay equal,
- ``statistics(batches)`` / ``set_statistics(stats)``  feature statistics computed once per run (DPA's
                                μ, σ); only when ``uses_statistics``,
- ``sample_score(voxel_scores)`` a volume's score from its voxel map (default: the mean of the top 0.1 %),
- ``score_terms(batch)``          the named parts of a combined image score (``{name: [B]}``, each higher =
                                more anomalous); evaluation ranks each on its own (metrics.json "score_terms"),
                                through ``score_with_terms`` (scores, maps and terms from one forward),
- ``reconstruction(images)``    what the method rebuilds of tiles in [0, 1], for evaluation's
                                reconstructions.png (None: it does not reconstruct),
- ``generates_tiles`` / ``projects_tiles`` and ``synthesize`` / ``inverted``  what `tessera synthesize`
                                (and its ``--project``) ask of a generator,
- ``generated(count, first_seed)``  a generator's images in [0, 1] from seeds first_seed… (None: not a
                                generator); evaluation compares them with the split's normal tiles (FD/KD).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

PhaseLoss = Callable[[dict, Any], "torch.Tensor | dict[str, torch.Tensor]"]


@dataclass(frozen=True)
class Phase:
    """One part of a training step (StyleGAN2-ADA's Gmain, Greg, Dmain, Dreg).

    ``loss(batch, state)`` runs the phase's own forward on a fresh batch and returns its loss, or a dict
    with ``"loss"`` and any scalars to report (``"D/real_sign"``…), which the trainer averages over ranks
    once per tick, and vectors (``"G/w_mean"``), which only ``Method.adjust`` gets (elementwise means). The trainer backpropagates the loss into ``group``'s parameters only (the method stops
    gradients into other groups, e.g. ``requires_grad_(False)`` on D for G's loss) and steps that group's
    optimiser. The phase runs on steps where ``step % interval == 0``; a ``regularisation`` phase with
    interval I (lazy regularisation) scales its group's learning rate and Adam betas by I / (I + 1), as
    the StyleGAN2 paper does, and should multiply its loss by I itself. A phase with ``data=False`` (a
    generator's, which draws only latents) reads no tiles: its batch is ``{"batch_size": B}``.

    Random numbers drawn in a phase come from a generator the trainer seeds per micro-batch from (run
    seed, step, phase, micro-batch number across ranks and accumulation), so W ranks draw what one rank
    accumulating W micro-batches draws, and a resumed run draws what the uninterrupted one did.
    """

    name: str                       # unique within the method; logged as loss/<name>
    group: str                      # the network group whose optimiser this phase steps
    loss: PhaseLoss                 # (batch, StepState) -> loss or {"loss": …, "<stat>": …}
    interval: int = 1               # run every `interval` steps (1: every step)
    regularisation: bool = False    # a lazy-regularisation phase (see above)
    data: bool = True               # False: the phase reads no batch of tiles (it gets {"batch_size": B})

    def __post_init__(self):
        if self.interval < 1:
            raise ValueError(f"phase '{self.name}': interval must be >= 1, got {self.interval}")


class Method(nn.Module):
    """Base class of every registered method; the defaults are those of a single-network method."""

    Config: type
    uses_statistics: bool = False   # True: the trainer computes statistics() once and calls set_statistics()
    generates_tiles: bool = False   # True: synthesize(z, psi, noise_mode) makes tiles (`tessera synthesize`)
    projects_tiles: bool = False    # True: inverted(images) gives {"w", "reconstruction", "distance"}
                                    # for `tessera synthesize --project`
    adjust_interval: int = 0        # > 0: the trainer calls adjust() every this many steps
    pooling_options: tuple[str, ...] = ()  # options that only pool maps into sample scores: cached maps
                                           # (`tessera posthoc`) stay valid when they change

    def groups(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    def training_step(self, batch: dict, state=None) -> dict[str, torch.Tensor]:
        """``{group: loss}`` from one forward: what a single-network method writes instead of phases()."""
        raise NotImplementedError(f"{type(self).__name__} defines neither phases() nor training_step()")

    def phases(self) -> list[Phase]:
        groups = list(self.groups())
        if len(groups) != 1:
            raise TypeError(f"method '{getattr(self, 'method_name', type(self).__name__)}' optimises {groups}: a "
                            f"method with several groups declares its phases() (one forward per phase)")
        group = groups[0]
        return [Phase("main", group, lambda batch, state: self.training_step(batch, state)[group])]

    def score(self, batch: dict):
        raise NotImplementedError

    def ema_networks(self) -> dict[str, nn.Module]:
        return {}

    def snapshot(self, reals: dict, state, networks: dict[str, nn.Module]) -> dict | None:
        """``{"images": {name: [N, C, H, W] in [0, 1]}, "metrics": {name: float}}`` or None. ``networks``
        are ``ema_networks()`` as averaged (the live ones when there is no average)."""
        return None

    def adjust(self, stats: dict[str, float], state, images: int) -> None:
        """Called every ``adjust_interval`` steps with the means of the scalars the phases reported since
        the last call, over all ranks and micro-batches (names absent when no phase reported them), the
        state after the step and the images trained on since the last call. Whatever it changes must live
        in buffers, which checkpoints keep."""
        raise NotImplementedError

    def score_terms(self, batch: dict) -> dict[str, torch.Tensor]:
        """``{name: image scores [B]}``: parts of the image score worth ranking alone; {} when none (then
        evaluation does not call it)."""
        return {}

    def score_with_terms(self, batch: dict):
        """``score(batch)`` and ``score_terms(batch)`` as one triple; what evaluation calls for a method with
        terms. A method overrides it when both come from one forward pass (then it runs once)."""
        scores, maps = self.score(batch)
        return scores, maps, self.score_terms(batch)

    def sample_score(self, voxel_scores) -> float:
        """A volume's score from its (smoothed, baseline-subtracted) voxel scores: the mean of the top 0.1 %."""
        from core.scoring import volume_score

        return volume_score(voxel_scores)

    def reconstruction(self, images: torch.Tensor) -> torch.Tensor | None:
        return None

    def generated(self, count: int, first_seed: int) -> torch.Tensor | None:
        return None

    def statistics(self, batches: list[dict]) -> dict:
        raise NotImplementedError

    def set_statistics(self, stats: dict) -> None:
        raise NotImplementedError


def check_method_class(name: str, cls: type) -> None:
    """What registration checks, so that a method missing a piece fails when it is added, not mid-run."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        raise TypeError(f"method '{name}' ({cls.__module__}.{cls.__name__}) must subclass core.methods.base.Method")
    if not isinstance(getattr(cls, "Config", None), type):
        raise TypeError(f"method '{name}' has no Config class")
    missing = [hook for hook in ("groups", "score") if getattr(cls, hook) is getattr(Method, hook)]
    if cls.phases is Method.phases and cls.training_step is Method.training_step:
        missing.append("phases or training_step")
    if getattr(cls, "adjust_interval", 0) and cls.adjust is Method.adjust:
        missing.append("adjust (adjust_interval is set)")
    if cls.uses_statistics and (cls.statistics is Method.statistics or cls.set_statistics is Method.set_statistics):
        missing.append("statistics and set_statistics (uses_statistics is True)")
    if missing:
        raise TypeError(f"method '{name}' does not define {', '.join(missing)}")


def check_phases(method: Method) -> list[Phase]:
    """A built method's phases, checked against its groups: every group stepped by some phase, names
    unique, and no parameter shared by two groups (two optimisers would step it)."""
    groups, phases = method.groups(), method.phases()
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise ValueError(f"phase names repeat: {names}")
    unknown = sorted({p.group for p in phases} - set(groups))
    if unknown:
        raise ValueError(f"phases step groups {unknown} that groups() does not have ({sorted(groups)})")
    idle = sorted(set(groups) - {p.group for p in phases})
    if idle:
        raise ValueError(f"groups {idle} are optimised by no phase")
    owner: dict[int, str] = {}
    for group, module in groups.items():
        for parameter in module.parameters():
            if id(parameter) in owner and owner[id(parameter)] != group:
                raise ValueError(f"groups '{owner[id(parameter)]}' and '{group}' share parameters: each "
                                 f"parameter must belong to one group")
            owner[id(parameter)] = group
    return phases


def load_trained(path: str, kinds: tuple[str, ...], option: str) -> Method:
    """A trained method of one of ``kinds`` from a run directory (its final.pt) or a final.pt / snapshot
    model.pt, with its averaged networks (G_ema, E_ema) in place, read with weights_only=True (never code).
    ``option`` names the setting that gave the path, for errors."""
    import json
    from pathlib import Path

    from core.methods import create_method

    source = Path(path).expanduser()
    if source.is_dir():
        source = source / "final.pt"
    if not source.is_file():
        raise FileNotFoundError(f"{option}: no weights at '{source}' (give the run directory of a finished "
                                f"{' or '.join(kinds)} run, or its final.pt / a snapshot's model.pt)")
    saved = torch.load(source, map_location="cpu", weights_only=True)
    if not isinstance(saved, dict) or "method_json" not in saved:
        raise ValueError(f"{option}: '{source}' is not a tessera weights file")
    config = json.loads(saved["method_json"])
    if config["name"] not in kinds:
        raise ValueError(f"{option}: '{source}' holds a '{config['name']}' run, not {' or '.join(kinds)}")
    method = create_method(config["name"], config["options"])
    method.load_state_dict(saved["state"])
    for name, state in (saved.get("ema") or {}).items():
        getattr(method, name).load_state_dict(state)
    return method
