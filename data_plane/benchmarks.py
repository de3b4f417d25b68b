"""Benchmarks built from real data: `tessera make-benchmark brain` and `tessera make-benchmark slide`.

Brain: N subjects made from the real MNI152 template (nilearn) by a smooth random elastic
deformation plus intensity and bias-field variation (MONAI random transforms), split like the FPI
paper: 60% train normal, 10% test normal, 30% test anomalous, the anomalous ones carrying MOOD's five
outlier kinds in turn (each kind is a ``group``), placed inside the brain. Written as NIfTI images,
label masks for every test subject (empty for normals) and a manifest CSV that `tessera ingest` reads.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Sequence

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


def write_manifest(path: Path, rows: list[dict]) -> Path:
    """The manifest CSV `tessera ingest --manifest` reads; columns in the order of the first row."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def split_counts(subjects: int) -> tuple[int, int, int]:
    """(train normal, test normal, test anomalous): 60 / 10 / 30 %, at least one of each test kind."""
    test_normal = max(1, round(0.1 * subjects))
    anomalous = max(1, round(0.3 * subjects))
    return subjects - test_normal - anomalous, test_normal, anomalous


def contaminated(count: int, fraction: float, seed: int) -> list[int]:
    """Which of ``count`` training items carry an unlabelled anomaly: round(fraction × count) of them,
    chosen by their own random stream so that nothing else of the benchmark changes with ``fraction``."""
    if not 0 <= fraction < 1:
        raise ValueError(f"contaminate must be a fraction in [0, 1), got {fraction}")
    chosen = np.random.default_rng((seed, 0xC0)).permutation(count)[:int(round(fraction * count))]
    return sorted(int(i) for i in chosen)


def make_brain_benchmark(out: str | Path, subjects: int = 20, resolution: int = 2, seed: int = 0,
                         show_progress: bool = True, val_anomalous: int = 0, val_normal: int = 0,
                         contaminate: float = 0.0, workers: int = 1, other_kinds: int = 0,
                         test_normal: int = 0) -> Path:
    """Write the benchmark into ``out``; returns the manifest CSV. ``val_anomalous`` more subjects, with
    outliers, form a ``val`` split: the few known anomalies a weakly-supervised search chooses by;
    ``val_normal`` more normal subjects join it, so evaluation settings (a volume score's reduction,
    smoothing) can be chosen on a val sample AUROC without touching the test split. Subject i is the
    same whatever the counts after it: adding val subjects leaves train and test unchanged.

    ``contaminate`` P: a share P of the training subjects carry an outlier (MOOD's kinds in turn) while
    still labelled normal, without a mask: training data that is not anomaly-free, as real data is. The
    test and val subjects are unchanged; ``contamination.json`` lists the contaminated subjects.

    ``other_kinds`` more test subjects carry outliers of kinds beyond MOOD's (``core.anomalies.OTHER_KINDS``:
    lesion, cavity, local blur, intensity scale, in turn): kinds nothing is ever chosen by, so that
    settings chosen on MOOD's kinds are judged on kinds nobody listed. They come after every other
    subject, so the rest of the benchmark is the same with or without them.

    ``test_normal`` more normal test subjects come after those: the test split's normals are otherwise the
    tenth of ``subjects`` that ``split_counts`` gives them (10 of 100), too few for paired intervals that
    separate two settings. Appended last, they leave every other subject (and a model trained on them) as
    it was.

    ``workers`` > 1 makes subjects in that many processes: each subject has its own seeds, so the files
    are the same as with one."""
    from nilearn import datasets

    from data_plane.progress import track

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "labels").mkdir(exist_ok=True)
    template = datasets.load_mni152_template(resolution=resolution)
    brain = datasets.load_mni152_brain_mask(resolution=resolution)
    shared = {"t1": np.asarray(template.dataobj, np.float32), "brain": np.asarray(brain.dataobj, np.float32) > 0.5,
              "affine": template.affine, "out": out, "seed": seed, "subjects": subjects,
              "val_anomalous": val_anomalous, "counts": split_counts(subjects),
              "other_from": subjects + val_anomalous + val_normal,
              "test_normal_from": subjects + val_anomalous + val_normal + other_kinds}
    shared["dirty"] = contaminated(shared["counts"][0], contaminate, seed)
    steps = range(subjects + val_anomalous + val_normal + other_kinds + test_normal)
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # spawn, not fork: torch and MONAI in the parent may hold threads that a forked child inherits locked
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_set_shared, initargs=(shared,)) as pool:
            made = list(track(pool.map(_make_subject, steps), total=len(steps), description="brain subjects",
                              show=show_progress))
    else:
        _set_shared(shared)
        made = [_make_subject(i) for i in track(steps, description="brain subjects", show=show_progress)]
    rows = [row for row, _ in made]
    examples = {}
    for _, example in made:
        if example is not None:
            examples.setdefault(example[0], example[1:])
    manifest = write_manifest(out / "manifest.csv", rows)
    _write_contamination(out, contaminate, [rows[i]["path"] for i in shared["dirty"]])
    if examples:
        montage(examples, out / "montage.png")
    return manifest


