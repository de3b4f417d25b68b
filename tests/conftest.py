"""Shared fixtures. Sample data is fetched once per session into $TESSERA_CACHE (the Makefile and
.ci/run point it inside the work tree), so only the first run on a machine needs the package index."""

import pytest


@pytest.fixture(scope="session")
def sample_data():
    from data_plane.sample_data import fetch_sample_data

    return fetch_sample_data()
