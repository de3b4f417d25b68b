"""The search at a glance: the objective against each hyperparameter, the best-so-far curve, and the
validation AUROC of every fold per trial."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_search(table, per_trial, experiment: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    params = [c for c in table.columns if c.startswith("param/")]
    first = table.groupby("trial").first()
    if params:
        fig, axes = plt.subplots(1, len(params), figsize=(4.2 * len(params), 3.6), dpi=100, squeeze=False)
        for ax, column in zip(axes[0], params):
            values = first.loc[per_trial.index, column]
            numeric = np.issubdtype(np.asarray(values).dtype, np.number)
            x = values if numeric else [str(v) for v in values]
            ax.scatter(x, per_trial["mean_val_auroc"], c=per_trial["step"], cmap="viridis", s=28)
            if numeric and column.endswith(("lr", "weight_decay")) and (np.asarray(values) > 0).all():
                ax.set_xscale("log")
            ax.set(xlabel=column.removeprefix("param/"), ylabel="mean validation AUROC (last report)")
        fig.suptitle("objective vs hyperparameters (colour: steps reached)", fontsize=10)
        fig.tight_layout()
        written.append(experiment / "objective_vs_params.png")
        fig.savefig(written[-1])
        plt.close(fig)
    ordered = per_trial.sort_values("trial_index")
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=100)
    ax.plot(range(1, len(ordered) + 1), ordered["mean_val_auroc"], "o", alpha=0.5, label="trial")
    ax.plot(range(1, len(ordered) + 1), np.maximum.accumulate(ordered["mean_val_auroc"].fillna(0)), "-",
            label="best so far")
    ax.set(xlabel="trial", ylabel="mean validation AUROC")
    ax.legend()
    fig.tight_layout()
    written.append(experiment / "best_so_far.png")
    fig.savefig(written[-1])
    plt.close(fig)
    last = table.sort_values("report").groupby(["trial", "fold"]).tail(1)
    trials = list(ordered.index)
    fig, ax = plt.subplots(figsize=(max(5.5, 0.5 * len(trials)), 3.6), dpi=100)
    for position, trial in enumerate(trials):
        folds = last[last["trial"] == trial]
        ax.scatter([position] * len(folds), folds["val_auroc"], s=20, c=folds["fold"], cmap="tab10", vmin=0, vmax=9)
    ax.set_xticks(range(len(trials)), [t[-5:] for t in trials], rotation=60, fontsize=7)
    ax.set(xlabel="trial", ylabel="validation AUROC per fold")
    fig.tight_layout()
    written.append(experiment / "auroc_by_fold.png")
    fig.savefig(written[-1])
    plt.close(fig)
    return written
