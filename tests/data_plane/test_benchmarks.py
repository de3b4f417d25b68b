"""The benchmarks' splits: extra validation subjects and contaminated training items never change the
test subjects or tiles."""

import csv
import json

import nibabel
import numpy as np


def test_val_subjects_and_other_kinds_leave_train_and_test_unchanged(tmp_path):
    from data_plane.benchmarks import make_brain_benchmark

    plain = make_brain_benchmark(tmp_path / "plain", subjects=6, resolution=2, seed=2, show_progress=False)
    extended = make_brain_benchmark(tmp_path / "val", subjects=6, resolution=2, seed=2, show_progress=False,
                                    val_anomalous=2, val_normal=2, other_kinds=2, test_normal=1)
    before, after = list(csv.DictReader(open(plain))), list(csv.DictReader(open(extended)))
    assert after[:6] == before
    other = after[10:12]  # test subjects with kinds beyond MOOD's, after everything else
    assert [(r["split"], r["label"], r["group"]) for r in other] == [("test", "anomalous", "lesion"),
                                                                     ("test", "anomalous", "cavity")]
    for row in other:
        assert np.asarray(nibabel.load(extended.parent / row["mask"]).dataobj).any()
    val = after[6:10]
    assert [(r["split"], r["label"]) for r in val] == [("val", "anomalous")] * 2 + [("val", "normal")] * 2
    assert all(r["group"] for r in val[:2]) and not any(r["group"] for r in val[2:])
    for row in before:
        first = np.asarray(nibabel.load(plain.parent / row["path"]).dataobj)
        assert np.array_equal(first, np.asarray(nibabel.load(extended.parent / row["path"]).dataobj))
    extra = after[12:]  # the extra test normal comes last
    assert [(r["split"], r["label"], r["group"]) for r in extra] == [("test", "normal", "")]
    for row in val[2:] + extra:  # val normals and extra test normals carry an empty mask, as test normals do
        assert not np.asarray(nibabel.load(extended.parent / row["mask"]).dataobj).any()


def test_contamination_changes_only_the_chosen_training_items(tmp_path):
    from data_plane.benchmarks import contaminated, make_brain_benchmark

    clean = make_brain_benchmark(tmp_path / "clean", subjects=8, resolution=2, seed=3, show_progress=False)
    dirty = make_brain_benchmark(tmp_path / "dirty", subjects=8, resolution=2, seed=3, show_progress=False,
                                 contaminate=0.4)
    assert list(csv.DictReader(open(clean))) == list(csv.DictReader(open(dirty)))  # labels, splits: unchanged
    listed = json.loads((dirty.parent / "contamination.json").read_text())
    assert listed["fraction"] == 0.4 and len(listed["items"]) == 2  # round(0.4 x 5 training subjects)
    for row in csv.DictReader(open(clean)):
        a = np.asarray(nibabel.load(clean.parent / row["path"]).dataobj)
        b = np.asarray(nibabel.load(dirty.parent / row["path"]).dataobj)
        assert np.array_equal(a, b) == (row["path"] not in listed["items"]), row["path"]
        if row["path"] in listed["items"]:
            assert row["split"] == "train" and row["label"] == "normal"
            assert 0.001 < (a != b).mean() < 0.1  # one outlier, inside the brain
    assert contaminated(100, 0.05, 0) == contaminated(100, 0.05, 0) and len(contaminated(100, 0.02, 0)) == 2
    assert set(contaminated(100, 0.02, 0)) <= set(contaminated(100, 0.05, 0))  # 2 % is a subset of 5 %
    assert json.loads((clean.parent / "contamination.json").read_text())["items"] == []


def test_slide_contamination_alters_training_tiles_only(tmp_path, sample_data):
    import tifffile

    from data_plane.benchmarks import make_slide_benchmark

    clean = make_slide_benchmark(tmp_path / "clean", tile=128, per_group=2, seed=1)
    dirty = make_slide_benchmark(tmp_path / "dirty", tile=128, per_group=2, seed=1, contaminate=0.05)
    for row in csv.DictReader(open(clean)):
        a, b = (tifffile.imread(folder.parent / row["path"], level=0) for folder in (clean, dirty))
        if row["split"] == "train":
            changed = (np.abs(a.astype(int) - b).reshape(a.shape[0] // 128, 128, a.shape[1] // 128, 128, 3)
                       .max(axis=(1, 3, 4)) > 8)  # JPEG noise aside, which cells changed
            assert changed.sum() == len(json.loads((dirty.parent / "contamination.json").read_text())["items"]) > 0
        else:
            assert np.array_equal(a, b)


def test_brain_subjects_made_in_two_processes_are_the_same_files(tmp_path):
    from data_plane.benchmarks import make_brain_benchmark

    one = make_brain_benchmark(tmp_path / "one", subjects=6, resolution=2, seed=2, show_progress=False,
                               contaminate=0.4)
    two = make_brain_benchmark(tmp_path / "two", subjects=6, resolution=2, seed=2, show_progress=False,
                               contaminate=0.4, workers=2)
    rows = list(csv.DictReader(open(one)))
    assert rows == list(csv.DictReader(open(two)))
    for row in rows:
        for key in ("path", "mask"):
            if row[key]:
                a = np.asarray(nibabel.load(one.parent / row[key]).dataobj)
                assert np.array_equal(a, np.asarray(nibabel.load(two.parent / row[key]).dataobj)), row[key]
    assert (two.parent / "montage.png").is_file()
