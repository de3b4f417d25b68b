"""Anomaly-detection metrics: image AUROC/AP, pixel AUROC/AP the MOOD way, DICE at the best threshold.

Pixel metrics pool all voxels of all cases (as the MOOD challenge does), with scores clipped to
[0, 1]. They are accumulated case by case in a table of distinct scores with positive and negative
counts, so no case's voxels are kept: memory grows with the number of distinct score values, which
``bins`` caps (scores rounded to ``bins`` levels) for very large evaluations. With ``bins=None`` the
results equal scikit-learn's on the flattened arrays.

Per group (e.g. outlier kind): that group's anomalous cases together with all normal cases.

Image AUROC comes with a stratified bootstrap interval (normals and anomalies resampled separately,
2000 times, percentiles): with the handful of anomalies per kind a benchmark has, an AUROC of 0.6 can
be chance, and the interval says so. ``paired_auroc_difference`` compares two scorings of the same
cases on the same resamples (`tessera compare`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


class ScoreTable:
    """Distinct scores with how many positives and negatives had each: the sufficient statistic of ROC/PR."""

    def __init__(self, bins: int | None = None):
        self.bins = bins
        self.scores = np.empty(0, np.float64)
        self.positives = np.empty(0, np.int64)
        self.negatives = np.empty(0, np.int64)

    def update(self, scores, labels) -> None:
        scores = np.asarray(scores, np.float64).ravel()
        labels = np.asarray(labels).ravel() > 0
        if scores.shape != labels.shape:
            raise ValueError(f"scores and labels differ in size: {scores.size} vs {labels.size}")
        if self.bins:
            scores = np.round(scores * self.bins) / self.bins
        merged = np.concatenate([self.scores, scores])
        unique, inverse = np.unique(merged, return_inverse=True)
        old = len(self.scores)
        pos = np.bincount(inverse[:old], weights=self.positives, minlength=len(unique)).astype(np.float64)
        neg = np.bincount(inverse[:old], weights=self.negatives, minlength=len(unique)).astype(np.float64)
        pos += np.bincount(inverse[old:], weights=labels, minlength=len(unique))
        neg += np.bincount(inverse[old:], weights=~labels, minlength=len(unique))
        self.scores, self.positives, self.negatives = unique, pos.astype(np.int64), neg.astype(np.int64)

    def merge(self, other: "ScoreTable") -> "ScoreTable":
        out = ScoreTable(self.bins)
        out.scores = np.concatenate([self.scores, other.scores])
        out.positives = np.concatenate([self.positives, other.positives])
        out.negatives = np.concatenate([self.negatives, other.negatives])
        unique, inverse = np.unique(out.scores, return_inverse=True)
        out.positives = np.bincount(inverse, weights=out.positives, minlength=len(unique)).astype(np.int64)
        out.negatives = np.bincount(inverse, weights=out.negatives, minlength=len(unique)).astype(np.int64)
        out.scores = unique
        return out

    def _cumulative(self):
        """True/false positives when predicting positive for score >= each threshold, thresholds descending."""
        order = slice(None, None, -1)
        return np.cumsum(self.positives[order]), np.cumsum(self.negatives[order]), self.scores[order]

    def average_precision(self) -> float:
        tp, fp, _ = self._cumulative()
        total = tp[-1] if len(tp) else 0
        if total == 0:
            return float("nan")
        precision = tp / np.maximum(tp + fp, 1)
        recall = tp / total
        return float(np.sum(np.diff(np.concatenate([[0.0], recall])) * precision))

    def auroc(self) -> float:
        tp, fp, _ = self._cumulative()
        if not len(tp) or tp[-1] == 0 or fp[-1] == 0:
            return float("nan")
        tpr = np.concatenate([[0.0], tp / tp[-1]])
        fpr = np.concatenate([[0.0], fp / fp[-1]])
        return float(np.trapezoid(tpr, fpr))

    def best_dice(self) -> tuple[float, float]:
        """The highest DICE over all thresholds (score >= t is positive), and that threshold."""
        tp, fp, thresholds = self._cumulative()
        if not len(tp) or tp[-1] == 0:
            return float("nan"), float("nan")
        dice = 2 * tp / (2 * tp + fp + (tp[-1] - tp))
        best = int(np.argmax(dice))
        return float(dice[best]), float(thresholds[best])


def bootstrap_aurocs(normal: list, anomalous: list, resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """AUROC of each of R scorings of the same cases on ``resamples`` stratified bootstrap resamples:
    (R, resamples). ``normal[r]`` and ``anomalous[r]`` are scoring r's scores of the normal and the
    anomalous cases, in the same case order for every r, so row differences are paired.

    A resample is a count per case (multinomial); the AUROC of a resample is the Mann-Whitney
    statistic with those counts as weights (ties count one half), from sorted scores and cumulative
    counts: O(n log n) per scoring, not the n_normal x n_anomalous matrix, so tile-level cases fit."""
    normal = [np.asarray(n, np.float64) for n in normal]
    anomalous = [np.asarray(a, np.float64) for a in anomalous]
    n0, n1 = len(normal[0]), len(anomalous[0])
    if n0 == 0 or n1 == 0:
        return np.full((len(normal), resamples), np.nan)
    rng = np.random.default_rng(seed)
    out = np.empty((len(normal), resamples))
    chunk = max(1, int(4e6 // (n0 + n1)))  # bounds the (chunk, n) count arrays to ~32 MB each
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        weights0 = rng.multinomial(n0, np.full(n0, 1 / n0), size=size).astype(np.float64)
        weights1 = rng.multinomial(n1, np.full(n1, 1 / n1), size=size).astype(np.float64)
        for r, (scores0, scores1) in enumerate(zip(normal, anomalous)):
            out[r, start:start + size] = weighted_auroc(scores0, scores1, weights0, weights1)
    return out


def weighted_auroc(normal: np.ndarray, anomalous: np.ndarray, normal_weights: np.ndarray,
                   anomalous_weights: np.ndarray) -> np.ndarray:
    """AUROC with a weight per case, for each row of the (B, n) weight arrays: the weighted share of
    (normal, anomalous) pairs ranked right, ties counting one half."""
    order = np.argsort(normal, kind="stable")
    ranked = normal[order]
    cumulative = np.cumsum(normal_weights[:, order], axis=1)
    cumulative = np.concatenate([np.zeros((len(cumulative), 1)), cumulative], axis=1)
    below = cumulative[:, np.searchsorted(ranked, anomalous, side="left")]
    up_to = cumulative[:, np.searchsorted(ranked, anomalous, side="right")]
    pairs = normal_weights.sum(axis=1) * anomalous_weights.sum(axis=1)
    return ((below + up_to) / 2 * anomalous_weights).sum(axis=1) / pairs


def interval(values: np.ndarray, level: float = 0.95) -> list[float]:
    """The central ``level`` percentile interval of bootstrap values."""
    tail = (1 - level) / 2 * 100
    return [float(v) for v in np.percentile(values, [tail, 100 - tail])]


def paired_auroc_difference(normal_a, anomalous_a, normal_b, anomalous_b, resamples: int = 2000,
                            level: float = 0.95, seed: int = 0) -> dict:
    """AUROC of scoring A minus that of scoring B on the same cases (same order), with the paired
    bootstrap interval of the difference and the share of resamples in which A is ahead.

    A side may hold several scorings of the cases (rows of 2D arrays, e.g. one run per training
    seed): its AUROC is then the mean of theirs, on every resample too. The interval then covers the
    sampling of the cases with the seeds' results averaged; the seeds themselves are not resampled."""
    from sklearn.metrics import roc_auc_score

    sides = [(np.atleast_2d(np.asarray(n, np.float64)), np.atleast_2d(np.asarray(a, np.float64)))
             for n, a in ((normal_a, anomalous_a), (normal_b, anomalous_b))]
    labels = np.r_[np.zeros(sides[0][0].shape[1]), np.ones(sides[0][1].shape[1])]
    runs = [[float(roc_auc_score(labels, np.r_[n, a])) for n, a in zip(*side)] for side in sides]
    boot = bootstrap_aurocs([*sides[0][0], *sides[1][0]], [*sides[0][1], *sides[1][1]], resamples, seed)
    boot_a, boot_b = boot[:len(runs[0])].mean(axis=0), boot[len(runs[0]):].mean(axis=0)
    a, b = float(np.mean(runs[0])), float(np.mean(runs[1]))
    difference = boot_a - boot_b
    return {"auroc_a": a, "auroc_a_ci": interval(boot_a, level), "auroc_b": b, "auroc_b_ci": interval(boot_b, level),
            "runs_a": runs[0], "runs_b": runs[1], "difference": a - b, "difference_ci": interval(difference, level),
            "a_ahead": float((difference > 0).mean()), "tied": float((difference == 0).mean())}


