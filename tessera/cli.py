"""The `tessera` command: the app (tessera/app.py) with every command family registered
(tessera/commands/), and ``main``, which turns store-version and storage errors into one line."""

from __future__ import annotations

from tessera.app import app, storage_message
# importing a family registers its commands, in this order in `tessera --help`
from tessera.commands import data  # noqa: F401  isort:skip
from tessera.commands import runs  # noqa: F401  isort:skip
from tessera.commands import judge  # noqa: F401  isort:skip
from tessera.commands import generate  # noqa: F401  isort:skip
from tessera.commands import jobs  # noqa: F401  isort:skip

__all__ = ["app", "main"]


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
