"""Backends run a JobSpec somewhere: ``local``, ``slurm``, ``ray``, ``kubernetes``. One base class; each
backend is one file, registered by name. A submitted job becomes a JobRecord in the local registry
(cluster/registry.py), which ``tessera jobs`` reads.
"""

from __future__ import annotations

from typing import Callable

from cluster.spec import JobSpec

_BACKENDS: dict[str, type] = {}


class BackendError(RuntimeError):
    """A backend cannot do what was asked (tool missing, queue unknown, cluster unreachable): the message
    says what and how to fix it."""


def register_backend(name: str) -> Callable[[type], type]:
    def add(cls: type) -> type:
        cls.name = name
        _BACKENDS[name] = cls
        return cls

    return add


class Backend:
    """Render, submit, and follow jobs. ``render`` never touches the cluster (``--dry-run`` prints it)."""

    name = "base"

    def render(self, spec: JobSpec) -> str:
        """The script or manifest this backend would submit."""
        raise NotImplementedError

    def submit(self, spec: JobSpec) -> dict:
        """Submit; returns the fields of the job record: ``backend_id`` and ``log`` (where output goes),
        plus anything the backend needs later."""
        raise NotImplementedError

    def status(self, record: dict) -> str:
        """One of PENDING, RUNNING, COMPLETED, FAILED, CANCELLED, UNKNOWN."""
        raise NotImplementedError

    def logs(self, record: dict) -> str:
        raise NotImplementedError

    def cancel(self, record: dict) -> None:
        raise NotImplementedError


def backend_names() -> list[str]:
    _load_all()
    return sorted(_BACKENDS)


def get_backend(name: str) -> Backend:
    _load_all()
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend '{name}' (known: {', '.join(sorted(_BACKENDS))})")
    return _BACKENDS[name]()


def _load_all() -> None:
    from cluster.backends import kubernetes, local, ray_jobs, slurm  # noqa: F401
