"""Evaluation of volume runs: slices scored and reassembled into voxel score volumes (smoothed, minus
the normal baseline where configured), MOOD's outputs, pooled pixel metrics, sample scores and
figures; the normal baseline is computed once per run and reused for any store."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from core.metrics import AnomalyMetrics
from core.scoring import pooled_slice_term, share_of_top_inside, smooth_scores
from data_plane.stream import on_device
from trainers.evaluate import _gather, _scored, _share, _with_normals, new_metrics
from trainers.export import load_method
from trainers.report import _write_outputs


FOUND_SHARE = 0.5  # a map "finds" an anomaly when at least half of its top 0.1 % of voxels lie inside the mask


def _unsquare(maps: torch.Tensor, height: int, width: int) -> np.ndarray:
    """Undo SliceStream's pad-to-square and resize: (S, S) maps back to (height, width) planes."""
    import torch.nn.functional as F

    side = max(height, width)
    top, left = (side - height) // 2, (side - width) // 2
    full = F.interpolate(maps[:, None].float(), size=(side, side), mode="bilinear", align_corners=False)[:, 0]
    return full[:, top:top + height, left:left + width].numpy()


def map_cache_folder(root: Path, run_dir: Path, method, store, stream_config) -> Path:
    """Where ``score_volumes`` keeps the raw voxel maps of one run's weights, scoring options (those that
    only pool maps into sample scores excepted: ``Method.pooling_options``), store and slicing. A trial
    of `tessera posthoc` that changes σ, the normal baseline or a pooling option then re-pools cached maps
    (seconds) instead of re-scoring every slice (minutes)."""
    import hashlib

    from data_plane.store import store_path

    weights = run_dir / "final.pt"
    options = {k: v for k, v in method.config.model_dump(mode="json").items() if k not in method.pooling_options}
    key = {"run": str(run_dir.resolve()), "store": str(store_path(store).resolve()), "options": options,
           "slice_axis": stream_config.slice_axis, "slice_size": stream_config.slice_size,
           "weights": [weights.stat().st_size, weights.stat().st_mtime_ns] if weights.is_file() else None}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    folder = root / digest
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "key.json").write_text(json.dumps(key, indent=1, sort_keys=True))
    return folder


def _cached_map(cache: Path | None, volume_id: str) -> tuple[np.ndarray, dict] | None:
    path = cache / f"{volume_id}.npz" if cache is not None else None
    if path is None or not path.is_file():
        return None
    with np.load(path, allow_pickle=False) as saved:
        return saved["scores"], json.loads(str(saved["terms"]))


def _cache_map(cache: Path, volume_id: str, scores: np.ndarray, terms: dict) -> None:
    partial = cache / f".{volume_id}.partial.npz"  # renamed whole: a killed trial leaves no half map
    np.savez(partial, scores=scores, terms=json.dumps(terms))
    partial.replace(cache / f"{volume_id}.npz")


@torch.no_grad()
def score_volumes(method, store, stream_config, ids: list[str], batch_size: int, workers: int, show: bool,
                   device: torch.device, description: str, terms: dict | None = None,
                   cache: Path | None = None) -> tuple[dict, dict]:
    """Score ``ids`` slice by slice: their reassembled (unsmoothed) voxel score volumes and index rows.
    With ``terms`` (a dict) and a method with score terms, each volume's per-slice terms are added to it:
    ``terms[volume_id][name]`` lists (slice foreground fraction, value). With ``cache`` (a folder from
    :func:`map_cache_folder`), volumes scored before are read from it and new ones written to it."""
    from torch.utils.data import DataLoader

    from data_plane.progress import track
    from data_plane.volume_stream import SliceStream

    listed = SliceStream(store, stream_config.model_copy(update={"ids": ids}), shuffle=False)
    volumes = {row.volume_id: row for row in listed.volumes.itertuples(index=False)}
    scores, found = {}, {}
    for volume_id in volumes:
        hit = _cached_map(cache, volume_id)
        if hit is not None:
            scores[volume_id], found[volume_id] = hit
            if terms is not None and hit[1]:
                terms[volume_id] = {name: [tuple(v) for v in values] for name, values in hit[1].items()}
    missing = [v for v in volumes if v not in scores]
    if not missing:
        return scores, volumes
    stream = SliceStream(store, stream_config.model_copy(update={"ids": missing}), shuffle=False).batched(batch_size)
    axis = stream_config.slice_axis
    scores.update({v: np.zeros((volumes[v].shape_z, volumes[v].shape_y, volumes[v].shape_x), np.float32)
                   for v in missing})
    mine = {} if cache is not None else terms  # with a cache, every volume's terms are kept to be saved
    batches = DataLoader(stream, batch_size=None, num_workers=workers)
    for batch in track(batches, total=len(stream), description=description, show=show):
        _, maps, parts = _scored(method, on_device(batch, device))
        maps = maps.float().cpu()
        if mine is not None and parts:
            foreground = (batch["image"] != 0).flatten(1).float().mean(1)
            for name, values in parts.items():
                for i, volume_id in enumerate(batch["volume_id"]):
                    mine.setdefault(volume_id, {}).setdefault(name, []).append((float(foreground[i]),
                                                                                float(values[i])))
        for i, volume_id in enumerate(batch["volume_id"]):
            plane_shape = [s for a, s in enumerate(scores[volume_id].shape) if a != axis]
            plane = _unsquare(maps[i], *plane_shape)[0]
            index = [slice(None)] * 3
            index[axis] = int(batch["slice"][i])
            scores[volume_id][tuple(index)] = plane
    if cache is not None:
        for volume_id in missing:
            _cache_map(cache, volume_id, scores[volume_id], mine.get(volume_id, {}))
        if terms is not None:
            terms.update({v: mine[v] for v in missing if v in mine})
    return scores, volumes