_SHARED: dict = {}


def _set_shared(shared: dict) -> None:
    _SHARED.update(shared)


def _make_subject(i: int) -> tuple[dict, tuple | None]:
    """Subject i of the benchmark in ``_SHARED``'s settings, written; (its manifest row, (kind, image,
    mask) of an anomalous subject for the montage, else None)."""
    import nibabel
    import torch

    from core.anomalies import OTHER_KINDS, OUTLIER_KINDS, mood_outlier

    shared = _SHARED
    seed, subjects, out, dirty = shared["seed"], shared["subjects"], shared["out"], shared["dirty"]
    n_train, n_test_normal, _ = shared["counts"]
    sample = _subject_transform(seed * 100_003 + i)({"image": shared["t1"][None],
                                                     "brain": shared["brain"][None].astype(np.float32)})
    image = torch.as_tensor(sample["image"]).float()
    foreground = torch.as_tensor(sample["brain"])[0] > 0.5
    inside = image[0][foreground]
    low, high = torch.quantile(inside, 0.005), torch.quantile(inside, 0.995)
    image = ((image - low) / (high - low)).clamp(0, 1) * foreground  # [0, 1], background 0
    name = f"subject_{i:03d}"
    split, label, group = "train", "normal", ""
    mask, example = None, None
    if i >= shared["test_normal_from"]:  # an extra normal test subject (an empty mask, as the others)
        split, mask = "test", torch.zeros_like(foreground)
    elif i >= shared["other_from"]:  # a test subject with a kind of outlier nothing chooses by
        split, label = "test", "anomalous"
        group = OTHER_KINDS[(i - shared["other_from"]) % len(OTHER_KINDS)]
        image, mask = mood_outlier(image, group, np.random.default_rng((seed, i)), foreground=foreground,
                                   radius_range=(0.08, 0.18))
        example = (group, image[0].numpy(), mask.numpy())
    elif i >= n_train:
        split = "test" if i < subjects else "val"
        mask = torch.zeros_like(foreground)
        if n_train + n_test_normal <= i < subjects + shared["val_anomalous"]:
            first = n_train + n_test_normal if i < subjects else subjects
            label, group = "anomalous", OUTLIER_KINDS[(i - first) % len(OUTLIER_KINDS)]
            rng = np.random.default_rng((seed, i))
            image, mask = mood_outlier(image, group, rng, foreground=foreground, radius_range=(0.08, 0.18))
            example = (group, image[0].numpy(), mask.numpy())
    elif i in dirty:  # an unlabelled outlier in a training subject
        kind = OUTLIER_KINDS[dirty.index(i) % len(OUTLIER_KINDS)]
        image, _ = mood_outlier(image, kind, np.random.default_rng((seed, i, 0xC0)), foreground=foreground,
                                radius_range=(0.08, 0.18))
    path = out / "images" / f"{name}.nii.gz"
    nibabel.Nifti1Image(image[0].numpy().astype(np.float32), shared["affine"]).to_filename(path)
    mask_path = ""
    if mask is not None:
        mask_path = out / "labels" / f"{name}.nii.gz"
        nibabel.Nifti1Image(mask.numpy().astype(np.uint8), shared["affine"]).to_filename(mask_path)
        mask_path = str(mask_path.relative_to(out))
    return {"path": str(path.relative_to(out)), "label": label, "split": split, "mask": mask_path,
            "group": group}, example


