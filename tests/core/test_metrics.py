import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from core.metrics import AnomalyMetrics, ScoreTable


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
