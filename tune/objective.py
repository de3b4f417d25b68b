"""What a trial reports: the validation AUROC of a fold's model on its held-out normal items against
the known validation anomalies (image level: tiles, or whole volumes from reassembled voxel scores),
and, for the unsupervised comparison, its training loss on the held-out normals."""

from __future__ import annotations

import numpy as np
import torch

from core.schedule import StepState
from data_plane.stream import on_device
from tune.folds import Folds


def leave_one_out_baseline(maps: dict[str, np.ndarray], normals: list[str], fold: int = 0) -> dict[str, np.ndarray]:
    """Tune's stand-in for ``data.volume_stream.normal_baseline``: each smoothed score map minus the
    mean map of the fold's held-out normals, leaving out the map itself (a normal's own false
    positives would cancel). Evaluation takes the mean over a split's normals instead; scoring all of
    them for every trial would cost more than the trial's training. Maps are replaced in place."""
    from trainers.eval_volumes import check_baseline_shape

    if len(normals) < 2:
        raise ValueError(f"data.volume_stream.normal_baseline: tune's validation subtracts the mean score map of "
                         f"the other held-out normals, and fold {fold} holds out {len(normals)}; use fewer folds "
                         "or set normal_baseline: null for the search")
    shape = maps[normals[0]].shape
    for v, volume in maps.items():
        check_baseline_shape(v, volume.shape, shape, f"fold {fold}")
    total = sum(maps[v].astype(np.float64) for v in normals)
    held = set(normals)
    for v in list(maps):
        others = (total - maps[v]) / (len(normals) - 1) if v in held else total / len(normals)
        maps[v] = maps[v] - others.astype(np.float32)
    return maps


@torch.no_grad()
def validate(method, config, folds: Folds, k: int, device=torch.device("cpu"), batch_size: int = 32,
             loss_batches: int = 8) -> dict:
    """{"val_auroc": …, "val_loss": …, "scores": [[item, label, score], …]} of ``method`` (left in eval
    mode) for fold ``k``; the per-item scores let tune/budget.py redo the choice with fewer anomalies."""
    from sklearn.metrics import roc_auc_score

    method.eval()
    held, anomalies = set(folds.folds[k]), set(folds.anomalies)
    splits = sorted({"train", config.tune.val_split})
    if folds.kind == "tiles":
        from data_plane.stream import TileStream

        stream_config = config.data.stream.model_copy(update={
            "splits": splits, "ids": sorted(held | anomalies), "labels": ["normal", "anomalous"], "groups": None,
            "crop": config.data.stream.eval_crop, "augment": "none", "max_tiles_per_slide": None})
        stream = TileStream(config.data.store, stream_config, stain=config.data.stain, shuffle=False)
        labels, scores, items = [], [], []
        for batch in stream.batched(batch_size):
            batch_scores = method.score(on_device(batch, device))[0].float().cpu().numpy()
            for item, target, score in zip(batch["slide_id"], batch["target"].tolist(), batch_scores):
                if (item in held and target == 0) or (item in anomalies and target == 1):
                    labels.append(target)
                    scores.append(float(score))
                    items.append(item)
        normal_stream = TileStream(config.data.store, stream_config.model_copy(update={
            "ids": sorted(held), "crop": config.data.stream.crop, "crop_size": config.data.stream.crop_size}),
            stain=config.data.stain, shuffle=False)
    else:
        from data_plane.volume_stream import SliceStream
        from core.scoring import smooth_scores
        from trainers.eval_volumes import score_volumes

        stream_config = config.data.volume_stream.model_copy(update={
            "splits": splits, "labels": None, "groups": None, "min_foreground": 0.0, "augment": "none"})
        voxels, _ = score_volumes(method, config.data.store, stream_config, sorted(held | anomalies), batch_size,
                                   0, False, device, "")
        reduce = method.sample_score
        items = list(voxels)
        labels = [1 if v in anomalies else 0 for v in items]
        for v in items:
            voxels[v] = smooth_scores(voxels[v], stream_config.score_smoothing)
        if stream_config.normal_baseline:
            voxels = leave_one_out_baseline(voxels, [v for v in items if v not in anomalies], k)
        scores = [reduce(voxels[v]) for v in items]
        normal_stream = SliceStream(config.data.store, config.data.volume_stream.model_copy(update={
            "splits": ["train"], "ids": sorted(held), "labels": None, "groups": None}), shuffle=False)
    losses = []
    torch.manual_seed(0)  # the same synthetic draws for every trial: losses compare
    for i, batch in enumerate(normal_stream.batched(batch_size)):
        if i >= loss_batches:
            break
        losses.append(float(sum(method.training_step(on_device(batch, device), StepState()).values())))
    both = len(set(labels)) == 2
    return {"val_auroc": float(roc_auc_score(labels, scores)) if both else float("nan"),
            "val_loss": float(np.mean(losses)) if losses else float("nan"),
            "val_normals": labels.count(0), "val_anomalies": labels.count(1),
            "scores": [[item, int(label), float(score)] for item, label, score in zip(items, labels, scores)]}
