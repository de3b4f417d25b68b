"""The `tessera` command. Heavy libraries are imported inside each command so `--help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Distributed training of anomaly detectors on whole-slide images and 3D volumes.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")
features_app = typer.Typer(help="Pretrained feature extractors: statistics for normalised features.",
                           no_args_is_help=True)
app.add_typer(features_app, name="features")

SET_HELP = "Override a config key, e.g. --set data.tiles.size=512 (repeatable; values are YAML)."
ConfigArg = typer.Argument(None, help="YAML recipe (e.g. configs/demo.yaml); omit for the defaults.",
                           show_default=False)


def _fail(message: str, code: int = 2) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def _load(config: Optional[Path], overrides: Optional[list[str]]):
    from tessera.config import ConfigError, load_config

    try:
        return load_config(config, overrides or [])
    except ConfigError as exc:
        _fail(str(exc))


@config_app.command("show")
def config_show(config: Optional[Path] = ConfigArg,
                overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Print the fully resolved config (defaults filled in, overrides applied, validated)."""
    typer.echo(_load(config, overrides).to_yaml(), nl=False)


@app.command()
def doctor() -> None:
    """Versions of the stack, visible GPUs, and which optional backends are usable."""
    from rich.console import Console
    from rich.table import Table

    from tessera.doctor import run_checks

    checks = run_checks()
    table = Table(title="tessera doctor")
    for column in ("component", "version", "status", "detail"):
        table.add_column(column)
    for check in checks:
        status = "[green]ok[/]" if check.ok else ("[red]missing[/]" if check.required else "[yellow]unavailable[/]")
        table.add_row(check.name, check.version, status, check.detail)
    Console().print(table)
    broken = [c.name for c in checks if c.required and not c.ok]
    if broken:
        _fail(f"required components not usable: {', '.join(broken)}", code=1)


@app.command("sample-data")
def sample_data(dest: Optional[Path] = typer.Option(
        None, help="Cache folder; default $TESSERA_CACHE/sample-data or ~/.cache/tessera/sample-data.")) -> None:
    """Fetch the real sample slide, H&E reference image and MNI152 brain into a cache; print their paths."""
    from data_plane.sample_data import SampleDataError, fetch_sample_data

    try:
        data = fetch_sample_data(dest)
    except SampleDataError as exc:
        _fail(str(exc), code=1)
    for key, path, description in data.describe():
        typer.echo(f"{key}\t{path}\t{description}")


@app.command()
def ingest(sources: list[str] = typer.Argument(None, help="Slides, NIfTI files, DICOM folders, folders or globs.",
                                              show_default=False),
           store: Optional[str] = typer.Option(None, help="Zarr store to fill; default data.store of the config."),
           manifest: Optional[Path] = typer.Option(None, help="CSV: path,label,split,annotation|mask,group[,id]."),
           workers: Optional[int] = typer.Option(None, help="Slides in parallel (Ray tasks when > 1)."),
           ray_address: Optional[str] = typer.Option(None, help="Join this Ray cluster instead of a local runtime."),
           label: str = typer.Option("normal", help="Label of slides given as paths: normal or anomalous."),
           split: str = typer.Option("train", help="Split of slides given as paths: train, val or test."),
           group: str = typer.Option("", help="Group of slides given as paths."),
           config: Optional[Path] = typer.Option(None, help="YAML recipe whose data section is used."),
           overrides: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP)) -> None:
    """Ingest slides (pyramid, tissue mask, annotations, tile index) and volumes into a Zarr store. Resumable."""
    from rich.console import Console

    from data_plane.ingest import IngestError, SourceError, ingest as run_ingest, resolve_sources
    from tessera.config import ConfigError, load_data_config

    try:
        resolved = load_data_config(config, overrides or [])  # the data section only: no method, no torch
    except ConfigError as exc:
        _fail(str(exc))
    if not sources and manifest is None:
        _fail("nothing to ingest: give slide paths/globs or --manifest CSV")
    if label not in ("normal", "anomalous") or split not in ("train", "val", "test"):
        _fail(f"--label must be normal|anomalous and --split train|val|test (got {label!r}, {split!r})")
    try:
        items = resolve_sources(sources or [], manifest, label=label, split=split, group=group)
        with _WritingTo(store or resolved.data.store):
            report = run_ingest(items, store or resolved.data.store, resolved.data, workers=workers,
                                ray_address=ray_address)
    except (SourceError, IngestError) as exc:
        _fail(str(exc))
    console = Console()
    console.print(f"ingested {len(report.done)}, already present {len(report.skipped)}, "
                  f"failed {len(report.failed)}; the store holds {report.tiles} indexed tiles and "
                  f"{report.volumes} volumes ({store or resolved.data.store})")
    for item_id, warnings in report.warnings.items():
        for warning in warnings:
            console.print(f"[yellow]warning:[/] {item_id}: {warning}", highlight=False)
    if report.failed:
        lines = "\n".join(f"  {slide}: {reason}" for slide, reason in report.failed.items())
        _fail(f"{len(report.failed)} item(s) failed (recorded in manifest.json; rerun to retry):\n{lines}", code=1)


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


