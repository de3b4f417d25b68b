import json
from pathlib import Path

import nibabel
import numpy as np
import pandas as pd
import pytest
import zarr

from data_plane.ingest import Source, ingest, read_manifest_csv, resolve_sources
from data_plane.volumes import volume_index, write_volume_scores

NIBABEL_DATA = Path(nibabel.__file__).parent / "tests" / "data"


def stored(store, volume_id, name="image"):
    from data_plane.volumes import volume_array

    return volume_array(store, volume_id, name)


def test_mni152_template_with_its_brain_mask(tmp_path, sample_data, data_config):
    source = Source(sample_data.mni152_t1, "mni152", "normal", "train", sample_data.mni152_brain_mask, "", "volume")
    report = ingest([source], tmp_path / "s.zarr", data_config(), show_progress=False)
    assert report.done == ["mni152"] and report.volumes == 1
    image, mask = stored(tmp_path / "s.zarr", "mni152"), stored(tmp_path / "s.zarr", "mni152", "mask")
    assert image.shape == (189, 233, 197) and image.chunks == (64, 64, 64) and mask.shape == image.shape
    voxels = image[:]
    assert voxels.min() == 0.0 and voxels.max() == 1.0
    brain = mask[:] > 0
    assert 0.1 < brain.mean() < 0.4
    assert voxels[brain].mean() > 3 * voxels[~brain].mean()  # the mask sits on the brain
    info = zarr.open_group(str(tmp_path / "s.zarr" / "volumes" / "mni152"), mode="r").attrs["tessera"]
    assert info["orientation"] == "RAS" and np.allclose(info["spacing_xyz"], 1.0)
    assert info["normalisation"]["clip_high"] > info["normalisation"]["clip_low"]
    row = pd.read_parquet(tmp_path / "s.zarr" / ".tessera" / "volumes.parquet").iloc[0]
    assert (row.volume_id, row.shape_z, row.has_mask) == ("mni152", 189, True)


def test_any_orientation_is_stored_as_ras(tmp_path, data_config):
    original = nibabel.load(NIBABEL_DATA / "anatomical.nii")
    data = np.asarray(original.dataobj, np.float32)
    # The same anatomy written with the first axis flipped (L instead of R): the stored arrays must agree.
    flip = np.diag([-1.0, 1, 1, 1])
    flip[0, 3] = data.shape[0] - 1
    flipped = nibabel.Nifti1Image(data[::-1].copy(), original.affine @ flip)
    flipped.to_filename(tmp_path / "flipped.nii.gz")
    nibabel.Nifti1Image(data, original.affine).to_filename(tmp_path / "plain.nii.gz")
    report = ingest(resolve_sources([str(tmp_path / "plain.nii.gz"), str(tmp_path / "flipped.nii.gz")]),
                    tmp_path / "s.zarr", data_config(), show_progress=False)
    assert sorted(report.done) == ["flipped", "plain"]
    np.testing.assert_array_equal(stored(tmp_path / "s.zarr", "plain")[:], stored(tmp_path / "s.zarr", "flipped")[:])


def test_resampling_to_a_target_spacing(tmp_path, data_config):
    report = ingest(resolve_sources([str(NIBABEL_DATA / "standard.nii.gz")]), tmp_path / "s.zarr",
                    data_config("data.volumes.spacing=[4.0, 4.0, 4.0]"), show_progress=False)
    assert report.done == ["standard"]
    info = zarr.open_group(str(tmp_path / "s.zarr" / "volumes" / "standard"), mode="r").attrs["tessera"]
    assert np.allclose(info["spacing_xyz"], 4.0)
    row = volume_index(tmp_path / "s.zarr").set_index("volume_id").loc["standard"]
    assert np.allclose([row.spacing_x, row.spacing_y, row.spacing_z], 4.0)
    # A volume ingested by an older tessera (its index row has no spacing) still joins the index.
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from data_plane.store import rebuild_volume_index

    root = tmp_path / "s.zarr"
    shutil.copytree(root / "volumes" / "standard", root / "volumes" / "older")
    old_row = pq.read_table(root / ".tessera" / "volume_index" / "standard.parquet").drop_columns(
        ["spacing_x", "spacing_y", "spacing_z"])
    old_row = old_row.set_column(0, "volume_id", pa.array(["older"]))
    pq.write_table(old_row, root / ".tessera" / "volume_index" / "older.parquet")
    assert rebuild_volume_index(root) == 2
    index = volume_index(root).set_index("volume_id")
    assert pd.isna(index.loc["older", "spacing_z"]) and index.loc["standard", "spacing_z"] == pytest.approx(4.0)
    original = nibabel.load(NIBABEL_DATA / "standard.nii.gz")
    zooms = np.array(original.header.get_zooms()[:3])
    expected = np.round(np.array(original.shape) * zooms / 4.0)
    assert np.all(np.abs(np.array(info["shape_zyx"][::-1]) - expected) <= 1)


