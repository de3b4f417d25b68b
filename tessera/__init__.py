"""The `tessera` command and the run config that composes each package's config."""

__version__ = "0.2.0"