def check_baseline_shape(volume_id: str, shape: tuple, expected: tuple | None, split: str) -> None:
    if expected is not None and tuple(shape) != tuple(expected):
        raise ValueError(f"normal_baseline needs volumes of one shape (registered to one template): '{volume_id}' "
                         f"is {tuple(shape)}, the normals of split '{split}' {tuple(expected)}")


def normal_baseline(run_dir: Path, method, stream_config, store, batch_size: int, workers: int, show: bool,
                    device: torch.device, env=None, run_store=None, map_cache: Path | None = None) -> np.ndarray:
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
           "options": method.config.model_dump(mode="json"),
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
    cache = map_cache_folder(map_cache, run_dir, method, store, config) if map_cache is not None else None
    scores, _ = score_volumes(method, store, config, mine, batch_size, workers, show, device,
                               f"baseline {split} normals", cache=cache) if mine else ({}, {})
    total = None
    for volume_id, volume in scores.items():
        volume = smooth_scores(volume, stream_config.score_smoothing)
        check_baseline_shape(volume_id, volume.shape, None if total is None else total.shape, split)
        total = volume.astype(np.float64) if total is None else total + volume
    if env is not None and env.world_size > 1:
        import torch.distributed as dist

        shapes = [None] * env.world_size
        dist.all_gather_object(shapes, None if total is None else total.shape)
        shape = next(s for s in shapes if s is not None)
        for rank, other in enumerate(shapes):
            check_baseline_shape(f"a volume of rank {rank}", other or shape, shape, split)
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
                     out: Path | None = None, map_cache: Path | None = None, figures: bool = True,
                     pixel_metrics: bool = True, pixel_bins: int | None = None) -> dict | None:
    """Score volumes slice by slice, reassemble voxel score volumes, write MOOD outputs and metrics
    (with several ranks: each its share of the volumes, gathered on the main rank). ``map_cache``: a
    folder keeping the raw voxel maps between evaluations of the same weights (see map_cache_folder)."""
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
                                   run_store=config.data.store, map_cache=map_cache)
    metrics, extras, slice_terms = new_metrics(pixel_bins), {}, {}
    names = []
    if mine:
        cache = map_cache_folder(map_cache, run_dir, method, store, stream_config) if map_cache is not None else None
        scores, volumes = score_volumes(method, store, stream_config, mine, batch_size, workers, show, device,
                                         f"eval {split}", slice_terms, cache=cache)
        root = store_path(store)
        reduce = method.sample_score
        for volume_id, row in volumes.items():
            target = {"normal": 0, "anomalous": 1}.get(row.label, -1)
            scores[volume_id] = smooth_scores(scores[volume_id], stream_config.score_smoothing)
            if baseline is not None:
                check_baseline_shape(volume_id, scores[volume_id].shape, baseline.shape,
                                      stream_config.normal_baseline)
            pooled = scores[volume_id] - baseline if baseline is not None else scores[volume_id]
            sample = reduce(pooled)
            if figures:  # MOOD's outputs and the store's score volume (see evaluate's figures)
                write_volume_scores(store, volume_id, run_dir.name, scores[volume_id], sample, out_dir=out / "mood")
            if target < 0:
                continue
            mask = volume_array(root, volume_id, "mask")[:] if row.has_mask and pixel_metrics else None
            metrics.add(sample, target, row.group, scores[volume_id] if mask is not None else None, mask,
                        case_id=volume_id)
            # The anomalies the voxel map finds (most of its peak inside the mask) against every normal: a
            # sample score that pools the map well never ranks those low (metrics.json: found_by_map).
            if target == 0 or (mask is not None and share_of_top_inside(pooled, mask) >= FOUND_SHARE):
                extras.setdefault("found", AnomalyMetrics()).add(sample, target, row.group, case_id=volume_id)
            for name, values in slice_terms.get(volume_id, {}).items():
                extras.setdefault(f"term/{name}", AnomalyMetrics()).add(
                    pooled_slice_term(values, config.data.volume_stream.min_foreground), target, row.group,
                    case_id=volume_id)
            if target == 1 and figures:
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