def test_bad_volumes_fail_alone_with_reasons(tmp_path, sample_data, data_config):
    good = NIBABEL_DATA / "anatomical.nii"
    corrupt = tmp_path / "corrupt.nii.gz"
    whole = sample_data.mni152_t1.read_bytes()
    corrupt.write_bytes(whole[: len(whole) // 2])  # a download cut off half way
    four_d = NIBABEL_DATA / "example4d.nii.gz"
    sources = [Source(good, "good", kind="volume"), Source(corrupt, "corrupt", kind="volume"),
               Source(four_d, "four_d", kind="volume"),
               Source(good, "mismatch", annotation=sample_data.mni152_brain_mask, kind="volume"),
               Source(tmp_path / "missing.nii.gz", "missing", kind="volume")]
    store = tmp_path / "s.zarr"
    report = ingest(sources, store, data_config(), show_progress=False)
    assert report.done == ["good"]
    assert "could not be read (corrupt or truncated gzip?)" in report.failed["corrupt"]
    assert "a 3D volume was expected" in report.failed["four_d"] and "4D" in report.failed["four_d"]
    assert "must share one voxel grid" in report.failed["mismatch"]
    assert "does not exist" in report.failed["missing"]
    assert sorted(p.name for p in (store / "volumes").iterdir() if p.is_dir()) == ["good"]
    manifest = json.loads((store / ".tessera" / "manifest.json").read_text())["items"]
    assert manifest["corrupt"]["status"] == "failed" and manifest["good"]["kind"] == "volume"
    assert ingest(sources[:1], store, data_config(), show_progress=False).skipped == ["good"]


def test_manifest_csv_with_volumes_and_slides(tmp_path, sample_data):
    csv = tmp_path / "items.csv"
    csv.write_text("path,label,split,mask,group\n"
                   f"{sample_data.mni152_t1},normal,train,{sample_data.mni152_brain_mask},\n"
                   f"{sample_data.slide},anomalous,test,,skin\n")
    volume, slide = read_manifest_csv(csv)
    assert (volume.kind, volume.item_id, volume.annotation) == ("volume", "mni152_t1_1mm", sample_data.mni152_brain_mask)
    assert (slide.kind, slide.label, slide.group) == ("slide", "anomalous", "skin")


@pytest.mark.parametrize("flipped", [False, True])
def test_scores_go_back_to_the_inputs_grid(tmp_path, data_config, flipped):
    original = nibabel.load(NIBABEL_DATA / "anatomical.nii")
    data = np.asarray(original.dataobj, np.float32)
    affine = original.affine
    if flipped:
        flip = np.diag([-1.0, 1, 1, 1])
        flip[0, 3] = data.shape[0] - 1
        data, affine = data[::-1].copy(), affine @ flip
    path = tmp_path / "case.nii.gz"
    nibabel.Nifti1Image(data, affine).to_filename(path)
    store = tmp_path / "s.zarr"
    ingest(resolve_sources([str(path)]), store, data_config(), show_progress=False)
    image = stored(store, "case")[:]
    written = write_volume_scores(store, "case", "probe", image, sample_score=0.75, out_dir=tmp_path / "out")
    back = nibabel.load(written["nifti"])
    assert back.shape == data.shape and np.allclose(back.affine, affine)
    # The score volume was the normalised image itself: back in the input grid it follows the input.
    assert np.corrcoef(np.asarray(back.dataobj).ravel(), data.ravel())[0, 1] > 0.99
    assert Path(written["txt"]).read_text().strip() == "0.750000"
    scores = zarr.open_group(str(Path(store) / "volumes" / "case" / "scores" / "probe"), mode="r")
    assert scores.attrs["tessera"]["sample_score"] == 0.75
    with pytest.raises(ValueError, match="do not match volume"):
        write_volume_scores(store, "case", "bad", image[1:], 0.0)


def write_dicom_series(folder: Path, volume: np.ndarray, spacing: float = 2.0) -> Path:
    """A DICOM series (one file per axial slice) of ``volume`` (x, y, z), headers from pydicom's real MR slice."""
    import copy

    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    template = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    series = generate_uid()
    folder.mkdir(parents=True)
    for k in range(volume.shape[2]):
        ds = copy.deepcopy(template)
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        plane = volume[:, :, k].T.astype(np.int16)  # DICOM rows run along y, columns along x
        ds.Rows, ds.Columns = plane.shape
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = plane.tobytes()
        ds.PixelSpacing = [spacing, spacing]
        ds.SliceThickness = spacing
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [0.0, 0.0, k * spacing]
        ds.InstanceNumber = k + 1
        ds.SeriesInstanceUID = series
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for tag in ("RescaleSlope", "RescaleIntercept"):
            if tag in ds:
                delattr(ds, tag)
        ds.save_as(folder / f"slice_{k:03d}.dcm", enforce_file_format=True)
    return folder


def test_dicom_series_folder_is_one_volume(tmp_path, data_config):
    from nilearn import datasets

    template = datasets.load_mni152_template(resolution=2)
    volume = np.asarray(template.dataobj, np.float32)[::2, ::2, ::2]  # (50, 59, 48): small and quick
    folder = write_dicom_series(tmp_path / "series_a", np.round(volume).astype(np.int16))
    sources = resolve_sources([str(folder)])
    assert [(s.kind, s.item_id) for s in sources] == [("volume", "series_a")]
    report = ingest(sources, tmp_path / "s.zarr", data_config("data.volumes.nonzero_only=false",
                                                              "data.volumes.percentiles=[0, 100]"),
                    show_progress=False)
    assert report.done == ["series_a"], report.failed
    image = stored(tmp_path / "s.zarr", "series_a")[:]
    assert sorted(image.shape) == sorted(volume.shape)
    info = zarr.open_group(str(tmp_path / "s.zarr" / "volumes" / "series_a"), mode="r").attrs["tessera"]
    assert np.allclose(info["spacing_xyz"], 2.0)
    # Orientation aside, the stored voxels are the series' voxels, scaled to [0, 1].
    source = np.round(volume)
    expected = np.sort(((source - source.min()) / (source.max() - source.min())).ravel())
    np.testing.assert_allclose(np.sort(image.ravel()), expected, atol=1e-5)


def test_nonfinite_voxels_fail_the_volume_or_are_zeroed_by_policy(tmp_path, data_config):
    original = nibabel.load(NIBABEL_DATA / "anatomical.nii")
    data = np.asarray(original.dataobj, np.float32)
    broken = data.copy()
    broken[10, 20, 5] = np.nan
    broken[11, 20, 5] = np.inf
    nibabel.save(nibabel.Nifti1Image(broken, original.affine), tmp_path / "holes.nii.gz")
    nibabel.save(nibabel.Nifti1Image(data, original.affine), tmp_path / "whole.nii.gz")
    sources = resolve_sources([str(tmp_path / "holes.nii.gz"), str(tmp_path / "whole.nii.gz")])
    store = tmp_path / "s.zarr"
    report = ingest(sources, store, data_config(), show_progress=False)
    assert report.done == ["whole"]
    assert "2 non-finite voxel(s)" in report.failed["holes"] and "(10, 20, 5)" in report.failed["holes"]
    manifest = json.loads((store / ".tessera" / "manifest.json").read_text())["items"]
    assert manifest["holes"]["status"] == "failed" and not (store / "volumes" / "holes").exists()
    assert list(volume_index(store)["volume_id"]) == ["whole"]

    report = ingest(sources, store, data_config("data.volumes.nonfinite=zero"), show_progress=False)
    assert sorted(report.done) == ["holes", "whole"]
    image = stored(store, "holes")[:]
    assert np.isfinite(image).all() and image.max() == 1.0
    info = zarr.open_group(str(store / "volumes" / "holes"), mode="r").attrs["tessera"]
    assert info["nonfinite_voxels_zeroed"] == 2


def test_dicom_series_that_is_not_whole_fails_naming_the_files(tmp_path, data_config):
    import shutil

    import pydicom

    volume = np.round(np.random.default_rng(0).uniform(0, 1000, (24, 20, 8))).astype(np.int16)
    whole = write_dicom_series(tmp_path / "whole", volume)
    truncated = shutil.copytree(whole, tmp_path / "truncated")
    cut = truncated / "slice_003.dcm"
    cut.write_bytes(cut.read_bytes()[:-300])
    missing = shutil.copytree(whole, tmp_path / "missing")
    (missing / "slice_004.dcm").unlink()
    uneven = shutil.copytree(whole, tmp_path / "uneven")
    for path in sorted(uneven.glob("*.dcm"))[5:]:  # slices 5.. shifted by 1 mm: a 3 mm gap, renumbering kept
        ds = pydicom.dcmread(path)
        ds.ImagePositionPatient = [0.0, 0.0, float(ds.ImagePositionPatient[2]) + 1.0]
        ds.save_as(path, enforce_file_format=True)
    resized = shutil.copytree(whole, tmp_path / "resized")
    small = write_dicom_series(tmp_path / "small", volume[:12])
    odd = pydicom.dcmread(small / "slice_002.dcm")
    odd.SeriesInstanceUID = pydicom.dcmread(whole / "slice_002.dcm").SeriesInstanceUID
    odd.save_as(resized / "slice_002.dcm", enforce_file_format=True)
    foreign = shutil.copytree(whole, tmp_path / "foreign")
    shutil.copy(small / "slice_002.dcm", foreign / "slice_002.dcm")

    sources = resolve_sources([str(p) for p in (whole, truncated, missing, uneven, resized, foreign)])
    report = ingest(sources, tmp_path / "s.zarr", data_config(), show_progress=False)
    assert report.done == ["whole"]
    assert "'slice_003.dcm' is truncated or corrupt" in report.failed["truncated"]
    assert "misses instance number(s) [5]" in report.failed["missing"]
    assert "not evenly spaced" in report.failed["uneven"] and "'slice_004.dcm' and 'slice_005.dcm'" in \
        report.failed["uneven"]
    assert "mixes image sizes: slice_002.dcm" in report.failed["resized"]
    assert "mixes series (SeriesInstanceUID): slice_002.dcm" in report.failed["foreign"]
    assert stored(tmp_path / "s.zarr", "whole").shape[0] == 8  # all eight slices, z first
