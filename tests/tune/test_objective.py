"""Tune's volume validation: the leave-one-out normal baseline."""

import numpy as np
import pytest

from tune.objective import leave_one_out_baseline


def test_each_normal_is_compared_with_the_others_and_anomalies_with_all():
    rng = np.random.default_rng(0)
    maps = {name: rng.random((3, 4, 5), dtype=np.float32) for name in ("n1", "n2", "n3", "a1")}
    original = {k: v.copy() for k, v in maps.items()}
    out = leave_one_out_baseline(maps, ["n1", "n2", "n3"])
    assert np.allclose(out["n1"], original["n1"] - (original["n2"] + original["n3"]) / 2, atol=1e-6)
    assert np.allclose(out["a1"], original["a1"] - (original["n1"] + original["n2"] + original["n3"]) / 3, atol=1e-6)
    # A hot spot shared by every normal (a recurring false positive) is gone; one only in the anomaly stays.
    shared = {k: np.zeros((4, 4, 4), np.float32) for k in ("n1", "n2", "a1")}
    for k in shared:
        shared[k][1, 1, 1] = 5.0
    shared["a1"][2, 2, 2] = 3.0
    out = leave_one_out_baseline(shared, ["n1", "n2"])
    assert out["n1"].max() == 0 and out["a1"][1, 1, 1] == 0 and out["a1"][2, 2, 2] == 3.0


def test_too_few_normals_or_mixed_shapes_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="fold 2 holds out 1; use fewer folds"):
        leave_one_out_baseline({"n1": np.zeros((2, 2, 2)), "a": np.zeros((2, 2, 2))}, ["n1"], fold=2)
    with pytest.raises(ValueError, match="'a' is \\(3, 2, 2\\)"):
        leave_one_out_baseline({"n1": np.zeros((2, 2, 2)), "n2": np.zeros((2, 2, 2)), "a": np.zeros((3, 2, 2))},
                               ["n1", "n2"])
