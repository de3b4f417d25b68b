"""What runs a training in this process: reads the run directory's config (validated), takes the run's
lock on the main rank, builds the trainer and trains. The rank entry point under torchrun, the DeepSpeed
launcher or srun: ``python -m trainers.worker RUN_DIR [--resume] [--until STEP]``; `tessera train` with
one process, the demo and tune's final runs call :func:`run` in-process."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path


def run(run_dir: str | Path, resume: bool, until: int | None = None) -> dict:
    """Train the run in ``run_dir`` (its config.yaml) as this process's rank. With ``until``, stop at that
    step with a checkpoint (final.pt only once the run is complete): a search trains a multi-rank trial
    segment by segment and validates in between."""
    from core.run_config import load_config
    from trainers.dist import DistEnv
    from trainers.loop import Trainer
    from trainers.run_dir import RunLock

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


def load_latest(run_dir: str | Path):
    """(config, method) of a run as of its latest checkpoint, in eval mode (tune validates with it)."""
    from core.run_config import load_config
    from trainers.checkpoint import load_latest as load

    config = load_config(Path(run_dir) / "config.yaml")
    return config, load(run_dir, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--until", type=int, default=None, help="stop at this step, with a checkpoint")
    args = parser.parse_args()
    from trainers.dist import die_with_launcher

    die_with_launcher()  # a killed launcher takes its ranks with it: no orphan keeps training
    from trainers.files import UnsafeFileError
    from trainers.loop import TrainingDiverged
    from trainers.run_dir import RunLocked

    try:
        run(args.run_dir, args.resume, args.until)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(3)
    except (RunLocked, UnsafeFileError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
