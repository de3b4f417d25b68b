"""Commands about runs: train, eval, export, score, features stats, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tessera.app import SET_HELP, ConfigArg, _fail, _load, _method_options, _WritingTo, app, features_app  # noqa: F401


@app.command()
def train(config: Optional[Path] = ConfigArg,
          overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
          nproc: int = typer.Option(1, min=1, help="Processes (ranks) per node; > 1 launches torchrun."),
          nnodes: int = typer.Option(1, min=1, help="Nodes, each running this same command (e.g. one srun task "
                                                    "per node); needs --rdzv-endpoint."),
          rdzv_endpoint: Optional[str] = typer.Option(None, help="HOST:PORT of the torchrun rendezvous on the first node."),
          hostfile: Optional[Path] = typer.Option(None, help="Start ranks on every host of this MPI-style hostfile "
                                                             "with the DeepSpeed launcher (ssh/pdsh)."),
          nodes: Optional[str] = typer.Option(None, help="H1,H2,…: as --hostfile, --nproc slots on each host."),
          run_dir: Optional[Path] = typer.Option(None, help="Run directory; default runs/<name>-<timestamp>."),
          resume: bool = typer.Option(False, help="Continue the run in --run-dir from its latest checkpoint.")) -> None:
    """Train the config's method with DeepSpeed (gloo on CPU, NCCL on GPUs); resumable."""
    import os
    import subprocess
    import sys

    from trainers.launch import Launch
    from trainers.run_dir import create_run_dir, join_run_dir

    try:
        launch = Launch(nproc, nnodes, rdzv_endpoint, hostfile, tuple(h for h in (nodes or "").split(",") if h))
    except ValueError as exc:
        _fail(str(exc))
    if resume:
        if run_dir is None or not (run_dir / "config.yaml").is_file():
            _fail("--resume needs --run-dir pointing at an existing run (with its config.yaml)")
        if config is not None:
            _fail("--resume continues the run with its own config.yaml; drop CONFIG (--set may still change "
                  "learning rates, steps and logging)")
        from tessera.config import ConfigError, resumed_config
        from trainers.run_dir import RunLock, record_resume_overrides

        holder = RunLock(run_dir).holder()
        if holder:
            _fail(f"run directory '{run_dir}' is being trained by {holder}; wait for it or stop it before "
                  f"resuming")
        try:
            resolved = resumed_config(run_dir / "config.yaml", overrides or [])
        except ConfigError as exc:
            _fail(f"cannot resume '{run_dir}': {exc}")
        if overrides:
            record_resume_overrides(run_dir, resolved, overrides, sys.argv)
        path = run_dir
    elif launch.nnodes > 1:
        # Every node runs this same command: the first creates the run directory, the others join it,
        # and all continue from its latest checkpoint if there is one (a requeued allocation resumes).
        if run_dir is None:
            _fail("--nnodes needs --run-dir: every node must write into the same run directory")
        resolved = _load(config, overrides)
        try:
            path = join_run_dir(resolved, resolved.name, run_dir)
        except (FileExistsError, TimeoutError) as exc:
            _fail(str(exc))
        resume = True
    else:
        if run_dir is not None and run_dir.exists():
            _fail(f"run directory '{run_dir}' exists: add --resume to continue it, or choose another")
        resolved = _load(config, overrides)
        _check_statistics_file(resolved)
        path = create_run_dir(resolved, resolved.name, resolved.runs_dir, path=run_dir).path
    typer.echo(f"run directory: {path}")
    if launch.in_process and "RANK" not in os.environ:
        from trainers.worker import run
        from trainers.files import UnsafeFileError
        from trainers.loop import TrainingDiverged
        from trainers.run_dir import RunLocked

        try:
            with _WritingTo(path):
                run(path, resume)
        except TrainingDiverged as exc:
            _fail(str(exc), code=3)
        except (RunLocked, UnsafeFileError, FileNotFoundError) as exc:
            _fail(str(exc))
        return
    from trainers.dist import guarded

    command = launch.command(path, resume)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # ranks share the cores
    # The launcher dies with this process (and each rank with the launcher): no orphan outlives a kill -9.
    code = subprocess.run(guarded(command), env=env).returncode
    if code:
        _fail(f"training failed (exit {code}); see {path / 'log.txt'}; rerun with --run-dir {path} --resume",
              code=code)


