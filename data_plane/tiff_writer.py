"""Write pyramidal, tiled, JPEG-compressed TIFF slides that OpenSlide reads (Aperio-style header).

Used to make test and benchmark slides of any size from real H&E pixels: the image is produced
tile by tile by a callback, so a 50 000² slide is written without holding it in memory. Each
pyramid level is one TIFF page (SubIFD pyramids show as a single level in OpenSlide).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

TileFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # level-0 rows (h,), columns (w,) -> RGB (h, w, 3) uint8


def write_pyramidal_tiff(path: str | Path, height: int, width: int, tile_fn: TileFn, mpp: float = 0.25,
                         objective_power: float = 40.0, tile: int = 256, min_level_side: int = 512,
                         quality: int = 90) -> Path:
    """Level l is ``tile_fn`` sampled every 2**l level-0 pixels; levels stop below ``min_level_side``."""
    import tifffile

    path = Path(path)
    levels = [1]
    while max(height, width) // (levels[-1] * 2) >= min_level_side:
        levels.append(levels[-1] * 2)
    description = (f"Aperio Image Library v12.0.0 \r\n{width}x{height} ({tile}x{tile}) JPEG/RGB Q={quality}"
                   f"|AppMag = {objective_power:g}|MPP = {mpp:g}")

    def tiles(step: int, level_h: int, level_w: int):
        for y in range(0, level_h, tile):
            for x in range(0, level_w, tile):
                block = np.full((tile, tile, 3), 255, np.uint8)
                h, w = min(tile, level_h - y), min(tile, level_w - x)
                rows = np.arange(y, y + h) * step
                cols = np.arange(x, x + w) * step
                block[:h, :w] = tile_fn(rows, cols)
                yield block

    with tifffile.TiffWriter(path, bigtiff=height * width * 3 > 2**31) as tif:
        for index, step in enumerate(levels):
            level_h, level_w = -(-height // step), -(-width // step)
            tif.write(tiles(step, level_h, level_w), shape=(level_h, level_w, 3), dtype=np.uint8,
                      tile=(tile, tile), compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
                      subfiletype=0 if index == 0 else 1, description=description if index == 0 else None,
                      resolution=(1e4 / (mpp * step), 1e4 / (mpp * step)), resolutionunit="CENTIMETER",
                      metadata=None)
    return path


def texture_tile_fn(texture: np.ndarray, tissue: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> TileFn:
    """Real H&E ``texture`` repeated over the plane where ``tissue(rows[:, None], cols[None, :])`` holds."""
    th, tw = texture.shape[:2]

    def tile_fn(rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        out = texture[np.ix_(rows % th, cols % tw)]
        out[~np.broadcast_to(tissue(rows[:, None], cols[None, :]), out.shape[:2])] = 255
        return out

    return tile_fn
