"""The files tessera writes with torch.save and reads back: checkpoints' rank state, ``final.pt``,
exports and feature statistics.

Every one is read with ``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples
and dicts only. A pickle can name any Python callable, so a file handed to a user (an export, a run
directory someone shared, a statistics file) must never be unpickled in full: a crafted one would run
its code before any check could look at it. What is not a tensor or a plain value (the run config,
numpy's random state) is written as JSON text or as tensors.

Each file carries ``format`` (what it is), ``format_version`` and the ``tessera`` version that wrote it.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 2  # 1: tessera 0.1, pickled numpy states and configs; refused since they need full unpickling


class UnsafeFileError(ValueError):
    """A file that cannot be read without running code from it, or is not the kind of file expected."""


def tessera_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tessera")
    except PackageNotFoundError:  # a source tree that was never installed
        return "unknown"


def save_file(payload: dict, path: str | Path, kind: str) -> Path:
    """``payload`` (tensors and plain values) under ``path``, tagged as ``kind``; written to a partial name
    first, so a file cut short by a kill or a full disk never stands under the final name."""
    from data_plane.store import atomic_write

    bundle = {"format": kind, "format_version": FORMAT_VERSION, "tessera": tessera_version(), **payload}
    return atomic_write(path, lambda partial: torch.save(bundle, partial))


def load_file(path: str | Path, kind: str | tuple[str, ...], what: str | None = None) -> dict:
    """A file written by :func:`save_file`, read without unpickling anything but tensors and plain values.

    ``kind``: the format(s) accepted. ``what`` names the file in errors (e.g. "train.statistics_file").
    """
    path = Path(path)
    kinds = (kind,) if isinstance(kind, str) else tuple(kind)
    name = f"{what} '{path}'" if what else f"'{path}'"
    if not path.is_file():
        raise FileNotFoundError(f"{name} does not exist")
    if not zipfile.is_zipfile(path):  # torch.save writes zip archives; anything else is not ours
        raise UnsafeFileError(f"{name} is not a tessera file (not a torch zip archive, or truncated)")
    try:
        bundle = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{name} was refused: it holds Python objects other than tensors and plain values, and loading "
            f"those could run code from the file. tessera {tessera_version()} writes {'/'.join(kinds)} files "
            f"that load safely; files of tessera 0.1 (or from elsewhere) do not. If it is yours, recreate it "
            f"with this version: {_how_to_recreate(kinds[0])}. (torch: {str(exc).splitlines()[0]})") from None
    except (RuntimeError, EOFError, OSError) as exc:  # not a torch file at all, or truncated
        raise UnsafeFileError(f"{name} is not a tessera file or is truncated ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else 'empty'})") from None
    if not isinstance(bundle, dict) or bundle.get("format") not in kinds:
        found = bundle.get("format") if isinstance(bundle, dict) else type(bundle).__name__
        raise UnsafeFileError(f"{name} is not a {' or '.join(kinds)} file (format: {found!r}); "
                              f"{_how_to_recreate(kinds[0])}")
    if bundle.get("format_version", 1) > FORMAT_VERSION:
        raise UnsafeFileError(f"{name} was written by tessera {bundle.get('tessera')} (file format "
                              f"{bundle['format_version']}), newer than this tessera {tessera_version()} reads "
                              f"(format {FORMAT_VERSION}): upgrade tessera")
    return bundle


def _how_to_recreate(kind: str) -> str:
    return {
        "tessera-export": "`tessera export RUN_DIR --out model.pt` on the run directory it came from",
        "tessera-final": "resume the run (`tessera train --run-dir RUN_DIR --resume`) to rewrite final.pt, "
                         "or retrain it",
        "tessera-statistics": "`tessera features stats CONFIG --out FILE`",
        "tessera-rank-state": "start the run again from scratch: its checkpoints come from an older tessera",
    }.get(kind, "recreate it")


# ------------------------------------------------------------------------------- random states as tensors

def numpy_state_to_tensors(state: tuple) -> dict:
    """``np.random.get_state()`` (a tuple holding a uint32 array) as plain values and a tensor."""
    name, keys, position, has_gauss, cached = state
    return {"name": name, "keys": torch.from_numpy(np.asarray(keys, np.uint32).astype(np.int64)),
            "position": int(position), "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}


def numpy_state_from_tensors(saved: dict) -> tuple:
    return (saved["name"], saved["keys"].numpy().astype(np.uint32), saved["position"], saved["has_gauss"],
            saved["cached_gaussian"])


def python_state_to_plain(state: tuple) -> dict:
    """``random.getstate()`` (version, a tuple of 625 ints, gauss) as lists and numbers."""
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def python_state_from_plain(saved: dict) -> tuple:
    return saved["version"], tuple(saved["internal"]), saved["gauss"]



# ------------------------------------------------------------------------------- DeepSpeed's checkpoints

def _deepspeed_classes() -> list:
    """The few DeepSpeed classes its ZeRO optimiser states hold besides tensors: plain records (an enum,
    the loss-scaler's settings, a dataclass of offsets), safe to rebuild; nothing else is allowed."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, fragment_address]


def load_deepspeed_file(path: str | Path, map_location=None) -> Any:
    """One file of a DeepSpeed checkpoint, read with ``weights_only=True`` (DeepSpeed's own engine reads
    it in full, unpickling anything): a crafted checkpoint in a run directory cannot run code on resume."""
    try:
        with torch.serialization.safe_globals(_deepspeed_classes()):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(f"checkpoint file '{path}' was refused: it holds Python objects other than "
                              f"tensors, plain values and DeepSpeed's optimiser records, and loading those "
                              f"could run code from the file (torch: {str(exc).splitlines()[0]})") from None


def load_safely(engine) -> None:
    """Make a DeepSpeed engine read its checkpoints through :func:`load_deepspeed_file`."""
    engine.checkpoint_engine.load = load_deepspeed_file


def load_engine_weights(folder: str | Path) -> dict:
    """A group's weights from one DeepSpeed checkpoint folder (``<group>/<tag>``), read safely."""
    return load_deepspeed_file(Path(folder) / "mp_rank_00_model_states.pt", map_location="cpu")["module"]
