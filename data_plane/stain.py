"""Stain normalisation with torchstain (Macenko, Reinhard), fitted once to a reference H&E image.

torchstain 1.4 has no Vahadane; tessera offers what it maintains. Macenko needs enough stained
pixels to estimate the stain vectors: on a tile that is mostly glass it cannot, and the tile is
passed through unchanged (counted in ``skipped``) rather than failing the stream.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from data_plane.config import StainConfig


class StainNormalizer:
    """Maps RGB uint8 (H, W, 3) tiles to the reference image's stain appearance."""

    def __init__(self, method: str, reference: np.ndarray):
        import torchstain

        classes = {"macenko": torchstain.normalizers.MacenkoNormalizer,
                   "reinhard": torchstain.normalizers.ReinhardNormalizer}
        if method not in classes:
            raise ValueError(f"stain method '{method}' is not one of {sorted(classes)}")
        self.method = method
        self.normalizer = classes[method](backend="numpy")
        self.normalizer.fit(reference)
        self.skipped = 0

    @classmethod
    def from_config(cls, config: StainConfig) -> "StainNormalizer":
        from PIL import Image

        if config.reference is None:
            from data_plane.sample_data import fetch_sample_data

            path = fetch_sample_data().he_target
        else:
            path = Path(config.reference)
            if not path.is_file():
                raise FileNotFoundError(f"data.stain.reference '{path}' does not exist")
        with Image.open(path) as image:
            reference = np.asarray(image.convert("RGB"))
        return cls(config.method, reference)

    def normalize_uint8(self, tile: np.ndarray) -> np.ndarray:
        try:
            out = self.normalizer.normalize(tile, stains=False) if self.method == "macenko" \
                else self.normalizer.normalize(tile)
        except (np.linalg.LinAlgError, ValueError, IndexError):
            self.skipped += 1
            return tile
        out = out[0] if isinstance(out, tuple) else out
        return np.clip(out, 0, 255).astype(np.uint8)

    def normalize_batch(self, images):
        """A batch (B, 3, H, W) float in [0, 1] as the stream yields it, normalised tile by tile."""
        import torch

        tiles = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
        out = np.stack([self.normalize_uint8(t) for t in tiles])
        return torch.from_numpy(out).permute(0, 3, 1, 2).float().div(255).to(images.device)
