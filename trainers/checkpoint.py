"""Checkpoints of a run, and its final weights.

``checkpoints/<group>/<tag>/`` holds each engine's DeepSpeed checkpoint (weights, optimiser state);
``checkpoints/state/<tag>/rank<R>.pt`` each rank's own state: step, epoch, stream position, period,
per-group step counters, G_ema, the run-wide average, the statistics of the tick and of the method's
next adjust(), and RNG states.
``latest.json`` is replaced last, so a checkpoint cut short is never the one resumed. Every file is
read with weights_only=True (trainers/files.py).
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from data_plane.store import atomic_write_text
from trainers.files import load_file, numpy_state_from_tensors, numpy_state_to_tensors, python_state_from_plain, \
    python_state_to_plain, save_file

STATISTICS_FILE = "feature_stats.pt"


def save_checkpoint(trainer) -> str:
    """Write a checkpoint at the trainer's step on every rank (a collective); returns its tag."""
    import torch.distributed as dist

    tag = f"step{trainer.step:08d}"
    folder = trainer.run_dir / "checkpoints"
    for group, engine in trainer.engines.items():
        engine.save_checkpoint(str(folder / group), tag=tag, save_latest=False)
    state_dir = folder / "state" / tag
    state_dir.mkdir(parents=True, exist_ok=True)
    save_file({"step": trainer.step, "epoch": trainer.epoch, "global_batch": trainer.global_batch,
               "phase": trainer.period, "group_steps": dict(trainer.group_steps),
               "average": trainer.average.state_dict() if trainer.average is not None else None,
               "g_ema": trainer.g_ema.state_dict() if trainer.g_ema is not None else None,
               "stats": trainer.stats.state_dict(), "adjusting": trainer.adjusting.state_dict(),
               "buffers": outside_groups(trainer.method),
               "torch": torch.get_rng_state(), "numpy": numpy_state_to_tensors(np.random.get_state()),
               "python": python_state_to_plain(random.getstate()),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
              state_dir / f"rank{trainer.env.rank}.pt", "tessera-rank-state")
    dist.barrier()
    if trainer.env.is_main:
        latest = folder / "latest.json"
        atomic_write_text(latest, json.dumps({"tag": tag, "step": trainer.step, "phase": trainer.period}))
        _prune(folder, list(trainer.engines), keep=tag, count=trainer.train.keep_checkpoints)
        trainer.log.log(f"checkpoint {tag} written")
    dist.barrier()
    return tag


def outside_groups(method) -> dict:
    """The method's buffers that belong to no optimised group (counters, feature statistics, a frozen
    extractor's BatchNorm statistics): DeepSpeed checkpoints only the groups' modules, and a resumed run
    must have these too. Parameters outside the groups are pretrained weights, reloaded, never saved."""
    owned = {id(m) for m in method.groups().values()}
    prefixes = tuple(f"{name}." for name, module in method.named_modules() if id(module) in owned and name)
    return {name: buffer.detach().cpu().clone() for name, buffer in method.named_buffers()
            if not name.startswith(prefixes)}


def _prune(folder: Path, groups: list[str], keep: str, count: int) -> None:
    tags = sorted(p.name for p in (folder / "state").iterdir() if p.name.startswith("step"))
    for tag in tags[: max(len(tags) - count, 0)]:
        if tag == keep:
            continue
        for path in [folder / "state" / tag] + [folder / g / tag for g in groups]:
            shutil.rmtree(path, ignore_errors=True)


def load_checkpoint(trainer) -> bool:
    """Continue from ``latest.json`` if there is one; returns whether it did."""
    folder = trainer.run_dir / "checkpoints"
    latest = folder / "latest.json"
    if not latest.is_file():
        return False
    index = json.loads(latest.read_text())
    tag = index["tag"]
    if index.get("phase", "main") == "swa" and trainer.period != "swa":
        trainer.enter_swa()  # the checkpoint holds the SWA optimiser's state
    for group, engine in trainer.engines.items():
        path, _ = engine.load_checkpoint(str(folder / group), tag=tag, load_lr_scheduler_states=False)
        if path is None:
            raise RuntimeError(f"checkpoint {tag} of group '{group}' in {folder} could not be loaded")
    state = load_file(folder / "state" / tag / f"rank{trainer.env.rank}.pt", "tessera-rank-state", f"checkpoint {tag}")
    trainer.step, trainer.epoch, trainer.global_batch = state["step"], state["epoch"], state["global_batch"]
    # tessera 0.2.0 checkpoints predate per-group counters: a group then had stepped with every step
    trainer.group_steps.update(state.get("group_steps") or {g: state["step"] for g in trainer.engines})
    if trainer.average is not None and state.get("average") is not None:
        trainer.average.load_state_dict(state["average"])
    if trainer.g_ema is not None and state.get("g_ema") is not None:
        trainer.g_ema.load_state_dict(state["g_ema"])
    if state.get("buffers"):
        trainer.method.load_state_dict(state["buffers"], strict=False)
    if state.get("stats") is not None:
        trainer.stats.load_state_dict(state["stats"])
    if state.get("adjusting") is not None:
        trainer.adjusting.load_state_dict(state["adjusting"])
    torch.set_rng_state(state["torch"])
    np.random.set_state(numpy_state_from_tensors(state["numpy"]))
    random.setstate(python_state_from_plain(state["python"]))
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if trainer.log:
        trainer.log.log(f"resumed from {tag} (step {trainer.step}, epoch {trainer.epoch}, batch {trainer.global_batch})")
        if trainer.step < trainer.total_steps and (trainer.run_dir / "final.pt").exists():
            # a finished run extended with --set train.steps: its final.pt no longer is the end of it
            (trainer.run_dir / "final.pt").unlink()
            trainer.log.log(f"final.pt removed: the run continues to step {trainer.total_steps}")
    return True


def save_final(method_config, state: dict, averaged: str | None, path: Path, ema: dict | None = None) -> Path:
    """``final.pt``: the method's config as JSON text (never a pickled object), its weights, and the
    G_ema networks' weights when the run kept them (evaluation and export then use those)."""
    return save_file({"method_json": json.dumps(method_config.model_dump(mode="json")), "state": state,
                      "averaged": averaged, "ema": ema}, path, "tessera-final")


def save_statistics(stats: dict, path: Path) -> None:
    save_file({"statistics": stats}, path, "tessera-statistics")  # never a half-written file under the final name


def load_statistics(path: str | Path, what: str = "feature statistics") -> dict:
    return load_file(path, "tessera-statistics", what)["statistics"]


def load_latest(run_dir: str | Path, config, device: torch.device = torch.device("cpu")):
    """The method of a run as of its latest checkpoint (each group's weights from DeepSpeed's model
    states, G_ema's where kept, the feature statistics from the run dir), in eval mode: to validate
    between segments. ``config`` is the run's validated config."""
    from core.methods import create_method
    from trainers.files import load_engine_weights

    run_dir = Path(run_dir)
    tag = json.loads((run_dir / "checkpoints" / "latest.json").read_text())["tag"]
    torch.manual_seed(config.seed)
    method = create_method(config.method.name, config.method.options)
    for group, module in method.groups().items():
        module.load_state_dict(load_engine_weights(run_dir / "checkpoints" / group / tag))
    g_ema = load_file(run_dir / "checkpoints" / "state" / tag / "rank0.pt", "tessera-rank-state").get("g_ema")
    for name, network in method.ema_networks().items():
        if g_ema:
            network.load_state_dict(g_ema[name])
    if method.uses_statistics and (run_dir / STATISTICS_FILE).is_file():
        method.set_statistics(load_statistics(run_dir / STATISTICS_FILE))
    return method.to(device).eval()
