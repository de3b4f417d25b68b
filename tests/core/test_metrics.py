import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from core.metrics import (AnomalyMetrics, ScoreTable, bootstrap_aurocs, bootstrap_pixel_metrics,
                          paired_auroc_difference, pixel_histogram, pixel_levels, weighted_auroc)


def cases(seed=0, n=6, shape=(8, 9, 10)):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        labels = np.zeros(shape, bool)
        if i % 2:
            labels[2:5, 3:6, 4:8] = True
        # Quantised scores make ties, which is where hand-written AP/AUROC usually go wrong.
        scores = np.round(np.clip(rng.normal(0.3, 0.2, shape) + 0.4 * labels, -0.2, 1.3), 2)
        out.append((scores, labels, i % 2, "kind_a" if i % 4 == 1 else "kind_b"))
    return out


def test_pixel_metrics_equal_sklearn_on_flattened_arrays():
    metrics = AnomalyMetrics()
    for scores, labels, label, group in cases():
        metrics.add(scores.mean(), label, group, scores, labels)
    result = metrics.compute()["overall"]
    flat_scores = np.clip(np.concatenate([c[0].ravel() for c in cases()]), 0, 1)
    flat_labels = np.concatenate([c[1].ravel() for c in cases()])
    assert result["pixel_ap"] == pytest.approx(average_precision_score(flat_labels, flat_scores), abs=1e-12)
    assert result["pixel_auroc"] == pytest.approx(roc_auc_score(flat_labels, flat_scores), abs=1e-12)


def test_best_dice_is_the_maximum_over_thresholds():
    scores, labels, _, _ = cases()[1]
    table = ScoreTable()
    table.update(scores, labels)
    dice, threshold = table.best_dice()
    brute = max(2 * (labels & (scores >= t)).sum() / ((scores >= t).sum() + labels.sum()) for t in np.unique(scores))
    assert dice == pytest.approx(brute)
    predicted = scores >= threshold
    assert 2 * (predicted & labels).sum() / (predicted.sum() + labels.sum()) == pytest.approx(dice)


def test_streaming_merge_equals_one_table_and_bins_bound_size():
    whole, parts = ScoreTable(), [ScoreTable(), ScoreTable()]
    for i, (scores, labels, _, _) in enumerate(cases()):
        whole.update(scores, labels)
        parts[i % 2].update(scores, labels)
    merged = parts[0].merge(parts[1])
    assert merged.average_precision() == pytest.approx(whole.average_precision())
    assert merged.auroc() == pytest.approx(whole.auroc())
    binned = ScoreTable(bins=10)
    for scores, labels, _, _ in cases():
        binned.update(np.clip(scores, 0, 1), labels)
    assert len(binned.scores) <= 11


def test_image_metrics_and_groups():
    metrics = AnomalyMetrics()
    # Normals score low; kind_a anomalies are found, kind_b ones are not.
    for score in (0.1, 0.2, 0.3):
        metrics.add(score, 0)
    for score in (0.8, 0.9):
        metrics.add(score, 1, "kind_a")
    for score in (0.15, 0.25):
        metrics.add(score, 1, "kind_b")
    result = metrics.compute()
    assert result["groups"]["kind_a"]["image_auroc"] == 1.0
    assert result["groups"]["kind_b"]["image_auroc"] < 0.6
    assert 0.6 < result["overall"]["image_auroc"] < 1.0
    assert result["overall"]["n_normal"] == 3 and result["overall"]["n_anomalous"] == 4
    assert "pixel_ap" not in result["overall"]


def test_weighted_auroc_equals_sklearn_with_sample_weights():
    rng = np.random.default_rng(3)
    normal, anomalous = np.round(rng.normal(0, 1, 25), 1), np.round(rng.normal(0.7, 1, 15), 1)  # with ties
    weights0, weights1 = rng.integers(0, 4, (5, 25)).astype(float), rng.integers(1, 4, (5, 15)).astype(float)
    got = weighted_auroc(normal, anomalous, weights0, weights1)
    labels = np.r_[np.zeros(25), np.ones(15)]
    for row in range(5):
        expected = roc_auc_score(labels, np.r_[normal, anomalous], sample_weight=np.r_[weights0[row], weights1[row]])
        assert got[row] == pytest.approx(expected, abs=1e-12)


def test_bootstrap_interval_covers_the_estimate_and_narrows_with_more_cases():
    rng = np.random.default_rng(0)

    def width_and_estimate(n):
        normal, anomalous = rng.normal(0, 1, n), rng.normal(1, 1, n)
        boot = bootstrap_aurocs([normal], [anomalous], 2000)[0]
        estimate = roc_auc_score(np.r_[np.zeros(n), np.ones(n)], np.r_[normal, anomalous])
        low, high = np.percentile(boot, [2.5, 97.5])
        assert low < estimate < high
        return high - low

    assert width_and_estimate(200) < 0.5 * width_and_estimate(12)
    # Perfectly separated in every resample: the interval is the point.
    assert set(bootstrap_aurocs([np.arange(5.0)], [np.arange(10.0, 16)], 300)[0]) == {1.0}


