"""The brain benchmark's splits: extra validation subjects never change the train and test subjects."""

import csv

import nibabel
import numpy as np


def test_val_subjects_leave_train_and_test_unchanged(tmp_path):
    from data_plane.benchmarks import make_brain_benchmark

    plain = make_brain_benchmark(tmp_path / "plain", subjects=6, resolution=2, seed=2, show_progress=False)
    extended = make_brain_benchmark(tmp_path / "val", subjects=6, resolution=2, seed=2, show_progress=False,
                                    val_anomalous=2, val_normal=2)
    before, after = list(csv.DictReader(open(plain))), list(csv.DictReader(open(extended)))
    assert after[:6] == before
    val = after[6:]
    assert [(r["split"], r["label"]) for r in val] == [("val", "anomalous")] * 2 + [("val", "normal")] * 2
    assert all(r["group"] for r in val[:2]) and not any(r["group"] for r in val[2:])
    for row in before:
        first = np.asarray(nibabel.load(plain.parent / row["path"]).dataobj)
        assert np.array_equal(first, np.asarray(nibabel.load(extended.parent / row["path"]).dataobj))
    for row in val[2:]:  # val normals carry an empty mask, as test normals do
        assert not np.asarray(nibabel.load(extended.parent / row["mask"]).dataobj).any()
