import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import openslide
import pandas as pd
import pytest
import zarr

from data_plane.ingest import Source, SourceError, ingest, read_manifest_csv, resolve_sources
from data_plane.pyramid import reduce_2x2
from data_plane.store import LevelReader, LevelWriter


def test_sample_slide_tile_index_and_mask_look_right(sample_store, sample_data):
    tiles = pd.read_parquet(sample_store / ".tessera" / "tiles.parquet")
    group = zarr.open_group(str(sample_store / "slides" / "cmu_small_region"), mode="r")
    info = group.attrs["tessera"]
    assert info["vendor"] == "aperio" and info["objective_power"] == 20.0 and abs(info["mpp"] - 0.499) < 1e-3
    # The slide is scanned at 20x, so 20x tiles come from level 0 at their own size.
    assert set(tiles["level"]) == {0} and set(tiles["size"]) == {256}
    assert len(tiles) > 30 and (tiles["tissue_fraction"] >= 0.05).all()
    assert ((tiles["y"] + 256 <= 2967) & (tiles["x"] + 256 <= 2220)).all()
    mask = group["labels/tissue/0"][:]
    assert 0.2 < mask.mean() < 0.6  # a strip of skin down the middle of the glass
    # Tiles judged tissue-rich are stained (saturated); glass is not.
    with openslide.OpenSlide(str(sample_data.slide)) as slide:
        def saturation(y, x):
            rgb = np.asarray(slide.read_region((int(x), int(y)), 0, (256, 256)).convert("RGB")).astype(float)
            return float((rgb.max(-1) - rgb.min(-1)).mean())
        rich = tiles[tiles["tissue_fraction"] > 0.95]
        assert min(saturation(r.y, r.x) for r in rich.itertuples()) > 20  # measured 28..70
        # The top-left corner of the slide is glass (chroma ~4): it is not indexed.
        assert not ((tiles["y"] == 0) & (tiles["x"] == 0)).any()
        assert saturation(0, 0) < 10


def test_pyramid_is_lossless_at_level0_and_halves_per_level(sample_store, sample_data):
    group = zarr.open_group(str(sample_store / "slides" / "cmu_small_region"), mode="r")
    levels = sorted(int(k) for k in group.array_keys() if k.isdigit())
    shapes = [group[str(level)].shape for level in levels]
    assert shapes[0] == (3, 2967, 2220)
    for finer, coarser in zip(shapes, shapes[1:]):
        assert coarser == (3, -(-finer[1] // 2), -(-finer[2] // 2))
    tiles = pd.read_parquet(sample_store / ".tessera" / "tiles.parquet")
    row = tiles.sort_values("tissue_fraction").iloc[-1]
    level0 = LevelReader(group["0"]).read(int(row.y), int(row.x), 256, 256).transpose(1, 2, 0)
    with openslide.OpenSlide(str(sample_data.slide)) as slide:
        direct = np.asarray(slide.read_region((int(row.x), int(row.y)), 0, (256, 256)).convert("RGB"))
    np.testing.assert_array_equal(level0, direct)
    level1 = LevelReader(group["1"]).read(int(row.y) // 2, int(row.x) // 2, 128, 128).transpose(1, 2, 0).astype(int)
    pooled = level0.reshape(128, 2, 128, 2, 3).astype(int).sum(axis=(1, 3)) / 4
    assert np.abs(level1 - pooled).max() <= 1
    # Chunks that hold no tissue are not written.
    written = sum(1 for p in (sample_store / "slides" / "cmu_small_region" / "0").rglob("*") if p.is_file()) - 1
    assert written < np.ceil(2967 / 256) * np.ceil(2220 / 256)
    ome = group.attrs["ome"]["multiscales"][0]
    assert [d["path"] for d in ome["datasets"]] == [str(level) for level in levels]


def test_pil_reduction_is_the_rounded_2x2_mean():
    block = np.random.default_rng(0).integers(0, 256, (3, 64, 96), dtype=np.uint8)
    expected = (block.astype(np.uint16).reshape(3, 32, 2, 48, 2).sum(axis=(2, 4)) + 2) // 4
    np.testing.assert_array_equal(reduce_2x2(block), expected)


@pytest.mark.parametrize("codec", ["lz4", "zstd"])
def test_direct_chunk_writes_are_the_bytes_zarr_writes(tmp_path, codec):
    from zarr.codecs import BloscCodec, BloscShuffle

    rng = np.random.default_rng(1)
    blocks = {(0, 0): rng.integers(0, 256, (3, 64, 64), dtype=np.uint8),        # a whole chunk
              (64, 128): rng.integers(0, 256, (3, 36, 22), dtype=np.uint8),    # the corner chunk: padded
              (0, 64): np.full((3, 64, 64), 255, np.uint8)}                     # all fill: never written
    paths = {}
    for how in ("zarr", "direct"):
        array = zarr.create_array(str(tmp_path / f"{how}.zarr"), shape=(3, 100, 150), chunks=(3, 64, 64), dtype="uint8",
                                  fill_value=255, compressors=BloscCodec(
                                      cname=codec, clevel=5 if codec == "zstd" else 9,
                                      shuffle=BloscShuffle.bitshuffle if codec == "zstd" else BloscShuffle.noshuffle))
        writer = LevelWriter(array)
        assert writer._dir is not None  # a local store: the direct path is the one under test
        for (y, x), block in blocks.items():
            if how == "zarr":
                array[:, y:y + block.shape[1], x:x + block.shape[2]] = block
            else:
                writer.write(y, x, block)
        paths[how] = sorted(p.relative_to(tmp_path / f"{how}.zarr") for p in (tmp_path / f"{how}.zarr").rglob("c/*/*/*"))
        assert [str(p) for p in paths[how]] == ["c/0/0/0", "c/0/1/2"]
    for path in paths["zarr"]:
        assert (tmp_path / "zarr.zarr" / path).read_bytes() == (tmp_path / "direct.zarr" / path).read_bytes()
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "direct.zarr"))[:, 64:100, 128:150], blocks[(64, 128)])


