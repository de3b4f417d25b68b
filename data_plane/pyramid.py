"""A slide's pyramid in the store: level 0 copied from OpenSlide chunk by chunk (tissue chunks only,
composited on white, optionally stain-normalised), then each level from the one below by a 2x2 mean.
Chunks are written through :class:`data_plane.store.LevelWriter` (zarr's bytes, without its per-call
overhead) from a thread pool."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from data_plane.heap import release_freed_memory
from data_plane.sources import IngestError

TRIM_EVERY = 64  # chunks between heap trims (data_plane.heap.release_freed_memory)


def _in_order(function, items, threads: int):
    """``function`` over ``items`` on ``threads`` threads, results in order, at most 4 per thread in
    flight: ``Executor.map`` submits every item at once, and a 40k² slide's 16k chunks held as futures
    grew the ingest's peak RSS with the slide's size."""
    from collections import deque

    window = 4 * threads
    with ThreadPoolExecutor(threads) as pool:
        pending = deque()
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def _counted(progress: Callable[[int], None]) -> Callable[[int], None]:
    """``progress`` that also trims the heap every TRIM_EVERY chunks (called from the driving thread)."""
    count = 0

    def advance(n: int) -> None:
        nonlocal count
        count += n
        if count % TRIM_EVERY == 0:
            release_freed_memory()
        progress(n)

    return advance


def write_level0(slide, array, chunk_grid: np.ndarray, chunk: int, threads: int, stain,
                  progress: Callable[[int], None]) -> None:
    from data_plane.store import LevelWriter
    from data_plane.tissue import composite_on_white

    height, width = array.shape[1:]
    writer = LevelWriter(array)

    def copy(cy_cx):
        cy, cx = cy_cx
        y, x = cy * chunk, cx * chunk
        h, w = min(chunk, height - y), min(chunk, width - x)
        try:
            region = slide.read_region((x, y), 0, (w, h))
        except Exception as exc:
            raise IngestError(f"reading level-0 region (y={y}, x={x}) failed (truncated or corrupt file?): "
                              f"{exc}") from exc
        pixels = np.asarray(composite_on_white(region))
        if stain is not None:
            pixels = stain.normalize_uint8(pixels)
        writer.write(y, x, pixels.transpose(2, 0, 1))

    advance = _counted(progress)
    for _ in _in_order(copy, zip(*np.nonzero(chunk_grid)), threads):
        advance(1)
    release_freed_memory()


def reduce_2x2(block: np.ndarray) -> np.ndarray:
    """A (c, 2h, 2w) uint8 block as (c, h, w): each pixel the mean of its 2x2 parents, rounded half up.

    PIL's box reduction rounds as (sum + 2) // 4, bit-identical to the numpy form. Plane by plane, since
    the block is stored channel-first: an RGB image would need two transposing copies (1.28 ms against
    0.33 ms for a 512² block; bench/ingest.py, tests/data_plane/test_ingest.py checks the equality)."""
    from PIL import Image

    out = np.empty((block.shape[0], -(-block.shape[1] // 2), -(-block.shape[2] // 2)), np.uint8)
    for c, plane in enumerate(block):
        out[c] = Image.fromarray(np.ascontiguousarray(plane)).reduce(2)
    return out


def write_reduced(parent, array, parent_grid: np.ndarray, chunk: int, threads: int,
                   progress: Callable[[int], None]) -> np.ndarray:
    """Level l from level l-1 by 2x2 mean; a chunk is written when any of its 4 parents was."""
    from data_plane.store import LevelReader, LevelWriter

    reader, writer = LevelReader(parent), LevelWriter(array)
    height, width = array.shape[1:]
    grid_h, grid_w = math.ceil(height / chunk), math.ceil(width / chunk)
    padded = np.zeros((grid_h * 2, grid_w * 2), bool)
    padded[: parent_grid.shape[0], : parent_grid.shape[1]] = parent_grid
    grid = padded.reshape(grid_h, 2, grid_w, 2).any(axis=(1, 3))

    def reduce(cy_cx):
        cy, cx = cy_cx
        block = reader.read(cy * chunk * 2, cx * chunk * 2, chunk * 2, chunk * 2)
        small = reduce_2x2(block)
        y, x = cy * chunk, cx * chunk
        writer.write(y, x, small[:, : min(chunk, height - y), : min(chunk, width - x)])

    advance = _counted(progress)
    for _ in _in_order(reduce, zip(*np.nonzero(grid)), threads):
        advance(1)
    release_freed_memory()
    return grid
