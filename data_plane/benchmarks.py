"""Benchmarks built from real data: `tessera make-benchmark brain` (and slide).

Brain: N subjects made from the real MNI152 template (nilearn) by a smooth random elastic
deformation plus intensity and bias-field variation (MONAI random transforms), split like the FPI
paper: 60% train normal, 10% test normal, 30% test anomalous, the anomalous ones carrying MOOD's five
outlier kinds in turn (each kind is a ``group``), placed inside the brain. Written as NIfTI images,
label masks for every test subject (empty for normals) and a manifest CSV that `tessera ingest` reads.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np


def _subject_transform(seed: int):
    from monai.transforms import (Compose, Rand3DElasticd, RandAdjustContrastd, RandBiasFieldd,
                                  RandScaleIntensityd)

    return Compose([
        Rand3DElasticd(["image", "brain"], sigma_range=(6, 9), magnitude_range=(60, 140), prob=1.0,
                       rotate_range=(0.08, 0.08, 0.08), scale_range=(0.06, 0.06, 0.06),
                       mode=("bilinear", "nearest"), padding_mode="zeros"),
        RandBiasFieldd("image", coeff_range=(0.05, 0.2), prob=1.0),
        RandScaleIntensityd("image", factors=0.1, prob=1.0),
        RandAdjustContrastd("image", gamma=(0.85, 1.2), prob=1.0),
    ]).set_random_state(seed=seed)


def split_counts(subjects: int) -> tuple[int, int, int]:
    """(train normal, test normal, test anomalous): 60 / 10 / 30 %, at least one of each test kind."""
    test_normal = max(1, round(0.1 * subjects))
    anomalous = max(1, round(0.3 * subjects))
    return subjects - test_normal - anomalous, test_normal, anomalous


def make_brain_benchmark(out: str | Path, subjects: int = 20, resolution: int = 2, seed: int = 0,
                         show_progress: bool = True) -> Path:
    """Write the benchmark into ``out``; returns the manifest CSV."""
    import nibabel
    import torch
    from nilearn import datasets
    from rich.progress import track

    from core.anomalies import OUTLIER_KINDS, mood_outlier

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(exist_ok=True)
    template = datasets.load_mni152_template(resolution=resolution)
    brain = datasets.load_mni152_brain_mask(resolution=resolution)
    affine = template.affine
    t1 = np.asarray(template.dataobj, np.float32)
    brain_mask = np.asarray(brain.dataobj, np.float32) > 0.5
    n_train, n_test_normal, n_anomalous = split_counts(subjects)
    rows = []
    examples = {}
    steps = range(subjects)
    for i in (track(steps, description="brain subjects") if show_progress else steps):
        sample = _subject_transform(seed * 100_003 + i)({"image": t1[None], "brain": brain_mask[None].astype(np.float32)})
        image = torch.as_tensor(sample["image"]).float()
        foreground = torch.as_tensor(sample["brain"])[0] > 0.5
        inside = image[0][foreground]
        low, high = torch.quantile(inside, 0.005), torch.quantile(inside, 0.995)
        image = ((image - low) / (high - low)).clamp(0, 1) * foreground  # [0, 1], background 0
        name = f"subject_{i:03d}"
        split, label, group = "train", "normal", ""
        mask = None
        if i >= n_train:
            split = "test"
            mask = torch.zeros_like(foreground)
            if i >= n_train + n_test_normal:
                label, group = "anomalous", OUTLIER_KINDS[(i - n_train - n_test_normal) % len(OUTLIER_KINDS)]
                rng = np.random.default_rng((seed, i))
                image, mask = mood_outlier(image, group, rng, foreground=foreground, radius_range=(0.08, 0.18))
                examples.setdefault(group, (image[0].numpy(), mask.numpy()))
        path = out / "images" / f"{name}.nii.gz"
        nibabel.Nifti1Image(image[0].numpy().astype(np.float32), affine).to_filename(path)
        mask_path = ""
        if mask is not None:
            mask_path = out / "labels" / f"{name}.nii.gz"
            nibabel.Nifti1Image(mask.numpy().astype(np.uint8), affine).to_filename(mask_path)
            mask_path = str(mask_path.relative_to(out))
        rows.append({"path": str(path.relative_to(out)), "label": label, "split": split, "mask": mask_path,
                     "group": group})
    manifest = out / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["path", "label", "split", "mask", "group"])
        writer.writeheader()
        writer.writerows(rows)
    if examples:
        montage(examples, out / "montage.png")
    return manifest


def montage(examples: dict[str, tuple[np.ndarray, np.ndarray]], path: Path) -> Path:
    """One axial slice through the centre of each outlier, with its mask outlined."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(examples), figsize=(3 * len(examples), 3.4), dpi=110)
    for ax, (kind, (image, mask)) in zip(np.atleast_1d(axes), examples.items()):
        k = int(np.round(np.nonzero(mask)[2].mean()))  # axis 2 of the (i, j, k) RAS array is superior
        ax.imshow(np.rot90(image[:, :, k]), cmap="gray", vmin=0, vmax=1)
        ax.contour(np.rot90(mask[:, :, k]), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(kind.replace("_", " "), fontsize=10)
        ax.set_axis_off()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
