"""Commands about jobs: tune (Ray Tune searches), submit, and jobs list / status / logs / cancel."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tessera.app import SET_HELP, ConfigArg, _fail, _load, app, jobs_app  # noqa: F401

CONFIG_COMMANDS = {"train", "tune", "ingest", "features", "config"}  # commands that read a config and --set


@app.command("tune")
def tune_command(config: Optional[Path] = ConfigArg,
                 overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
                 samples: Optional[int] = typer.Option(None, min=1, help="Trials (default tune.samples)."),
                 folds: Optional[int] = typer.Option(None, min=2, help="Folds of the normal training items."),
                 ray_address: Optional[str] = typer.Option(None, help="Join this Ray cluster (default: a local runtime)."),
                 name: Optional[str] = typer.Option(None, help="Experiment name (default: the config's name)."),
                 resume: bool = typer.Option(False, help="Continue the experiment after an interruption."),
                 final: bool = typer.Option(False, help="Then retrain the best (and the unsupervised) pick on all "
                                                        "training data and evaluate on the test split."),
                 anomaly_budget: Optional[str] = typer.Option(None, help="Then redo the choice with only N1,N2,… "
                                                                         "validation anomalies (of one group, or "
                                                                         "several) and report the test AUROC of the "
                                                                         "picks, e.g. 1,5,20,50 (budget.json, "
                                                                         "budget.png).")) -> None:
    """Weakly-supervised hyperparameter search: a few known anomalies choose, K-fold, ASHA, Ray Tune."""
    import json

    from tune.search import final_run, tune_experiment

    resolved = _load(config, overrides)
    try:
        summary = tune_experiment(resolved, str(config) if config else None, samples, folds, ray_address, resume, name)
    except (ValueError, FileExistsError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc))
    experiment = Path(summary["experiment"])
    typer.echo(f"{summary['trials']} trials, {len(summary['failed'])} failed; best {summary['best']['trial']} "
               f"(mean validation AUROC {summary['best']['mean_val_auroc']:.3f}) -> {experiment / 'best.yaml'}; "
               f"unsupervised pick {summary['unsupervised']['trial']}")
    for failure in summary["failed"]:
        typer.echo(f"  failed: {failure['trial']}: {failure['error']}")
    if final:
        results = {pick: final_run(experiment, pick)["overall"] for pick in ("best", "unsupervised")}
        (experiment / "final.json").write_text(json.dumps(results, indent=1))
        for pick, overall in results.items():
            typer.echo(f"  {pick}: test image AUROC {overall['image_auroc']:.3f}")
    if anomaly_budget:
        from tune.budget import budget_study

        try:
            budgets = [int(b) for b in anomaly_budget.split(",") if b.strip()]
        except ValueError:
            _fail(f"--anomaly-budget takes comma-separated counts, e.g. 1,5,20,50; got '{anomaly_budget}'")
        study = budget_study(experiment, budgets, seed=resolved.seed)
        typer.echo(f"anomaly budget ({study['trials']} trials, pool of {study['pool']} validation anomalies "
                   f"{study['groups']}); test AUROC of the pick:")
        for row in study["rows"]:
            typer.echo(f"  {row['setting']:>14}, {row['budget']:>3}: " + (
                row["skipped"] if "skipped" in row else f"{row['test_auroc_mean']:.3f} ± {row['test_auroc_std']:.3f}"))
        typer.echo(f"  unsupervised pick {study['unsupervised_pick']['test_auroc']}, mean trial "
                   f"{study['mean_trial']:.3f}, best in hindsight {study['best_in_hindsight']:.3f} -> "
                   f"{experiment / 'budget.png'}")


def _check_job_config(command: list[str], workdir: Path) -> None:
    """Validate the config a submitted command will load (its YAML, relative to --workdir, and its --set
    overrides), so `tessera submit` refuses what the job would refuse, before it waits in a queue."""
    from tessera.config import ConfigError, load_config, resumed_config

    if not command or command[0] not in CONFIG_COMMANDS:
        return
    overrides, recipe, run_dir, resume, args = [], None, None, "--resume" in command, iter(command[1:])
    for arg in args:
        if arg == "--set":
            overrides.append(next(args, ""))
        elif arg.startswith("--set="):
            overrides.append(arg.removeprefix("--set="))
        elif arg in ("--run-dir", "--config"):
            value = next(args, "")
            run_dir, recipe = (Path(value), recipe) if arg == "--run-dir" else (run_dir, Path(value))
        elif arg.startswith("--"):
            continue
        elif arg.endswith((".yaml", ".yml")) and recipe is None:
            recipe = Path(arg)
    try:
        if resume and run_dir is not None:
            path = run_dir if run_dir.is_absolute() else workdir / run_dir
            if (path / "config.yaml").is_file():
                resumed_config(path / "config.yaml", overrides)
            return
        if recipe is not None and not recipe.is_absolute():
            recipe = workdir / recipe
        if recipe is not None and not recipe.is_file():
            _fail(f"config '{recipe}' does not exist (paths are relative to --workdir {workdir})")
        load_config(recipe, overrides)
    except ConfigError as exc:
        _fail(f"the job's config is invalid, nothing was submitted:\n{exc}")


@app.command(context_settings={"allow_interspersed_args": False})
def submit(command: list[str] = typer.Argument(..., help="The tessera command to run, after `--`, e.g. "
                                                          "`-- train configs/x.yaml --run-dir runs/x`."),
           backend: str = typer.Option("local", help="local, slurm, ray or kubernetes."),
           name: str = typer.Option("tessera", help="Job name."),
           nodes: int = typer.Option(1, min=1, help="Nodes."),
           gpus_per_node: int = typer.Option(0, min=0, help="GPUs per node (training: one rank each)."),
           tasks_per_node: Optional[int] = typer.Option(None, min=1, help="Ranks per node (default: GPUs, or 1)."),
           cpus_per_task: int = typer.Option(4, min=1, help="CPUs per rank."),
           mem_per_task: Optional[str] = typer.Option("16G", help="Memory per rank, e.g. 16G."),
           time_limit: str = typer.Option("04:00:00", "--time", help="Wall-clock limit [D-]HH:MM:SS."),
           partition: Optional[str] = typer.Option(None, help="Slurm partition."),
           account: Optional[str] = typer.Option(None, help="Slurm account."),
           qos: Optional[str] = typer.Option(None, help="Slurm QOS."),
           image: Optional[str] = typer.Option(None, help="Container image (Kubernetes; pyxis on Slurm)."),
           env: Optional[list[str]] = typer.Option(None, "--env", help="KEY=VALUE for the job (repeatable; no secrets)."),
           pass_env: Optional[list[str]] = typer.Option(None, "--pass-env", help="Forward this variable by name "
                                                                              "from this shell (repeatable)."),
           workdir: Path = typer.Option(Path("."), help="Working directory of the job."),
           log_dir: Path = typer.Option(Path("runs/jobs"), help="Where job scripts and logs go."),
           python: Optional[str] = typer.Option(None, help="Python on the nodes (default: this interpreter; in "
                                                           "containers `python`)."),
           namespace: str = typer.Option("default", help="Kubernetes namespace."),
           shared_volume: Optional[str] = typer.Option(None, help="Kubernetes PVC mounted at --workdir."),
           ray_address: Optional[str] = typer.Option(None, help="Ray dashboard address for --backend ray."),
           array: Optional[int] = typer.Option(None, min=1, help="Slurm job array of N tasks, each running the "
                                                                  "command as its share (synthesize)."),
           dry_run: bool = typer.Option(False, help="Print the script or manifest; submit nothing.")) -> None:
    """Run a tessera command as a job on this machine, Slurm, a Ray cluster or Kubernetes."""
    import sys

    from pydantic import ValidationError

    from cluster import registry
    from cluster.backends import BackendError, get_backend
    from cluster.spec import JobSpec

    variables = {}
    for item in env or []:
        key, sep, value = item.partition("=")
        if not sep:
            _fail(f"--env {item!r}: expected KEY=VALUE")
        variables[key] = value
    if command and command[0] == "tessera":
        command = command[1:]  # `-- tessera train …` and `-- train …` mean the same
    _check_job_config(command, workdir)  # a bad config fails here, not after hours in a queue
    try:
        spec = JobSpec(command=command, name=name, nodes=nodes, gpus_per_node=gpus_per_node,
                       tasks_per_node=tasks_per_node, cpus_per_task=cpus_per_task, mem_per_task=mem_per_task,
                       time=time_limit, partition=partition, account=account, qos=qos, image=image, env=variables,
                       pass_env=pass_env or [], workdir=workdir, log_dir=log_dir,
                       python=python or ("python" if backend == "kubernetes" else sys.executable),
                       namespace=namespace, shared_volume=shared_volume, ray_address=ray_address, array=array)
        chosen = get_backend(backend)
        if array and backend != "slurm":
            raise BackendError(f"--array: job arrays are a Slurm feature; with --backend {backend} run the shares "
                               f"as one job (synthesize --nproc N) instead")
        if dry_run:
            typer.echo(chosen.render(spec), nl=False)
            return
        fields = chosen.submit(spec)
    except ValidationError as exc:
        _fail("; ".join(f"{'.'.join(map(str, e['loc'])) or 'job'}: {e['msg']}" for e in exc.errors()))
    except (BackendError, ValueError) as exc:
        _fail(str(exc))
    record = registry.add({"backend": backend, "name": name, "spec": spec.model_dump(mode="json"), **fields})
    typer.echo(f"submitted {record['id']} ({backend} id {record['backend_id']}); logs: {record['log']}")


def _job(job_id: str):
    from cluster import registry
    from cluster.backends import get_backend

    try:
        record = registry.load(job_id)
    except KeyError as exc:
        _fail(str(exc).strip("'\""))
    return record, get_backend(record["backend"])


@jobs_app.command("list")
def jobs_list() -> None:
    """Every registered job with its current state."""
    from cluster import registry
    from cluster.backends import BackendError, get_backend

    for record in registry.all_jobs():
        try:
            state = get_backend(record["backend"]).status(record)
        except BackendError as exc:
            state = f"? ({exc})"
        command = " ".join(record["spec"]["command"])
        typer.echo(f"{record['id']}  {record['backend']:<10} {record['backend_id']:<12} {state:<10} {command[:60]}")


@jobs_app.command("status")
def jobs_status(job_id: str = typer.Argument(..., help="Job id (or a unique part of it).")) -> None:
    record, backend = _job(job_id)
    typer.echo(backend.status(record))


@jobs_app.command("logs")
def jobs_logs(job_id: str = typer.Argument(..., help="Job id (or a unique part of it)."),
              follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends.")) -> None:
    import time

    record, backend = _job(job_id)
    if follow and hasattr(backend, "follow"):
        for chunk in backend.follow(record):
            typer.echo(chunk, nl=False)
        return
    shown = 0
    while True:
        text = backend.logs(record)
        typer.echo(text[shown:], nl=False)
        shown = len(text)
        if not follow or backend.status(record) not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING"):
            return
        time.sleep(2)


@jobs_app.command("cancel")
def jobs_cancel(job_id: str = typer.Argument(..., help="Job id (or a unique part of it).")) -> None:
    from cluster import registry

    record, backend = _job(job_id)
    backend.cancel(record)
    registry.save(record)
    typer.echo(f"cancel requested for {record['id']} ({record['backend']} id {record['backend_id']})")
