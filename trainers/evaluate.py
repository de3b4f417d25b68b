"""Evaluation: score a split with a trained method, write metrics, curves, heatmaps and a page.

``<run_dir>/eval-<split>/`` receives ``metrics.json`` (image AUROC with its bootstrap interval, AP,
and pixel AUROC/AP and DICE where masks exist; overall and per group), ``scores.csv`` (one row per
scored item: id, label, group, score), ``roc.png`` / ``pr.png``, one heatmap overlay per slide under
``heatmaps/`` (the stitched scores are also stored in the store, ``slides/<id>/heatmaps/<run>``), and
``index.html`` showing them together. ``compare_evals`` sets two evaluations of the same items side
by side (`tessera compare`).
"""

from __future__ import annotations

import html
import json
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from core.metrics import AnomalyMetrics
from data_plane.stream import on_device
from trainers.files import load_file, save_file

EXPORT_FORMAT = "tessera-export"


def load_method(run_dir: Path, options: dict | None = None):
    """The trained method of a run (``final.pt``) or an export, in eval mode on the CPU. ``options``
    replace method options that shape scoring only (StyleGAN2's ``score``, ``projector_steps``; an
    encoder's ``refine_steps``): the weights must still fit, which load_state_dict checks."""
    from core.methods import create_method
    from trainers.checkpoint import STATISTICS_FILE, load_statistics

    run_dir = Path(run_dir)
    path = run_dir / "final.pt" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise FileNotFoundError(f"no trained weights at '{path}': train the run to the end first "
                                f"(or resume it with `tessera train --run-dir {run_dir} --resume`)")
    saved = load_file(path, ("tessera-final", EXPORT_FORMAT), "trained weights")
    saved["method"] = json.loads(saved["method_json"])
    method = create_method(saved["method"]["name"], {**saved["method"]["options"], **(options or {})})
    method.load_state_dict(saved["state"])
    for name, network in method.ema_networks().items():  # G_ema, where the run kept one, scores and samples
        if saved.get("ema"):
            network.load_state_dict(saved["ema"][name])
    if method.uses_statistics and (path.parent / STATISTICS_FILE).is_file() and run_dir.is_dir():
        # the statistics the run trained with: the same values its weights hold, plus any a newer tessera
        # derives from them (MKD's map scale) that weights saved by an older one lack
        method.set_statistics(load_statistics(path.parent / STATISTICS_FILE))
    return method.eval(), saved


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


def _share(ids, env) -> list[str]:
    """This rank's items (slides or volumes) of the split: every world_size-th of the sorted ids."""
    ids = sorted(set(ids))
    return ids[env.rank::env.world_size] if env is not None else ids


def _gather(env, part):
    """Every rank's (metrics, figure names) on the main rank (None elsewhere); as is on a lone rank."""
    if env is None or env.world_size == 1:
        return [part]
    import torch.distributed as dist

    parts = [None] * env.world_size
    dist.all_gather_object(parts, part)
    return parts if env.is_main else None


def _scored(method, batch: dict) -> tuple:
    """(image scores, pixel maps or None, {term: scores} on the CPU: {} for a method without terms)."""
    from core.methods.base import Method

    if isinstance(method, Method) and type(method).score_terms is not Method.score_terms:
        scores, maps, terms = method.score_with_terms(batch)
        return scores, maps, {name: values.float().cpu() for name, values in terms.items()}
    scores, maps = method.score(batch)
    return scores, maps, {}


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
    metrics, names, extras = AnomalyMetrics(), [], {}
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


PIXEL_MAP_SIDE = 16  # heat pixels per tile edge in a slide's stitched pixel-map heatmap


@torch.no_grad()
def _with_normals(groups: list[str] | None) -> list[str] | None:
    """The groups to score: the chosen anomaly groups and the normal items' (no group, "")."""
    return None if not groups else sorted({*groups, ""})