def _write_contamination(out: Path, fraction: float, paths: list[str]) -> None:
    import json

    (out / "contamination.json").write_text(json.dumps({"fraction": fraction, "items": paths}, indent=1))


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


SLIDE_GROUPS = ("he_tissue", "ihc_tissue", "uniform_addition", "noise_addition", "sink_source", "uniform_shift",
                "reflection", "out_of_focus", "marker_ink")
# The last two are artefacts every pathology lab knows, made here so that a detector's settings can be
# judged on kinds nobody chose them by: a defocused patch (the scanner's focus missed a fold or a bubble)
# and a pathologist's marker pen over tissue (a translucent dye, in one of the three colours in use).
MARKER_INKS = {"blue": (70, 110, 230), "green": (80, 190, 110), "black": (90, 90, 100)}


def _random_disc(size: int, rng: np.random.Generator, radius_range: tuple[float, float]):
    """(cy, cx, radius, inside): a disc of radius ``radius_range`` x ``size`` wholly inside a size² tile."""
    radius = rng.uniform(*radius_range) * size
    cy, cx = rng.uniform(radius, size - radius, 2)
    yy, xx = np.mgrid[:size, :size]
    return cy, cx, radius, (yy - cy) ** 2 + (xx - cx) ** 2 <= radius ** 2


def _artefact(tile: np.ndarray, group: str, rng: np.random.Generator) -> tuple[np.ndarray, tuple]:
    """``tile`` with a disc of ``group`` (out_of_focus, marker_ink); returns (tile, (cy, cx, radius))."""
    from PIL import Image, ImageFilter

    size = tile.shape[0]
    cy, cx, radius, inside = _random_disc(size, rng, (0.2, 0.35))
    if group == "out_of_focus":
        altered = np.asarray(Image.fromarray(tile).filter(ImageFilter.GaussianBlur(rng.uniform(2.0, 4.0) * size / 128)))
    else:  # marker ink: a translucent dye multiplies the light that passes
        ink = np.array(MARKER_INKS[list(MARKER_INKS)[int(rng.integers(len(MARKER_INKS)))]], np.float32) / 255
        strength = rng.uniform(0.5, 0.8)
        altered = (tile * (1 - strength + strength * ink)).round().astype(np.uint8)
    out = tile.copy()
    out[inside] = altered[inside]
    return out, (cy, cx, radius)


def _disc_polygon(cy: float, cx: float, radius: float, points: int = 48) -> list[list[float]]:
    angles = np.linspace(0, 2 * np.pi, points, endpoint=False)
    ring = [[float(cx + radius * np.cos(a)), float(cy + radius * np.sin(a))] for a in angles]
    return ring + [ring[0]]


def _foreign_tissue(tile: np.ndarray, source: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, tuple]:
    """Paste a disc of another real tissue image into ``tile``; returns (tile, (cy, cx, radius))."""
    size = tile.shape[0]
    cy, cx, radius, inside = _random_disc(size, rng, (0.15, 0.3))
    sy, sx = rng.integers(0, source.shape[0] - size), rng.integers(0, source.shape[1] - size)
    patch = source[sy:sy + size, sx:sx + size]
    out = tile.copy()
    out[inside] = patch[inside]
    return out, (cy, cx, radius)


