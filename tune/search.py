"""``tessera tune``: a Ray Tune search in which every trial trains K fold models (each a normal
trainers run in the experiment's ``trials/`` folder) side by side, reporting their mean validation
AUROC on the known anomalies every ``report_every`` steps; ASHA stops weak trials at those reports.

The experiment folder ``<experiments_dir>/<name>/`` holds ``config.yaml`` (the base config),
``folds.json`` (the saved split), Ray Tune's state (so ``--resume`` continues after the driver is
killed), ``results.parquet`` (every trial x report x fold), ``best.yaml``, ``unsupervised.yaml``
(the pick by lowest validation loss on normals) and plots.
"""

from __future__ import annotations

import copy
import json
import math
import os
import time
from pathlib import Path

import numpy as np


def apply_params(tree: dict, params: dict) -> dict:
    """The config tree with dotted keys set (``train.lr`` -> tree["train"]["lr"])."""
    from core.run_config import set_key

    tree = copy.deepcopy(tree)
    for key, value in params.items():
        set_key(tree, key.split("."), value, f"search key {key!r}")
    return tree


def search_space(space: dict) -> dict:
    from ray import tune

    build = {"choice": lambda d: tune.choice(d.values), "grid": lambda d: tune.grid_search(d.values),
             "uniform": lambda d: tune.uniform(d.low, d.high), "loguniform": lambda d: tune.loguniform(d.low, d.high),
             "randint": lambda d: tune.randint(int(d.low), int(d.high))}
    return {key: build[d.type](d) for key, d in space.items()}


def fold_config(base: dict, params: dict, folds, k: int | None):
    """The run config of one fold (k None: all normal training items, for the final retrain)."""
    from core.run_config import RunConfig

    tree = apply_params(base, params)
    section = "volume_stream" if folds.kind == "volumes" else "stream"
    tree["data"][section]["ids"] = folds.train if k is None else folds.fold_train(k)
    tree["data"][section]["splits"] = ["train"]
    return RunConfig.model_validate(tree)


def run_trial(params: dict, base: dict, experiment: str) -> None:
    """Ray Tune's function trainable: K fold trainers advanced together, validated at each report."""
    import torch
    from ray import tune

    from trainers.dist import DistEnv
    from trainers.loop import Trainer
    from trainers.run_dir import create_run_dir
    from tune.folds import Folds
    from tune.objective import validate

    experiment = Path(experiment)
    folds = Folds.load(experiment / "folds.json")
    trial_id = tune.get_context().get_trial_id()
    attempts = experiment / "trials" / trial_id / "attempts.jsonl"  # one line per start: retries show here
    attempts.parent.mkdir(parents=True, exist_ok=True)
    with open(attempts, "a") as f:
        f.write(json.dumps({"time": time.time(), "pid": os.getpid(), "params": params}) + "\n")
    workers = base["tune"].get("workers_per_trial", 1)
    if workers > 1:
        _multi_rank_trial(params, base, experiment, folds, trial_id, workers)
        return
    if not torch.distributed.is_initialized():
        # A trial is a lone rank. Launcher variables inherited from whoever started Ray (e.g. a shell
        # that ran an in-process training) would make every trial bind the same MASTER_PORT.
        for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
    env = DistEnv.from_env()
    device = env.init()
    trainers = []
    for k in range(len(folds.folds)):
        config = _trial_fold_config(base, params, folds, k)
        run_dir = experiment / "trials" / trial_id / f"fold{k}"
        if not (run_dir / "config.yaml").is_file():
            create_run_dir(config, f"{trial_id}-fold{k}", path=run_dir)
        trainer = Trainer(config, run_dir, env, device)
        trainer.load_checkpoint()  # a restored or retried trial continues from its folds' checkpoints
        trainers.append(trainer)
    every = base["tune"]["report_every"]
    total = trainers[0].total_steps
    start = min(t.step for t in trainers)
    for until in _report_steps(start, every, total):
        rows = []
        for k, trainer in enumerate(trainers):
            trainer.advance(until, show_progress=False)
            rows.append(validate(trainer.method, trainer.config, folds, k, device))
            _write_json(trainer.run_dir / "val_scores.json", {"step": until, "scores": rows[-1].pop("scores")})
            trainer.method.train()
            if until == total:
                trainer.finish()  # final.pt: the fold's run is complete and reproducible on its own
        _record_report(experiment / "trials" / trial_id, _report(until, rows))
        tune.report(_report(until, rows))