def _check_statistics_file(resolved) -> None:
    """A given train.statistics_file is read (safely) before any rank starts or any directory is made."""
    if resolved.train.statistics_file is None:
        return
    from trainers.checkpoint import load_statistics
    from trainers.files import UnsafeFileError

    try:
        load_statistics(resolved.train.statistics_file, "train.statistics_file")
    except (UnsafeFileError, FileNotFoundError) as exc:
        _fail(str(exc))


@app.command("eval")
def evaluate(run_dir: Path = typer.Argument(..., help="A finished training run directory."),
             store: Optional[str] = typer.Option(None, help="Store to evaluate on; default the run's data.store."),
             split: str = typer.Option("test", help="Split to score."),
             groups: Optional[list[str]] = typer.Option(None, "--group", help="Only these anomaly groups (repeatable)."),
             nproc: int = typer.Option(1, min=1, help="Ranks scoring shares of the items (torchrun); 1 = in-process."),
             score_smoothing: Optional[float] = typer.Option(
                 None, min=0, help="Volumes: σ (voxels) of the 3D Gaussian over score volumes; default the run's "
                 "data.volume_stream.score_smoothing."),
             normal_baseline: Optional[str] = typer.Option(
                 None, help="Volumes: split whose normals' mean score map is subtracted before the volume score "
                 "('none' = off); default the run's data.volume_stream.normal_baseline."),
             option: Optional[list[str]] = typer.Option(
                 None, "--option", help="KEY=VALUE: a method option that shapes scoring only, e.g. score=projector "
                 "(stylegan2) or refine_steps=20 (stylegan2_encoder); repeatable"),
             out: Optional[Path] = typer.Option(None, help="Output folder; default RUN_DIR/eval-SPLIT."),
             slide_top_fraction: float = typer.Option(0.05, min=0.0001, max=1.0, help="Tile runs: a slide's score "
                                                      "is the mean of this top share of its tile scores.")) -> None:
    """Score a split: metrics.json, ROC/PR curves, slide heatmaps and an index.html in RUN_DIR/eval-SPLIT."""
    import json
    import os
    import subprocess
    import sys

    from trainers.evaluate import evaluate as run_eval

    options = _method_options(option)
    out = out or run_dir / f"eval-{split}"

    if nproc > 1:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "trainers.eval_main", str(run_dir), "--split", split]
        command += (["--store", store] if store else []) + [a for g in groups or [] for a in ("--group", g)]
        command += ["--score-smoothing", str(score_smoothing)] if score_smoothing is not None else []
        command += ["--normal-baseline", normal_baseline] if normal_baseline is not None else []
        command += ["--options", json.dumps(options), "--out", str(out), "--slide-top-fraction", str(slide_top_fraction)]
        code = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                              ).returncode
        if code:
            _fail(f"evaluation failed (exit {code})", code=code)
        result = json.loads((out / "metrics.json").read_text())
    else:
        try:
            with _WritingTo(out, store or _run_store(run_dir)):
                result = run_eval(run_dir, store, split, groups, score_smoothing=score_smoothing,
                                  normal_baseline=normal_baseline, options=options or None, out=out,
                                  slide_top_fraction=slide_top_fraction)
        except (FileNotFoundError, NotImplementedError, ValueError) as exc:
            _fail(str(exc))
    overall = result["overall"]
    typer.echo(f"image AUROC {overall['image_auroc']:.3f}"
               + (f" [{overall['image_auroc_low']:.2f}, {overall['image_auroc_high']:.2f}]"
                  if "image_auroc_low" in overall else "") + f", AP {overall['image_ap']:.3f} "
               f"({overall['n_normal']} normal, {overall['n_anomalous']} anomalous)"
               + (f"; pixel AUROC {overall['pixel_auroc']:.3f}, AP {_with_interval(overall, 'pixel_ap')}, "
                  f"DICE {_with_interval(overall, 'dice')}" if "pixel_ap" in overall else "")
               + f" -> {out}/index.html")
    if result.get("slides"):
        slides = result["slides"]["overall"]
        typer.echo(f"slides: AUROC {_with_interval(slides, 'image_auroc')} ({slides['n_normal']} normal, "
                   f"{slides['n_anomalous']} anomalous; score = mean of each slide's top {slide_top_fraction:.0%} "
                   f"tiles) -> {out}/slide_scores.csv")
    if result.get("generator"):
        generator = result["generator"]
        fd = next(k for k in generator if k.startswith(("FD", "FID")) and not k.endswith(" real"))
        typer.echo(f"generator: {fd} {generator[fd]:.2f} (real vs real {generator[fd + ' real']:.2f}) over "
                   f"{generator['images']} images")


