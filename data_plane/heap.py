"""glibc heap policy, the two ways the data plane needs it (Linux with glibc only; elsewhere no-ops).

Readers that collate tiles want freed blocks kept (:func:`keep_freed_memory`: no page faults for the
next tensor); the ingest wants them handed back (:func:`release_freed_memory`: its RSS follows live
memory over a 40k² slide). One loader of libc for both.
"""

from __future__ import annotations

import functools
import sys


@functools.cache
def _glibc():
    import ctypes

    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc (e.g. musl)


def keep_freed_memory() -> bool:
    """Let glibc serve large blocks from its heap and keep them after free (Linux only).

    Every tile makes multi-megabyte tensors (the float image, then the collated batch). By default
    glibc maps each with mmap and unmaps it on free, so every new tensor page-faults its memory in
    again: measured 5.6 ms per 512² tile for conversion + collation, 1.7 ms with this setting. The
    cost is up to 512 MiB of freed memory kept per process. Returns whether it applied.
    """
    libc = _glibc()
    if libc is None:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, 256 << 20) and libc.mallopt(m_trim_threshold, 512 << 20))


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS (glibc ``malloc_trim``), so RSS follows live memory.

    glibc keeps the chunk buffers that the ingest's decode threads freed in their own arenas: without
    a trim the peak RSS of `tessera ingest` crept from ~200 to ~290 MiB over a 40960² slide's level 0;
    trimming every 64 chunks (data_plane.pyramid) holds it flat for ~3 % more CPU (bench/ingest.py)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
