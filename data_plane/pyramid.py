"""A slide's pyramid in the store: level 0 copied from OpenSlide chunk by chunk (tissue chunks only,
composited on white, optionally stain-normalised), then each level from the one below by a 2x2 mean.
Chunks are written through :class:`data_plane.store.LevelWriter` (zarr's bytes, without its per-call
overhead) from a thread pool."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

from data_plane.sources import IngestError


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

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(copy, zip(*np.nonzero(chunk_grid))):
            progress(1)


def reduce_2x2(block: np.ndarray) -> np.ndarray:
    """A (3, 2h, 2w) uint8 block as (3, h, w): each pixel the mean of its 2x2 parents, rounded half up."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(block.transpose(1, 2, 0)))
    return np.asarray(image.reduce(2)).transpose(2, 0, 1)


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
        # PIL's 2x2 box reduction rounds as (sum + 2) // 4, bit-identical to the numpy form and ~4.5x
        # faster (bench/ingest.py; tests/data_plane/test_ingest.py checks the equality)
        small = reduce_2x2(block)
        y, x = cy * chunk, cx * chunk
        writer.write(y, x, small[:, : min(chunk, height - y), : min(chunk, width - x)])

    with ThreadPoolExecutor(threads) as pool:
        for _ in pool.map(reduce, zip(*np.nonzero(grid))):
            progress(1)
    return grid
