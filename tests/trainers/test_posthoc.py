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
        trials.append({"setting": name, "score": auroc})
        assert set(used) == {i for i, label, g in rows if label == 0 or g == "kind_a"} and seen == ["kind_a"]
    assert trials[pick(trials)]["setting"] == "good_a" and trials[0]["score"] == 1.0
    assert pick([{"score": 0.7}, {"score": 0.7}]) == 0  # ties: the space's first (the default's place)


def test_anomaly_budget_draws_only_choosing_anomalies_and_more_of_them_find_the_best(tmp_path):
    """Trial 'good' ranks kind_a clearly above normals, 'weak' barely: with the whole pool every draw picks
    'good'; a draw holds exactly its budget of kind_a anomalies (never kind_b), a budget as large as the
    pool is one draw, and the draws are seeded."""
    from trainers.posthoc import budget_picks

    rng = np.random.default_rng(1)
    rows = [(f"n{i}", 0, "normal") for i in range(40)] + [(f"{g}{i}", 1, g) for g in ("kind_a", "kind_b") for i in range(12)]
    folders = [write_eval(tmp_path / name, [(i, label, g, float(label * shift * (g == "kind_a") + rng.normal()))
                                             for i, label, g in rows])
               for name, shift in (("weak", 0.3), ("good", 3.0))]
    picks = budget_picks(folders, ["kind_a"], [1, 5, 12, 50], draws=8, seed=0)
    pool = {f"kind_a{i}" for i in range(12)}
    for budget, draws in picks.items():
        assert len(draws) == (1 if budget >= 12 else 8)
        for draw in draws:
            assert set(draw["items"]) <= pool and len(draw["items"]) == min(budget, 12)
    assert [d["trial"] for d in picks[12]] == [1] and [d["trial"] for d in picks[50]] == [1]
    assert sum(d["trial"] == 1 for d in picks[5]) >= sum(d["trial"] == 1 for d in picks[1])
    assert picks == budget_picks(folders, ["kind_a"], [1, 5, 12, 50], draws=8, seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        budget_picks(folders, ["kind_a"], [0])


def test_a_setting_is_one_value_per_key():
    from trainers.posthoc import parse_setting

    assert parse_setting(["score_smoothing=0", "normal_baseline=null"]) == {"score_smoothing": 0, "normal_baseline": None}
    with pytest.raises(ValueError, match="one value per key"):
        parse_setting(["score_smoothing=0,2"])


def test_pixel_ap_chooses_from_the_metrics_of_the_choosing_groups(tmp_path):
    import json

    from trainers.posthoc import selection_pixel_ap

    folder = tmp_path / "trial"
    folder.mkdir()
    (folder / "metrics.json").write_text(json.dumps({"overall": {"pixel_ap": 0.5}, "groups": {
        "kind_a": {"pixel_ap": 0.8}, "kind_b": {"pixel_ap": 0.2}, "kind_c": {"pixel_ap": 0.4}}}))
    assert selection_pixel_ap(folder, None) == 0.5
    assert selection_pixel_ap(folder, ["kind_a", "kind_c"]) == pytest.approx(0.6)
    (folder / "metrics.json").write_text(json.dumps({"overall": {"image_auroc": 0.7}, "groups": {}}))
    with pytest.raises(ValueError, match="no pixel AP"):
        selection_pixel_ap(folder, None)


def test_a_tie_in_the_objective_goes_to_the_better_image_auroc_then_to_the_earlier():
    from trainers.posthoc import pick

    # pixel AP ties across settings that leave the maps alone (a normal baseline, a top fraction)
    trials = [{"score": 0.68, "image_auroc": 0.94}, {"score": 0.68, "image_auroc": 0.95},
              {"score": 0.65, "image_auroc": 0.97}, {"score": 0.68, "image_auroc": 0.95}]
    assert pick(trials) == 1
    assert pick([{"score": 0.9}, {"score": 0.9}]) == 0