@dataclass
class _Case:
    score: float
    label: int
    group: str
    case_id: str = ""


@dataclass
class AnomalyMetrics:
    """Accumulates cases (image score, label, group, optional pixel maps) and computes every metric."""

    clip: bool = True                  # clip pixel scores to [0, 1] as MOOD does
    bins: int | None = None            # round pixel scores to this many levels to bound memory; None = exact
    resamples: int = 2000              # bootstrap resamples of the image AUROC interval (0: no interval)
    level: float = 0.95                # coverage of that interval
    cases: list[_Case] = field(default_factory=list)
    _pixels: dict[str, ScoreTable] = field(default_factory=dict)

    def add(self, score: float, label: int, group: str = "", pixel_scores=None, pixel_labels=None,
            case_id: str = "") -> None:
        """One case (``case_id`` names it in scores.csv). Normal cases (label 0) count in every group."""
        label = int(label)
        group = group if label else "normal"
        self.cases.append(_Case(float(score), label, group, str(case_id)))
        if pixel_scores is not None:
            scores = np.asarray(pixel_scores, np.float64)
            scores = np.clip(scores, 0, 1) if self.clip else scores
            labels = np.zeros(scores.shape, bool) if pixel_labels is None else np.asarray(pixel_labels) > 0
            self._pixels.setdefault(group, ScoreTable(self.bins)).update(scores, labels)

    def merge(self, other: "AnomalyMetrics") -> "AnomalyMetrics":
        """Add another accumulator's cases and pixel tables (e.g. another rank's share of a split)."""
        self.cases.extend(other.cases)
        for group, table in other._pixels.items():
            self._pixels[group] = self._pixels[group].merge(table) if group in self._pixels else table
        return self

    def _summary(self, groups: set[str]) -> dict:
        from sklearn.metrics import average_precision_score, roc_auc_score

        # In id order, so the bootstrap resamples the same cases however ranks shared them out.
        chosen = sorted((c for c in self.cases if c.group in groups), key=lambda c: c.case_id)
        labels = np.array([c.label for c in chosen])
        scores = np.array([c.score for c in chosen])
        both = len(set(labels.tolist())) == 2
        out = {
            "n_normal": int((labels == 0).sum()), "n_anomalous": int((labels == 1).sum()),
            "image_auroc": float(roc_auc_score(labels, scores)) if both else float("nan"),
            "image_ap": float(average_precision_score(labels, scores)) if both else float("nan"),
        }
        if both and self.resamples:
            boot = bootstrap_aurocs([scores[labels == 0]], [scores[labels == 1]], self.resamples)[0]
            out["image_auroc_low"], out["image_auroc_high"] = interval(boot, self.level)
        tables = [self._pixels[g] for g in groups if g in self._pixels]
        if tables:
            table = tables[0]
            for other in tables[1:]:
                table = table.merge(other)
            dice, threshold = table.best_dice()
            out.update({"pixel_auroc": table.auroc(), "pixel_ap": table.average_precision(),
                        "dice": dice, "dice_threshold": threshold})
        return out

    def compute(self) -> dict:
        """``{"overall": {...}, "groups": {group: {...}}}`` with image and (if given) pixel metrics."""
        groups = sorted({c.group for c in self.cases} - {"normal"})
        everything = set(groups) | {"normal"}
        return {"overall": self._summary(everything),
                "groups": {g: self._summary({g, "normal"}) for g in groups}}
