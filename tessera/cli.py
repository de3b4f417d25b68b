"""The `tessera` command. Heavy libraries are imported inside each command so `--help` stays fast."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

app = typer.Typer(help="Distributed training of anomaly detectors on whole-slide images and 3D volumes.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
config_app = typer.Typer(help="Inspect run configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
