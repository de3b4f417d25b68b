"""`tessera doctor`: what is installed, which devices are visible, which backends can be used."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Check:
    name: str
    version: str
    ok: bool
    detail: str
    required: bool = True


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def _import(module: str, dist: str, required: bool = True, detail=lambda mod: "") -> Check:
    try:
        mod = importlib.import_module(module)
        return Check(module, _version(dist), True, detail(mod), required)
    except Exception as exc:  # a broken install can raise anything at import; report it, don't crash
        return Check(module, _version(dist), False, f"import failed: {type(exc).__name__}: {exc}", required)


def _torch_detail(torch) -> str:
    if not torch.cuda.is_available():
        return "CUDA not available: training runs on CPU (fp32, gloo)"
    names = {torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())}
    bf16 = "bf16 ok" if torch.cuda.is_bf16_supported() else "no bf16"
    return f"CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU(s): {', '.join(sorted(names))}; {bf16}"


def _distributed() -> Check:
    import torch.distributed as dist

    backends = [name for name, ok in (("gloo", dist.is_gloo_available()), ("nccl", dist.is_nccl_available())) if ok]
    return Check("torch.distributed", "-", bool(backends), "backends: " + (", ".join(backends) or "none"))


def _command(name: str, why: str, label: str | None = None) -> Check:
    # The virtual environment's own bin folder counts even when it is not activated.
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    return Check(label or name, "-", path is not None, path or f"not on PATH ({why})", required=False)


def _kubeconfig() -> Check:
    path = Path(os.environ.get("KUBECONFIG", Path.home() / ".kube" / "config"))
    return Check("kubeconfig", _version("kubernetes"), path.is_file(),
                 str(path) if path.is_file() else f"{path} missing (Kubernetes backend can only --dry-run)",
                 required=False)


def run_checks() -> list[Check]:
    checks = [
        _import("torch", "torch", detail=_torch_detail),
        _import("torchvision", "torchvision"),
        _distributed(),
        _import("deepspeed", "deepspeed"),
        _import("ray", "ray"),
        _import("monai", "monai"),
        _import("openslide", "openslide-python",
                detail=lambda m: f"OpenSlide library {m.__library_version__}"),
        _import("zarr", "zarr"),
        _import("nibabel", "nibabel"),
        _import("tifffile", "tifffile"),
        _import("imagecodecs", "imagecodecs"),
        _import("torchstain", "torchstain", required=False),
        _import("nilearn", "nilearn", required=False, detail=lambda m: "MNI152 sample templates"),
        _command("sbatch", "Slurm backend unavailable"),
        _command("ray", "`ray start` clusters unavailable", label="ray CLI"),
        _kubeconfig(),
    ]
    return checks