def _method_options(items: Optional[list[str]]) -> dict:
    """``--option KEY=VALUE`` pairs, values typed as YAML."""
    import yaml

    options = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            _fail(f"--option takes KEY=VALUE, got {item!r}")
        options[key.strip()] = yaml.safe_load(value)
    return options


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
def compare(a: str = typer.Argument(..., help="Run directory (or evaluation folder) A; several, comma-separated "
                                        "(e.g. one per seed), are averaged."),
            b: str = typer.Argument(..., help="Run directory (or evaluation folder) B, evaluated on the same items; "
                                        "comma-separated like A."),
            split: str = typer.Option("test", help="The split both were evaluated on (RUN_DIR/eval-SPLIT)."),
            out: Optional[Path] = typer.Option(None, help="Output folder; default A's eval folder/compare-<B>."),
            resamples: int = typer.Option(2000, min=100, help="Paired bootstrap resamples."),
            level: float = typer.Option(0.95, min=0.5, max=0.999, help="Coverage of the intervals.")) -> None:
    """Is A better than B? Image AUROC (and pixel AP) per group with paired bootstrap intervals: compare.json,
    compare.png."""
    from rich.console import Console
    from rich.table import Table

    from trainers.compare import compare_evals

    try:
        result = compare_evals([p for p in a.split(",") if p], [p for p in b.split(",") if p], split, out,
                               resamples, level)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    table = Table(title=f"image AUROC: A = {result['name_a']}, B = {result['name_b']} "
                        f"({level:.0%} intervals, {resamples} paired bootstrap resamples)")
    several = len(result["a"]) > 1 or len(result["b"]) > 1
    columns = ["group", "normal", "anomalous", "A", "B", "A − B", "A ahead"] + (["A runs", "B runs"] if several else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "group" else "right")
    for name, row in result["groups"].items():
        low, high = row["difference_ci"]
        verdict = "green" if low > 0 else "red" if high < 0 else "default"
        cells = [name, str(row["n_normal"]), str(row["n_anomalous"]),
                 "{:.3f} [{:.2f}, {:.2f}]".format(row["auroc_a"], *row["auroc_a_ci"]),
                 "{:.3f} [{:.2f}, {:.2f}]".format(row["auroc_b"], *row["auroc_b_ci"]),
                 f"[{verdict}]{row['difference']:+.3f} [{low:+.2f}, {high:+.2f}][/]", f"{row['a_ahead']:.0%}"]
        if several:
            cells += [" ".join(f"{v:.2f}" for v in row["runs_a"]), " ".join(f"{v:.2f}" for v in row["runs_b"])]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    pixel_rows = {name: row["pixel_ap"] for name, row in result["groups"].items() if "pixel_ap" in row}
    if pixel_rows:
        table = Table(title=f"pixel AP (pooled voxels; cases resampled, {level:.0%} intervals)")
        for column in columns[:1] + columns[3:]:
            table.add_column(column, justify="left" if column == "group" else "right")
        for name, row in pixel_rows.items():
            low, high = row["difference_ci"]
            verdict = "green" if low > 0 else "red" if high < 0 else "default"
            cells = [name, "{:.3f} [{:.2f}, {:.2f}]".format(row["a"], *row["a_ci"]),
                     "{:.3f} [{:.2f}, {:.2f}]".format(row["b"], *row["b_ci"]),
                     f"[{verdict}]{row['difference']:+.3f} [{low:+.2f}, {high:+.2f}][/]", f"{row['a_ahead']:.0%}"]
            if several:
                cells += [" ".join(f"{v:.2f}" for v in row["runs_a"]), " ".join(f"{v:.2f}" for v in row["runs_b"])]
            table.add_row(*cells)
        console.print(table)
    if several:
        console.print(f"A: {', '.join(result['a'])}\nB: {', '.join(result['b'])}", highlight=False)
    console.print(f"an interval across 0 makes no call; -> {result['out']}/compare.png", highlight=False)


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


