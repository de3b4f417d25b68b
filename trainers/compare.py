"""`tessera compare`: two evaluations of the same items side by side, with paired bootstrap intervals of
the differences in image AUROC (and pixel AP), overall and per group, and a forest plot."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _eval_folder(path: Path, split: str) -> Path:
    """An evaluation folder (with scores.csv), given it or the run directory it belongs to."""
    path = Path(path)
    for folder in (path, path / f"eval-{split}"):
        if (folder / "scores.csv").is_file():
            return folder
    for folder in (path, path / f"eval-{split}"):
        if (folder / "metrics.json").is_file():
            run = folder.parent if folder.name.startswith("eval-") else folder
            raise FileNotFoundError(f"'{folder}' has metrics but no scores.csv (an evaluation by an older tessera): "
                                    f"run `tessera eval {run} --split {split}` again")
    raise FileNotFoundError(f"'{path}' is neither an evaluation folder nor a run directory with an eval-{split}/ "
                            f"folder: run `tessera eval {path} --split {split}` first")


def _read_scores(folder: Path) -> dict[str, tuple[int, str, float]]:
    import csv

    with open(folder / "scores.csv", newline="") as f:
        return {row["id"]: (int(row["label"]), row["group"], float(row["score"])) for row in csv.DictReader(f)}


def _run_name(folder: Path) -> str:
    return folder.parent.name if folder.name.startswith("eval-") else folder.name


def _pixel_sides(folders: list[Path], counts: tuple[int, int], ids: list[str]) -> dict | None:
    """Every evaluation's per-case pixel histograms (pixel_histograms.npz), checked to cover the same
    cases; None when any evaluation has none (no pixel maps, or made by an older tessera)."""
    files = [folder / "pixel_histograms.npz" for folder in folders]
    if not all(f.is_file() for f in files):
        return None
    loaded = []
    for f in files:
        with np.load(f) as data:
            loaded.append({k: data[k] for k in ("ids", "labels", "groups", "histograms")})
    first = loaded[0]
    for f, other in zip(files[1:], loaded[1:]):
        if other["ids"].tolist() != first["ids"].tolist() or other["histograms"].shape != first["histograms"].shape:
            raise ValueError(f"'{files[0]}' and '{f}' hold pixel maps of different items or levels: evaluate "
                             "both runs with this tessera on the same split of the same store")
    stray = sorted(set(first["ids"].tolist()) - set(ids))
    if stray:
        raise ValueError(f"'{files[0]}' has pixel maps of items not in its scores.csv (e.g. '{stray[0]}'): "
                         "evaluate the run again")
    return {"labels": first["labels"], "groups": first["groups"],
            "sides": [[d["histograms"] for d in loaded[:counts[0]]], [d["histograms"] for d in loaded[counts[0]:]]]}


def compare_evals(a, b, split: str = "test", out: str | Path | None = None, resamples: int = 2000,
                  level: float = 0.95, pooled: dict[str, list[str]] | None = None) -> dict:
    """Image AUROC of evaluation A against B on the same items, overall and per group, with paired
    bootstrap intervals of the difference (core.metrics.paired_auroc_difference); likewise pixel AP
    (core.metrics.paired_pixel_difference) where both have pixel maps. ``a`` and ``b`` are
    each a run directory or evaluation folder, or a list of them (e.g. one run per seed: that side's
    AUROC is their mean). Writes ``compare.json`` and a forest plot ``compare.png`` into ``out``
    (default A's first evaluation folder / compare-<B's first run>) and returns what it wrote.
    ``pooled``: extra rows, each the normals against the anomalies of several groups together (e.g. the
    kinds a choice never saw)."""
    from core.metrics import paired_auroc_difference, paired_pixel_difference

    sides = [[_eval_folder(path, split) for path in ([side] if isinstance(side, (str, Path)) else side)]
             for side in (a, b)]
    if not sides[0] or not sides[1]:
        raise ValueError("compare needs at least one evaluation on each side")
    folders = sides[0] + sides[1]
    scores = [_read_scores(folder) for folder in folders]
    reference, first = scores[0], folders[0]
    if not reference:
        raise ValueError(f"'{first / 'scores.csv'}' lists no scored item")
    for folder, other in zip(folders[1:], scores[1:]):
        only_a, only_b = sorted(set(reference) - set(other)), sorted(set(other) - set(reference))
        if only_a or only_b:
            raise ValueError(f"'{first}' and '{folder}' scored different items ({len(only_a)} only in the first, "
                             f"e.g. {only_a[:3]}; {len(only_b)} only in the second, e.g. {only_b[:3]}): compare "
                             "evaluations of the same split of the same store")
        differing = [i for i in reference if reference[i][:2] != other[i][:2]]
        if differing:
            raise ValueError(f"'{first}' and '{folder}' disagree on the label or group of {len(differing)} items "
                             f"(e.g. '{differing[0]}': {reference[differing[0]][:2]} against "
                             f"{other[differing[0]][:2]}): were they made from different stores?")
    ids = sorted(reference)
    label = np.array([reference[i][0] for i in ids])
    group = np.array([reference[i][1] for i in ids])
    values = np.array([[table[i][2] for i in ids] for table in scores])
    value_a, value_b = values[:len(sides[0])], values[len(sides[0]):]
    normal = label == 0
    selections = {"overall": label == 1}
    selections.update({g: (label == 1) & (group == g) for g in sorted(set(group[label == 1]))})
    members = {name: list(groups) for name, groups in (pooled or {}).items() if groups}
    selections.update({name: (label == 1) & np.isin(group, groups) for name, groups in members.items()})
    rows = {}
    for name, anomalous in selections.items():
        if not normal.any() or not anomalous.any():
            continue
        rows[name] = {"n_normal": int(normal.sum()), "n_anomalous": int(anomalous.sum()),
                      **paired_auroc_difference(value_a[:, normal], value_a[:, anomalous], value_b[:, normal],
                                                value_b[:, anomalous], resamples, level)}
    if not rows:
        raise ValueError(f"'{first / 'scores.csv'}' needs both normal and anomalous items to compare AUROCs")
    pixels = _pixel_sides(folders, (len(sides[0]), len(sides[1])), ids)
    if pixels is not None:
        normal_p = pixels["labels"] == 0
        for name in rows:
            chosen = members.get(name, [name])
            anomalous_p = (pixels["labels"] == 1) & (True if name == "overall" else np.isin(pixels["groups"], chosen))
            if anomalous_p.any():
                rows[name]["pixel_ap"] = paired_pixel_difference(
                    [h[normal_p] for h in pixels["sides"][0]], [h[anomalous_p] for h in pixels["sides"][0]],
                    [h[normal_p] for h in pixels["sides"][1]], [h[anomalous_p] for h in pixels["sides"][1]],
                    resamples, level)
    names = [[_run_name(folder) for folder in side] for side in sides]
    label_a, label_b = (side[0] + (f" (+{len(side) - 1})" if len(side) > 1 else "") for side in names)
    out = Path(out) if out else sides[0][0] / f"compare-{names[1][0]}"
    out.mkdir(parents=True, exist_ok=True)
    result = {"a": [str(f) for f in sides[0]], "b": [str(f) for f in sides[1]], "name_a": label_a,
              "name_b": label_b, "resamples": resamples, "level": level, "groups": rows}
    (out / "compare.json").write_text(json.dumps(result, indent=1))
    _forest_plot(result, out / "compare.png")
    result["out"] = str(out)
    return result


def _forest_plot(result: dict, path: Path) -> None:
    """The difference per group with its interval, image AUROC (and pixel AP where both sides have
    pixel maps) side by side: left of 0, B is better; a bar across 0, no call."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["groups"])[::-1]
    panels = [("image AUROC", [result["groups"][n] for n in names])]
    if any("pixel_ap" in result["groups"][n] for n in names):
        panels.append(("pixel AP", [{"auroc_a": r["pixel_ap"]["a"], "auroc_b": r["pixel_ap"]["b"],
                                     **r["pixel_ap"]} if "pixel_ap" in r else None
                                    for r in (result["groups"][n] for n in names)]))
    fig, axes = plt.subplots(1, len(panels), figsize=(7 * len(panels), 0.5 * len(names) + 1.4), dpi=110,
                             squeeze=False)
    for index, (ax, (title, rows)) in enumerate(zip(axes[0], panels)):
        for y, row in enumerate(rows):
            if row is None:
                continue
            low, high = row["difference_ci"]
            colour = "tab:green" if low > 0 else "tab:red" if high < 0 else "tab:grey"
            ax.plot([low, high], [y, y], color=colour, lw=2)
            ax.plot(row["difference"], y, "o", color=colour)
            ax.annotate(f"{row['auroc_a']:.3f} vs {row['auroc_b']:.3f}"
                        + (f"  (n={row['n_anomalous']})" if "n_anomalous" in row else ""), (1.02, y),
                        xycoords=("axes fraction", "data"), va="center", fontsize=8)
        ax.axvline(0, color="black", lw=0.8, ls="--")
        ax.set_yticks(range(len(names)), names if index == 0 else [])  # the groups, named once at the left
        ax.set_ylim(-0.5, len(names) - 0.5)
        ax.set_xlabel(f"{title} {result['name_a']} − {result['name_b']}  ({result['level']:.0%} paired bootstrap)")
    fig.tight_layout()
    fig.subplots_adjust(right=1 - 0.28 / len(panels), wspace=0.45)
    fig.savefig(path)
    plt.close(fig)
