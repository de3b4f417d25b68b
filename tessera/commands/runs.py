"""Commands about runs: train, eval, compare, export, score, synthesize, features stats, demo."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tessera.app import SET_HELP, ConfigArg, _fail, _load, _WritingTo, app, features_app  # noqa: F401


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
def fuse(runs: list[str] = typer.Argument(..., help="Two or more run directories (or evaluation folders), "
                                                 "evaluated on the same items."),
         out: Path = typer.Option(..., help="Output folder: an evaluation (scores.csv, metrics.json, curves) "
                                            "that `tessera compare` takes."),
         split: str = typer.Option("test", help="The split the runs were evaluated on (RUN_DIR/eval-SPLIT)."),
         normalise: str = typer.Option("rank", help="Each run's scale before the sum: rank or robust-z (label-free)."),
         choose_on: Optional[str] = typer.Option(None, help="Choose the weights by AUROC on this split's evaluations "
                                                            "(e.g. val: a few known anomalies); default equal weights."),
         choose_groups: Optional[str] = typer.Option(None, help="Comma-separated anomaly groups that choose; the "
                                                                "other groups are held out (kinds never seen)."),
         step: float = typer.Option(0.1, min=0.01, max=0.5, help="Weight grid step.")) -> None:
    """Fuse several runs' scores into one (rank- or robust-z-normalised weighted sum), with weights chosen by a
    few known anomalies or equal: metrics per group with intervals, fusion.json with what chose the weights."""
    from trainers.fuse import fuse_evals

    try:
        result = fuse_evals(runs, out, split, normalise, choose_on,
                            [g for g in (choose_groups or "").split(",") if g] or None, step)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    fusion = result["fusion"]
    chose = (f"chosen on {fusion['selection']['split']} ({fusion['selection']['anomalous']} anomalies of "
             f"{', '.join(fusion['selection']['groups'])}; AUROC there {fusion['selection']['auroc']:.3f})"
             if fusion["selection"] else "equal")
    typer.echo(f"weights {chose}: " + ", ".join(f"{n} {w:.2f}" for n, w in zip(fusion["names"], fusion["weights"])))
    typer.echo(f"{split} image AUROC: fused {result['overall']['image_auroc']:.3f} "
               f"[{result['overall']['image_auroc_low']:.2f}-{result['overall']['image_auroc_high']:.2f}]; "
               + ", ".join(f"{n} {a:.3f}" for n, a in fusion["single_auroc"].items()))
    for group, values in result["groups"].items():
        held = " (held out of the choice)" if fusion["held_out_groups"] and group in fusion["held_out_groups"] else ""
        typer.echo(f"  {group}: {values['image_auroc']:.3f}{held}")
    typer.echo(f"written to {out}; pair it with a run: tessera compare {out} RUN --split {split}")


@app.command()
def posthoc(run_dir: Path = typer.Argument(..., help="A finished training run directory."),
            search: list[str] = typer.Option(..., "--search", help="KEY=V1,V2,… a scoring setting and its values: a "
                                             "method option that shapes scoring (image_pooling=mean,top), or "
                                             "score_smoothing / normal_baseline (volume runs). Repeatable."),
            choose_split: str = typer.Option("val", help="The split whose known anomalies choose."),
            choose_groups: Optional[str] = typer.Option(None, help="Comma-separated anomaly groups that choose; the "
                                                                   "others are judged as kinds never seen."),
            test_split: str = typer.Option("test", help="The split the pick and the default are judged on."),
            out: Optional[Path] = typer.Option(None, help="Output folder (default RUN_DIR/posthoc)."),
            workers: int = typer.Option(0, min=0, help="DataLoader workers per evaluation.")) -> None:
    """Choose scoring settings of a trained run by a few known anomalies, without retraining; judge the pick
    against the default on the test split (paired intervals, overall and on held-out groups)."""
    from trainers.posthoc import parse_space, posthoc_search

    try:
        space = parse_space(search)
        result = posthoc_search(run_dir, space, choose_split, [g for g in (choose_groups or "").split(",") if g] or None,
                                test_split, out, workers, log=typer.echo)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"pick: {result['pick']} (chosen on {choose_split}, anomalies of {result['selection']['groups']})")
    for group, row in result["pick_minus_default"].items():
        low, high = row["difference_ci"]
        held = " (held out of the choice)" if group in result["held_out_groups"] else ""
        typer.echo(f"  {test_split} {group}: pick {row['auroc_a']:.3f}, default {row['auroc_b']:.3f}, "
                   f"difference {row['difference']:+.3f} [{low:+.2f}, {high:+.2f}]{held}")
    typer.echo(f"apply it: {result['apply']}")


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