@app.command()
def synthesize(run_dir: Path = typer.Argument(..., help="A finished generator run (stylegan2, stylegan2_encoder)."),
               count: Optional[int] = typer.Option(None, min=1, help="Tiles to make: tile i from seed SEED0 + i."),
               store: str = typer.Option(..., help="Store to write into (created if missing)."),
               name: Optional[str] = typer.Option(None, help="Name of the synthetic set; default the run's name."),
               seed0: int = typer.Option(0, help="Seed of tile 0."),
               truncation: Optional[float] = typer.Option(None, help="ψ; default the run's truncation_psi."),
               batch: Optional[int] = typer.Option(None, min=1, help="Tiles per generator pass (the set's block; "
                                                                    "default 1 on CPU, 32 on GPU)."),
               split: Optional[str] = typer.Option(None, help="Split recorded in the tiles' rows (default train); "
                                                              "with --project, the split inverted (default test)."),
               project: bool = typer.Option(False, "--project", help="Invert the store's real tiles of --split "
                                                                     "instead: reconstructions, distances, heatmaps."),
               option: Optional[list[str]] = typer.Option(None, "--option", help="KEY=VALUE method option for "
                                                          "--project (projector_steps=100, refine_steps=20)."),
               noise: str = typer.Option("const", help="const (learned noise maps) or none."),
               nproc: int = typer.Option(1, min=1, help="Local processes (torchrun), each making its share."),
               nnodes: int = typer.Option(1, min=1, help="Nodes, each running this same command (with --nproc and "
                                                         "--rdzv-endpoint); ranks make shares, no other traffic."),
               rdzv_endpoint: Optional[str] = typer.Option(None, help="HOST:PORT of the torchrun rendezvous (nodes > 1)."),
               resume: bool = typer.Option(False, help="Complete an existing set (tiles already written are kept)."),
               rank: Optional[int] = typer.Option(None, min=0, help="This process's share, when a scheduler "
                                                             "starts the ranks (default from torchrun/Slurm)."),
               world: Optional[int] = typer.Option(None, min=1, help="Number of shares (with --rank).")) -> None:
    """Generate tiles into a store's synthetic set: deterministic by seed, sharded by rank, resumable; the set
    streams like ingested tiles (data.stream.synthetic) once complete. With --project: invert real tiles the
    same way, storing reconstructions and distances, stitched into slide heatmaps."""
    import os
    import subprocess
    import sys
    import uuid

    from data_plane.synthetic import SyntheticError, SyntheticSet
    from trainers.synthesize import default_batch, load_generator, set_spec, synthesize as run_synthesize

    import torch

    options = _method_options(option)
    if project:
        _project_command(run_dir, store, split or "test", name, batch, options, nproc, resume)
        return
    if count is None:
        _fail("--count is required (how many tiles to make), unless --project")
    if nnodes > 1 and not rdzv_endpoint:
        _fail("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the first node), the same on every node")
    split = split or "train"
    try:
        if nproc > 1 or nnodes > 1:
            # The parent creates and locks the set for the job; its torchrun ranks (on every node: the job id
            # comes from the rendezvous they share) carry on under it.
            job = f"synthesize-{rdzv_endpoint}" if nnodes > 1 else f"synthesize-{uuid.uuid4().hex[:12]}"
            os.environ["TESSERA_JOB_ID"] = os.environ.get("TESSERA_JOB_ID") or job
            os.environ["TESSERA_JOB_PID"] = str(os.getpid())
            method, saved = load_generator(run_dir)
            device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
            batch = batch or default_batch(device)
            spec = set_spec(run_dir, method, saved, count, seed0, truncation, batch, split, noise)
            with _WritingTo(store):
                synthetic = SyntheticSet.open(store, name or run_dir.name, spec, resume=resume)
                synthetic.lock()
            launch = ["--standalone"] if nnodes == 1 else [f"--nnodes={nnodes}", "--rdzv-backend=c10d",
                                                          f"--rdzv-endpoint={rdzv_endpoint}"]
            command = [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc_per_node={nproc}",
                       "-m", "trainers.synthesize", str(run_dir), "--store", str(store), "--count", str(count),
                       "--name", synthetic.name, "--seed0", str(seed0), "--batch", str(batch), "--split", split,
                       "--noise", noise, "--resume"] + (["--truncation", str(truncation)] if truncation is not None else [])
            code = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                                  ).returncode
            if code:
                _fail(f"synthesis failed (exit {code}); rerun with --resume to complete the set", code=code)
            if not SyntheticSet(store, synthetic.name).complete():
                _fail("the ranks finished but the set is not complete; rerun with --resume", code=1)
            synthetic.unlock()
        else:
            with _WritingTo(store):
                result = run_synthesize(run_dir, store, count, name, seed0, truncation, batch, split, noise, resume,
                                        rank, world, log=lambda line: typer.echo(line))
            if not result["complete"]:
                typer.echo(f"rank {result['rank']}/{result['world']} done; the set completes when every rank has "
                           f"written its share")
    except (SyntheticError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


def _project_command(run_dir: Path, store: str, split: str, name: Optional[str], batch: Optional[int], options: dict,
                     nproc: int, resume: bool) -> None:
    import json
    import os
    import subprocess
    import sys
    import uuid

    import torch

    from data_plane.synthetic import SyntheticError, SyntheticSet
    from trainers.export import load_method
    from trainers.synthesize import default_batch, project, project_spec, projection_source

    try:
        if nproc == 1:
            with _WritingTo(store):
                result = project(run_dir, store, split, name, batch, options, resume, log=lambda line: typer.echo(line))
            if not result["complete"]:
                typer.echo("this share is done; the set completes when every rank has written its share")
            return
        os.environ["TESSERA_JOB_ID"] = os.environ.get("TESSERA_JOB_ID") or f"project-{uuid.uuid4().hex[:12]}"
        os.environ["TESSERA_JOB_PID"] = str(os.getpid())
        method, _ = load_method(run_dir, options)
        batch = batch or default_batch(torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
        rows, _, _ = projection_source(run_dir, store, split, method.config.resolution)
        name = name or f"{run_dir.name}-project-{split}"
        with _WritingTo(store):
            synthetic = SyntheticSet.open(store, name, project_spec(run_dir, method, split, len(rows), batch, options),
                                          resume=resume, source=rows)
            synthetic.lock()
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                   "-m", "trainers.synthesize", str(run_dir), "--store", str(store), "--project", "--split", split,
                   "--name", name, "--batch", str(batch), "--options", json.dumps(options), "--resume"]
        code = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
                              ).returncode
        if code:
            _fail(f"projection failed (exit {code}); rerun with --resume to complete it", code=code)
        if not SyntheticSet(store, name).complete():
            _fail("the ranks finished but the projection is not complete; rerun with --resume", code=1)
        synthetic.unlock()
    except (SyntheticError, FileNotFoundError, ValueError) as exc:
        _fail(str(exc))


