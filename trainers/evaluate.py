"""Evaluation: score a split with a trained method, write metrics, curves, heatmaps and a page.

``<run_dir>/eval-<split>/`` receives ``metrics.json`` (image AUROC with its bootstrap interval, AP,
and pixel AUROC/AP and DICE where masks exist; overall and per group), ``scores.csv`` (one row per
scored item: id, label, group, score), ``roc.png`` / ``pr.png``, one heatmap overlay per slide under
``heatmaps/`` (the stitched scores are also stored in the store, ``slides/<id>/heatmaps/<run>``), and
``index.html`` showing them together. ``compare_evals`` sets two evaluations of the same items side
by side (`tessera compare`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from core.metrics import AnomalyMetrics
from data_plane.stream import on_device
from core.scoring import slide_score
from data_plane.kinds import reads_volumes
from trainers.export import load_method
from trainers.report import _write_outputs

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


PIXEL_MAP_SIDE = 16  # heat pixels per tile edge in a slide's stitched pixel-map heatmap


def _with_normals(groups: list[str] | None) -> list[str] | None:
    """The groups to score: the chosen anomaly groups and the normal items' (no group, "")."""
    return None if not groups else sorted({*groups, ""})


@torch.no_grad()  # methods that need gradients to score (MKD's maps, projectors) enable them themselves
def new_metrics(pixel_bins: int | None = None) -> AnomalyMetrics:
    """An evaluation's accumulator: exact, with intervals; with ``pixel_bins``, binned pixel scores and no
    intervals (evaluate's quick form)."""
    return AnomalyMetrics(bins=pixel_bins, resamples=0) if pixel_bins else AnomalyMetrics()


def evaluate(run_dir: str | Path, store: str | None = None, split: str = "test", groups: list[str] | None = None,
             batch_size: int = 32, workers: int = 2, show_progress: bool = True, env=None,
             device: torch.device | None = None, score_smoothing: float | None = None,
             normal_baseline: str | None = None, options: dict | None = None,
             out: str | Path | None = None, slide_top_fraction: float = 0.05,
             map_cache: str | Path | None = None, figures: bool = True, pixel_metrics: bool = True,
             pixel_bins: int | None = None) -> dict | None:
    """Score every tile of ``split`` (uncertain tiles excluded) and write the evaluation outputs into
    ``out`` (default ``RUN_DIR/eval-SPLIT``). ``options``: method options for scoring (load_method).

    Tile runs are also judged per slide (``slides`` in metrics.json, ``slide_scores.csv``): a slide's score
    is the mean of its highest ``slide_top_fraction`` of tile scores; it is anomalous when any of its
    tiles is (its group: theirs), normal when all are normal.

    ``score_smoothing`` and ``normal_baseline`` (volume runs) replace the run's
    ``data.volume_stream`` settings of those names; ``normal_baseline="none"`` turns it off.
    ``map_cache`` (volume runs): a folder where raw voxel maps are kept and reused by later evaluations
    of the same weights, options and store (`tessera posthoc` trials).
    ``figures=False`` writes the scores and metrics only: no heatmaps, overlays or reconstructions, and
    nothing into the store (a posthoc trial is judged by its scores; its figures would cost more than
    re-pooling a cached map and would overwrite the run's own heatmaps in the store).
    ``pixel_metrics=False``: image metrics only (pooling the voxels of a split into exact pixel AUROC/AP
    costs ~0.6 s a 2 mm brain, ten times the re-pooling of its cached map). ``pixel_bins``: pixel scores
    rounded to that many levels and no bootstrap intervals, a quick pixel AP for a posthoc trial.

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
    if reads_volumes(config.train.data):
        from trainers.eval_volumes import evaluate_volumes  # which imports this module's rank helpers

        if score_smoothing is not None:
            config.data.volume_stream.score_smoothing = score_smoothing
        if normal_baseline is not None:
            config.data.volume_stream.normal_baseline = None if normal_baseline == "none" else normal_baseline
        return evaluate_volumes(run_dir, config, store, split, groups, batch_size, workers, show_progress, env, device,
                                options, out, Path(map_cache) if map_cache is not None else None, figures,
                                pixel_metrics, pixel_bins)
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
    metrics, extras = new_metrics(pixel_bins), {}
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
                has_mask = pixel_metrics and (bool(batch["has_mask"][i]) if "has_mask" in batch else False)
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
            if not figures:
                continue
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
    if figures and (shown[0] or shown[1]) and (env is None or env.is_main):  # from the main rank's share
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


def slide_label(targets: list[int], groups: list[str]) -> tuple[int | None, str]:
    """A slide's (label, group) from its tiles': anomalous (1) when any tile is, with the most common group
    of those tiles; normal (0) when all are normal; None when its tiles are all uncertain."""
    anomalous = [g for t, g in zip(targets, groups) if t == 1]
    if anomalous:
        return 1, max(set(anomalous), key=anomalous.count)
    return (0, "") if any(t == 0 for t in targets) else (None, "")


