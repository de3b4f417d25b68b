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

Pixel AUROC, AP and DICE get an interval too, from the same stratified resampling of cases (a case's
voxels stay together: they are not independent draws). Each case keeps a histogram of its clipped
pixel scores in ``pixel_bins`` log-spaced levels per label (8 KB at 1024 levels), a resample's pooled
table is a weighted sum of those, so no voxel is kept. The bootstrap statistic is the binned one; the interval is
shifted by the difference between the exact and the binned full-sample figure, so the rounding of
scores does not move it off the reported value.
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


PIXEL_FLOOR = 1e-6  # the lowest pixel level holds scores below this; log-spaced levels above it


def pixel_levels(scores: np.ndarray, bins: int) -> np.ndarray:
    """Each score's level in [0, bins): 0 below ``PIXEL_FLOOR``, then log-spaced up to 1 (about 1.4 %
    apart at 1024 levels), an order-preserving rounding. Log spacing because residual maps put most
    voxels near 0 (an autoencoder's median voxel scores 3e-5): on 1024 uniform levels its pixel AP
    read 0.235 for an exact 0.285, on these 0.281."""
    scores = np.asarray(scores, np.float64).ravel()
    span = -np.log(PIXEL_FLOOR)
    level = 1 + np.floor((np.log(np.maximum(scores, PIXEL_FLOOR)) + span) / span * (bins - 1)).astype(np.int64)
    return np.where(scores < PIXEL_FLOOR, 0, np.minimum(level, bins - 1))


def pixel_histogram(scores: np.ndarray, labels: np.ndarray, bins: int) -> np.ndarray:
    """(2, bins) counts of one case's scores in [0, 1] per ``pixel_levels`` level: row 0 normal
    voxels, row 1 anomalous ones."""
    level = pixel_levels(scores, bins)
    positive = np.asarray(labels).ravel() > 0
    return np.stack([np.bincount(level[~positive], minlength=bins),
                     np.bincount(level[positive], minlength=bins)]).astype(np.int32)


def _table_metrics(negatives: np.ndarray, positives: np.ndarray) -> dict[str, np.ndarray]:
    """Pixel AUROC, AP and best DICE of each row of (B, levels) count tables (levels ascending),
    computed as ScoreTable does, on every row at once."""
    tp = np.cumsum(positives[:, ::-1], axis=1)
    fp = np.cumsum(negatives[:, ::-1], axis=1)
    total_p, total_n = tp[:, -1:], fp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = tp / np.maximum(tp + fp, 1)
        recall = tp / total_p
        ap = np.sum(np.diff(np.concatenate([np.zeros_like(recall[:, :1]), recall], axis=1), axis=1) * precision, axis=1)
        tpr = np.concatenate([np.zeros_like(tp[:, :1]), tp], axis=1) / total_p
        fpr = np.concatenate([np.zeros_like(fp[:, :1]), fp], axis=1) / total_n
        auroc = np.trapezoid(tpr, fpr, axis=1)
        dice = np.max(2 * tp / (2 * tp + fp + (total_p - tp)), axis=1)
    nothing = (total_p[:, 0] == 0)
    return {"pixel_auroc": np.where(nothing | (total_n[:, 0] == 0), np.nan, auroc),
            "pixel_ap": np.where(nothing, np.nan, ap), "dice": np.where(nothing, np.nan, dice)}