@app.command("export-annotations")
def export_annotations_command(
        folder: Path = typer.Argument(..., help="An evaluation folder (RUN_DIR/eval-<split>) or a run directory."),
        format: str = typer.Option("geojson", "--format", help="Output format: geojson (QuPath: File > Import objects)."),
        threshold: Optional[float] = typer.Option(None, help="Heatmap score marking a region; default: the 95th "
                                                            "percentile of the normal tiles' scores."),
        split: str = typer.Option("test", help="The split, when FOLDER is a run directory."),
        out: Optional[Path] = typer.Option(None, help="Output folder (default FOLDER/annotations).")) -> None:
    """Slide heatmap regions (annotations) and per-tile scores (detections) as GeoJSON in level-0 pixels."""
    from trainers.export_annotations import export_annotations

    if format != "geojson":
        _fail(f"--format {format!r}: only geojson is supported")
    try:
        written = export_annotations(folder, out, threshold, split)
    except (FileNotFoundError, ValueError, KeyError) as exc:
        _fail(str(exc).strip("'\""))
    for slide, path in written.items():
        typer.echo(f"{slide}: {path}")


store_app = typer.Typer(help="Maintain stores made by `tessera ingest`.", no_args_is_help=True)
app.add_typer(store_app, name="store")


@store_app.command("migrate")
def store_migrate(store: Path = typer.Argument(..., help="A store written by an older tessera.")) -> None:
    """Rewrite a store of an older layout into this tessera's (OME-NGFF 0.5), in place, without re-ingesting:
    pixels are re-chunked from the store itself, masks become NGFF labels. Per item atomic; rerun to resume."""
    from data_plane.migrate import migrate_store

    with _WritingTo(store):
        done = migrate_store(store, progress=lambda line: typer.echo(line))
    typer.echo(done)


