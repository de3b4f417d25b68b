"""Post-hoc scoring search (`tessera posthoc`): on a trained run, the scoring-only settings (method options
that shape the score, such as ``image_pooling``; ``score_smoothing`` and ``normal_baseline`` for volume
runs) chosen by the AUROC of a few known anomalies, then judged on anomalies that did not choose.

Every setting of the space is evaluated on ``choose_split`` (each trial is a real evaluation into its own
folder; for volume runs the raw voxel maps are scored once and kept in OUT/map-cache, so a trial that
changes σ, the normal baseline or a pooling option re-pools them in seconds); the AUROC that chooses counts that split's normal items and its anomalies of ``choose_groups``
only (None: all of them). The pick and the run's default setting are then evaluated on ``test_split``
and paired with `tessera compare`'s bootstrap, overall and per group, so the groups left out of the
choice (``held_out_groups``) say whether the choice carries over to kinds nobody listed. ``posthoc.json``
records the trials, exactly which items chose, and the command that applies the pick.

Two more baselines make the figure honest. ``unsupervised``: the setting a user without a single known
anomaly would run (e.g. no smoothing, no baseline), judged on the test split beside the pick. ``budgets``:
the anomaly budget curve: the choice repeated with only 1, 5, 20, … of the choosing anomalies (all
normals), ``draws`` random draws each, from the trials' saved per-item scores (no re-evaluation), each
pick's test AUROC (overall and on the held-out kinds pooled) against the default, the unsupervised setting
and the best trial in hindsight (``budget.json``, ``budget.png``).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

HELD_OUT = "held-out kinds"  # the pooled row of pick_minus_default
EVAL_SETTINGS = ("score_smoothing", "normal_baseline")
PIXEL_BINS = 1024  # a trial's pixel AP: scores rounded to this many levels (exact tables cost ~0.6 s a brain)  # evaluate()'s own arguments; the rest are method options


def parse_space(items: list[str]) -> dict[str, list]:
    """``["image_pooling=mean,top", "pooling_top=0.05,0.1"]`` as ``{key: [values]}`` (values are YAML)."""
    import yaml

    space = {}
    for item in items:
        key, _, values = item.partition("=")
        if not key or not values:
            raise ValueError(f"'{item}': a search dimension is KEY=V1,V2,… (e.g. image_pooling=mean,top)")
        space[key.strip()] = [yaml.safe_load(v) for v in values.split(",")]
    if not space:
        raise ValueError("nothing to search: give at least one KEY=V1,V2")
    return space


def selection_auroc(folder: Path, groups: list[str] | None) -> tuple[float, list[str], list[str]]:
    """AUROC of an evaluation's normal items against its anomalies of ``groups`` (None: all), the ids that
    counted, and the groups of the anomalies among them (the kinds the choice saw)."""
    from sklearn.metrics import roc_auc_score

    from trainers.compare import _read_scores

    table = _read_scores(folder)
    used = sorted(i for i, (label, group, _) in table.items() if label == 0 or groups is None or group in groups)
    labels = np.array([table[i][0] for i in used])
    if len(set(labels.tolist())) < 2:
        raise ValueError(f"'{folder}' has no normal item or no anomaly of {groups or 'any group'} to choose by")
    seen = sorted({table[i][1] for i in used if table[i][0] == 1})
    return float(roc_auc_score(labels, [table[i][2] for i in used])), used, seen


def _auroc(table: dict, ids: list[str]) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score([table[i][0] for i in ids], [table[i][2] for i in ids]))


def budget_picks(folders: list[Path], groups: list[str] | None, budgets: list[int], draws: int = 20,
                 seed: int = 0) -> dict[int, list[dict]]:
    """For each budget: ``draws`` random sets of that many choosing anomalies (of ``groups``; None: any),
    always with every normal item, and the trial (index into ``folders``) each set picks. A budget as
    large as the pool is drawn once (every draw would be the same)."""
    from trainers.compare import _read_scores

    tables = [_read_scores(folder) for folder in folders]
    first = tables[0]
    normals = sorted(i for i, (label, _, _) in first.items() if label == 0)
    pool = sorted(i for i, (label, group, _) in first.items() if label == 1 and (groups is None or group in groups))
    if not normals or not pool:
        raise ValueError(f"'{folders[0]}' has no normal item or no anomaly of {groups or 'any group'} to choose by")
    rng = np.random.default_rng(seed)
    result = {}
    for budget in budgets:
        if budget < 1:
            raise ValueError(f"an anomaly budget is at least 1 item, not {budget}")
        sets = [pool] if budget >= len(pool) else [sorted(rng.choice(pool, budget, replace=False).tolist())
                                                     for _ in range(draws)]
        result[budget] = [{"items": chosen,
                           "trial": pick([{"score": _auroc(table, normals + chosen)} for table in tables])}
                          for chosen in sets]
    return result


OBJECTIVES = ("image_auroc", "pixel_ap", "mean")


def selection_pixel_ap(folder: Path, groups: list[str] | None) -> float:
    """Pixel AP of an evaluation, pooled over all its anomalies (``groups`` None) or the mean of the
    per-group figures of ``groups``."""
    metrics = json.loads((folder / "metrics.json").read_text())
    if groups is None:
        value = metrics["overall"].get("pixel_ap")
    else:
        values = [metrics["groups"][g].get("pixel_ap") for g in groups if g in metrics["groups"]]
        value = float(np.mean(values)) if values and None not in values else None
    if value is None or not np.isfinite(value):
        raise ValueError(f"'{folder}' has no pixel AP to choose by (no masks, or a method without pixel maps): "
                         "choose by image_auroc")
    return float(value)


def pick(trials: list[dict]) -> int:
    """The trial with the highest ``score`` (the objective on the choosing items); ties go to the higher
    ``image_auroc`` where trials have one, then to the earlier (the space's first values). Pixel AP ties
    whenever a setting leaves the maps alone (a normal baseline, a volume top fraction), and the first of
    those is no better than chance at being the right one."""
    return max(range(len(trials)), key=lambda i: (trials[i]["score"], trials[i].get("image_auroc", 0.0), -i))


def _apply(setting: dict) -> list[str]:
    """The `tessera eval` arguments that apply ``setting``."""
    args = []
    for key, value in setting.items():
        if key == "score_smoothing":
            args += ["--score-smoothing", str(value)]
        elif key == "normal_baseline":
            args += ["--normal-baseline", str(value if value is not None else "none")]
        else:
            args += ["--option", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
    return args


def parse_setting(items: list[str]) -> dict:
    """``["score_smoothing=0", "normal_baseline=null"]`` as ``{key: value}`` (one YAML value each)."""
    space = parse_space(items) if items else {}
    several = [k for k, values in space.items() if len(values) != 1]
    if several:
        raise ValueError(f"a setting gives one value per key: {', '.join(several)} got several")
    return {key: values[0] for key, values in space.items()}


def posthoc_search(run_dir: str | Path, space: dict[str, list], choose_split: str = "val",
                   choose_groups: list[str] | None = None, test_split: str = "test", out: str | Path | None = None,
                   workers: int = 0, batch_size: int = 32, log=print, unsupervised: dict | None = None,
                   budgets: list[int] | None = None, draws: int = 20, seed: int = 0,
                   objective: str = "image_auroc") -> dict:
    from trainers.compare import compare_evals
    from trainers.evaluate import evaluate

    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)}, not '{objective}'")
    if budgets and objective != "image_auroc":
        raise ValueError("the anomaly budget curve re-chooses from the trials' per-item image scores: use it with "
                         "objective image_auroc")
    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "posthoc"
    out.mkdir(parents=True, exist_ok=True)

    def run_eval(split: str, setting: dict, folder: Path, figures: bool = True, pixel_bins: int | None = None) -> dict:
        """One evaluation; a trial's (figures False) writes image scores and metrics only: it is chosen and
        judged by image AUROC, and pixel metrics would cost more than re-pooling its cached maps."""
        settings = {k: v for k, v in setting.items() if k in EVAL_SETTINGS}
        options = {k: v for k, v in setting.items() if k not in EVAL_SETTINGS}
        if "normal_baseline" in settings and settings["normal_baseline"] is None:
            settings["normal_baseline"] = "none"
        return evaluate(run_dir, split=split, options=options or None, out=folder, show_progress=False,
                        workers=workers, batch_size=batch_size, map_cache=out / "map-cache", figures=figures,
                        pixel_metrics=figures or pixel_bins is not None, pixel_bins=pixel_bins,
                        **settings)

    trials = []
    for i, values in enumerate(itertools.product(*space.values())):
        setting = dict(zip(space, values))
        folder = out / f"trial{i:03d}-{choose_split}"
        run_eval(choose_split, setting, folder, figures=False,
                 pixel_bins=PIXEL_BINS if objective != "image_auroc" else None)
        image_auroc, used, seen = selection_auroc(folder, choose_groups)
        trial = {"setting": setting, "image_auroc": image_auroc, "folder": str(folder)}
        if objective != "image_auroc":
            trial["pixel_ap"] = selection_pixel_ap(folder, choose_groups)
        trial["score"] = {"image_auroc": image_auroc, "pixel_ap": trial.get("pixel_ap"),
                          "mean": (image_auroc + trial.get("pixel_ap", 0.0)) / 2}[objective]  # what picks
        trials.append(trial)
        log(f"trial {i}: {setting} -> {choose_split} AUROC {image_auroc:.3f}"
            + (f", pixel AP {trial['pixel_ap']:.3f}" if "pixel_ap" in trial else ""))
    best = trials[pick(trials)]
    chosen = out / f"pick-{test_split}"
    default = out / f"default-{test_split}"
    picked = run_eval(test_split, best["setting"], chosen)
    plain = run_eval(test_split, {}, default)
    judged_groups = sorted(picked["groups"])
    held_out = [g for g in judged_groups if g not in seen]
    # the kinds the choice never saw, pooled: one interval for "does the choice carry over"
    pooled = {HELD_OUT: held_out} if len(held_out) > 1 else None
    comparison = compare_evals(chosen, default, split=test_split, out=out / "compare", pooled=pooled)
    result = {
        "run": str(run_dir), "space": space, "objective": objective, "trials": trials, "pick": best["setting"],
        "selection": {"split": choose_split, "groups": seen, "items": used,
                      "normals_shared_with_test": choose_split == test_split},
        # kinds the choice never saw: with a val split of a few kinds, every other test kind
        "held_out_groups": held_out,
        "test": {"pick": {"overall": picked["overall"], "groups": picked["groups"]},
                 "default": {"overall": plain["overall"], "groups": plain["groups"]}},
        "pick_minus_default": comparison["groups"],
        "apply": " ".join(["tessera", "eval", str(run_dir), *_apply(best["setting"])]),
    }
    if unsupervised is not None:
        folder = out / f"unsupervised-{test_split}"
        found = run_eval(test_split, unsupervised, folder)
        result["unsupervised"] = {"setting": unsupervised, "overall": found["overall"], "groups": found["groups"]}
        result["pick_minus_unsupervised"] = compare_evals(chosen, folder, split=test_split,
                                                          out=out / "compare-unsupervised", pooled=pooled)["groups"]
    if budgets:
        result["budget"] = _budget_curve(trials, budgets, draws, seed, choose_groups, held_out, test_split, out,
                                         run_eval, default, out / f"unsupervised-{test_split}"
                                         if unsupervised is not None else None, log)
    (out / "posthoc.json").write_text(json.dumps(result, indent=1))
    return result


def _budget_curve(trials, budgets, draws, seed, choose_groups, held_out, test_split, out, run_eval, default,
                  unsupervised, log) -> dict:
    """The anomaly budget curve (see the module's docstring): every trial evaluated on the test split once,
    the picks of each budget's draws looked up."""
    picks = budget_picks([Path(t["folder"]) for t in trials], choose_groups, budgets, draws, seed)
    tests = []
    for i, trial in enumerate(trials):
        folder = out / f"trial{i:03d}-{test_split}"
        if not (folder / "scores.csv").is_file():
            run_eval(test_split, trial["setting"], folder, figures=False)
        tests.append(folder)

    def judged(folder: Path) -> dict:
        row = {"overall": selection_auroc(folder, None)[0]}
        if held_out:
            row["held_out"] = selection_auroc(folder, held_out)[0]
        return row

    per_trial = [judged(folder) for folder in tests]
    curve = {}
    for budget, chosen in picks.items():
        rows = [per_trial[c["trial"]] for c in chosen]
        curve[str(budget)] = {"draws": len(chosen), "trials": [c["trial"] for c in chosen],
                              "items": [c["items"] for c in chosen]}
        for key in rows[0]:
            values = np.array([r[key] for r in rows])
            curve[str(budget)][key] = {"mean": float(values.mean()), "min": float(values.min()),
                                       "max": float(values.max()), "std": float(values.std())}
        log(f"budget {budget}: test AUROC of the picks {curve[str(budget)]['overall']['mean']:.3f} "
            f"[{curve[str(budget)]['overall']['min']:.3f}-{curve[str(budget)]['overall']['max']:.3f}]")
    result = {"curve": curve, "per_trial_test": per_trial, "default": judged(default),
              "hindsight_best": {key: max(r[key] for r in per_trial) for key in per_trial[0]}}
    if unsupervised is not None:
        result["unsupervised"] = judged(unsupervised)
    (out / "budget.json").write_text(json.dumps(result, indent=1))
    _budget_plot(result, out / "budget.png")
    return result


def _budget_plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in ("overall", "held_out") if k in result["default"]]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.8), squeeze=False)
    budgets = [int(b) for b in result["curve"]]
    for ax, key in zip(axes[0], keys):
        rows = [result["curve"][str(b)][key] for b in budgets]
        ax.errorbar(budgets, [r["mean"] for r in rows],
                    # clipped: the mean of equal values can round past them
                    yerr=[[max(0.0, r["mean"] - r["min"]) for r in rows], [max(0.0, r["max"] - r["mean"]) for r in rows]],
                    marker="o", capsize=3, label="weak pick (mean, min-max over draws)")
        ax.axhline(result["default"][key], color="grey", ls="--", label="default")
        if "unsupervised" in result:
            ax.axhline(result["unsupervised"][key], color="tab:red", ls=":", label="unsupervised setting")
        ax.axhline(result["hindsight_best"][key], color="tab:green", ls="-.", label="best trial in hindsight")
        ax.set_xscale("log")
        ax.set_xlabel("known anomalies that choose")
        ax.set_ylabel("test AUROC")
        ax.set_title("all test kinds" if key == "overall" else "kinds held out of the choice")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