def _report_steps(start: int, every: int, total: int) -> list[int]:
    """The steps a trial reports at, from where its folds' checkpoints stand. A trial restarted with its
    folds already at a report step (the driver was killed between the training and the report) reports
    that step again first, so it never ends without a result."""
    steps = [min(s, total) for s in range(((start // every) + 1) * every, total + every, every)]
    again = [start] if start > 0 and (start % every == 0 or start == total) else []
    return list(dict.fromkeys(again + steps))


def _record_report(trial_dir: Path, report: dict) -> None:
    """Append a report to the trial's own ``reports.jsonl`` (flushed to disk) before Ray hears of it: the
    summary is built from these, so a driver killed mid-trial loses no report, and a trial Ray restarts
    from its folds' checkpoints keeps the reports it made before (Ray rewrites its result.json)."""
    with open(trial_dir / "reports.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **report}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _report(step: int, rows: list[dict]) -> dict:
    return {"step": step, "val_auroc": float(np.nanmean([r["val_auroc"] for r in rows])),
            "val_loss": float(np.nanmean([r["val_loss"] for r in rows])),
            **{f"val_auroc_fold{k}": r["val_auroc"] for k, r in enumerate(rows)},
            **{f"val_loss_fold{k}": r["val_loss"] for k, r in enumerate(rows)}}


def _trial_fold_config(base: dict, params: dict, folds, k: int):
    """A fold's run config inside a trial: checkpoints at the validation reports only."""
    config = fold_config(base, params, folds, k)
    return config.model_copy(update={"train": config.train.model_copy(update={
        "checkpoint_every": config.tune.report_every, "checkpoint_minutes": None})})


def _multi_rank_trial(params: dict, base: dict, experiment: Path, folds, trial_id: str, workers: int) -> None:
    """A trial whose fold models each train on ``workers`` ranks: torchrun (the same launcher as
    `tessera train --nproc`) trains a fold up to the next report and checkpoints; the trial validates
    that checkpoint itself and reports. A retried trial resumes each fold from its latest checkpoint."""
    import subprocess

    from ray import tune

    from trainers.launch import Launch
    from trainers.worker import load_latest
    from trainers.run_dir import create_run_dir
    from tune.objective import validate

    run_dirs = []
    for k in range(len(folds.folds)):
        run_dir = experiment / "trials" / trial_id / f"fold{k}"
        if not (run_dir / "config.yaml").is_file():
            create_run_dir(_trial_fold_config(base, params, folds, k), f"{trial_id}-fold{k}", path=run_dir)
        run_dirs.append(run_dir)
    every, total = base["tune"]["report_every"], _total_steps(base)
    reached = [json.loads((d / "checkpoints" / "latest.json").read_text())["step"]
               if (d / "checkpoints" / "latest.json").is_file() else 0 for d in run_dirs]
    launcher = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}
    env = {k: v for k, v in os.environ.items() if k not in launcher}
    env["OMP_NUM_THREADS"] = str(max(1, int(base["tune"]["cpus_per_trial"] // workers)))
    for until in _report_steps(min(reached), every, total):
        rows = []
        for k, run_dir in enumerate(run_dirs):
            command = Launch(nproc=workers).command(run_dir, resume=True, until=until)
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"fold {k} of trial {trial_id} failed to train to step {until} on {workers} "
                                   f"ranks (exit {done.returncode}); see {run_dir / 'log.txt'}: "
                                   f"{done.stderr.strip()[-1500:]}")
            config, method = load_latest(run_dir)
            rows.append(validate(method, config, folds, k))
            _write_json(run_dir / "val_scores.json", {"step": until, "scores": rows[-1].pop("scores")})
        _record_report(experiment / "trials" / trial_id, _report(until, rows))
        tune.report(_report(until, rows))


def _write_json(path: Path, value) -> None:
    from data_plane.store import atomic_write_text

    atomic_write_text(path, json.dumps(value))


def tune_experiment(config, config_path: str | None, samples: int | None = None, folds: int | None = None,
                    ray_address: str | None = None, resume: bool = False, name: str | None = None,
                    show_progress: bool = True) -> dict:
    """Run (or resume) the search; write results, picks and plots. Returns the summary."""
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from tune.folds import Folds, make_folds

    if samples is not None or folds is not None:
        config = config.model_copy(update={"tune": config.tune.model_copy(update={
            k: v for k, v in {"samples": samples, "folds": folds}.items() if v is not None})})
    settings = config.tune
    if not settings.space:
        raise ValueError("tune.space is empty: name the config keys to search, e.g. "
                         "tune.space: {train.lr: {type: loguniform, low: 1e-4, high: 1e-2}}")
    experiment = Path(settings.experiments_dir).resolve() / (name or config.name)
    base = _absolute_paths(config.model_dump(mode="json"))
    if resume:
        if not (experiment / "folds.json").is_file():
            raise FileNotFoundError(f"nothing to resume in {experiment} (no folds.json)")
        base = _load_yaml(experiment / "config.yaml")
    else:
        if (experiment / "tuner.pkl").exists() or (experiment / "folds.json").exists():
            raise FileExistsError(f"experiment {experiment} exists: add --resume to continue it, or choose "
                                  f"another name (--name)")
        experiment.mkdir(parents=True, exist_ok=True)
        import yaml

        (experiment / "config.yaml").write_text(yaml.safe_dump(base, sort_keys=False))
        make_folds(config).save(experiment / "folds.json")
    if not ray.is_initialized():
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            cpus = os.cpu_count() or 1
            ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                     _temp_dir=os.environ.get("RAY_TMPDIR"))
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=base, experiment=str(experiment)),
                                    {"cpu": settings.cpus_per_trial, "gpu": settings.gpus_per_trial})
    # ASHA's clock is the step a report was made at: a trial resumed from its folds' checkpoints
    # reports the steps it reaches, whatever Tune counts as iterations.
    scheduler = ASHAScheduler(time_attr="step", max_t=_total_steps(base),
                              grace_period=settings.grace_period * settings.report_every,
                              reduction_factor=settings.reduction_factor) \
        if settings.scheduler == "asha" else FIFOScheduler()
    search_alg = None
    if settings.searcher == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch(seed=config.seed)
    run_config = tune.RunConfig(storage_path=str(experiment.parent), name=experiment.name,
                                failure_config=tune.FailureConfig(max_failures=settings.max_failures),
                                verbose=1 if show_progress else 0)
    if resume:
        tuner = tune.Tuner.restore(str(experiment), trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(trainable, param_space=search_space(settings.space), run_config=run_config,
                           tune_config=tune.TuneConfig(metric="val_auroc", mode="max", scheduler=scheduler,
                                                       search_alg=search_alg, num_samples=settings.samples,
                                                       max_concurrent_trials=settings.max_concurrent,
                                                       reuse_actors=settings.reuse_actors))
    grid = tuner.fit()
    return summarise(grid, base, experiment, Folds.load(experiment / "folds.json"))


def _absolute_paths(tree: dict) -> dict:
    """The config with its file paths made absolute: Ray runs each trial in its own working directory,
    where a path relative to where `tessera tune` was started would name nothing."""
    for section, key in (("data", "store"), ("train", "statistics_file"), (None, "runs_dir")):
        node = tree.get(section, {}) if section else tree
        if node.get(key) and "://" not in str(node[key]):
            node[key] = str(Path(node[key]).expanduser().resolve())
    stain = tree.get("data", {}).get("stain", {})
    if stain.get("reference"):
        stain["reference"] = str(Path(stain["reference"]).expanduser().resolve())
    return tree


def _total_steps(tree: dict) -> int:
    swa = tree["train"].get("swa")
    return tree["train"]["steps"] + (swa["steps"] if swa else 0)


def _load_yaml(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def summarise(grid, base: dict, experiment: Path, folds) -> dict:
    """results.parquet, best.yaml, unsupervised.yaml, plots and summary.json from a finished search."""
    import pandas as pd
    import yaml

    rows, failed, stopped = [], [], []
    every, total = base["tune"]["report_every"], _total_steps(base)
    trial_dirs = sorted(d for d in (experiment / "trials").iterdir() if (d / "attempts.jsonl").is_file()) \
        if (experiment / "trials").is_dir() else []
    # Ray names a trial's folder "<trainable>_<trial id>_<index>_<params>…": find each trial's by its id.
    names = {d.name: next((Path(r.path).name for r in grid if f"_{d.name}_" in Path(r.path).name), d.name)
             for d in trial_dirs}
    errors = {}
    for result in grid:
        if result.error is not None:
            lines = [line.strip() for line in str(result.error).strip().splitlines()
                     if line.strip() and "For further information visit" not in line]
            errors[Path(result.path).name] = " | ".join(lines[-3:])[:500]
    failed = [{"trial": name, "error": error} for name, error in errors.items()]
    params_of = {}
    for index, trial_dir in enumerate(trial_dirs):
        trial = names[trial_dir.name]
        attempts = [json.loads(line) for line in (trial_dir / "attempts.jsonl").read_text().splitlines() if line]
        params_of[trial] = attempts[-1]["params"]
        params = {f"param/{k}": v for k, v in params_of[trial].items()}
        reports = [json.loads(line) for line in (trial_dir / "reports.jsonl").read_text().splitlines() if line] \
            if (trial_dir / "reports.jsonl").is_file() else []
        last = max((int(r["step"]) for r in reports), default=0)
        if last < total and trial not in errors:
            # a trial that stopped short: ASHA's early stop, or (FIFO) an interruption nothing resumed
            entry = {"trial": trial, "reported_until_step": last, "of": total}
            (stopped if base["tune"]["scheduler"] == "asha" else failed).append(
                entry if base["tune"]["scheduler"] == "asha" else
                {"trial": trial, "error": f"interrupted: reported up to step {last} of {total}"})
        for report in reports:
            for k in range(len(folds.folds)):
                rows.append({"trial": trial, "trial_index": index, **params, "step": int(report["step"]),
                             "report": math.ceil(int(report["step"]) / every), "fold": k,
                             "val_auroc": float(report[f"val_auroc_fold{k}"]),
                             "val_loss": float(report[f"val_loss_fold{k}"]),
                             "mean_val_auroc": float(report["val_auroc"]), "mean_val_loss": float(report["val_loss"])})
    if not rows:
        raise RuntimeError(f"no trial reported a result; failures: {failed}")
    # a trial restarted after a kill may report a step twice: keep its latest
    table = pd.DataFrame(rows).drop_duplicates(["trial", "step", "fold"], keep="last").reset_index(drop=True)
    table.to_parquet(experiment / "results.parquet", index=False)
    last = table.sort_values("report").groupby("trial").tail(len(folds.folds))  # each trial's last report, all folds
    per_trial = last.groupby("trial").agg(mean_val_auroc=("val_auroc", "mean"), mean_val_loss=("val_loss", "mean"),
                                          step=("step", "max"), trial_index=("trial_index", "first"))
    best = per_trial["mean_val_auroc"].idxmax()
    unsupervised = per_trial["mean_val_loss"].idxmin()
    picks = {}
    for label, trial in (("best", best), ("unsupervised", unsupervised)):
        tree = apply_params(base, params_of[trial])
        tree.pop("tune", None)
        (experiment / f"{label}.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
        picks[label] = {"trial": trial, "params": params_of[trial],
                        "mean_val_auroc": float(per_trial.loc[trial, "mean_val_auroc"]),
                        "mean_val_loss": float(per_trial.loc[trial, "mean_val_loss"])}
    summary = {"experiment": str(experiment), "trials": len(params_of), "failed": failed, "stopped_early": stopped,
               **picks,
               "validation": {"normals_per_fold": [len(f) for f in folds.folds], "anomalies": folds.anomalies,
                              "anomaly_groups": sorted(set(folds.groups))}}
    (experiment / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    from tune.plots import plot_search

    plot_search(table, per_trial, experiment)
    return summary


def final_run(experiment: Path, pick: str = "best") -> dict:
    """Retrain a pick on all normal training items and evaluate it on the test split."""
    from core.run_config import load_config
    from trainers.evaluate import evaluate
    from trainers.worker import run
    from trainers.run_dir import create_run_dir
    from tune.folds import Folds

    folds = Folds.load(experiment / "folds.json")
    config = load_config(experiment / f"{pick}.yaml")
    section = "volume_stream" if folds.kind == "volumes" else "stream"
    tree = config.model_dump(mode="json")
    tree["data"][section]["ids"] = folds.train
    from core.run_config import RunConfig

    config = RunConfig.model_validate(tree)
    run_dir = experiment / f"final-{pick}"
    if not (run_dir / "final.pt").is_file():
        if not (run_dir / "config.yaml").is_file():
            create_run_dir(config, f"final-{pick}", path=run_dir)
        run(run_dir, resume=True)
    return evaluate(run_dir, split="test", show_progress=False)
