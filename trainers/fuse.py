"""`tessera fuse`: several runs' evaluations of the same items fused into one score, with the weights
either equal or chosen by weak supervision: the validation AUROC of a few known anomalies (optionally
of named groups only, so that the test's other groups are kinds the choice never saw).

Each run's scores are first put on a common scale without labels: ``rank`` (each item's empirical
quantile among the split's items) or ``robust-z`` ((s - median) / IQR over the split). The fused score
is the weighted sum. The output folder is an evaluation like any other (scores.csv, metrics.json with
intervals per group, ROC/PR curves), so `tessera compare` pairs it with a single run's evaluation;
``fusion.json`` records the runs, the weights and exactly which items chose them.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

from trainers.compare import _eval_folder, _read_scores, _run_name

NORMALISERS = ("rank", "robust-z")


def normalised(scores: np.ndarray, how: str) -> np.ndarray:
    """One run's scores over a split's items on a label-free common scale."""
    scores = np.asarray(scores, np.float64)
    if how == "rank":
        from scipy.stats import rankdata

        return (rankdata(scores) - 0.5) / len(scores)
    if how == "robust-z":
        low, median, high = np.percentile(scores, [25, 50, 75])
        return (scores - median) / (high - low if high > low else 1.0)
    raise ValueError(f"normalise must be one of {', '.join(NORMALISERS)}, got '{how}'")


def _table(folders: list[Path]) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
    """(ids, labels, groups, scores [runs x items]) of evaluations that scored the same items."""
    tables = [_read_scores(folder) for folder in folders]
    ids = sorted(tables[0])
    for folder, table in zip(folders[1:], tables[1:]):
        if sorted(table) != ids:
            missing = sorted(set(ids) ^ set(table))
            raise ValueError(f"'{folders[0]}' and '{folder}' scored different items (e.g. '{missing[0]}'): "
                             "evaluate every run on the same split of the same store")
    labels = np.array([tables[0][i][0] for i in ids])
    groups = np.array([tables[0][i][1] for i in ids])
    return ids, labels, groups, np.array([[table[i][2] for i in ids] for table in tables])


def _simplex(runs: int, step: float) -> np.ndarray:
    """Every weight vector on a grid of ``step`` that sums to 1."""
    parts = int(round(1 / step))
    grid = [c for c in itertools.product(range(parts + 1), repeat=runs - 1) if sum(c) <= parts]
    return np.array([[*c, parts - sum(c)] for c in grid], np.float64) / parts


def choose_weights(scores: np.ndarray, labels: np.ndarray, how: str, step: float = 0.1) -> tuple[np.ndarray, float]:
    """The grid weights with the highest AUROC on labelled items (ties: the most even weights)."""
    from sklearn.metrics import roc_auc_score

    if len(set(labels.tolist())) < 2:
        raise ValueError("choosing fusion weights needs normal and anomalous validation items")
    scaled = np.stack([normalised(s, how) for s in scores])
    best, best_auroc = None, -1.0
    even = np.full(len(scores), 1 / len(scores))
    for weights in _simplex(len(scores), step):
        auroc = roc_auc_score(labels, weights @ scaled)
        if auroc > best_auroc + 1e-12 or (abs(auroc - best_auroc) <= 1e-12 and
                                          np.abs(weights - even).sum() < np.abs(best - even).sum()):
            best, best_auroc = weights, auroc
    return best, float(best_auroc)


def fuse_evals(runs: list, out: str | Path, split: str = "test", normalise: str = "rank",
               choose_on: str | None = None, choose_groups: list[str] | None = None, step: float = 0.1) -> dict:
    """Fuse the ``split`` evaluations of ``runs`` (run directories or evaluation folders) into ``out``.

    ``choose_on``: the split (e.g. ``val``) whose evaluations of the same runs choose the weights by
    AUROC, from its normal items and its anomalous items of ``choose_groups`` (None: all); otherwise
    the weights are equal. Returns metrics.json's content, with ``fusion`` (runs, weights, the
    selection's inputs, each run's own AUROC on ``split``)."""
    from sklearn.metrics import roc_auc_score

    from core.metrics import AnomalyMetrics
    from trainers.report import _curves, _write_scores

    if len(runs) < 2:
        raise ValueError("fuse needs at least two runs")
    folders = [_eval_folder(run, split) for run in runs]
    ids, labels, groups, scores = _table(folders)
    selection = None
    if choose_on is not None:
        chosen = [_eval_folder(run, choose_on) for run in runs]
        val_ids, val_labels, val_groups, val_scores = _table(chosen)
        keep = (val_labels == 0) | (np.isin(val_groups, choose_groups) if choose_groups else val_labels == 1)
        if choose_groups and not (keep & (val_labels == 1)).any():
            raise ValueError(f"no {choose_on} anomaly of the groups {', '.join(choose_groups)} (groups there: "
                             f"{', '.join(sorted(set(val_groups[val_labels == 1].tolist())))})")
        weights, val_auroc = choose_weights(val_scores[:, keep], val_labels[keep], normalise, step)
        selection = {"split": choose_on, "groups": sorted(set(val_groups[keep & (val_labels == 1)].tolist())),
                     "items": [i for i, k in zip(val_ids, keep) if k], "normal": int((keep & (val_labels == 0)).sum()),
                     "anomalous": int((keep & (val_labels == 1)).sum()), "auroc": val_auroc}
    else:
        weights = np.full(len(runs), 1 / len(runs))
    fused = weights @ np.stack([normalised(s, normalise) for s in scores])

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    metrics = AnomalyMetrics()
    for i, item in enumerate(ids):
        metrics.add(float(fused[i]), int(labels[i]), str(groups[i]), case_id=item)
    result = metrics.compute()
    names = [_run_name(folder) for folder in folders]
    result["fusion"] = {
        "runs": [str(folder) for folder in folders], "names": names, "weights": weights.tolist(),
        "normalise": normalise, "split": split, "selection": selection,
        "held_out_groups": sorted(set(groups[labels == 1].tolist()) - set(selection["groups"])) if selection else None,
        "single_auroc": {name: float(roc_auc_score(labels, s)) for name, s in zip(names, scores)}}
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    (out / "fusion.json").write_text(json.dumps(result["fusion"], indent=1))
    _write_scores(out / "scores.csv", metrics)
    _curves(fused, labels, groups, out)
    return result
