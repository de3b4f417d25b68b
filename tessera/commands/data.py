"""Commands about data: config show, doctor, sample-data, ingest, store migrate, make-benchmark,
export-annotations."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tessera.app import (SET_HELP, ConfigArg, _fail, _load, _WritingTo, app, bench_app, config_app,  # noqa: F401
                         store_app)

CONTAMINATE_HELP = ("Share of the training items (subjects, tiles) given an anomaly while still labelled normal "
                    "(0.02 = 2 %); the test split is unchanged. Lists them in contamination.json.")


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


@store_app.command("migrate")
def store_migrate(store: Path = typer.Argument(..., help="A store written by an older tessera.")) -> None:
    """Rewrite a store of an older layout into this tessera's (OME-NGFF 0.5), in place, without re-ingesting:
    pixels are re-chunked from the store itself, masks become NGFF labels. Per item atomic; rerun to resume."""
    from data_plane.migrate import migrate_store

    with _WritingTo(store):
        done = migrate_store(store, progress=lambda line: typer.echo(line))
    typer.echo(done)


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
                                                                     "as with 1)."),
                         other_kinds: int = typer.Option(0, min=0, help="Extra test subjects with outlier kinds "
                                                         "beyond MOOD's (lesion, cavity, local_blur, intensity_scale "
                                                         "in turn), never used to choose: held-out kinds."),
                         test_normal: int = typer.Option(0, min=0, help="Extra normal test subjects (after all "
                                                         "others: the rest stay the same), for tighter intervals.")
                         ) -> None:
    """Brain MRI subjects from the MNI152 template, with MOOD's five outlier kinds in the test split."""
    from data_plane.benchmarks import make_brain_benchmark, split_counts

    manifest = make_brain_benchmark(out, subjects, resolution, seed, val_anomalous=val_anomalous, val_normal=val_normal,
                                    contaminate=contaminate, workers=workers, other_kinds=other_kinds,
                                    test_normal=test_normal)
    train, normal, anomalous = split_counts(subjects)
    typer.echo(f"{subjects} subjects ({train} train normal, {normal + test_normal} test normal, {anomalous} test anomalous"
               f"{f', {other_kinds} test anomalous of other kinds' if other_kinds else ''}"
               f"{f', {val_anomalous} val anomalous' if val_anomalous else ''}"
               f"{f', {val_normal} val normal' if val_normal else ''}) "
               f"-> {manifest}; ingest with: tessera ingest --manifest {manifest} --store STORE")


@bench_app.command("slide")
def make_benchmark_slide(out: Path = typer.Option(..., help="Output folder (mosaic slides, GeoJSON, manifest.csv, recipe.yaml)."),
                         tile: int = typer.Option(128, min=32, help="Tile size in pixels."),
                         per_group: int = typer.Option(12, min=1, help="Anomalous tiles per group."),
                         seed: int = typer.Option(0, help="Seed of the split and the anomalies."),
                         contaminate: float = typer.Option(0.0, min=0.0, max=0.99, help=CONTAMINATE_HELP),
                         kinds: Optional[str] = typer.Option(None, help="Anomaly kinds of the test split, comma-"
                                                             "separated (default: all)."),
                         val_kinds: Optional[str] = typer.Option(None, help="The few known anomalies: kinds of a 'val' "
                                                                 "split to choose settings by (posthoc, fuse, tune); "
                                                                 "the test's other kinds are the ones never seen."),
                         val_per_group: int = typer.Option(4, min=1, help="Anomalous val tiles per val kind.")) -> None:
    """Normal tissue tiles from the sample slide and tiles carrying foreign tissue, MOOD outliers or lab artefacts
    (out of focus, marker ink), one group each."""
    from data_plane.benchmarks import SLIDE_GROUPS, make_slide_benchmark

    def listed(text):
        return [k.strip() for k in text.split(",") if k.strip()] if text else []

    try:
        manifest = make_slide_benchmark(out, tile, per_group, seed, contaminate, listed(kinds) or None,
                                        listed(val_kinds), val_per_group)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    made = listed(kinds) or list(SLIDE_GROUPS)
    typer.echo(f"test groups {', '.join(made)}" + (f"; val groups {', '.join(listed(val_kinds))} ({val_per_group} "
               f"tiles each), held out of any choice: {', '.join(k for k in made if k not in listed(val_kinds))}"
               if val_kinds else "") + f" -> {manifest}")
    typer.echo(f"ingest with: tessera ingest --manifest {manifest} --store STORE --config {Path(out) / 'recipe.yaml'}")


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