def _run_store(run_dir: Path) -> str | None:
    """The store a run was trained on (its config's data.store), for messages; None if unreadable."""
    from tessera.config import ConfigError, load_config

    try:
        return load_config(run_dir / "config.yaml").data.store
    except ConfigError:
        return None


def _with_interval(values: dict, key: str) -> str:
    """``0.676 [0.61, 0.73]``: a figure with its bootstrap interval when the evaluation has one."""
    if f"{key}_low" not in values:
        return f"{values[key]:.3f}"
    return f"{values[key]:.3f} [{values[key + '_low']:.2f}, {values[key + '_high']:.2f}]"


@app.command()
def export(run_dir: Path = typer.Argument(..., help="A finished training run directory."),
           out: Path = typer.Option(..., help="The file to write, e.g. model.pt.")) -> None:
    """A self-contained scoring file (weights, method and data config) that `tessera score` accepts."""
    from trainers.export import export_run

    try:
        typer.echo(f"exported {export_run(run_dir, out)}")
    except FileNotFoundError as exc:
        _fail(str(exc))


@app.command()
def score(model: Path = typer.Argument(..., help="A run directory or a `tessera export` file."),
          inputs: list[str] = typer.Argument(..., help="Slides or volumes (NIfTI, DICOM series) to score (paths, "
                                                        "folders, globs)."),
          out: Path = typer.Option(Path("scores"), help="Output folder: scores.csv, heatmaps/, mood/, store.zarr.")) -> None:
    """Score slides or volumes that were never ingested: per-item scores, slide heatmaps, volume score maps."""
    from trainers.score import score_inputs

    try:
        typer.echo(f"scores in {score_inputs(model, inputs, out)}")
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@features_app.command("stats")
def features_stats(config: Optional[Path] = ConfigArg,
                   overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
                   out: Path = typer.Option(Path("feature_stats.pt"), help="Where to write the statistics."),
                   batches: Optional[int] = typer.Option(None, min=1, help="Training batches to use; default "
                                                                          "train.statistics_batches.")) -> None:
    """Per-layer feature statistics of the config's method over its training data (DPA: channel μ, σ of
    each feature layer; MKD: λ from the untrained cloner). Train with them through
    `--set train.statistics_file=OUT`; a run without that computes its own (feature_stats.pt)."""
    import torch
    from rich.console import Console
    from rich.table import Table

    from core.methods import create_method
    from trainers.checkpoint import save_statistics
    from trainers.loop import compute_statistics

    resolved = _load(config, overrides)
    torch.manual_seed(resolved.seed)  # MKD's λ depends on the cloner's initial weights: the run's seed
    try:
        method = create_method(resolved.method.name, resolved.method.options)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    if not method.uses_statistics:
        _fail(f"method '{resolved.method.name}' uses no feature statistics")
    from data_plane.kinds import training_stream

    stream = training_stream(resolved.data, resolved.train.data)  # what the run would train on
    count = batches or resolved.train.statistics_batches
    stats = compute_statistics(method, stream.batched(resolved.train.micro_batch), count, torch.device("cpu"))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_statistics(stats, out)
    table = Table(title=f"{resolved.method.name} statistics over {count} batches -> {out}")
    table.add_column("layer / term")
    table.add_column("value")
    for key, value in stats.items():
        if isinstance(value, dict):
            table.add_row(key, f"{len(value['mean'])} channels, mean of μ {float(value['mean'].mean()):.4g}, "
                               f"mean of σ {float(value['std'].mean()):.4g}, {value['count']} values each")
        else:
            table.add_row(key, f"{value:.6g}")
    Console().print(table)


@app.command()
def demo(config: Path = typer.Option(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml",
                                     help="Demo recipe."),
         overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Run the whole pipeline on the bundled sample data."""
    from data_plane.sample_data import SampleDataError
    from tessera.demo import run_demo

    resolved = _load(config, overrides)
    try:
        run_demo(resolved)
    except SampleDataError as exc:
        _fail(str(exc), code=1)