def evaluate(run_dir: str | Path, store: str | None = None, split: str = "test", groups: list[str] | None = None,
             batch_size: int = 32, workers: int = 2, show_progress: bool = True, env=None,
             device: torch.device | None = None, score_smoothing: float | None = None,
             normal_baseline: str | None = None, options: dict | None = None,
             out: str | Path | None = None, slide_top_fraction: float = 0.05) -> dict | None:
    """Score every tile of ``split`` (uncertain tiles excluded) and write the evaluation outputs into
    ``out`` (default ``RUN_DIR/eval-SPLIT``). ``options``: method options for scoring (load_method).

    Tile runs are also judged per slide (``slides`` in metrics.json, ``slide_scores.csv``): a slide's score
    is the mean of its highest ``slide_top_fraction`` of tile scores; it is anomalous when any of its
    tiles is (its group: theirs), normal when all are normal.

    ``score_smoothing`` and ``normal_baseline`` (volume runs) replace the run's
    ``data.volume_stream`` settings of those names; ``normal_baseline="none"`` turns it off.

    With ``env`` (a DistEnv of several ranks) each rank scores its share of the slides and writes their
    heatmaps; the main rank gathers the metrics, writes the outputs and returns them (others: None).
    """
    import torch.nn.functional as F
    import zarr
    from torch.utils.data import DataLoader

    from data_plane.heatmap import render_overlay, write_heatmap
    from data_plane.progress import track
    from data_plane.store import read_tile_index, store_path
    from data_plane.stream import TileStream, select_tiles
    from core.run_config import load_config

    run_dir = Path(run_dir)
    config = load_config(run_dir / "config.yaml")
    store = store or config.data.store
    device = device or torch.device("cpu")
    if config.train.data in ("slices", "slice_pairs"):
        if score_smoothing is not None:
            config.data.volume_stream.score_smoothing = score_smoothing
        if normal_baseline is not None:
            config.data.volume_stream.normal_baseline = None if normal_baseline == "none" else normal_baseline
        return evaluate_volumes(run_dir, config, store, split, groups, batch_size, workers, show_progress, env, device,
                                options, out)
    method, _ = load_method(run_dir, options)
    method.to(device)
    test_crop = config.data.stream.eval_crop
    # --group G compares G's items with the normal ones, which belong to no group (""): keep both.
    stream_config = config.data.stream.model_copy(update={"splits": [split], "groups": _with_normals(groups),
                                                          "labels": None,
                                                          "crop": test_crop, "augment": "none",
                                                          "max_tiles_per_slide": None, "ids": None})
    everything = select_tiles(read_tile_index(store), stream_config)
    if len(everything) == 0:
        raise ValueError(f"no tile of split '{split}' in store '{store}' passes the run's stream filters")
    mine = _share(everything["slide_id"], env)
    out = Path(out) if out is not None else run_dir / f"eval-{split}"
    heatmap = run_dir.name if out == run_dir / f"eval-{split}" else f"{run_dir.name}.{out.name}"
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    metrics, extras = AnomalyMetrics(), {}
    names = []
    scoring, scored = 0.0, 0
    shown: dict[int, list] = {0: [], 1: []}  # the first normal and anomalous tiles, for reconstructions.png
    embedder, normal_features = _generator_embedder(method, device), []
    if mine:
        stream_config = stream_config.model_copy(update={"ids": mine})
        stream = TileStream(store, stream_config, stain=config.data.stain, shuffle=False).batched(batch_size)
        per_slide: dict[str, list] = {}
        batches = DataLoader(stream, batch_size=None, num_workers=workers)
        show = show_progress and (env is None or env.is_main)
        for batch in track(batches, total=len(stream), description=f"eval {split}", show=show):
            started = time.perf_counter()
            ready = on_device(batch, device)  # images as float on the device; the rest of `batch` stays on the CPU
            scores, maps, parts = _scored(method, ready)
            scores, maps = scores.float().cpu(), (maps.float().cpu() if maps is not None else None)
            scoring, scored = scoring + time.perf_counter() - started, scored + len(scores)
            if embedder is not None and (batch["target"] == 0).any():
                normal_features.append(embedder(ready["image"][ready["target"] == 0]).cpu())
            # each tile's pixel map, shrunk to PIXEL_MAP_SIDE² for the slide's stitched pixel heatmap (whole
            # tiles only: a centre crop's map would not cover its tile)
            small = F.interpolate(maps, size=(PIXEL_MAP_SIDE,) * 2, mode="area")[:, 0].numpy() \
                if maps is not None and test_crop == "none" else None
            for i in range(len(scores)):
                slide, target = batch["slide_id"][i], int(batch["target"][i])
                per_slide.setdefault(slide, []).append((batch["level0_yx"][i].numpy(), float(scores[i]),
                                                        int(batch["index"][i]), target, batch["group"][i],
                                                        small[i] if small is not None else None))
                if target < 0:
                    continue  # "uncertain": partly annotated, neither normal nor anomalous
                if len(shown[target]) < 8:
                    shown[target].append(ready["image"][i].cpu())
                has_mask = bool(batch["has_mask"][i]) if "has_mask" in batch else False
                case = "{}@{},{}".format(slide, *batch["level0_yx"][i].tolist())
                metrics.add(float(scores[i]), target, batch["group"][i],
                            maps[i, 0].numpy() if maps is not None and has_mask else None,
                            batch["mask"][i, 0].numpy() if has_mask else None, case_id=case)
                for name, values in parts.items():
                    extras.setdefault(f"term/{name}", AnomalyMetrics()).add(float(values[i]), target,
                                                                            batch["group"][i], case_id=case)
        for slide, entries in per_slide.items():
            label, group = slide_label([e[3] for e in entries], [e[4] for e in entries])
            if label is not None:
                extras.setdefault("slides", AnomalyMetrics()).add(
                    slide_score(np.array([e[1] for e in entries]), slide_top_fraction), label, group, case_id=slide)
            rows = stream.tiles.iloc[[e[2] for e in entries]]
            footprint = float((rows["size"] * 2 ** rows["level"].astype(int)).iloc[0])
            write_heatmap(store, slide, heatmap, np.stack([e[0] for e in entries]), footprint,
                          scores=np.array([e[1] for e in entries]))
            render_overlay(store, slide, out / "heatmaps" / f"{slide}.png", heatmap=heatmap,
                           title=f"{slide}: {method.method_name} scores")
            names.append(f"{slide}.png")
            if entries[0][5] is not None:  # the method localises: its pixel maps stitched, finer than tiles
                info = zarr.open_group(str(store_path(store) / "slides" / slide), mode="r").attrs["tessera"]
                downsample = max(1, int(footprint // PIXEL_MAP_SIDE), -(-max(info["level0_shape"]) // 8192))
                write_heatmap(store, slide, f"{heatmap}-pixels", np.stack([e[0] for e in entries]), footprint,
                              maps=np.stack([e[5] for e in entries]), downsample=downsample)
                render_overlay(store, slide, out / "heatmaps" / f"{slide}.pixels.png", heatmap=f"{heatmap}-pixels",
                               title=f"{slide}: {method.method_name} pixel maps")
                names.append(f"{slide}.pixels.png")
    if (shown[0] or shown[1]) and (env is None or env.is_main):  # from the main rank's share
        _write_reconstructions(method, shown, device, out)
    generator = _generator_metrics(method, embedder, normal_features, env, device) if embedder is not None else None
    parts = _gather(env, (metrics, names, extras))
    settings = {"method_options": options or {}, "store": str(store), "heatmap": heatmap,
                "slide_top_fraction": slide_top_fraction, "seconds_per_tile": scoring / max(scored, 1)}  # the main rank's scoring time, loading excluded
    return _write_outputs(out, run_dir, parts, settings, {"generator": generator} if generator else None) \
        if parts is not None else None


def _generator_embedder(method, device):
    """The feature network of a generator's FD/KD (the method's ``metrics_feature``, else the offline
    surrogate); None for methods that generate nothing."""
    from core.methods.base import Method

    if type(method).generated is Method.generated:
        return None
    from core.generator_metrics import Embedder

    config = method.config
    return Embedder(getattr(config, "metrics_feature", "efficientnet_lite0"),
                    getattr(config, "inception_weights", None)).to(device)


def _generator_metrics(method, embedder, normal_features: list, env, device) -> dict | None:
    """FD/KD of as many generated images as the split has normal tiles, against those tiles, beside
    real against real: each rank embeds its normals and generates its share (seeds by rank), the main
    rank computes. None where there are too few normal tiles."""
    from core.generator_metrics import metric_names, with_baseline

    real = torch.cat(normal_features) if normal_features else torch.zeros(0, embedder.num_features, dtype=torch.float64)
    rank = env.rank if env is not None else 0
    fakes = [embedder(method.generated(min(64, len(real) - i), rank * 10**6 + i)).cpu() for i in range(0, len(real), 64)]
    fake = torch.cat(fakes) if fakes else torch.zeros_like(real)
    if env is not None and env.world_size > 1:
        import torch.distributed as dist

        shares = [None] * env.world_size
        dist.all_gather_object(shares, (real, fake))
        real, fake = torch.cat([s[0] for s in shares]), torch.cat([s[1] for s in shares])
        if not env.is_main:
            return None
    if len(real) < 4:
        return None
    out = with_baseline(real, fake, kid_subset_size=min(len(real) // 2, 1000))
    fd, kd = metric_names(embedder.feature)
    return {fd: out["fd"], f"{fd} real": out["fd_real"], kd: out["kd"], f"{kd} real": out["kd_real"],
            "images": out["images"]}


def _write_reconstructions(method, shown: dict, device, out: Path) -> None:
    """reconstructions.png: up to 8 normal tiles over their reconstructions, then up to 8 anomalous ones
    over theirs, for methods that reconstruct (Method.reconstruction)."""
    from torchvision.utils import save_image

    rows = []
    for target in (0, 1):
        if not shown[target]:
            continue
        images = torch.stack(shown[target]).float().to(device)
        rebuilt = method.reconstruction(images)
        if rebuilt is None:
            return
        pad = 8 - len(images)
        blank = torch.ones(pad, *images.shape[1:], device=device)
        rows += [torch.cat([images, blank]), torch.cat([rebuilt.float().clamp(0, 1), blank])]
    save_image(torch.cat(rows).cpu(), out / "reconstructions.png", nrow=8, padding=2, pad_value=1.0)


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
                  level: float = 0.95) -> dict:
    """Image AUROC of evaluation A against B on the same items, overall and per group, with paired
    bootstrap intervals of the difference (core.metrics.paired_auroc_difference); likewise pixel AP
    (core.metrics.paired_pixel_difference) where both have pixel maps. ``a`` and ``b`` are
    each a run directory or evaluation folder, or a list of them (e.g. one run per seed: that side's
    AUROC is their mean). Writes ``compare.json`` and a forest plot ``compare.png`` into ``out``
    (default A's first evaluation folder / compare-<B's first run>) and returns what it wrote."""
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
            anomalous_p = (pixels["labels"] == 1) & (True if name == "overall" else pixels["groups"] == name)
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


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """One file that scores without the run directory: weights, method config, the run's data config."""
    from core.run_config import load_config

    run_dir = Path(run_dir)
    method, saved = load_method(run_dir)
    config = load_config(run_dir / "config.yaml")
    # the file's state plus what the run's statistics add to weights saved before a buffer existed (MKD's
    # map scale); the file's own values stay (the loaded method's generator holds G_ema, not G)
    state = {**method.state_dict(), **saved["state"]}
    bundle = {"method_json": saved["method_json"], "state": state, "averaged": saved.get("averaged"),
              "ema": saved.get("ema"),
              "config_json": json.dumps(config.model_dump(mode="json")), "source_run": str(run_dir.resolve()),
              "code": (run_dir / "git.txt").read_text() if (run_dir / "git.txt").is_file() else ""}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_file(bundle, out, EXPORT_FORMAT)


def slide_label(targets: list[int], groups: list[str]) -> tuple[int | None, str]:
    """A slide's (label, group) from its tiles': anomalous (1) when any tile is, with the most common group
    of those tiles; normal (0) when all are normal; None when its tiles are all uncertain."""
    anomalous = [g for t, g in zip(targets, groups) if t == 1]
    if anomalous:
        return 1, max(set(anomalous), key=anomalous.count)
    return (0, "") if any(t == 0 for t in targets) else (None, "")


def slide_score(tile_scores: np.ndarray, top_fraction: float = 0.05) -> float:
    """Mean of the highest ``top_fraction`` of tile scores: one focal lesion still lifts the slide."""
    ranked = np.sort(np.asarray(tile_scores))[::-1]
    return float(ranked[: max(1, int(np.ceil(top_fraction * len(ranked))))].mean())


@torch.no_grad()
def score_inputs(model: str | Path, inputs: list[str], out: str | Path, batch_size: int = 32) -> Path:
    """Score slides and volumes never ingested: ingest them into ``out/store.zarr`` with the run's data
    settings, then write ``scores.csv`` (slide score = mean of the top 5% tile scores; a volume's, its
    sample score) with slide heatmaps and PNG overlays, and for volumes MOOD's outputs in ``out/mood``."""
    import csv

    from torch.utils.data import DataLoader

    from data_plane.heatmap import render_overlay, write_heatmap
    from data_plane.ingest import ingest, resolve_sources
    from data_plane.stream import GridStream
    from core.run_config import RunConfig, load_config

    model = Path(model)
    if model.is_dir():
        method, _ = load_method(model)
        config = load_config(model / "config.yaml")
    else:
        if not model.is_file() or not zipfile.is_zipfile(model):
            raise ValueError(f"'{model}' is neither a run directory nor a `tessera export` file")
        bundle = load_file(model, EXPORT_FORMAT, "exported model")  # refuses anything that is not safe to read
        method, _ = load_method(model)
        config = RunConfig.model_validate(json.loads(bundle["config_json"]))
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = out / "store.zarr"
    report = ingest(resolve_sources(inputs), store, config.data, show_progress=False)
    rows = [{"slide_id": slide, "score": "", "tiles": 0, "error": reason} for slide, reason in report.failed.items()]
    volumes = _ingested_volumes(store)
    slides = [item for item in report.done + report.skipped if item not in volumes]
    rows += _score_new_volumes(method, config, store, [i for i in report.done + report.skipped if i in volumes],
                               out, batch_size, model if model.is_dir() else None)
    (out / "heatmaps").mkdir(exist_ok=True)
    for slide in slides:
        stream = GridStream(store, [slide], stain=config.data.stain)
        scores, coords = [], []
        for item in DataLoader(stream, batch_size=batch_size, num_workers=0):
            image_scores, _ = method.score(on_device(item, torch.device("cpu")))
            scores.append(image_scores.numpy())
            coords.append(item["level0_yx"].numpy())
        if not scores:
            rows.append({"slide_id": slide, "score": "", "tiles": 0, "error": "no tissue tiles"})
            continue
        scores, coords = np.concatenate(scores), np.concatenate(coords)
        footprint = float((stream.tiles["size"] * 2 ** stream.tiles["level"].astype(int)).iloc[0])
        write_heatmap(store, slide, "score", coords, footprint, scores=scores)
        render_overlay(store, slide, out / "heatmaps" / f"{slide}.png", heatmap="score")
        rows.append({"slide_id": slide, "score": f"{slide_score(scores):.6f}", "tiles": len(scores), "error": ""})
    with open(out / "scores.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["slide_id", "score", "tiles", "error"])
        writer.writeheader()
        writer.writerows(rows)
    return out / "scores.csv"


def _ingested_volumes(store) -> set[str]:
    from data_plane.volumes import volume_index

    try:
        return set(volume_index(store)["volume_id"])
    except FileNotFoundError:
        return set()


def _score_new_volumes(method, config, store, ids: list[str], out: Path, batch_size: int,
                       run_dir: Path | None) -> list[dict]:
    """`tessera score` of volumes: each scored slice by slice as evaluation does (the run's slice axis,
    size and smoothing, and the normal baseline its evaluation cached in RUN_DIR/baselines when the
    volume has its shape), written as MOOD outputs (out/mood/pixel/<case>.nii.gz in the input's own grid,
    out/mood/sample/<case>.txt) and a scores.csv row. A run trained on tiles cannot score a volume: each
    gets a row that says so."""
    if not ids:
        return []
    if config.train.data not in ("slices", "slice_pairs"):
        return [{"slide_id": v, "score": "", "tiles": 0, "error": "a volume needs a run trained on slices "
                 f"(train.data: slices); this one was trained on {config.train.data}"} for v in ids]
    from data_plane.volumes import write_volume_scores

    settings = config.data.volume_stream
    stream_config = settings.model_copy(update={"splits": ["train"], "groups": None, "labels": None,
                                                "min_foreground": 0.0, "augment": "none"})
    scores, _ = score_volumes(method, store, stream_config, ids, batch_size, 0, False, torch.device("cpu"),
                              "score volumes")
    baseline = None
    cached = run_dir / "baselines" / f"{settings.normal_baseline}-sigma{settings.score_smoothing:g}.npz" \
        if run_dir is not None and settings.normal_baseline else None
    if cached is not None and cached.is_file():
        with np.load(cached, allow_pickle=False) as saved:
            baseline = saved["mean"]
    reduce = getattr(method, "sample_score", volume_score)
    rows = []
    for volume_id in ids:
        voxels = smooth_scores(scores[volume_id], settings.score_smoothing)
        fits = baseline is not None and baseline.shape == voxels.shape
        sample = reduce(voxels - baseline if fits else voxels)
        write_volume_scores(store, volume_id, "score", voxels, sample, out_dir=out / "mood")
        note = ""
        if settings.normal_baseline and not fits:
            note = ("scored without the run's normal baseline: " +
                    ("it has another shape (not registered to the training template)" if baseline is not None else
                     "none cached; `tessera eval` the run once to cache it"))
        rows.append({"slide_id": volume_id, "score": f"{sample:.6f}", "tiles": int(voxels.shape[settings.slice_axis]),
                     "error": note})
    return rows


def volume_score(voxel_scores: np.ndarray, top_fraction: float = 0.001) -> float:
    """Mean of the highest 0.1% voxel scores (at least 10): a focal outlier lifts the whole volume."""
    flat = np.sort(voxel_scores.ravel())[::-1]
    return float(flat[: max(10, int(top_fraction * flat.size))].mean())


def pooled_slice_term(values: list[tuple[float, float]], min_foreground: float, top_fraction: float = 0.1) -> float:
    """A volume's value of a per-slice score term: the mean of the highest tenth over the slices with as
    much foreground as training used (empty slices, never trained on, would otherwise dominate)."""
    kept = np.sort([v for f, v in values if f >= min_foreground] or [v for _, v in values])[::-1]
    return float(kept[: max(1, int(round(top_fraction * len(kept))))].mean())


def smooth_scores(voxel_scores: np.ndarray, sigma: float) -> np.ndarray:
    """A reassembled score volume smoothed by a 3D Gaussian of ``sigma`` voxels (0: unchanged)."""
    if not sigma:
        return voxel_scores
    from scipy import ndimage

    return ndimage.gaussian_filter(np.asarray(voxel_scores, np.float32), sigma, mode="nearest")


def _unsquare(maps: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Undo SliceStream's pad-to-square and resize: (S, S) maps back to (height, width) planes."""
    import torch.nn.functional as F

    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    full = F.interpolate(maps[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    return full[:, top:top + height, left:left + width].numpy()


@torch.no_grad()
def score_volumes(method, store, stream_config, ids: list[str], batch_size: int, workers: int, show: bool,
                   device: torch.device, description: str, terms: dict | None = None) -> tuple[dict, dict]:
    """Score ``ids`` slice by slice: their reassembled (unsmoothed) voxel score volumes and index rows.
    With ``terms`` (a dict) and a method with score terms, each volume's per-slice terms are added to it:
    ``terms[volume_id][name]`` lists (slice foreground fraction, value)."""
    from torch.utils.data import DataLoader

    from data_plane.progress import track
    from data_plane.volume_stream import SliceStream

    stream = SliceStream(store, stream_config.model_copy(update={"ids": ids}), shuffle=False).batched(batch_size)
    axis = stream_config.slice_axis
    volumes = {row.volume_id: row for row in stream.volumes.itertuples(index=False)}
    scores = {v: np.zeros((row.shape_z, row.shape_y, row.shape_x), np.float32) for v, row in volumes.items()}
    batches = DataLoader(stream, batch_size=None, num_workers=workers)
    for batch in track(batches, total=len(stream), description=description, show=show):
        _, maps, parts = _scored(method, on_device(batch, device))
        maps = maps.float().cpu()
        if terms is not None and parts:
            foreground = (batch["image"] != 0).flatten(1).float().mean(1)
            for name, values in parts.items():
                for i, volume_id in enumerate(batch["volume_id"]):
                    terms.setdefault(volume_id, {}).setdefault(name, []).append((float(foreground[i]),
                                                                                 float(values[i])))
        for i, volume_id in enumerate(batch["volume_id"]):
            plane_shape = [s for a, s in enumerate(scores[volume_id].shape) if a != axis]
            plane = _unsquare(maps[i], *plane_shape)[0]
            index = [slice(None)] * 3
            index[axis] = int(batch["slice"][i])
            scores[volume_id][tuple(index)] = plane
    return scores, volumes


def _check_baseline_shape(volume_id: str, shape: tuple, expected: tuple | None, split: str) -> None:
    if expected is not None and tuple(shape) != tuple(expected):
        raise ValueError(f"normal_baseline needs volumes of one shape (registered to one template): '{volume_id}' "
                         f"is {tuple(shape)}, the normals of split '{split}' {tuple(expected)}")


def normal_baseline(run_dir: Path, method, stream_config, store, batch_size: int, workers: int, show: bool,
                    device: torch.device, env=None, run_store=None) -> np.ndarray:
    """The voxel-wise mean of the smoothed score volumes of the normal volumes of split
    ``stream_config.normal_baseline``: where the model's false positives on normal anatomy recur.

    The normals come from ``store`` (the one evaluated) when it holds some of that split, else from
    ``run_store`` (the run's own training store): a store of new test volumes needs no normals of its own.
    Cached in RUN_DIR/baselines/ (written whole, then renamed) and recomputed when the weights, the
    method options, σ, the store or the split's volumes change. With several ranks each scores its share.
    """
    from data_plane.store import store_path
    from data_plane.volume_stream import select_volumes
    from data_plane.volumes import volume_index

    split = stream_config.normal_baseline
    config = stream_config.model_copy(update={"splits": [split], "labels": ["normal"], "groups": None, "ids": None,
                                              "normal_baseline": None})
    ids = sorted(set(select_volumes(volume_index(store), config)["volume_id"]))
    if not ids and run_store is not None and store_path(run_store) != store_path(store):
        store = run_store
        ids = sorted(set(select_volumes(volume_index(store), config)["volume_id"]))
    if not ids:
        raise ValueError(f"normal_baseline: split '{split}' of store '{store}' has no normal volume to build "
                         "the normative score map from; name a split with normals or set it to null")
    weights = run_dir / "final.pt"
    key = {"split": split, "ids": ids, "sigma": stream_config.score_smoothing, "store": str(store_path(store)),
           "slice_axis": stream_config.slice_axis, "slice_size": stream_config.slice_size,
           "options": method.config.model_dump(mode="json") if hasattr(method, "config") else None,
           "weights": [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None}
    folder = run_dir / "baselines"
    path = folder / f"{split}-sigma{stream_config.score_smoothing:g}.npz"
    cached = None
    if env is None or env.is_main:
        if path.is_file():
            with np.load(path, allow_pickle=False) as saved:
                if json.loads(str(saved["key"])) == key:
                    cached = saved["mean"]
    if env is not None and env.world_size > 1:
        import torch.distributed as dist

        found = [cached is not None]
        dist.broadcast_object_list(found, src=0)
        if found[0]:
            holder = [cached]
            dist.broadcast_object_list(holder, src=0)
            return holder[0]
    elif cached is not None:
        return cached
    mine = _share(ids, env)
    scores, _ = score_volumes(method, store, config, mine, batch_size, workers, show, device,
                               f"baseline {split} normals") if mine else ({}, {})
    total = None
    for volume_id, volume in scores.items():
        volume = smooth_scores(volume, stream_config.score_smoothing)
        _check_baseline_shape(volume_id, volume.shape, None if total is None else total.shape, split)
        total = volume.astype(np.float64) if total is None else total + volume
    if env is not None and env.world_size > 1:
        import torch.distributed as dist

        shapes = [None] * env.world_size
        dist.all_gather_object(shapes, None if total is None else total.shape)
        shape = next(s for s in shapes if s is not None)
        for rank, other in enumerate(shapes):
            _check_baseline_shape(f"a volume of rank {rank}", other or shape, shape, split)
        summed = torch.from_numpy(total) if total is not None else torch.zeros(shape, dtype=torch.float64)
        dist.all_reduce(summed)
        total = summed.numpy()
    mean = (total / len(ids)).astype(np.float32)
    if env is None or env.is_main:
        folder.mkdir(exist_ok=True)
        partial = path.with_suffix(".partial.npz")
        np.savez(partial, mean=mean, key=json.dumps(key))
        partial.replace(path)
    return mean


@torch.no_grad()
def evaluate_volumes(run_dir: Path, config, store, split: str, groups, batch_size: int, workers: int,
                     show_progress: bool, env=None, device: torch.device | None = None, options: dict | None = None,
                     out: Path | None = None) -> dict | None:
    """Score volumes slice by slice, reassemble voxel score volumes, write MOOD outputs and metrics
    (with several ranks: each its share of the volumes, gathered on the main rank)."""
    from data_plane.store import store_path
    from data_plane.volume_stream import select_volumes
    from data_plane.volumes import volume_array, volume_index, write_volume_scores

    device = device or torch.device("cpu")
    method, _ = load_method(run_dir, options)
    method.to(device)
    stream_config = config.data.volume_stream.model_copy(update={"splits": [split], "groups": _with_normals(groups),
                                                                 "labels": None,
                                                                 "min_foreground": 0.0, "augment": "none",
                                                                 "ids": None})
    everything = select_volumes(volume_index(store), stream_config)
    if len(everything) == 0:
        raise ValueError(f"no volume of split '{split}' in store '{store}' passes the run's stream filters")
    mine = _share(everything["volume_id"], env)
    out = Path(out) if out is not None else run_dir / f"eval-{split}"
    (out / "heatmaps").mkdir(parents=True, exist_ok=True)
    show = show_progress and (env is None or env.is_main)
    baseline = None
    if stream_config.normal_baseline:
        baseline = normal_baseline(run_dir, method, stream_config, store, batch_size, workers, show, device, env,
                                   run_store=config.data.store)
    metrics, extras, slice_terms = AnomalyMetrics(), {}, {}
    names = []
    if mine:
        scores, volumes = score_volumes(method, store, stream_config, mine, batch_size, workers, show, device,
                                         f"eval {split}", slice_terms)
        root = store_path(store)
        reduce = getattr(method, "sample_score", volume_score)
        for volume_id, row in volumes.items():
            target = {"normal": 0, "anomalous": 1}.get(row.label, -1)
            scores[volume_id] = smooth_scores(scores[volume_id], stream_config.score_smoothing)
            if baseline is not None:
                _check_baseline_shape(volume_id, scores[volume_id].shape, baseline.shape,
                                      stream_config.normal_baseline)
            sample = reduce(scores[volume_id] - baseline if baseline is not None else scores[volume_id])
            write_volume_scores(store, volume_id, run_dir.name, scores[volume_id], sample, out_dir=out / "mood")
            if target < 0:
                continue
            mask = volume_array(root, volume_id, "mask")[:] if row.has_mask else None
            metrics.add(sample, target, row.group, scores[volume_id] if mask is not None else None, mask,
                        case_id=volume_id)
            for name, values in slice_terms.get(volume_id, {}).items():
                extras.setdefault(f"term/{name}", AnomalyMetrics()).add(
                    pooled_slice_term(values, config.data.volume_stream.min_foreground), target, row.group,
                    case_id=volume_id)
            if target == 1:
                names.append(_volume_figure(root, volume_id, scores[volume_id], mask, out / "heatmaps"))
    parts = _gather(env, (metrics, names, extras))
    settings = {"score_smoothing": stream_config.score_smoothing, "normal_baseline": stream_config.normal_baseline}
    return _write_outputs(out, run_dir, parts, settings) if parts is not None else None


def _volume_figure(root: Path, volume_id: str, scores: np.ndarray, mask, folder: Path) -> str:
    """The axial slice with the most anomaly (by mask, else by score): image, scores, and the mask outline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from data_plane.volumes import volume_array

    image = volume_array(root, volume_id)
    weight = mask if mask is not None and mask.any() else scores
    k = int(np.argmax(weight.reshape(weight.shape[0], -1).sum(1)))
    fig, axes = plt.subplots(1, 2, figsize=(7, 3.6), dpi=100)
    axes[0].imshow(image[k], cmap="gray", origin="lower")
    shown = axes[1].imshow(scores[k], cmap="inferno", origin="lower")
    fig.colorbar(shown, ax=axes[1], fraction=0.046)
    if mask is not None:
        for ax in axes:
            ax.contour(mask[k], levels=[0.5], colors="cyan", linewidths=0.8)
    for ax, title in zip(axes, (f"{volume_id} z={k}", "voxel scores")):
        ax.set_title(title, fontsize=9)
        ax.set_axis_off()
    fig.tight_layout()
    name = f"{volume_id}.png"
    fig.savefig(folder / name)
    plt.close(fig)
    return name