def test_slide_ingest_imports_neither_torch_nor_monai_nor_pandas(tmp_path, make_slide):
    slide = make_slide(tmp_path / "s.svs", height=1024, width=1024, centre=(512, 512), radius=400)
    code = ("import sys; from tessera.cli import app\n"
            "try: app()\nexcept SystemExit as e: assert not e.code, e.code\n"
            "print(sorted(m for m in ('torch', 'monai', 'deepspeed', 'pandas') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, "ingest", str(slide), "--store", str(tmp_path / "s.zarr")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]" and "ingested 1" in done.stdout


def test_magnification_picks_the_pyramid_level(tmp_path, make_slide, data_config):
    path = make_slide(tmp_path / "forty.svs", height=2048, width=2048, centre=(1024, 1024), radius=900)
    report = ingest(resolve_sources([str(path)]), tmp_path / "s.zarr", data_config("data.tiles.magnification=20"),
                    show_progress=False)
    tiles = pd.read_parquet(tmp_path / "s.zarr" / ".tessera" / "tiles.parquet")
    assert report.done == ["forty"]
    # 40x slide, 256 px tiles at 20x: level 1 of the store, 512 level-0 px per tile.
    assert set(tiles["level"]) == {1} and set(tiles["size"]) == {256}
    assert (np.diff(np.unique(tiles["x"])) % 512 == 0).all()
    failed = ingest(resolve_sources([str(path)]), tmp_path / "t.zarr", data_config("data.tiles.magnification=80"),
                    show_progress=False)
    assert "upsampled" in failed.failed["forty"]


def test_rerun_skips_finished_slides_and_redoes_changed_ones(tmp_path, make_slide, data_config):
    path = make_slide(tmp_path / "a.svs", height=1024, width=1024, centre=(512, 512), radius=400)
    store = tmp_path / "s.zarr"
    config = data_config()
    assert ingest(resolve_sources([str(path)]), store, config, show_progress=False).done == ["a"]
    stamp = (store / "slides" / "a" / "zarr.json").stat().st_mtime_ns
    again = ingest(resolve_sources([str(path)]), store, config, show_progress=False)
    assert again.skipped == ["a"] and again.done == []
    assert (store / "slides" / "a" / "zarr.json").stat().st_mtime_ns == stamp
    # A new tile size changes the index: the slide is ingested again.
    changed = ingest(resolve_sources([str(path)]), store, data_config("data.tiles.size=128"), show_progress=False)
    assert changed.done == ["a"]
    assert set(pd.read_parquet(store / ".tessera" / "tiles.parquet")["out_size"]) == {128}
    entry = json.loads((store / ".tessera" / "manifest.json").read_text())["items"]["a"]
    assert entry["status"] == "done" and len(entry["sha256"]) == 64


def test_bad_inputs_fail_alone_with_reasons(tmp_path, make_slide, sample_data, data_config):
    good = make_slide(tmp_path / "good.svs", height=1024, width=1024, centre=(512, 512), radius=400)
    blank = make_slide(tmp_path / "blank.svs", height=1024, width=1024, blank=True)
    truncated = tmp_path / "truncated.svs"
    truncated.write_bytes(sample_data.slide.read_bytes()[: 600_000])
    # Pixel data overwritten in the middle: OpenSlide opens the file, then fails to decode tiles.
    corrupt = tmp_path / "corrupt.svs"
    data = bytearray(make_slide(tmp_path / "whole.svs", height=2048, width=2048, centre=(1024, 1024),
                                radius=900).read_bytes())
    data[len(data) // 10: len(data) // 2] = b"\xff" * (len(data) // 2 - len(data) // 10)
    corrupt.write_bytes(bytes(data))
    not_a_slide = tmp_path / "notes.svs"
    not_a_slide.write_text("these are my notes, not a slide\n")
    outside = tmp_path / "outside.xml"
    outside.write_text('<ASAP_Annotations><Annotations><Annotation Name="t" Type="Polygon" PartOfGroup="tumor">'
                       '<Coordinates><Coordinate Order="0" X="90000" Y="90000"/><Coordinate Order="1" X="91000" '
                       'Y="90000"/><Coordinate Order="2" X="91000" Y="91000"/></Coordinates></Annotation>'
                       '</Annotations></ASAP_Annotations>')
    other = tmp_path / "other"
    other.mkdir()
    duplicate = make_slide(other / "good.svs", height=1024, width=1024, centre=(512, 512), radius=400)
    sources = resolve_sources([str(good), str(blank), str(truncated), str(corrupt), str(not_a_slide), str(duplicate),
                               str(tmp_path / "missing.svs")])
    sources.append(Source(good, "annotated", "anomalous", "test", outside, "tumor"))
    store = tmp_path / "s.zarr"
    report = ingest(sources, store, data_config(), show_progress=False)
    assert report.done == ["good"]
    reasons = report.failed
    assert "no tissue" in reasons["blank"]
    assert "truncated or corrupt" in reasons["truncated"]
    assert "truncated or corrupt" in reasons["corrupt"] and "JPEG" in reasons["corrupt"]
    assert "not a slide format it knows" in reasons["notes"]
    assert "does not exist" in reasons["missing"]
    assert "entirely outside the slide" in reasons["annotated"]
    assert any("already used by" in reason for key, reason in reasons.items() if key.startswith("good ("))
    recorded = json.loads((store / ".tessera" / "manifest.json").read_text())
    manifest = recorded["items"]
    assert manifest["good"]["status"] == "done" and manifest["blank"]["status"] == "failed"
    assert "already used by" in recorded["rejected"][str(duplicate)]["reason"]  # the duplicate is on record too
    # Nothing half-written is left looking complete.
    assert sorted(p.name for p in (store / "slides").iterdir() if p.is_dir()) == ["good"]
    assert set(pd.read_parquet(store / ".tessera" / "tiles.parquet")["slide_id"]) == {"good"}


def test_cli_exits_nonzero_listing_failures(tmp_path, make_slide):
    from typer.testing import CliRunner

    from tessera.cli import app

    good = make_slide(tmp_path / "good.svs", height=1024, width=1024, centre=(512, 512), radius=400)
    (tmp_path / "bad.svs").write_text("nope")
    result = CliRunner().invoke(app, ["ingest", str(good), str(tmp_path / "bad.svs"),
                                      "--store", str(tmp_path / "s.zarr")])
    assert result.exit_code == 1
    assert "1 item(s) failed" in result.output and "bad:" in result.output
    assert "ingested 1" in result.output


def test_manifest_csv(tmp_path, make_slide):
    make_slide(tmp_path / "a.svs", height=1024, width=1024, centre=(512, 512), radius=400)
    csv = tmp_path / "slides.csv"
    csv.write_text("path,label,split,annotation,group\na.svs,anomalous,val,,metastasis\n")
    (source,) = read_manifest_csv(csv)
    assert (source.item_id, source.label, source.split, source.group) == ("a", "anomalous", "val", "metastasis")
    csv.write_text("path,lable\na.svs,normal\n")
    with pytest.raises(SourceError, match="columns must be among"):
        read_manifest_csv(csv)
    csv.write_text("path,label,split\na.svs,tumour,train\na.svs,normal,train\n,normal,tset\na.svs,normal,val,x\n")
    with pytest.raises(SourceError) as error:
        read_manifest_csv(csv)
    message = str(error.value)  # every bad row, each with its column, value and the allowed values
    assert "4 problem(s); nothing was ingested" in message
    assert "line 2, column label: 'tumour' is not one of normal, anomalous" in message
    assert "line 4, column split: 'tset' is not one of train, val, test" in message
    assert "line 4, column path: empty" in message and "line 5: 1 cell(s) more" in message
    assert "line 3" not in message


def test_a_reingest_that_fails_leaves_no_tiles_of_that_slide(tmp_path, make_slide, data_config):
    good = make_slide(tmp_path / "a.svs", height=1024, width=1024, centre=(512, 512), radius=400)
    other = make_slide(tmp_path / "b.svs", height=1024, width=1024, centre=(512, 512), radius=300)
    store = tmp_path / "s.zarr"
    report = ingest(resolve_sources([str(good), str(other)]), store, data_config(), show_progress=False)
    assert sorted(report.done) == ["a", "b"]
    good.write_bytes(good.read_bytes()[:5000])  # replaced by a truncated file
    report = ingest(resolve_sources([str(good), str(other)]), store, data_config(), show_progress=False)
    assert list(report.failed) == ["a"] and report.skipped == ["b"]
    assert "earlier version was removed" in report.failed["a"]
    manifest = json.loads((store / ".tessera" / "manifest.json").read_text())["items"]
    assert manifest["a"]["status"] == "failed"
    assert set(pd.read_parquet(store / ".tessera" / "tiles.parquet")["slide_id"]) == {"b"}
    assert not (store / "slides" / "a").exists() and not (store / ".tessera" / "index" / "a.parquet").exists()


INTERRUPTIBLE = """
import sys
from data_plane.ingest import ingest, resolve_sources
from tessera.config import load_config
config = load_config(None, ["data.ingest.threads=1", "data.tiles.magnification=null"]).data
ingest(resolve_sources([sys.argv[1]]), sys.argv[2], config, show_progress=False)
"""


def test_sigkill_mid_slide_then_resume(tmp_path, make_slide):
    path = make_slide(tmp_path / "big.svs", height=6144, width=6144, centre=(3072, 3072), radius=3000)
    store = tmp_path / "s.zarr"
    proc = subprocess.Popen([sys.executable, "-c", INTERRUPTIBLE, str(path), str(store)])
    partial = store / ".tessera" / "partial" / "big" / "0" / "c"
    deadline = time.time() + 120
    while time.time() < deadline and not (partial.is_dir() and sum(1 for _ in partial.rglob("*")) > 40):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert partial.is_dir(), "the ingest finished or never started before it could be interrupted"
    assert not (store / "slides" / "big").exists()
    manifest = store / ".tessera" / "manifest.json"
    assert not manifest.exists() or "big" not in json.loads(manifest.read_text())["items"]
    # The rerun clears the partial slide and its stale lock, and completes.
    subprocess.run([sys.executable, "-c", INTERRUPTIBLE, str(path), str(store)], check=True)
    assert not (store / ".tessera" / "partial" / "big").exists()
    tiles = pd.read_parquet(store / ".tessera" / "tiles.parquet")
    clean = tmp_path / "clean.zarr"
    subprocess.run([sys.executable, "-c", INTERRUPTIBLE, str(path), str(clean)], check=True)
    pd.testing.assert_frame_equal(tiles, pd.read_parquet(clean / ".tessera" / "tiles.parquet"))
    a = zarr.open_array(str(store / "slides" / "big" / "2"), mode="r")[:]
    b = zarr.open_array(str(clean / "slides" / "big" / "2"), mode="r")[:]
    np.testing.assert_array_equal(a, b)


def test_parallel_ingest_with_ray(tmp_path, make_slide, data_config):
    paths = [make_slide(tmp_path / f"s{i}.svs", height=1024, width=1024, centre=(512, 512), radius=200 + 150 * i)
             for i in range(3)]
    (tmp_path / "broken.svs").write_text("x")
    sources = resolve_sources([str(p) for p in paths] + [str(tmp_path / "broken.svs")])
    config = data_config("data.tiles.magnification=null")
    report = ingest(sources, tmp_path / "s.zarr", config, workers=2, show_progress=False)
    assert sorted(report.done) == ["s0", "s1", "s2"] and list(report.failed) == ["broken"]
    tiles = pd.read_parquet(tmp_path / "s.zarr" / ".tessera" / "tiles.parquet")
    counts = tiles.groupby("slide_id").size()
    assert counts["s0"] < counts["s1"] < counts["s2"]  # bigger discs, more tiles


def test_stain_normalisation_at_ingest(tmp_path, sample_data, texture, data_config):
    from skimage.color import rgb2lab

    config = data_config("data.stain.method=reinhard", "data.stain.apply=ingest")
    report = ingest(resolve_sources([str(sample_data.slide)]), tmp_path / "s.zarr", config, show_progress=False)
    assert report.done == ["cmu_small_region"]
    tiles = pd.read_parquet(tmp_path / "s.zarr" / ".tessera" / "tiles.parquet")
    row = tiles.sort_values("tissue_fraction").iloc[-1]
    stored = LevelReader(zarr.open_array(str(tmp_path / "s.zarr" / "slides" / "cmu_small_region" / "0"),
                                         mode="r")).read(int(row.y), int(row.x), 256, 256).transpose(1, 2, 0)
    with openslide.OpenSlide(str(sample_data.slide)) as slide:
        raw = np.asarray(slide.read_region((int(row.x), int(row.y)), 0, (256, 256)).convert("RGB"))
    target = rgb2lab(texture).reshape(-1, 3).mean(0)
    def distance(image):
        return np.abs(rgb2lab(image).reshape(-1, 3).mean(0) - target).sum()
    assert distance(stored) < 0.5 * distance(raw)


def test_a_read_only_or_full_store_ends_in_one_line_and_a_rerun_resumes(sample_data, mount_tmpfs):
    import subprocess
    import sys

    def tessera(*args):
        return subprocess.run([sys.executable, "-m", "tessera.cli", "ingest", str(sample_data.slide), *args],
                              capture_output=True, text=True, timeout=600)

    read_only = mount_tmpfs("ro", read_only=True)
    done = tessera("--store", str(read_only / "store.zarr"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    lines = [line for line in done.stderr.splitlines() if line.strip() and not line.startswith("W")]
    assert len(lines) == 1 and "read-only" in lines[0] and str(read_only) in lines[0], done.stderr

    full = mount_tmpfs("full", size="300k")
    done = tessera("--store", str(full / "store.zarr"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "disk is full" in done.stderr and str(full) in done.stderr and "df -h" in done.stderr
    manifest = full / "store.zarr" / ".tessera" / "manifest.json"
    assert not manifest.exists() or json.loads(manifest.read_text())["items"].get(
        "cmu_small_region", {}).get("status") != "done"
    assert not (full / "store.zarr" / "slides" / "cmu_small_region").exists()  # nothing half-written looks whole
    mount_tmpfs.resize(full, "64m")
    again = tessera("--store", str(full / "store.zarr"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert "ingested 1" in again.stdout


def test_arrow_columns_built_from_buffers_equal_pyarrows_own():
    import pyarrow as pa

    from data_plane.store import arrow_numbers, arrow_strings

    strings = ["normal", "", "anomalous", "ünïcode", "normal"]
    assert arrow_strings(strings).equals(pa.array(strings, pa.string()))
    for values in (np.arange(-3, 4, dtype=np.int64), np.array([0.5, np.nan, 2.0], np.float32),
                   np.full(4, 7, np.int8), np.arange(10, dtype=np.int32)[::3]):  # a strided view too
        built = arrow_numbers(values)
        assert built.type == pa.from_numpy_dtype(values.dtype)
        np.testing.assert_array_equal(built.to_numpy(zero_copy_only=False), values)