def test_auroc_interval_in_metrics_and_independent_of_case_order():
    rng = np.random.default_rng(1)
    rows = [(f"case{i:02d}", float(rng.normal(i % 2)), i % 2) for i in range(30)]
    results = []
    for order in (rows, rows[::-1]):  # e.g. two ranks' shares gathered in another order
        metrics = AnomalyMetrics()
        for case_id, score, label in order:
            metrics.add(score, label, "kind", case_id=case_id)
        results.append(metrics.compute()["overall"])
    first = results[0]
    assert first["image_auroc_low"] < first["image_auroc"] < first["image_auroc_high"]
    assert results[0] == results[1]
    plain = AnomalyMetrics(resamples=0)
    for case_id, score, label in rows:
        plain.add(score, label, "kind", case_id=case_id)
    assert "image_auroc_low" not in plain.compute()["overall"]


def test_paired_difference_sees_a_real_gain_and_no_gain_in_a_tie():
    rng = np.random.default_rng(2)
    normal, anomalous = rng.normal(0, 1, 40), rng.normal(0.5, 1, 40)
    same = paired_auroc_difference(normal, anomalous, normal, anomalous, 500)
    assert same["difference"] == 0 and same["difference_ci"] == [0.0, 0.0] and same["tied"] == 1.0
    # A = B plus a signal on the anomalies: better on every resample.
    better = paired_auroc_difference(normal, anomalous + 1.0, normal, anomalous, 500)
    assert better["difference_ci"][0] > 0 and better["a_ahead"] > 0.99
    # Two scorings that are equally noisy views of the same cases: the interval spans 0.
    noisy_a = paired_auroc_difference(normal + rng.normal(0, 1, 40), anomalous + rng.normal(0, 1, 40),
                                      normal + rng.normal(0, 1, 40), anomalous + rng.normal(0, 1, 40), 1000)
    low, high = noisy_a["difference_ci"]
    assert low < 0 < high
    assert low < noisy_a["auroc_a"] - noisy_a["auroc_b"] < high


def test_binned_pixel_tables_give_the_exact_metrics_of_the_binned_scores():
    # The vectorised table metrics behind the pixel intervals equal ScoreTable's (hence scikit-learn's)
    # on scores rounded down to the histogram's levels.
    bins = 64
    histograms, binned = [], ScoreTable()
    for scores, labels, _, _ in cases(3):
        scores = np.clip(scores, 0, 1)
        histograms.append(pixel_histogram(scores, labels, bins))
        binned.update(pixel_levels(scores, bins), labels)
    one = np.stack(histograms).sum(axis=0)
    # A "resample" that draws every case once is the full sample: identity weights, via a 1-case stratum.
    boot = bootstrap_pixel_metrics(np.empty((0, 2, bins)), one[None], 5)
    assert np.allclose(boot["pixel_ap"], binned.average_precision(), atol=1e-12)
    assert np.allclose(boot["pixel_auroc"], binned.auroc(), atol=1e-12)
    assert np.allclose(boot["dice"], binned.best_dice()[0], atol=1e-12)


def test_pixel_levels_keep_the_order_of_scores_down_to_small_residuals():
    scores = np.r_[0.0, 5e-7, np.geomspace(1e-6, 1, 2000), 1.0]
    levels = pixel_levels(scores, 1024)
    assert levels[0] == levels[1] == 0 and levels[-1] == 1023
    assert np.all(np.diff(levels) >= 0)
    # Scores 3 % apart never share a level, however small: rounding to levels then ranks as exactly.
    ratio_three_percent = pixel_levels(np.geomspace(1e-5, 1, 390), 1024)
    assert len(np.unique(ratio_three_percent)) == 390


def test_pixel_intervals_cover_the_estimate_narrow_with_cases_and_keep_case_order():
    rng = np.random.default_rng(4)

    def evaluate(n, order=1):
        rows = []
        for i in range(n):
            labels = np.zeros((12, 12), bool)
            if i % 2:
                labels[3:7, 4:9] = True
            # Cases differ in how visible their anomaly is: that case-to-case spread is what the
            # interval measures (voxels of one case are not independent draws).
            scores = np.clip(rng.beta(1, 12, labels.shape) + rng.uniform(0, 0.5) * labels, 0, 1)
            rows.append((f"c{i:03d}", scores, labels, i % 2))
        metrics = AnomalyMetrics()
        for case_id, scores, labels, label in rows[::order]:
            metrics.add(float(scores.max()), label, "kind", scores, labels, case_id=case_id)
        return metrics.compute()["overall"]

    small, large = evaluate(16), evaluate(200)
    for key in ("pixel_auroc", "pixel_ap", "dice"):
        assert small[f"{key}_low"] < small[key] < small[f"{key}_high"], key
        assert large[f"{key}_high"] - large[f"{key}_low"] < 0.6 * (small[f"{key}_high"] - small[f"{key}_low"]), key
    rng = np.random.default_rng(5)
    forward = evaluate(20)
    rng = np.random.default_rng(5)
    assert evaluate(20, order=-1) == forward  # the same cases gathered in another order
    plain = AnomalyMetrics(resamples=0)
    plain.add(0.5, 1, "kind", np.full((4, 4), 0.5), np.eye(4), case_id="a")
    assert "pixel_ap" in plain.compute()["overall"] and "pixel_ap_low" not in plain.compute()["overall"]
