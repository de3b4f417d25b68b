"""The store as third-party OME-Zarr tools see it: ome-zarr-models validates every image, label and score
image of a store made by ingest (and by the migration of an older store); ome-zarr-py's Reader finds
the axes, units, scales and labels tessera means. Both run in their own environment (.venv-ngff,
built by `make setup`), through tests/data_plane/ngff_check.py."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
import zarr

from data_plane.ingest import Source, ingest
from tessera.config import load_config

ROOT = Path(__file__).resolve().parents[2]
CHECK = Path(__file__).with_name("ngff_check.py")
LAYOUT1 = ROOT / "tests" / "data" / "layout1.zarr"


def ngff_report(store: Path) -> dict:
    python = Path(os.environ.get("TESSERA_NGFF_PYTHON", ROOT / ".venv-ngff" / "bin" / "python"))
    if not python.exists():
        pytest.fail(f"the OME-Zarr readers' environment is missing ({python}): run `make setup`, which builds it")
    done = subprocess.run([str(python), str(CHECK), str(store)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def assert_all_valid(report: dict) -> None:
    invalid = {path: entry["model"] for path, entry in report["images"].items() if entry["model"].startswith("INVALID")}
    assert not invalid, invalid
    assert report["warnings"] == [], report["warnings"]  # walking slides/ and volumes/ finds only zarr nodes


@pytest.fixture(scope="module")
def ngff_store(tmp_path_factory, make_slide):
    """A slide with annotations and a heatmap, and a volume with a mask and scores, ingested by tessera."""
    from data_plane.heatmap import write_heatmap
    from data_plane.store import read_tile_index
    from data_plane.volumes import write_volume_scores

    folder = tmp_path_factory.mktemp("ngff")
    slide = make_slide(folder / "disc.svs", height=1536, width=2048, centre=(768, 1024), radius=600)  # 0.25 µm/px
    square = [[800, 500], [1300, 500], [1300, 900], [800, 900], [800, 500]]
    hole = [[950, 600], [1100, 600], [1100, 750], [950, 750], [950, 600]]
    (folder / "disc.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "MultiPolygon", "coordinates": [[square, hole]]}},
        {"type": "Feature", "properties": {"classification": {"name": "Tumor"}},
         "geometry": {"type": "Point", "coordinates": [10, 10]}}]}))
    affine = np.array([[1.5, 0, 0, -20.0], [0, 1.5, 0, -30.0], [0, 0, 2.0, 12.0], [0, 0, 0, 1]])
    rng = np.random.default_rng(0)
    mask = np.zeros((24, 20, 16), np.uint8)
    mask[8:14, 6:12, 4:9] = 1
    nibabel.Nifti1Image(rng.random((24, 20, 16)).astype(np.float32), affine).to_filename(folder / "vol.nii.gz")
    nibabel.Nifti1Image(mask, affine).to_filename(folder / "vol_mask.nii.gz")
    config = load_config(None, ["data.tiles.magnification=null", "data.tiles.size=256"]).data
    store = folder / "store.zarr"
    report = ingest([Source(slide, "disc", "anomalous", "test", folder / "disc.geojson"),
                     Source(folder / "vol.nii.gz", "vol", "anomalous", "test", folder / "vol_mask.nii.gz", "", "volume")],
                    store, config, show_progress=False)
    assert report.done == ["disc", "vol"], report
    assert report.warnings == {"disc": ["annotation 'disc.geojson': skipped 1 Point geometry (only polygons mark "
                                        "regions)"]}
    tiles = read_tile_index(store)
    write_heatmap(store, "disc", "run1", tiles[["y", "x"]].to_numpy(), 256, scores=tiles["y"].to_numpy(float))
    shape = zarr.open_group(str(store / "volumes" / "vol"), mode="r").attrs["tessera"]["shape_zyx"]
    write_volume_scores(store, "vol", "run1", np.full(shape, 0.5, np.float32), 0.5)
    return store


def test_every_image_label_and_score_image_of_an_ingested_store_validates(ngff_store):
    report = ngff_report(ngff_store)
    assert_all_valid(report)
    assert report["root_members"] == [".tessera", "slides", "volumes"]
    models = {path: entry["model"].rsplit(".", 1)[-1] for path, entry in report["images"].items()}
    assert models == {"slides/disc": "Image", "slides/disc/labels/tissue": "ImageLabel",
                      "slides/disc/labels/tumor": "ImageLabel", "slides/disc/heatmaps/run1": "Image",
                      "volumes/vol": "Image", "volumes/vol/labels/mask": "ImageLabel", "volumes/vol/scores/run1": "Image"}


def test_ome_zarr_py_reads_slide_axes_micrometre_scales_and_labels(ngff_store):
    nodes = ngff_report(ngff_store)["images"]["slides/disc"]["reader"]
    image = nodes["."]
    assert image["axes"] == ["c", "y", "x"] and image["units"] == [None, "micrometer", "micrometer"]
    assert image["channel_names"] == ["red", "green", "blue"] and "OMERO" in image["specs"]
    shapes = image["levels"]
    assert shapes[0] == [3, 1536, 2048]
    for level, (shape, transforms) in enumerate(zip(shapes, image["transforms"])):
        scale = {t["type"]: t[t["type"]] for t in transforms}
        step = 0.25 * 2**level
        assert scale["scale"] == [1.0, step, step]
        # Pixel centres: level-l pixel 0 covers level-0 pixels 0 … 2**l − 1.
        offset = 0.25 * (2**level - 1) / 2
        assert scale["translation"] == [0.0, offset, offset]
        if level:
            assert shape[1:] == [-(-shapes[level - 1][1] // 2), -(-shapes[level - 1][2] // 2)]
    for name in ("tissue", "tumor"):
        label = nodes[f"labels/{name}"]
        assert "Label" in label["specs"] and label["axes"] == ["y", "x"]
        assert len(label["levels"]) == len(shapes)  # NGFF: as many levels as the image
        downsample = zarr.open_group(str(ngff_store / "slides" / "disc" / "labels" / name), mode="r") \
            .attrs["tessera"]["downsample"]
        first = {t["type"]: t[t["type"]] for t in label["transforms"][0]}
        assert first["scale"] == [0.25 * downsample] * 2
        # The label covers the same extent as the image, in µm.
        assert label["levels"][0][0] * first["scale"][0] >= 1536 * 0.25 > (label["levels"][0][0] - 1) * first["scale"][0]


def test_the_annotation_label_keeps_the_multipolygon_hole(ngff_store):
    group = zarr.open_group(str(ngff_store / "slides" / "disc" / "labels" / "tumor"), mode="r")
    mask, ds = group["0"][:], group.attrs["tessera"]["downsample"]
    at = lambda x, y: mask[int(y // ds), int(x // ds)]
    assert at(850, 550) and at(1250, 850)          # inside the square
    assert not at(1020, 680)                       # inside the hole
    assert not at(100, 100)                        # outside


def test_ome_zarr_py_reads_volume_millimetre_scales_origin_and_orientation(ngff_store):
    nodes = ngff_report(ngff_store)["images"]["volumes/vol"]["reader"]
    image = nodes["."]
    assert image["axes"] == ["z", "y", "x"] and image["units"] == ["millimeter"] * 3
    transforms = {t["type"]: t[t["type"]] for t in image["transforms"][0]}
    assert transforms["scale"] == [2.0, 1.5, 1.5] and transforms["translation"] == [12.0, -30.0, -20.0]
    assert image["levels"] == [[16, 20, 24]]
    assert nodes["labels/mask"]["levels"] == [[16, 20, 24]]
    ome = zarr.open_group(str(ngff_store / "volumes" / "vol"), mode="r").attrs["ome"]
    assert [a["orientation"]["value"] for a in ome["multiscales"][0]["axes"]] == \
        ["inferior-to-superior", "posterior-to-anterior", "left-to-right"]


def test_an_older_store_is_refused_with_the_command_then_migrated_in_place(tmp_path):
    from data_plane.config import StreamConfig
    from data_plane.store import StoreVersionError, read_tile_index
    from data_plane.stream import TileStream

    store = tmp_path / "old.zarr"
    shutil.copytree(LAYOUT1, store)
    old = zarr.open_group(str(store / "slides" / "tiny"), mode="r")
    old_levels = {k: old[k][:] for k in old.array_keys() if k.isdigit()}
    old_tissue, old_heat = old["tissue"][:], old["heatmaps/run1"][:]
    old_volume = zarr.open_array(str(store / "volumes" / "vol" / "image"), mode="r")[:]
    old_tiles = pd.read_parquet(store / "tiles.parquet")
    chunks = lambda level: sum(1 for p in (store / "slides" / "tiny" / level / "c").rglob("*") if p.is_file())
    old_chunks = {k: chunks(k) for k in old_levels}
    with pytest.raises(StoreVersionError, match=f"tessera store migrate {store}"):
        read_tile_index(store)
    refused = subprocess.run([sys.executable, "-m", "tessera.cli", "ingest", str(tmp_path / "x.svs"), "--store",
                              str(store)], capture_output=True, text=True)
    assert refused.returncode == 2 and "tessera store migrate" in refused.stderr and "Traceback" not in refused.stderr

    done = subprocess.run([sys.executable, "-m", "tessera.cli", "store", "migrate", str(store)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "1 slide(s), 1 volume(s) rewritten" in done.stdout
    new = zarr.open_group(str(store / "slides" / "tiny"), mode="r")
    for key, pixels in old_levels.items():
        np.testing.assert_array_equal(new[key][:], pixels.transpose(2, 0, 1))
        # The same chunks are written (one (3, t, t) chunk per old (t, t, 3) one): background stays unwritten.
        assert chunks(key) == old_chunks[key]
    np.testing.assert_array_equal(new["labels/tissue/0"][:], old_tissue)
    np.testing.assert_array_equal(new["heatmaps/run1/0"][:], old_heat)
    np.testing.assert_array_equal(zarr.open_array(str(store / "volumes" / "vol" / "0"), mode="r")[:], old_volume)
    pd.testing.assert_frame_equal(read_tile_index(store), old_tiles)
    items = list(TileStream(store, StreamConfig(splits=["test"], min_tissue_fraction=0.0), shuffle=False))
    assert len(items) == len(old_tiles) and any(bool(i["mask"].any()) for i in items)  # the annotation came along
    assert_all_valid(ngff_report(store))
    again = subprocess.run([sys.executable, "-m", "tessera.cli", "store", "migrate", str(store)],
                           capture_output=True, text=True)
    assert again.returncode == 0 and "nothing to do" in again.stdout


def test_an_ome_tiff_with_its_pixel_size_only_in_ome_xml_ingests_at_a_magnification(tmp_path, texture):
    import tifffile

    pixels = np.full((1024, 1024, 3), 255, np.uint8)
    pixels[128:896, 128:896] = texture[:768, :768]
    path = tmp_path / "scan.ome.tif"
    tifffile.imwrite(path, pixels, tile=(256, 256), photometric="rgb", compression="jpeg", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 250, "PhysicalSizeXUnit": "nm",
                               "PhysicalSizeY": 250, "PhysicalSizeYUnit": "nm"})
    # 0.25 µm/px is about 40x: 20x tiles (the default magnification) read 512 level-0 pixels each.
    report = ingest([Source(path, "scan")], tmp_path / "s.zarr", load_config(None).data, show_progress=False)
    assert report.done == ["scan"], report.failed
    info = zarr.open_group(str(tmp_path / "s.zarr" / "slides" / "scan"), mode="r").attrs["tessera"]
    assert info["mpp"] == pytest.approx(0.25) and info["tile_downsample"] == pytest.approx(2.0)
