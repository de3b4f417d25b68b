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
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np

HELD_OUT = "held-out kinds"  # the pooled row of pick_minus_default
EVAL_SETTINGS = ("score_smoothing", "normal_baseline")  # evaluate()'s own arguments; the rest are method options


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


def pick(trials: list[dict]) -> int:
    """The trial with the highest selection AUROC; ties go to the earlier (the space's first values)."""
    return max(range(len(trials)), key=lambda i: (trials[i]["auroc"], -i))


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


def posthoc_search(run_dir: str | Path, space: dict[str, list], choose_split: str = "val",
                   choose_groups: list[str] | None = None, test_split: str = "test", out: str | Path | None = None,
                   workers: int = 0, batch_size: int = 32, log=print) -> dict:
    from trainers.compare import compare_evals
    from trainers.evaluate import evaluate

    run_dir = Path(run_dir)
    out = Path(out) if out is not None else run_dir / "posthoc"
    out.mkdir(parents=True, exist_ok=True)

    def run_eval(split: str, setting: dict, folder: Path) -> dict:
        settings = {k: v for k, v in setting.items() if k in EVAL_SETTINGS}
        options = {k: v for k, v in setting.items() if k not in EVAL_SETTINGS}
        if "normal_baseline" in settings and settings["normal_baseline"] is None:
            settings["normal_baseline"] = "none"
        return evaluate(run_dir, split=split, options=options or None, out=folder, show_progress=False,
                        workers=workers, batch_size=batch_size, map_cache=out / "map-cache", **settings)

    trials = []
    for i, values in enumerate(itertools.product(*space.values())):
        setting = dict(zip(space, values))
        folder = out / f"trial{i:03d}-{choose_split}"
        run_eval(choose_split, setting, folder)
        auroc, used, seen = selection_auroc(folder, choose_groups)
        trials.append({"setting": setting, "auroc": auroc, "folder": str(folder)})
        log(f"trial {i}: {setting} -> {choose_split} AUROC {auroc:.3f}")
    best = trials[pick(trials)]
    chosen = out / f"pick-{test_split}"
    default = out / f"default-{test_split}"
    picked = run_eval(test_split, best["setting"], chosen)
    plain = run_eval(test_split, {}, default)
    judged_groups = sorted(picked["groups"])
    held_out = [g for g in judged_groups if g not in seen]
    # the kinds the choice never saw, pooled: one interval for "does the choice carry over"
    comparison = compare_evals(chosen, default, split=test_split, out=out / "compare",
                               pooled={HELD_OUT: held_out} if len(held_out) > 1 else None)
    result = {
        "run": str(run_dir), "space": space, "trials": trials, "pick": best["setting"],
        "selection": {"split": choose_split, "groups": seen, "items": used,
                      "normals_shared_with_test": choose_split == test_split},
        # kinds the choice never saw: with a val split of a few kinds, every other test kind
        "held_out_groups": held_out,
        "test": {"pick": {"overall": picked["overall"], "groups": picked["groups"]},
                 "default": {"overall": plain["overall"], "groups": plain["groups"]}},
        "pick_minus_default": comparison["groups"],
        "apply": " ".join(["tessera", "eval", str(run_dir), *_apply(best["setting"])]),
    }
    (out / "posthoc.json").write_text(json.dumps(result, indent=1))
    return result
