"""`tessera score`: an exported model (or a run) on new slides and volumes, ingested into a scratch
store: per-slide scores and heatmaps, volume scores and MOOD outputs; and how tile scores pool into a
slide's score."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import torch

from core.scoring import slide_score, smooth_scores
from data_plane.kinds import reads_volumes
from data_plane.stream import on_device
from trainers.eval_volumes import score_volumes
from trainers.export import EXPORT_FORMAT, load_method
from trainers.files import load_file


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
    if not reads_volumes(config.train.data):
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
    reduce = method.sample_score
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
