"""Post-hoc scoring search: the pick is the setting the chosen anomalies rank best, only they (and the
normals) choose, and held-out groups are judged apart."""

import numpy as np
import pytest

from tests.trainers.test_fuse import write_eval
from trainers.posthoc import parse_space, pick, selection_auroc


def test_space_values_are_yaml_and_bad_dimensions_are_refused():
    assert parse_space(["image_pooling=mean,top", "pooling_top=0.05,0.1"]) == {
        "image_pooling": ["mean", "top"], "pooling_top": [0.05, 0.1]}
    with pytest.raises(ValueError, match="KEY=V1,V2"):
        parse_space(["image_pooling"])


def test_the_known_best_setting_is_picked_on_a_constructed_case(tmp_path):
    """Three settings: one ranks kind_a perfectly but kind_b badly, one the reverse, one is random. Chosen on
    kind_a, the first wins; only normals and kind_a items count."""
    rng = np.random.default_rng(0)
    rows = [(f"n{i}", 0, "normal") for i in range(30)] + [(f"{g}{i}", 1, g) for g in ("kind_a", "kind_b") for i in range(10)]
    scorers = {"good_a": lambda label, g: label * (g == "kind_a") + rng.uniform(0, 0.5),
               "good_b": lambda label, g: label * (g == "kind_b") + rng.uniform(0, 0.5),
               "random": lambda label, g: rng.uniform()}
    trials = []
    for name, scorer in scorers.items():
        folder = write_eval(tmp_path / name, [(i, label, g, float(scorer(label, g))) for i, label, g in rows])
        auroc, used, seen = selection_auroc(folder, ["kind_a"])
        trials.append({"setting": name, "auroc": auroc})
        assert set(used) == {i for i, label, g in rows if label == 0 or g == "kind_a"} and seen == ["kind_a"]
    assert trials[pick(trials)]["setting"] == "good_a" and trials[0]["auroc"] == 1.0
    assert pick([{"auroc": 0.7}, {"auroc": 0.7}]) == 0  # ties: the space's first (the default's place)