def bootstrap_pixel_metrics(normal: np.ndarray, anomalous: np.ndarray, resamples: int = 2000,
                            seed: int = 0) -> dict[str, np.ndarray]:
    """Pooled pixel AUROC, AP and best DICE on ``resamples`` stratified bootstrap resamples of cases.

    ``normal`` (n0, 2, bins) and ``anomalous`` (n1, 2, bins) are the cases' ``pixel_histogram``s.
    Normal and anomalous cases are resampled separately (multinomial counts), as for the image AUROC;
    a resample's table is the count-weighted sum of its cases' histograms."""
    normal, anomalous = np.asarray(normal, np.float64), np.asarray(anomalous, np.float64)
    normal = normal.reshape(len(normal), int(np.prod(normal.shape[1:])))
    anomalous = anomalous.reshape(len(anomalous), int(np.prod(anomalous.shape[1:])))
    n0, n1 = len(normal), len(anomalous)
    keys = ("pixel_auroc", "pixel_ap", "dice")
    if n1 == 0:
        return {k: np.full(resamples, np.nan) for k in keys}
    bins = anomalous.shape[1] // 2
    rng = np.random.default_rng(seed)
    out = {k: np.empty(resamples) for k in keys}
    chunk = max(1, int(2e6 // (2 * bins)))  # bounds the (chunk, 2, bins) tables to ~16 MB
    for start in range(0, resamples, chunk):
        size = min(chunk, resamples - start)
        table = rng.multinomial(n1, np.full(n1, 1 / n1), size=size).astype(np.float64) @ anomalous
        if n0:
            table += rng.multinomial(n0, np.full(n0, 1 / n0), size=size).astype(np.float64) @ normal
        table = table.reshape(size, 2, bins)
        for key, values in _table_metrics(table[:, 0], table[:, 1]).items():
            out[key][start:start + size] = values
    return out


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


def paired_pixel_difference(normal_a, anomalous_a, normal_b, anomalous_b, resamples: int = 2000,
                            level: float = 0.95, seed: int = 0, key: str = "pixel_ap") -> dict:
    """Pooled pixel metric ``key`` (pixel_ap, pixel_auroc or dice) of A minus B on the same cases, with
    the paired bootstrap interval: each side is a list of runs' (n, 2, bins) ``pixel_histogram`` stacks
    (normal and anomalous cases, same order everywhere). Every run is resampled with the same seed,
    hence the same case counts, so differences are paired; a side's figure is its runs' mean. Figures
    are those of the binned scores (within a few thousandths of the exact ones at 1024 levels)."""
    sides = [(list(normal_a), list(anomalous_a)), (list(normal_b), list(anomalous_b))]
    runs, boots = [], []
    for normals, anomalies in sides:
        full = [float(_table_metrics(*(np.concatenate([n, a]).sum(axis=0, dtype=np.float64)[:, None]))[key][0])
                for n, a in zip(normals, anomalies)]
        runs.append(full)
        boots.append(np.mean([bootstrap_pixel_metrics(n, a, resamples, seed)[key]
                              for n, a in zip(normals, anomalies)], axis=0))
    difference = boots[0] - boots[1]
    a, b = float(np.mean(runs[0])), float(np.mean(runs[1]))
    return {"a": a, "a_ci": interval(boots[0], level), "b": b, "b_ci": interval(boots[1], level),
            "runs_a": runs[0], "runs_b": runs[1], "difference": a - b, "difference_ci": interval(difference, level),
            "a_ahead": float((difference > 0).mean())}


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
    resamples: int = 2000              # bootstrap resamples of the intervals (0: no interval)
    level: float = 0.95                # coverage of the intervals
    pixel_bins: int = 1024             # score levels of each case's histogram for the pixel intervals
    cases: list[_Case] = field(default_factory=list)
    _pixels: dict[str, ScoreTable] = field(default_factory=dict)
    # (case_id, label, group, pixel_histogram) per case with a pixel map, for the pixel intervals;
    # only with clipped scores, whose [0, 1] range the histogram levels cover.
    _histograms: list[tuple] = field(default_factory=list)

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
            if self.clip and self.resamples:
                self._histograms.append((str(case_id), label, group, pixel_histogram(scores, labels, self.pixel_bins)))

    def merge(self, other: "AnomalyMetrics") -> "AnomalyMetrics":
        """Add another accumulator's cases and pixel tables (e.g. another rank's share of a split)."""
        self.cases.extend(other.cases)
        self._histograms.extend(other._histograms)
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
            out.update(self._pixel_intervals(groups, out))
        return out

    def pixel_histograms(self, groups: set[str]) -> tuple[list[str], np.ndarray, np.ndarray]:
        """Ids, labels and (n, 2, pixel_bins) histograms of the cases of ``groups`` with pixel maps, by id."""
        chosen = sorted((h for h in self._histograms if h[2] in groups), key=lambda h: h[0])
        if not chosen:
            return [], np.empty(0, int), np.empty((0, 2, self.pixel_bins), np.int32)
        return [h[0] for h in chosen], np.array([h[1] for h in chosen]), np.stack([h[3] for h in chosen])

    def _pixel_intervals(self, groups: set[str], exact: dict) -> dict:
        _, labels, histograms = self.pixel_histograms(groups)
        if not self.resamples or not (labels == 1).any():
            return {}
        boot = bootstrap_pixel_metrics(histograms[labels == 0], histograms[labels == 1], self.resamples)
        binned = _table_metrics(*(histograms.sum(axis=0, dtype=np.float64)[:, None]))
        out = {}
        for key, values in boot.items():
            if np.isfinite(exact[key]) and np.isfinite(values).all():
                offset = exact[key] - float(binned[key][0])  # the binned statistic's rounding, see the module doc
                out[f"{key}_low"], out[f"{key}_high"] = (min(1.0, max(0.0, v + offset))
                                                         for v in interval(values, self.level))
        return out

    def compute(self) -> dict:
        """``{"overall": {...}, "groups": {group: {...}}}`` with image and (if given) pixel metrics."""
        groups = sorted({c.group for c in self.cases} - {"normal"})
        everything = set(groups) | {"normal"}
        return {"overall": self._summary(everything),
                "groups": {g: self._summary({g, "normal"}) for g in groups}}
