"""Snapshots: every ``train.snapshot_kimg`` thousand images, what the method shows (image grids of fakes
and reconstructions, metrics such as FID/KID) goes into ``RUN_DIR/snapshots/kimg<NNNNNN>/`` with the
weights of that moment (``model.pt``, the final.pt format; ``kimg000012.800`` = 12 800 images), into metrics.jsonl and TensorBoard; the best
snapshot by ``train.snapshot_metric`` is kept as ``best.pt`` (``best.json`` says which)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import torch

from data_plane.store import atomic_write


def due(images_before: int, images_after: int, snapshot_kimg: float | None) -> bool:
    """Whether a step from ``images_before`` to ``images_after`` images crossed a multiple of the period."""
    if not snapshot_kimg:
        return False
    period = snapshot_kimg * 1000
    return math.floor(images_after / period) > math.floor(images_before / period)


def write_snapshot(run_dir: Path, kimg: float, shown: dict | None, save_weights, metric: str | None,
                   mode: str, log) -> dict:
    """Write one snapshot; returns its metrics record (``{"snapshot_kimg": …, "snapshot/<name>": …}``)."""
    from torchvision.utils import save_image

    folder = Path(run_dir) / "snapshots" / f"kimg{kimg:010.3f}"  # sorts by time: kimg000012.800
    folder.mkdir(parents=True, exist_ok=True)
    shown = shown or {}
    for name, images in (shown.get("images") or {}).items():
        images = images.detach().float().cpu().clamp(0, 1)
        save_image(images, folder / f"{name}.png", nrow=max(1, int(math.sqrt(len(images)))))
    metrics = {k: float(v) for k, v in (shown.get("metrics") or {}).items()}
    save_weights(folder / "model.pt")
    (folder / "metrics.json").write_text(json.dumps({"kimg": kimg, **metrics}, indent=1))
    if metrics:
        plot_curves(Path(run_dir) / "snapshots")
    record = {"snapshot_kimg": kimg, **{f"snapshot/{k}": v for k, v in metrics.items()}}
    if metric is not None:
        if metric not in metrics:
            log(f"warning: train.snapshot_metric '{metric}' is not among the snapshot's metrics "
                f"({', '.join(metrics) or 'none'}); no best snapshot is kept")
        else:
            best_file = Path(run_dir) / "best.json"
            best = json.loads(best_file.read_text()) if best_file.is_file() else None
            better = best is None or (metrics[metric] < best["value"] if mode == "min" else metrics[metric] > best["value"])
            if better:
                atomic_write(Path(run_dir) / "best.pt", lambda partial: shutil.copyfile(folder / "model.pt", partial))
                best_file.write_text(json.dumps({"metric": metric, "value": metrics[metric], "kimg": kimg,
                                                 "snapshot": folder.name}, indent=1))
                log(f"best snapshot so far: {metric} = {metrics[metric]:.4g} at {kimg:g} kimg -> best.pt")
    return record


def plot_curves(folder: Path) -> Path:
    """``snapshots/curves.png``: every snapshot metric against kimg, one panel per metric, a metric's
    baseline (``<name> real``: real against real) dashed in its panel. Redrawn after each snapshot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(f.read_text()) for f in sorted(folder.glob("kimg*/metrics.json"))]
    names = sorted({k for r in rows for k in r if k != "kimg" and not k.endswith(" real")})
    fig, axes = plt.subplots(1, max(len(names), 1), figsize=(4 * max(len(names), 1), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names):
        points = [(r["kimg"], r[name]) for r in rows if name in r]
        ax.plot(*zip(*points), marker="o", label="generated vs real")
        baseline = [(r["kimg"], r[f"{name} real"]) for r in rows if f"{name} real" in r]
        if baseline:
            ax.plot(*zip(*baseline), linestyle="--", color="grey", label="real vs real")
            ax.legend(fontsize=7)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("kimg")
    fig.tight_layout()
    out = folder / "curves.png"
    atomic_write(out, lambda partial: fig.savefig(partial, format="png", dpi=110))
    plt.close(fig)
    return out


def first_batch(stream, device, to_device) -> dict:
    """The stream's first batch, read without moving it (the reals every snapshot shows, like
    StyleGAN2-ADA's fixed grid); global random states are left as they were."""
    import numpy as np

    with torch.random.fork_rng(devices=[]):
        numpy_state = np.random.get_state()
        batch = next(iter(stream.endless(0)))
        np.random.set_state(numpy_state)
    batch.pop("global_batch", None)
    batch.pop("epoch", None)
    return to_device(batch, device, torch.float32)