CONTAMINATE_HELP = ("Share of the training items (subjects, tiles) given an anomaly while still labelled normal "
                    "(0.02 = 2 %); the test split is unchanged. Lists them in contamination.json.")
bench_app = typer.Typer(help="Build benchmarks with known anomalies from real sample data.", no_args_is_help=True)
app.add_typer(bench_app, name="make-benchmark")


@bench_app.command("brain")
def make_benchmark_brain(out: Path = typer.Option(..., help="Output folder (NIfTI images, labels, manifest.csv)."),
                         subjects: int = typer.Option(20, min=5, help="Number of subjects."),
                         resolution: int = typer.Option(2, min=1, max=2, help="MNI152 resolution in mm: 1 or 2."),
                         seed: int = typer.Option(0, help="Seed of deformations and outliers."),
                         val_anomalous: int = typer.Option(0, min=0, help="Extra subjects with outliers in a "
                                                                            "'val' split (known anomalies for tune)."),
                         val_normal: int = typer.Option(0, min=0, help="Extra normal subjects in the 'val' split "
                                                                         "(to choose eval settings by a val AUROC)."),
                         contaminate: float = typer.Option(0.0, min=0.0, max=0.99, help=CONTAMINATE_HELP),
                         workers: int = typer.Option(1, min=1, help="Processes making subjects (the same files "
                                                                     "as with 1).")) -> None:
    """Brain MRI subjects from the MNI152 template, with MOOD's five outlier kinds in the test split."""
    from data_plane.benchmarks import make_brain_benchmark, split_counts

    manifest = make_brain_benchmark(out, subjects, resolution, seed, val_anomalous=val_anomalous, val_normal=val_normal,
                                    contaminate=contaminate, workers=workers)
    train, normal, anomalous = split_counts(subjects)
    typer.echo(f"{subjects} subjects ({train} train normal, {normal} test normal, {anomalous} test anomalous"
               f"{f', {val_anomalous} val anomalous' if val_anomalous else ''}"
               f"{f', {val_normal} val normal' if val_normal else ''}) "
               f"-> {manifest}; ingest with: tessera ingest --manifest {manifest} --store STORE")


