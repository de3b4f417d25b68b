"""Whole decoded volumes kept for random 3D patches, shared by the DataLoader workers of one stream.

A patch read from the store decodes every 64³ chunk it crosses (up to eight for a 64³ patch); a crop
of a decoded volume costs a copy. Kept per process, each DataLoader worker would decode and hold its
own copy of every volume (4 workers: 4× the memory, 4× the decoding). Here a volume is decoded once,
by the first worker that needs it, saved as an ``.npy`` file in shared memory (``/dev/shm``) and
memory-mapped by every worker: its pages sit in RAM once. The budget (``volume_cache_mb``) bounds the
folder, least recently used volumes out.

The folder belongs to the process that built the stream: named by its pid, removed when the stream
is collected or the process exits, and swept by the next stream if the owner was killed. Where shared
memory is missing (not Linux) or full (a container's default 64 MB ``/dev/shm``), each process keeps
its own copies, as before, after one warning that says how to give it room.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import uuid
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import numpy as np

SHARED_MEMORY = Path("/dev/shm")


def _owner_alive(folder: Path) -> bool:
    try:
        os.kill(int(folder.name.split("-")[0]), 0)
    except ProcessLookupError:
        return False
    except (ValueError, PermissionError):  # not ours to judge: leave it
        return True
    return True


def _remove_if_owner(folder: Path, owner: int) -> None:
    # a forked DataLoader worker inherits this finaliser: only the owner removes the folder
    if os.getpid() == owner:
        shutil.rmtree(folder, ignore_errors=True)


def shared_folder(owner_object, base: Path | None = None) -> Path | None:
    """A fresh folder for ``owner_object``'s shared volumes (created lazily by the first writer), removed
    when the object is collected or this process exits; None where there is no shared memory. Folders
    of owners that died without cleaning up (killed jobs) are removed here."""
    base = SHARED_MEMORY if base is None else base
    if not base.is_dir() or not os.access(base, os.W_OK):
        return None
    root = base / f"tessera-volumes-{os.getuid()}"
    if root.is_dir():
        for folder in root.iterdir():
            if folder.is_dir() and not _owner_alive(folder):
                shutil.rmtree(folder, ignore_errors=True)
    folder = root / f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    weakref.finalize(owner_object, _remove_if_owner, folder, os.getpid())
    return folder


class VolumeCache:
    """Decoded volumes by key, least recently used out past ``budget`` bytes; shared through ``folder``
    when given (see the module's docstring), else held by this process alone."""

    def __init__(self, budget: int, folder: Path | None = None):
        self.budget, self.folder = budget, folder
        self.held: OrderedDict[tuple, np.ndarray] = OrderedDict()  # this process's views, LRU first
        self.nbytes = 0

    def get(self, key: tuple[str, ...], decode: Callable[[], np.ndarray]) -> np.ndarray:
        volume = self.held.get(key)
        if volume is not None:
            self.held.move_to_end(key)
            return volume
        volume = self._shared(key, decode) if self.folder is not None else decode()
        self.held[key] = volume
        self.nbytes += volume.nbytes
        while self.nbytes > self.budget and len(self.held) > 1:
            self.nbytes -= self.held.popitem(last=False)[1].nbytes
        return volume

    def _shared(self, key: tuple[str, ...], decode: Callable[[], np.ndarray]) -> np.ndarray:
        path = self.folder / ("--".join(key) + ".npy")
        try:
            return self._mapped(path)
        except OSError:  # not there yet (or the folder cannot be: found out below, when writing)
            pass
        partial = path.with_name(f".{path.name}.{os.getpid()}.partial")  # renamed whole: no reader sees half
        volume = None
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            # one decoder per volume: workers start together and ask for the same volumes; each writing
            # its own file would leave each mapping its own copy (measured: 2 workers, 2 copies)
            with open(self.folder / f".{path.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                if path.exists():  # another worker decoded it while this one waited
                    return self._mapped(path)
                volume = decode()
                self._make_room(volume.nbytes)
                with open(partial, "wb") as handle:
                    np.save(handle, volume)
                os.replace(partial, path)
        except OSError as exc:
            try:
                partial.unlink(missing_ok=True)
            except OSError:  # the folder itself could not be made
                pass
            warnings.warn(f"the shared volume cache in {self.folder.parent} is unavailable ({exc}): each "
                          f"DataLoader worker keeps its own decoded volumes. Give shared memory room (docker "
                          f"run --shm-size, a Kubernetes emptyDir with medium: Memory) or lower "
                          f"data.volume_stream.volume_cache_mb.", stacklevel=3)
            self.folder = None
            return volume if volume is not None else decode()
        return self._mapped(path)

    @staticmethod
    def _mapped(path: Path) -> np.ndarray:
        volume = np.load(path, mmap_mode="r")
        os.utime(path)  # recency, for the eviction of whichever process writes next
        return volume

    def _make_room(self, incoming: int) -> None:
        """Remove the least recently used volumes until ``incoming`` bytes fit the budget. A volume another
        worker still maps stays readable there until it lets go (unlinked, not overwritten)."""
        files = []
        for path in self.folder.glob("*.npy"):
            try:
                stat = path.stat()
            except FileNotFoundError:  # another worker removed it meanwhile
                continue
            files.append((stat.st_mtime_ns, stat.st_size, path))
        total = sum(size for _, size, _ in files)
        for _, size, path in sorted(files):
            if total + incoming <= self.budget:
                break
            path.unlink(missing_ok=True)
            total -= size
