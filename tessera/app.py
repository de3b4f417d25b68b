"""The `tessera` command's Typer app, its sub-command groups and what every command shares: config
loading with one-line errors, and the blame of a storage error on the location written to. Commands
live in tessera/commands/ (one module per family) and import heavy libraries inside each command, so
`--help` stays fast."""

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
store_app = typer.Typer(help="Maintain stores made by `tessera ingest`.", no_args_is_help=True)
app.add_typer(store_app, name="store")
bench_app = typer.Typer(help="Build benchmarks with known anomalies from real sample data.", no_args_is_help=True)
app.add_typer(bench_app, name="make-benchmark")
jobs_app = typer.Typer(help="Follow jobs submitted with `tessera submit` (the registry in $TESSERA_JOBS, default runs/jobs).",
                       no_args_is_help=True)
app.add_typer(jobs_app, name="jobs")


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
