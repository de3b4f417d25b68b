"""What an evaluation writes: ``metrics.json``, ``scores.csv``, the pixel histograms, ROC and PR curves
and ``index.html`` (the page showing them with the heatmaps)."""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from core.metrics import AnomalyMetrics


def _curves(image_scores: np.ndarray, targets: np.ndarray, groups: np.ndarray, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, precision_recall_curve, roc_curve

    normal = targets == 0
    selections = {"all": np.ones(len(targets), bool)}
    selections.update({g: normal | (groups == g) for g in sorted(set(groups[targets == 1]))})
    for kind in ("roc", "pr"):
        fig, ax = plt.subplots(figsize=(5.5, 5), dpi=110)
        drawn = 0
        for name, chosen in selections.items():
            y, s = targets[chosen], image_scores[chosen]
            if len(set(y.tolist())) < 2:
                continue
            drawn += 1
            if kind == "roc":
                fpr, tpr, _ = roc_curve(y, s)
                ax.plot(fpr, tpr, label=f"{name} (AUROC {auc(fpr, tpr):.3f})", lw=2 if name == "all" else 1)
            else:
                precision, recall, _ = precision_recall_curve(y, s)
                ax.plot(recall, precision, label=f"{name} (AP {np.sum(np.diff(recall[::-1]) * precision[::-1][1:]):.3f})",
                        lw=2 if name == "all" else 1)
        if kind == "roc":
            ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
            ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, image level")
        else:
            ax.set(xlabel="recall", ylabel="precision", title="precision-recall, image level")
        if drawn:
            ax.legend(fontsize=7, loc="lower right" if kind == "roc" else "lower left")
        else:  # a split of one class (e.g. only anomalies) has no curve; say so rather than show empty axes
            ax.text(0.5, 0.5, "no curve: the split needs both\nnormal and anomalous items", ha="center",
                    va="center", transform=ax.transAxes)
        fig.tight_layout()
        fig.savefig(out / f"{kind}.png")
        plt.close(fig)


def _page(out: Path, run_dir: Path, metrics: dict, heatmaps: list[str]) -> None:
    def cell(values, key):
        text = f"{values.get(key, float('nan')):.3f}"
        if f"{key}_low" in values:
            text += f" <small>[{values[key + '_low']:.2f}, {values[key + '_high']:.2f}]</small>"
        return f"<td>{text}</td>"

    def row(name, values):
        cells = "".join(cell(values, k) for k in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "dice"))
        return f"<tr><td>{html.escape(name)}</td><td>{values['n_normal']}</td><td>{values['n_anomalous']}</td>{cells}</tr>"

    rows = [row("overall", metrics["overall"])] + [row(g, v) for g, v in metrics["groups"].items()]
    rows += [row(f"score term {name} (overall)", values["overall"])
             for name, values in metrics.get("score_terms", {}).items()]
    if "slides" in metrics:  # image columns only: a slide's pixel metrics are its tiles'
        slides = metrics["slides"]
        rows += [row(f"slides: {g}", {k: v for k, v in values.items() if not k.startswith(("pixel", "dice"))})
                 for g, values in [("overall", slides["overall"]), *slides["groups"].items()]]
    images = "".join(f'<figure><img src="heatmaps/{html.escape(h)}" width="420"><figcaption>{html.escape(h)}'
                     f"</figcaption></figure>" for h in heatmaps)
    (out / "index.html").write_text(f"""<!doctype html><meta charset="utf-8"><title>tessera eval</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;text-align:right}}
figure{{display:inline-block;margin:6px}}</style>
<h1>Evaluation of {html.escape(run_dir.name)}</h1>
{''.join(f"<p>{html.escape(k)}: {html.escape(str(v))}</p>" for k, v in metrics.get("settings", {}).items())}
<p>[brackets]: 95% stratified bootstrap intervals, resampling cases (normal and anomalous apart).</p>
<table><tr><th>group</th><th>normal</th><th>anomalous</th><th>image AUROC</th><th>image AP</th>
<th>pixel AUROC</th><th>pixel AP</th><th>DICE</th></tr>{''.join(rows)}</table>
<p><img src="roc.png" width="420"> <img src="pr.png" width="420"></p>
<h2>Heatmaps</h2>{images or '<p>none</p>'}
""")


def _write_scores(path: Path, metrics: AnomalyMetrics) -> None:
    """One row per scored item, sorted by id: what `tessera compare` pairs two evaluations by."""
    import csv

    partial = path.with_suffix(".partial.csv")
    with open(partial, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", "group", "score"])
        for case in sorted(metrics.cases, key=lambda c: c.case_id):
            writer.writerow([case.case_id, case.label, case.group, repr(case.score)])
    partial.replace(path)


def _write_pixel_histograms(path: Path, metrics: AnomalyMetrics) -> None:
    """Each case's pixel-score histogram by label (core.metrics.pixel_histogram), for the pixel
    comparisons of `tessera compare`; nothing when no case had a pixel map."""
    ids, labels, histograms = metrics.pixel_histograms({c.group for c in metrics.cases})
    path.unlink(missing_ok=True)  # a previous evaluation's, which would no longer match scores.csv
    if not ids:
        return
    groups = {c.case_id: c.group for c in metrics.cases}
    partial = path.with_name(path.stem + ".partial.npz")
    with open(partial, "wb") as f:
        np.savez_compressed(f, ids=np.array(ids), labels=labels, groups=np.array([groups[i] for i in ids]),
                            histograms=histograms)
    partial.replace(path)


def _write_outputs(out: Path, run_dir: Path, parts: list, settings: dict | None = None,
                   extra: dict | None = None) -> dict:
    """Merge the ranks' shares and write metrics.json (with the eval ``settings`` that shaped the
    scores, and ``extra`` results such as a generator's FD/KD), the curves and index.html."""
    first = parts[0][0]  # the ranks' accumulators share their settings (evaluate's quick form: no intervals)
    metrics = AnomalyMetrics(bins=first.bins, resamples=first.resamples, level=first.level, pixel_bins=first.pixel_bins)
    names, extras = [], {}
    for part_metrics, part_names, part_extras in parts:
        metrics.merge(part_metrics)
        names += part_names
        for name, extra_metrics in part_extras.items():
            extras.setdefault(name, AnomalyMetrics()).merge(extra_metrics)
    result = metrics.compute()
    if settings:
        result["settings"] = settings
    # the parts of a combined image score, each ranked on its own (pgan_enc's L_n, L_o, A)
    terms = {name.split("/", 1)[1]: m.compute() for name, m in sorted(extras.items()) if name.startswith("term/")}
    if terms:
        result["score_terms"] = terms
    found = extras["found"].compute() if "found" in extras else None
    if found and found["overall"]["n_anomalous"]:
        # volume runs: the anomalies whose voxel map finds them (eval_volumes.FOUND_SHARE) against the normals
        result["found_by_map"] = found
    if "slides" in extras:  # a tile run's slides, each scored from its tiles
        result["slides"] = extras["slides"].compute()
        _write_scores(out / "slide_scores.csv", extras["slides"])
    result.update(extra or {})
    (out / "metrics.json").write_text(json.dumps(result, indent=1))
    _write_scores(out / "scores.csv", metrics)
    _write_pixel_histograms(out / "pixel_histograms.npz", metrics)
    _curves(np.array([c.score for c in metrics.cases]), np.array([c.label for c in metrics.cases]),
            np.array([c.group for c in metrics.cases]), out)
    _page(out, run_dir, result, sorted(names))
    return result