@bench_app.command("slide")
def make_benchmark_slide(out: Path = typer.Option(..., help="Output folder (mosaic slides, GeoJSON, manifest.csv, recipe.yaml)."),
                         tile: int = typer.Option(128, min=32, help="Tile size in pixels."),
                         per_group: int = typer.Option(12, min=1, help="Anomalous tiles per group."),
                         seed: int = typer.Option(0, help="Seed of the split and the anomalies."),
                         contaminate: float = typer.Option(0.0, min=0.0, max=0.99, help=CONTAMINATE_HELP)) -> None:
    """Normal tissue tiles from the sample slide and tiles carrying foreign tissue or MOOD outliers, one group each."""
    from data_plane.benchmarks import SLIDE_GROUPS, make_slide_benchmark

    manifest = make_slide_benchmark(out, tile, per_group, seed, contaminate)
    typer.echo(f"groups {', '.join(SLIDE_GROUPS)} -> {manifest}; ingest with: tessera ingest --manifest {manifest} "
               f"--store STORE --config {Path(out) / 'recipe.yaml'}")


@app.command()
def demo(config: Path = typer.Option(Path(__file__).resolve().parent.parent / "configs" / "demo.yaml",
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


jobs_app = typer.Typer(help="Follow jobs submitted with `tessera submit` (the registry in $TESSERA_JOBS, default runs/jobs).",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


CONFIG_COMMANDS = {"train", "tune", "ingest", "features", "config"}  # commands that read a config and --set


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


@jobs_app.command("cancel")
def jobs_cancel(job_id: str = typer.Argument(..., help="Job id (or a unique part of it).")) -> None:
    from cluster import registry

    record, backend = _job(job_id)
    backend.cancel(record)
    registry.save(record)
    typer.echo(f"cancel requested for {record['id']} ({record['backend']} id {record['backend_id']})")


class _WritingTo:
    """Context: an OSError raised without a usable file name (zarr's and torch's writers drop it, or give a
    path relative to the store) is blamed on the location this command writes to whose file system shows
    the fault (read-only, or full), so the one-line message says where."""

    def __init__(self, *locations):
        self.locations = [Path(str(p)) for p in locations if p is not None]

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, traceback) -> bool:
        import errno

        if not isinstance(exc, OSError) or not self.locations or \
                (exc.filename is not None and Path(str(exc.filename)).is_absolute()):
            return False

        def shows_fault(location: Path) -> bool:
            import os

            existing = next((p for p in (location, *location.parents) if p.exists()), None)
            if existing is None:
                return False
            stat = os.statvfs(existing)
            if exc.errno == errno.EROFS:
                return bool(stat.f_flag & os.ST_RDONLY)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                return stat.f_bavail == 0
            return False

        exc.filename = str(next((p for p in self.locations if shows_fault(p)), self.locations[0]))
        return False


def storage_message(exc: OSError) -> str:
    """One line for a write that failed because of where it writes: what, where, and what to do."""
    import errno
    import os

    where = Path(str(exc.filename)).resolve() if exc.filename else None
    place = f"'{where}'" if where else "the output location"
    folder = where.parent if where else Path(".")
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        what = "the disk is full" if exc.errno == errno.ENOSPC else "the disk quota is used up"
        return (f"could not write {place}: {what}. Free space there (`df -h {folder}`) or choose another "
                f"location, then run the same command again: finished items are kept and it resumes")
    if exc.errno == errno.EROFS:
        return (f"could not write {place}: the file system is read-only. Choose a writable location "
                f"(--store, --run-dir or --out)")
    return (f"could not write to {place}: {os.strerror(exc.errno).lower()}. Fix the permissions of {folder} or "
            f"choose another location")


def main() -> None:
    from data_plane.store import StoreVersionError, is_storage_error

    try:
        app()
    except StoreVersionError as exc:  # raised wherever a store is opened: one line, with the command to run
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    except OSError as exc:
        if not is_storage_error(exc):
            raise
        from rich.console import Console

        Console(stderr=True).print(f"[bold red]error:[/] {storage_message(exc)}", highlight=False, soft_wrap=True)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
