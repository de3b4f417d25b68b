"""Backends run a JobSpec somewhere: ``local``, ``slurm``, ``ray``, ``kubernetes``. One base class; each
backend is one file, registered by name. A submitted job becomes a JobRecord in the local registry
(cluster/registry.py), which ``tessera jobs`` reads.
"""

from __future__ import annotations

from cluster.spec import JobSpec


class BackendError(RuntimeError):
    """A backend cannot do what was asked (tool missing, queue unknown, cluster unreachable): the message
    says what and how to fix it."""


def _named(name: str, cls: type) -> None:
    cls.name = name


_BACKENDS = None


def _registry():
    """The backends' core.registry.Registry, made at the first use: importing cluster loads no project code."""
    global _BACKENDS
    if _BACKENDS is None:
        from core.registry import Registry

        _BACKENDS = Registry("backend", modules=[f"cluster.backends.{m}" for m in ("kubernetes", "local", "ray_jobs",
                                                                                  "slurm")],
                             error=BackendError, check=_named)
    return _BACKENDS


def register_backend(name: str):
    return _registry().register(name)


def backend_names() -> list[str]:
    return _registry().names()


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


def get_backend(name: str) -> Backend:
    return _registry().get(name)()
