import numpy as np
import pytest

from tessera.config import load_config


@pytest.fixture(scope="session")
def texture(sample_data):
    from PIL import Image

    with Image.open(sample_data.he_target) as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="session")
def make_slide(texture):
    """Write an Aperio-style pyramidal TIFF of real H&E texture inside a disc (or nowhere: blank)."""
    from data_plane.tiff_writer import texture_tile_fn, write_pyramidal_tiff

    def make(path, height=3000, width=4000, centre=(1500, 2000), radius=1200, blank=False, **kwargs):
        cy, cx = centre
        tissue = (lambda r, c: np.zeros(np.broadcast(r, c).shape, bool)) if blank else \
            (lambda r, c: (r - cy) ** 2 + (c - cx) ** 2 < radius ** 2)
        return write_pyramidal_tiff(path, height, width, texture_tile_fn(texture, tissue), **kwargs)

    return make


@pytest.fixture
def data_config():
    def build(*overrides):
        return load_config(None, list(overrides)).data

    return build
