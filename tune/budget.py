"""The anomaly-budget study (the DPA paper's Figure 4): how good is the configuration a search picks
when it may look at only 1, 5, 20 or 50 known anomalies, of one group or of several?

It reuses a finished search: every trial saved each fold's per-item validation scores
(``trials/<id>/fold<k>/val_scores.json``) on the whole validation pool, so a smaller budget is a
subset of that pool and re-picking needs no training. For each budget and setting, ``draws`` random
subsets each pick the trial with the best mean fold AUROC; the study reports the test AUROC of those
picks (mean and spread), beside the unsupervised pick (lowest validation loss on normals), the mean
trial (a random pick) and the best trial in hindsight. A trial's test AUROC is the mean over its fold
models, evaluated on the test split once and cached (``trials/<id>/test.json``); test labels are read
only here, after every choice is made.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _trial_dirs(experiment: Path, folds: int) -> list[Path]:
    """Trials whose every fold finished (final.pt) and saved validation scores."""
    return sorted(d for d in (experiment / "trials").iterdir()
                  if d.is_dir() and all((d / f"fold{k}" / "final.pt").is_file() and
                                        (d / f"fold{k}" / "val_scores.json").is_file() for k in range(folds)))


def trial_test_auroc(trial: Path, folds: int, show_progress: bool = False) -> float:
    """Mean test image AUROC of a trial's fold models (cached in ``test.json``)."""
    from trainers.evaluate import evaluate

    cache = trial / "test.json"
    if cache.is_file():
        return json.loads(cache.read_text())["test_auroc"]
    values = [evaluate(trial / f"fold{k}", split="test", workers=0, show_progress=show_progress)["overall"]
              ["image_auroc"] for k in range(folds)]
    result = {"test_auroc": float(np.mean(values)), "folds": values}
    cache.write_text(json.dumps(result))
    return result["test_auroc"]


def _fold_auroc(scores: list, anomalies: set[str]) -> float:
    from sklearn.metrics import roc_auc_score

    labels, values = [], []
    for item, label, score in scores:
        if label == 0 or item in anomalies:
            labels.append(label)
            values.append(score)
    return float(roc_auc_score(labels, values)) if len(set(labels)) == 2 else float("nan")


def budget_study(experiment: Path, budgets: list[int], draws: int = 20, seed: int = 0,
                 show_progress: bool = True) -> dict:
    from data_plane.progress import track
    from tune.folds import Folds

    experiment = Path(experiment)
    folds = Folds.load(experiment / "folds.json")
    k = len(folds.folds)
    trials = _trial_dirs(experiment, k)
    if len(trials) < 2:
        raise ValueError(f"the budget study needs at least 2 finished trials in {experiment / 'trials'}, "
                         f"found {len(trials)}")
    scores = {t.name: [json.loads((t / f"fold{f}" / "val_scores.json").read_text())["scores"] for f in range(k)]
              for t in trials}
    tests = {t.name: trial_test_auroc(t, k) for t in track(trials, description="test AUROC of trials",
                                                           show=show_progress)}
    group_of = dict(zip(folds.anomalies, folds.groups))
    by_group: dict[str, list[str]] = {}
    for item, group in group_of.items():
        by_group.setdefault(group, []).append(item)
    summary = json.loads((experiment / "summary.json").read_text()) if (experiment / "summary.json").is_file() else {}
    # summary.json names a trial by Ray's folder name, which holds the trial id (the trials/ folder name)
    picked_name = summary.get("unsupervised", {}).get("trial") or ""
    unsupervised = next((t.name for t in trials if t.name in picked_name), None)
    rng = np.random.default_rng(seed)
    rows = []
    for setting in ("one group", "several groups"):
        for budget in budgets:
            pool_size = max(len(v) for v in by_group.values()) if setting == "one group" else len(group_of)
            if budget > pool_size:
                rows.append({"setting": setting, "budget": budget, "skipped": f"only {pool_size} validation "
                             f"anomalies {'in a group' if setting == 'one group' else 'in all'}"})
                continue
            picked = []
            for _ in range(draws):
                if setting == "one group":
                    group = rng.choice(sorted(g for g, items in by_group.items() if len(items) >= budget))
                    subset = set(rng.choice(sorted(by_group[group]), budget, replace=False))
                else:
                    subset = set(rng.choice(sorted(group_of), budget, replace=False))
                means = {name: np.nanmean([_fold_auroc(fold, subset) for fold in per_fold])
                         for name, per_fold in scores.items()}
                picked.append(tests[max(sorted(means), key=lambda name: means[name])])
            rows.append({"setting": setting, "budget": budget, "test_auroc_mean": float(np.mean(picked)),
                         "test_auroc_std": float(np.std(picked)), "draws": draws})
    result = {"trials": len(trials), "pool": len(group_of), "groups": {g: len(v) for g, v in by_group.items()},
              "rows": rows, "test_auroc": tests,
              "unsupervised_pick": {"trial": unsupervised, "test_auroc": tests.get(unsupervised)},
              "mean_trial": float(np.mean(list(tests.values()))), "best_in_hindsight": float(max(tests.values()))}
    (experiment / "budget.json").write_text(json.dumps(result, indent=1))
    _plot(result, experiment / "budget.png")
    return result


def _plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for setting, marker in (("one group", "o"), ("several groups", "s")):
        rows = [r for r in result["rows"] if r["setting"] == setting and "skipped" not in r]
        if rows:
            ax.errorbar([r["budget"] for r in rows], [r["test_auroc_mean"] for r in rows],
                        yerr=[r["test_auroc_std"] for r in rows], marker=marker, capsize=3,
                        label=f"weakly supervised, {setting}")
    if result["unsupervised_pick"]["test_auroc"] is not None:
        ax.axhline(result["unsupervised_pick"]["test_auroc"], color="grey", ls="--", label="unsupervised pick")
    ax.axhline(result["mean_trial"], color="grey", ls=":", label="mean trial (random pick)")
    ax.axhline(result["best_in_hindsight"], color="green", ls="-.", label="best trial in hindsight")
    ax.set_xscale("log")
    ax.set_xlabel("validation anomalies used to choose")
    ax.set_ylabel("test AUROC of the chosen config")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
