"""Tissue detection: Otsu on a low-resolution image of the slide, then morphological clean-up."""

from __future__ import annotations

import math

import numpy as np

from data_plane.config import TissueConfig


def read_downsampled(slide, downsample: int, strip_rows: int = 512) -> np.ndarray:
    """The whole slide as RGB at ``downsample`` level-0 pixels per pixel, read strip by strip.

    Reads the pyramid level just finer than the target, one strip at a time, so memory stays
    bounded by the output image even on slides that have no low-resolution level.
    """
    from PIL import Image

    width0, height0 = slide.dimensions
    out_h, out_w = math.ceil(height0 / downsample), math.ceil(width0 / downsample)
    level = slide.get_best_level_for_downsample(downsample)
    level_ds = slide.level_downsamples[level]
    level_w, level_h = slide.level_dimensions[level]
    out = np.empty((out_h, out_w, 3), np.uint8)
    for r0 in range(0, out_h, strip_rows):
        r1 = min(r0 + strip_rows, out_h)
        ly0 = int(r0 * downsample / level_ds)
        ly1 = min(level_h, max(ly0 + 1, math.ceil(r1 * downsample / level_ds)))
        region = slide.read_region((0, int(ly0 * level_ds)), level, (level_w, ly1 - ly0))
        out[r0:r1] = np.asarray(composite_on_white(region).resize((out_w, r1 - r0), Image.BILINEAR))
    return out


def composite_on_white(region):
    """OpenSlide's RGBA (transparent outside the scanned area) as RGB on white glass."""
    from PIL import Image

    if region.mode != "RGBA":
        return region.convert("RGB")
    background = Image.new("RGB", region.size, (255, 255, 255))
    background.paste(region, mask=region.getchannel("A"))
    return background


def tissue_mask(rgb: np.ndarray, config: TissueConfig) -> np.ndarray:
    """Boolean tissue mask of a low-resolution RGB image."""
    from scipy import ndimage
    from skimage.color import rgb2gray, rgb2hsv
    from skimage.filters import threshold_otsu
    from skimage.morphology import disk, remove_small_objects

    # per block of rows, into one preallocated channel: the colour conversions make several float64 copies
    # of what they convert (150 MB for a 40k² slide's thumbnail at once); each pixel's value is the same
    # in a block, and a block of 2^18 values keeps its copies at 2 MB each
    rows = max(1, (1 << 18) // max(1, rgb.shape[1] * 3))
    signal = np.empty(rgb.shape[:2], np.float64)
    for i in range(0, len(rgb), rows):
        if config.channel == "saturation":
            signal[i:i + rows] = rgb2hsv(rgb[i:i + rows])[..., 1]
        else:
            signal[i:i + rows] = 1.0 - rgb2gray(rgb[i:i + rows])  # tissue is darker
    floor = config.min_saturation if config.channel == "saturation" else 0.0
    if float(signal.max()) - float(signal.min()) < 1e-6:
        return np.zeros(signal.shape, bool)  # a uniform image has no tissue (and Otsu is undefined)
    mask = signal > max(float(threshold_otsu(signal)), floor)
    if config.closing_radius:
        r = config.closing_radius  # pad so tissue touching the image edge is not eroded away
        mask = ndimage.binary_closing(np.pad(mask, r, mode="edge"), disk(r))[r:-r, r:-r]
    if config.opening_radius:
        mask = ndimage.binary_opening(mask, disk(config.opening_radius))
    if config.min_object_px:
        mask = remove_small_objects(mask, max_size=config.min_object_px - 1)  # drops objects of <= max_size px
    if config.fill_holes:
        mask = ndimage.binary_fill_holes(mask)
    return mask


def box_fractions(mask: np.ndarray, downsample: float, y0: np.ndarray, x0: np.ndarray, size0: float) -> np.ndarray:
    """Fraction of ``mask`` set inside each level-0 box (y0, x0, size0 × size0), via an integral image."""
    # int32 sums in place: a 40k² slide's mask (1280² at 1/32) needs 6.5 MB here, not ~50 MB of int64 copies
    dtype = np.int32 if mask.size < 2**31 else np.int64
    integral = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype)
    np.cumsum(mask, axis=0, dtype=dtype, out=integral[1:, 1:])
    np.cumsum(integral[1:, 1:], axis=1, out=integral[1:, 1:])
    top = np.clip(np.floor(y0 / downsample).astype(int), 0, mask.shape[0])
    left = np.clip(np.floor(x0 / downsample).astype(int), 0, mask.shape[1])
    bottom = np.clip(np.ceil((y0 + size0) / downsample).astype(int), 0, mask.shape[0])
    right = np.clip(np.ceil((x0 + size0) / downsample).astype(int), 0, mask.shape[1])
    area = np.maximum((bottom - top) * (right - left), 1)
    inside = integral[bottom, right] - integral[top, right] - integral[bottom, left] + integral[top, left]
    return inside / area