def _anomalous_cell(base: np.ndarray, group: str, rng: np.random.Generator, sources: dict) -> tuple[np.ndarray, tuple]:
    """``base`` with one anomaly of ``group``; returns (tile, (cy, cx, radius))."""
    import torch

    from core.anomalies import OUTLIERS, random_sphere, sphere_mask

    tile = base.shape[0]
    if group.endswith("_tissue"):
        return _foreign_tissue(base, sources[group], rng)
    if group in ("out_of_focus", "marker_ink"):
        return _artefact(base, group, rng)
    image = torch.from_numpy(base.copy()).permute(2, 0, 1).float() / 255
    centre, radius = random_sphere((tile, tile), rng, (0.15, 0.3))
    disc_mask = sphere_mask((tile, tile), centre, radius)
    altered = OUTLIERS[group](image, disc_mask, rng, centre=centre, radius=radius)
    cell = (altered.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    return cell, (float(centre[0]), float(centre[1]), radius)


def make_slide_benchmark(out: str | Path, tile: int = 128, per_group: int = 12, seed: int = 0,
                         contaminate: float = 0.0, kinds: Sequence[str] | None = None,
                         val_kinds: Sequence[str] = (), val_per_group: int = 4) -> Path:
    """Mosaic slides of real tissue tiles (normal, and one per anomaly group) with GeoJSON masks.

    From the sample slide's tissue tiles: 60% make the normal training mosaic, the rest the normal
    test mosaic; each group of ``kinds`` (default: all of SLIDE_GROUPS) has a mosaic of ``per_group``
    test tiles with one anomaly each. Also writes ``manifest.csv`` and ``recipe.yaml`` (the data
    settings that index one tile per mosaic cell).

    ``val_kinds``: the few known anomalies, a ``val`` split to choose settings by: a normal val mosaic
    (a sixth of the training share, so the test split is the same with or without it) and, for each
    of these kinds, ``val_per_group`` anomalous tiles made on val normals. The test split keeps every
    kind: those not in ``val_kinds`` are the kinds a choice never saw.
    ``contaminate`` P: a share P of the training mosaic's tiles carry an anomaly (the groups in turn),
    unannotated; the test mosaics are unchanged (``contamination.json`` lists the cells).
    """
    import json

    import openslide
    import yaml
    from PIL import Image
    from skimage import data as skdata

    from data_plane.config import TissueConfig
    from data_plane.sample_data import fetch_sample_data
    from data_plane.tiff_writer import write_pyramidal_tiff
    from data_plane.tissue import tissue_mask

    kinds = tuple(SLIDE_GROUPS if kinds is None else kinds)
    unknown = sorted(set(kinds) - set(SLIDE_GROUPS)) + sorted(set(val_kinds) - set(SLIDE_GROUPS))
    if unknown or not kinds:
        raise ValueError(f"unknown anomaly kind(s) {', '.join(unknown) or '(none given)'}: the slide benchmark "
                         f"makes {', '.join(SLIDE_GROUPS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    samples = fetch_sample_data()
    with openslide.OpenSlide(str(samples.slide)) as slide:
        width, height = slide.dimensions
        pixels = np.asarray(slide.read_region((0, 0), 0, (width, height)).convert("RGB"))
    with Image.open(samples.he_target) as image:
        he_source = np.asarray(image.convert("RGB"))
    ihc_source = skdata.immunohistochemistry()
    mask = tissue_mask(pixels[::8, ::8], TissueConfig(closing_radius=2, opening_radius=1, min_object_px=16))
    tiles = []
    for y in range(0, height - tile + 1, tile):
        for x in range(0, width - tile + 1, tile):
            if mask[y // 8:(y + tile) // 8, x // 8:(x + tile) // 8].mean() >= 0.9:
                tiles.append(pixels[y:y + tile, x:x + tile])
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(tiles))
    n_train = int(0.6 * len(tiles))
    train = [tiles[i] for i in order[:n_train]]
    test = [tiles[i] for i in order[n_train:]]
    val = []
    if val_kinds:  # from the training share, so that the test split does not change
        n_val = max(4, len(train) // 6)
        train, val = train[:-n_val], train[-n_val:]
        n_train = len(train)
    sources = {"he_tissue": he_source, "ihc_tissue": ihc_source}
    dirty = contaminated(n_train, contaminate, seed)
    for k, index in enumerate(dirty):
        train[index], _ = _anomalous_cell(train[index], SLIDE_GROUPS[k % len(SLIDE_GROUPS)],
                                          np.random.default_rng((seed, index, 0xC0)), sources)

    def mosaic(name: str, cells: list[np.ndarray], anomalies: list[tuple] | None = None) -> Path:
        columns = int(np.ceil(np.sqrt(len(cells))))
        rows = int(np.ceil(len(cells) / columns))
        canvas = np.full((rows * tile, columns * tile, 3), 255, np.uint8)
        features = []
        for index, cell in enumerate(cells):
            r, c = divmod(index, columns)
            canvas[r * tile:(r + 1) * tile, c * tile:(c + 1) * tile] = cell
            if anomalies:
                cy, cx, radius = anomalies[index]
                features.append({"type": "Feature", "properties": {"classification": {"name": "anomaly"}},
                                 "geometry": {"type": "Polygon",
                                              "coordinates": [_disc_polygon(r * tile + cy, c * tile + cx, radius)]}})
        path = write_pyramidal_tiff(out / f"{name}.tiff", canvas.shape[0], canvas.shape[1],
                                    lambda ys, xs: canvas[np.ix_(ys, xs)], mpp=0.5, objective_power=20,
                                    min_level_side=256, quality=95)
        if features:
            (out / f"{name}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
        return path

    rows = [{"path": mosaic("train_normal", train).name, "label": "normal", "split": "train", "annotation": "",
             "group": ""},
            {"path": mosaic("test_normal", test).name, "label": "normal", "split": "test", "annotation": "",
             "group": ""}]
    for group in SLIDE_GROUPS:  # every group draws its bases, made or not: a kind's tiles never depend on `kinds`
        bases = [test[int(rng.integers(len(test)))] for _ in range(per_group)]
        if group not in kinds:
            continue
        cells, discs = [], []
        for k, base in enumerate(bases):
            item_rng = np.random.default_rng((seed, SLIDE_GROUPS.index(group), k))
            cell, disc = _anomalous_cell(base, group, item_rng, sources)
            cells.append(cell)
            discs.append(disc)
        path = mosaic(f"test_{group}", cells, discs)
        rows.append({"path": path.name, "label": "anomalous", "split": "test", "annotation": f"test_{group}.geojson",
                     "group": group})
    if val_kinds:
        rows.append({"path": mosaic("val_normal", val).name, "label": "normal", "split": "val", "annotation": "",
                     "group": ""})
        val_rng = np.random.default_rng((seed, 0x7A1))
        for group in val_kinds:
            cells, discs = [], []
            for k in range(val_per_group):
                base = val[int(val_rng.integers(len(val)))]
                cell, disc = _anomalous_cell(base, group, np.random.default_rng((seed, 0x7A1, SLIDE_GROUPS.index(group), k)),
                                             sources)
                cells.append(cell)
                discs.append(disc)
            path = mosaic(f"val_{group}", cells, discs)
            rows.append({"path": path.name, "label": "anomalous", "split": "val",
                         "annotation": f"val_{group}.geojson", "group": group})
    manifest = write_manifest(out / "manifest.csv", rows)
    _write_contamination(out, contaminate, [f"train_normal cell {i}" for i in dirty])
    recipe = {"name": "slide-benchmark", "data": {
        "tiles": {"size": tile, "magnification": None, "min_tissue_fraction": 0.5},
        "annotations": {"downsample": 1, "anomalous_fraction": 0.01},
        "stream": {"min_tissue_fraction": 0.5}}}
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    return manifest
