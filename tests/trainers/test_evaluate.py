"""eval / export / score on a real benchmark built from the sample slide, after a short real training run."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, sample_data):
    from data_plane.benchmarks import make_slide_benchmark
    from data_plane.ingest import ingest, resolve_sources
    from tessera.config import load_config

    folder = tmp_path_factory.mktemp("bench")
    manifest = make_slide_benchmark(folder / "bench", tile=128, per_group=4, seed=1)
    store = folder / "s.zarr"
    config = load_config(folder / "bench" / "recipe.yaml").data
    assert not ingest(resolve_sources([], manifest), store, config, show_progress=False).failed
    run_dir = folder / "run"
    sets = [f"data.store={store}", "train.steps=8", "train.micro_batch=8", "train.num_workers=0",
            "train.checkpoint_every=8", "method.options={width: 8, depth: 3, bottleneck: 8}"]
    command = [sys.executable, "-m", "tessera.cli", "train", str(folder / "bench" / "recipe.yaml"),
               "--run-dir", str(run_dir)] + [a for s in sets for a in ("--set", s)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir, store, folder / "bench"


def test_eval_writes_metrics_curves_heatmaps_and_page(trained):
    from data_plane.benchmarks import SLIDE_GROUPS
    from trainers.evaluate import evaluate

    run_dir, store, _ = trained
    result = evaluate(run_dir, split="test", workers=0, show_progress=False)
    out = run_dir / "eval-test"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    overall = saved["overall"]
    assert overall["n_normal"] > 20 and overall["n_anomalous"] > 20
    for key in ("image_auroc", "image_ap", "pixel_auroc", "pixel_ap", "dice"):
        assert 0 <= overall[key] <= 1
    assert set(saved["groups"]) == set(SLIDE_GROUPS)
    for name in ("roc.png", "pr.png", "index.html"):
        assert (out / name).stat().st_size > 1000
    heatmaps = sorted(p.name for p in (out / "heatmaps").iterdir())
    tiles_maps = [h for h in heatmaps if not h.endswith(".pixels.png")]
    assert "test_normal.png" in heatmaps and len(tiles_maps) == 2 + len(SLIDE_GROUPS) - 1  # no train slide
    # the autoencoder localises: its pixel maps stitched per slide too, 16 heat pixels per tile edge
    assert sorted(h for h in heatmaps if h.endswith(".pixels.png")) == [h[:-4] + ".pixels.png" for h in tiles_maps]
    import numpy as np

    from data_plane.heatmap import read_heatmap

    tile_heat, tile_downsample = read_heatmap(store, "test_he_tissue", run_dir.name)
    pixel_heat, pixel_downsample = read_heatmap(store, "test_he_tissue", f"{run_dir.name}-pixels")
    assert pixel_downsample == 128 // 16 < tile_downsample and np.isfinite(pixel_heat).sum() > np.isfinite(tile_heat).sum()
    assert "image AUROC" in (out / "index.html").read_text()
    assert (store / "slides" / "test_normal" / "heatmaps" / run_dir.name / "zarr.json").is_file()
    assert overall["image_auroc_low"] <= overall["image_auroc"] <= overall["image_auroc_high"]
    with open(out / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len({r["id"] for r in rows}) == overall["n_normal"] + overall["n_anomalous"]
    assert sum(r["label"] == "1" for r in rows) == overall["n_anomalous"]
    for key in ("pixel_auroc", "pixel_ap", "dice"):
        assert overall[f"{key}_low"] <= overall[key] <= overall[f"{key}_high"], key
    import numpy as np

    with np.load(out / "pixel_histograms.npz") as pixels:
        assert set(pixels["ids"].tolist()) <= {r["id"] for r in rows}
        assert pixels["histograms"].shape == (len(pixels["ids"]), 2, 1024)
        assert pixels["histograms"][pixels["labels"] == 1, 1].sum() > 0  # anomalous voxels of anomalous tiles

    # Slide-level results: one score per test slide, the mean of its top 5 % tiles (at least one), labelled
    # anomalous when any tile is, in its tiles' group.
    from core.scoring import slide_score
    from trainers.evaluate import slide_label

    slides = saved["slides"]
    assert (slides["overall"]["n_normal"], slides["overall"]["n_anomalous"]) == (1, len(SLIDE_GROUPS))
    assert set(slides["groups"]) == set(SLIDE_GROUPS) and saved["settings"]["slide_top_fraction"] == 0.05
    with open(out / "slide_scores.csv", newline="") as f:
        per_slide = {r["id"]: r for r in csv.DictReader(f)}
    tiles = {}
    for r in rows:
        tiles.setdefault(r["id"].split("@")[0], []).append(float(r["score"]))
    for slide, row in per_slide.items():
        assert float(row["score"]) == pytest.approx(slide_score(np.array(tiles[slide]), 0.05))
        assert float(row["score"]) <= max(tiles[slide])
    assert per_slide["test_normal"]["label"] == "0" and per_slide["test_he_tissue"]["group"] == "he_tissue"
    assert "slides: overall" in (out / "index.html").read_text()
    assert slide_label([0, -1, 1, 1], ["", "", "b", "b"]) == (1, "b") and slide_label([-1], [""]) == (None, "")
    assert slide_label([0, 0], ["", ""]) == (0, "")


def test_eval_of_one_group_keeps_the_normal_tiles(trained, tmp_path):
    import math

    from trainers.evaluate import evaluate

    run_dir, _, _ = trained
    result = evaluate(run_dir, split="test", groups=["ihc_tissue"], workers=0, show_progress=False,
                      out=tmp_path / "ihc")
    overall = result["overall"]
    assert overall["n_normal"] > 20 and overall["n_anomalous"] > 0 and not math.isnan(overall["image_auroc"])
    assert set(result["groups"]) == {"ihc_tissue"}


def test_export_annotations_round_trips_through_geojson_into_a_store(trained, tmp_path):
    import numpy as np
    import zarr

    from data_plane.heatmap import read_heatmap
    from data_plane.ingest import Source, ingest
    from tessera.config import load_config
    from trainers.evaluate import evaluate

    run_dir, store, bench = trained
    evaluate(run_dir, split="test", workers=0, show_progress=False)
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "export-annotations", str(run_dir / "eval-test"),
                           "--format", "geojson"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    with open(run_dir / "eval-test" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    files = sorted((run_dir / "eval-test" / "annotations").glob("*.geojson"))
    assert {p.stem for p in files} == {r["id"].rpartition("@")[0] for r in rows}
    # The slide with the most flagged tissue: its regions go back in as an annotation of the same slide.
    collections = {p.stem: json.loads(p.read_text()) for p in files}
    slide = max(collections, key=lambda s: sum(f["properties"]["objectType"] == "annotation"
                                               for f in collections[s]["features"]))
    collection = collections[slide]
    threshold = collection["properties"]["tessera"]["threshold"]
    detections = [f for f in collection["features"] if f["properties"]["objectType"] == "detection"]
    assert len(detections) == sum(r["id"].startswith(f"{slide}@") for r in rows)
    assert all("anomaly score" in f["properties"]["measurements"] for f in detections)
    heat, downsample = read_heatmap(store, slide, run_dir.name)
    expected = np.nan_to_num(heat, nan=-np.inf) >= threshold
    assert expected.any() and not expected.all()
    source = bench / f"{slide}.tiff"
    again = tmp_path / "again.zarr"
    config = load_config(bench / "recipe.yaml", [f"data.annotations.downsample={downsample}"]).data
    report = ingest([Source(source, slide, "anomalous", "test", run_dir / "eval-test" / "annotations" / f"{slide}.geojson")],
                    again, config, show_progress=False)
    assert report.done == [slide], report.failed
    imported = zarr.open_group(str(again / "slides" / slide / "labels" / "anomaly"), mode="r")["0"][:] > 0
    np.testing.assert_array_equal(imported, expected)


def test_compare_pairs_two_evaluations_of_the_same_items(trained, tmp_path):
    from typer.testing import CliRunner

    from tessera.cli import app
    from trainers.evaluate import evaluate

    run_dir, _, _ = trained
    evaluate(run_dir, split="test", workers=0, show_progress=False)
    with open(run_dir / "eval-test" / "scores.csv", newline="") as f:
        rows = list(csv.DictReader(f))

    def other_eval(name, rows):
        folder = tmp_path / name / "eval-test"
        folder.mkdir(parents=True)
        with open(folder / "scores.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        return folder.parent

    # B ranks every anomaly below every normal: A is never behind, and ahead by its own AUROC.
    worse = other_eval("worse", [{**r, "score": -10.0} if r["label"] == "1" else r for r in rows])
    # B's pixel maps are flat (every voxel in the lowest level): its pixel AP is the anomalous share.
    import numpy as np

    with np.load(run_dir / "eval-test" / "pixel_histograms.npz") as pixels:
        pixels = dict(pixels)
    flat = np.zeros_like(pixels["histograms"])
    flat[:, :, 0] = pixels["histograms"].sum(axis=2)
    np.savez_compressed(worse / "eval-test" / "pixel_histograms.npz", **{**pixels, "histograms": flat})
    runner = CliRunner()
    done = runner.invoke(app, ["compare", str(run_dir), str(worse), "--resamples", "300", "--out", str(tmp_path / "c")])
    assert done.exit_code == 0, done.output
    result = json.loads((tmp_path / "c" / "compare.json").read_text())
    metrics = json.loads((run_dir / "eval-test" / "metrics.json").read_text())
    assert set(result["groups"]) == {"overall"} | set(metrics["groups"])
    for name, row in result["groups"].items():
        expected = metrics["overall"] if name == "overall" else metrics["groups"][name]
        assert row["auroc_a"] == pytest.approx(expected["image_auroc"]) and row["auroc_b"] == 0.0
        assert row["difference_ci"][0] >= 0 and row["a_ahead"] + row["tied"] == 1.0
        assert row["difference"] == pytest.approx(row["auroc_a"])
    assert result["groups"]["overall"]["difference_ci"][0] > 0
    pixel = result["groups"]["overall"]["pixel_ap"]
    assert pixel["a"] == pytest.approx(metrics["overall"]["pixel_ap"], abs=0.01)  # binned at 1024 levels
    share = flat[pixels["labels"] == 1, 1].sum() / flat.sum()
    assert pixel["b"] == pytest.approx(share, rel=1e-9)
    assert pixel["difference_ci"][0] <= pixel["a"] - pixel["b"] <= pixel["difference_ci"][1]
    assert "pixel AP" in done.output
    # Perfect pixel maps (anomalous voxels at the top level, the rest at the bottom) against flat ones.
    perfect = other_eval("perfect", rows)
    sharp = np.zeros_like(pixels["histograms"])
    sharp[:, 0, 0], sharp[:, 1, -1] = pixels["histograms"][:, 0].sum(axis=1), pixels["histograms"][:, 1].sum(axis=1)
    np.savez_compressed(perfect / "eval-test" / "pixel_histograms.npz", **{**pixels, "histograms": sharp})
    done = runner.invoke(app, ["compare", str(perfect), str(worse), "--resamples", "200", "--out", str(tmp_path / "p")])
    assert done.exit_code == 0, done.output
    pixel = json.loads((tmp_path / "p" / "compare.json").read_text())["groups"]["overall"]["pixel_ap"]
    assert pixel["a"] == 1.0 and pixel["difference_ci"][0] > 0.5 and pixel["a_ahead"] == 1.0
    assert (tmp_path / "c" / "compare.png").stat().st_size > 1000
    # Against itself: no difference on any resample.
    done = runner.invoke(app, ["compare", str(run_dir), str(run_dir), "--resamples", "200"])
    assert done.exit_code == 0, done.output
    itself = json.loads((run_dir / "eval-test" / f"compare-{run_dir.name}" / "compare.json").read_text())
    assert all(row["difference_ci"] == [0.0, 0.0] for row in itself["groups"].values())
    assert all(row["pixel_ap"]["difference_ci"] == [0.0, 0.0] for row in itself["groups"].values() if "pixel_ap" in row)
    # Several runs on one side (seeds): their mean AUROC, on every resample.
    done = runner.invoke(app, ["compare", f"{run_dir},{worse}", str(worse), "--resamples", "200",
                               "--out", str(tmp_path / "mean")])
    assert done.exit_code == 0, done.output
    mean = json.loads((tmp_path / "mean" / "compare.json").read_text())["groups"]["overall"]
    assert mean["runs_a"] == pytest.approx([metrics["overall"]["image_auroc"], 0.0])
    assert mean["auroc_a"] == pytest.approx(metrics["overall"]["image_auroc"] / 2) == mean["difference"]
    # Different items, or a run never evaluated: told what and where, exit 2.
    fewer = other_eval("fewer", rows[1:])
    done = runner.invoke(app, ["compare", str(run_dir), str(fewer)])
    assert done.exit_code == 2 and "scored different items" in done.output and rows[0]["id"] in done.output
    done = runner.invoke(app, ["compare", str(run_dir), str(tmp_path / "never")])
    assert done.exit_code == 2 and "tessera eval" in done.output


def test_eval_on_two_ranks_gives_the_same_metrics(trained):
    from trainers.evaluate import evaluate

    run_dir, _, _ = trained
    alone = json.loads(json.dumps(evaluate(run_dir, split="test", workers=0, show_progress=False)))
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "eval", str(run_dir), "--nproc", "2"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "image AUROC" in done.stdout
    shared = json.loads((run_dir / "eval-test" / "metrics.json").read_text())
    assert shared.keys() == alone.keys() and shared["groups"].keys() == alone["groups"].keys()
    for name, values in [("overall", alone["overall"])] + list(alone["groups"].items()):
        other = shared["overall"] if name == "overall" else shared["groups"][name]
        assert other == pytest.approx(values, rel=1e-6, nan_ok=True), name  # batches differ: float rounding
    assert len(list((run_dir / "eval-test" / "heatmaps").glob("*.png"))) >= 2  # both ranks wrote their slides'


def test_eval_crop_scores_the_centre_of_each_tile(trained, tmp_path):
    import shutil

    import yaml

    from trainers.evaluate import evaluate

    run_dir, _, _ = trained
    whole = json.loads(json.dumps(evaluate(run_dir, split="test", workers=0, show_progress=False)))
    centred = tmp_path / "centred"
    centred.mkdir()
    shutil.copy(run_dir / "final.pt", centred / "final.pt")
    tree = yaml.safe_load((run_dir / "config.yaml").read_text())
    tree["data"]["stream"].update({"eval_crop": "center", "crop_size": 64})
    (centred / "config.yaml").write_text(yaml.safe_dump(tree))
    result = evaluate(centred, split="test", workers=0, show_progress=False)
    # the same tiles, scored on their centres: other scores, and masks cropped with the images
    assert result["overall"]["n_normal"] == whole["overall"]["n_normal"]
    assert result["overall"]["image_auroc"] != whole["overall"]["image_auroc"]
    assert 0 <= result["overall"]["pixel_auroc"] <= 1


def test_export_then_score_new_slides(trained, tmp_path):
    from trainers.export import export_run
    from trainers.score import score_inputs

    run_dir, _, bench = trained
    model = export_run(run_dir, tmp_path / "model.pt")
    (tmp_path / "broken.svs").write_text("not a slide")
    table = score_inputs(model, [str(bench / "test_he_tissue.tiff"), str(bench / "test_normal.tiff"),
                                 str(tmp_path / "broken.svs")], tmp_path / "out")
    rows = {r["slide_id"]: r for r in csv.DictReader(open(table))}
    assert float(rows["test_normal"]["score"]) > 0 and int(rows["test_normal"]["tiles"]) > 20
    assert float(rows["test_he_tissue"]["score"]) > 0
    assert "not readable by OpenSlide" in rows["broken"]["error"]
    assert (tmp_path / "out" / "heatmaps" / "test_normal.png").is_file()
    with pytest.raises(ValueError, match="neither a run directory nor"):
        score_inputs(bench / "manifest.csv", [str(bench / "test_normal.tiff")], tmp_path / "x")


# one of its evals scores a split without normals: the curves say so instead of drawing an empty legend
@pytest.mark.filterwarnings("error:No artists with labels:UserWarning")
def test_volume_run_is_evaluated_slice_by_slice_with_mood_outputs(tmp_path, monkeypatch):
    import nibabel
    import numpy as np

    from data_plane.benchmarks import make_brain_benchmark
    from data_plane.ingest import ingest, resolve_sources
    from tessera.config import load_config
    from trainers.evaluate import evaluate

    manifest = make_brain_benchmark(tmp_path / "brain", subjects=10, resolution=2, seed=3, show_progress=False)
    store = tmp_path / "s.zarr"
    assert not ingest(resolve_sources([], manifest), store, load_config(None).data, show_progress=False).failed
    run_dir = tmp_path / "run"
    sets = [f"data.store={store}", "train.data=slices", "data.volume_stream.slice_size=64", "train.steps=300",
            "train.micro_batch=16", "train.num_workers=0", "train.checkpoint_every=300",
            "method.options={in_channels: 1, width: 16, depth: 3, bottleneck: 8}"]
    command = [sys.executable, "-m", "tessera.cli", "train", "--run-dir", str(run_dir)] + \
        [a for s in sets for a in ("--set", s)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    result = evaluate(run_dir, split="test", workers=0, show_progress=False)
    overall = result["overall"]
    assert (overall["n_normal"], overall["n_anomalous"]) == (1, 3)
    # The reference autoencoder's residual ranks anomalous voxels above normal ones (MOOD's pooled pixel AUROC).
    assert overall["pixel_auroc"] > 0.65
    mood = run_dir / "eval-test" / "mood"
    for row in csv.DictReader(open(manifest)):
        if row["split"] != "test":
            continue
        case = Path(row["path"]).name
        original = nibabel.load(manifest.parent / row["path"])
        scored = nibabel.load(mood / "pixel" / case)
        assert scored.shape == original.shape and np.allclose(scored.affine, original.affine)
        assert float((mood / "sample" / f"{case}.txt").read_text()) > 0
    assert (run_dir / "eval-test" / "index.html").is_file()
    assert result["settings"] == {"score_smoothing": 0.0, "normal_baseline": None}
    # found_by_map: the anomalies whose map peaks inside their mask, against every normal
    from core.scoring import share_of_top_inside

    found = result.get("found_by_map", {"overall": {"n_normal": 1, "n_anomalous": 0}})["overall"]
    assert found["n_normal"] == 1 and found["n_anomalous"] <= 3
    peak = np.zeros((4, 10, 10), np.float32)
    peak[1, 2:6, 2:6] = 1.0  # 16 voxels: the 10 highest all lie inside the mask; negated, none does
    mask = peak > 0
    assert share_of_top_inside(peak, mask) == 1.0 and share_of_top_inside(-peak, mask) == 0.0
    # a posthoc trial's quick pixel AP (binned scores, no intervals) stays near the exact one
    quick = evaluate(run_dir, split="test", workers=0, show_progress=False, figures=False, pixel_bins=1024,
                     out=tmp_path / "eval-quick")["overall"]
    assert quick["pixel_ap"] == pytest.approx(overall["pixel_ap"], abs=0.02) and "image_auroc_low" not in quick

    # `tessera score` of volumes never ingested, a NIfTI file and a DICOM series: re-ingested and scored as
    # evaluation scores them (the same sample score for the same file), with MOOD outputs in the input's grid.
    from tests.data_plane.test_volumes import write_dicom_series

    test_row = next(r for r in csv.DictReader(open(manifest)) if r["split"] == "test" and r["label"] == "anomalous")
    nifti = manifest.parent / test_row["path"]
    series = write_dicom_series(tmp_path / "series_b", np.round(1000 * np.asarray(nibabel.load(nifti).dataobj)))
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "score", str(run_dir), str(nifti), str(series),
                           "--out", str(tmp_path / "scored")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    rows = {r["slide_id"]: r for r in csv.DictReader(open(tmp_path / "scored" / "scores.csv"))}
    case = Path(test_row["path"]).name
    stem = case.removesuffix(".nii.gz")
    assert set(rows) == {stem, "series_b"} and not any(r["error"] for r in rows.values())
    assert float(rows[stem]["score"]) == pytest.approx(float((mood / "sample" / f"{case}.txt").read_text()), rel=1e-5)
    scored_nifti = nibabel.load(tmp_path / "scored" / "mood" / "pixel" / case)
    assert scored_nifti.shape == nibabel.load(nifti).shape
    assert float(rows["series_b"]["score"]) > 0 and list((tmp_path / "scored" / "mood" / "pixel").glob("series_b*"))

    # The same run evaluated with 3D smoothing: recorded with the metrics, and the written score volumes
    # vary less from one slice to the next than the raw slice-by-slice maps did.
    def slice_jumps(folder):
        volume = np.asarray(nibabel.load(folder / "pixel" / case).dataobj, np.float32)
        return float(np.abs(np.diff(volume, axis=2)).mean())  # NIfTI (x, y, z): z is the slice axis

    raw = slice_jumps(mood)
    smoothed = evaluate(run_dir, split="test", workers=0, show_progress=False, score_smoothing=2.0)
    assert smoothed["settings"] == {"score_smoothing": 2.0, "normal_baseline": None}
    assert slice_jumps(mood) < 0.5 * raw

    # With the train normals' normative map: it is their mean smoothed score volume, each sample score
    # ranks a volume's scores minus it, the stored voxel scores stay unsubtracted, and a rerun reuses it.
    import zarr

    import core.scoring as scoring
    import trainers.eval_volumes as evaluation
    from data_plane.volumes import volume_array, volume_index

    index = volume_index(store)
    evaluate(run_dir, split="train", workers=0, show_progress=False, score_smoothing=2.0)
    stored = {v: volume_array(store, v, f"scores/{run_dir.name}") for v in index["volume_id"]}
    train_normals = index[(index["split"] == "train") & (index["label"] == "normal")]["volume_id"]
    expected = np.mean([stored[v][:] for v in train_normals], axis=0)
    test_ids = list(index[index["split"] == "test"]["volume_id"])
    unsubtracted = {v: stored[v][:] for v in test_ids}  # written by the σ = 2 evaluation above
    based = evaluate(run_dir, split="test", workers=0, show_progress=False, score_smoothing=2.0,
                     normal_baseline="train")
    assert based["settings"] == {"score_smoothing": 2.0, "normal_baseline": "train"}
    with np.load(run_dir / "baselines" / "train-sigma2.npz") as saved:
        assert np.allclose(saved["mean"], expected, atol=1e-5)
    for volume_id in test_ids:
        written = zarr.open_group(str(store / "volumes" / volume_id / "scores" / run_dir.name), mode="r")
        scores = written["0"][:]
        assert np.allclose(scores, unsubtracted[volume_id], atol=1e-6)
        assert written.attrs["tessera"]["sample_score"] == pytest.approx(
            scoring.volume_score(scores - expected), abs=1e-5)
    scored = []
    with monkeypatch.context() as patch:
        real = evaluation.score_volumes
        patch.setattr(evaluation, "score_volumes", lambda *a, **k: (scored.append(a[3]), real(*a, **k))[1])
        again = evaluate(run_dir, split="test", workers=0, show_progress=False, score_smoothing=2.0,
                         normal_baseline="train")
    assert again["overall"] == based["overall"] and len(scored) == 1  # the test volumes only

    # A store of the test volumes alone (no normals of split train): its baseline is the run's own, from
    # the run's training store and its cache, so the same volumes get the same metrics.
    test_rows = [r for r in csv.DictReader(open(manifest)) if r["split"] == "test"]
    subset = manifest.parent / "test_only.csv"
    with open(subset, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(test_rows[0]))
        writer.writeheader()
        writer.writerows(test_rows)
    foreign = tmp_path / "test_only.zarr"
    assert not ingest(resolve_sources([], subset), foreign, load_config(None).data, show_progress=False).failed
    scored.clear()
    with monkeypatch.context() as patch:
        patch.setattr(evaluation, "score_volumes", lambda *a, **k: (scored.append(a[3]), real(*a, **k))[1])
        elsewhere = evaluate(run_dir, store=str(foreign), split="test", workers=0, show_progress=False,
                             score_smoothing=2.0, normal_baseline="train", out=tmp_path / "eval-foreign")
    assert elsewhere["overall"] == pytest.approx(based["overall"], rel=1e-5, nan_ok=True) and len(scored) == 1
    assert not list((run_dir / "baselines").glob("*.partial*"))

    # With a map cache (`tessera posthoc`): the first evaluation scores the test volumes' slices once and
    # keeps their raw maps; another σ and no baseline then re-pools them, scoring no slice, to the same
    # metrics as an evaluation without the cache.
    calls = []
    with monkeypatch.context() as patch:
        real_scored = evaluation._scored
        patch.setattr(evaluation, "_scored", lambda *a, **k: (calls.append(1), real_scored(*a, **k))[1])
        cached = evaluate(run_dir, split="test", workers=0, show_progress=False, score_smoothing=2.0,
                          normal_baseline="train", map_cache=tmp_path / "maps", out=tmp_path / "eval-cached")
        first = len(calls)
        repooled = evaluate(run_dir, split="test", workers=0, show_progress=False, score_smoothing=0.0,
                            normal_baseline="none", map_cache=tmp_path / "maps", out=tmp_path / "eval-cached0",
                            figures=False)
    assert first > 0 and len(calls) == first
    assert not (tmp_path / "eval-cached0" / "mood").exists()
    assert not list((tmp_path / "eval-cached0" / "heatmaps").iterdir()) and list((tmp_path / "eval-cached" / "heatmaps").iterdir())
    assert cached["overall"] == pytest.approx(based["overall"], rel=1e-5, nan_ok=True)
    assert repooled["overall"] == pytest.approx(result["overall"], rel=1e-5, nan_ok=True)
    (maps,) = (tmp_path / "maps").iterdir()
    assert sorted(p.name for p in maps.glob("*.npz")) == sorted(f"{v}.npz" for v in test_ids)

    # Two ranks build the map from their shares of the normals (summed across ranks) and score alike.
    (run_dir / "baselines" / "train-sigma2.npz").unlink()
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "eval", str(run_dir), "--nproc", "2",
                           "--score-smoothing", "2", "--normal-baseline", "train"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(run_dir / "baselines" / "train-sigma2.npz") as saved:
        assert np.allclose(saved["mean"], expected, atol=1e-5)
    shared = json.loads((run_dir / "eval-test" / "metrics.json").read_text())
    assert shared["settings"] == based["settings"]
    assert shared["overall"] == pytest.approx(based["overall"], rel=1e-5, nan_ok=True)


def test_smoothing_a_score_volume_brings_out_a_blob_scored_slice_by_slice():
    """Independent per-slice noise over a planted ball: smoothing in 3D ranks the ball's voxels better."""
    import numpy as np
    from sklearn.metrics import average_precision_score

    from core.scoring import smooth_scores

    rng = np.random.default_rng(0)
    zz, yy, xx = np.mgrid[:40, :40, :40]
    ball = (zz - 20) ** 2 + (yy - 18) ** 2 + (xx - 22) ** 2 <= 6 ** 2
    scores = 0.4 * ball + rng.normal(0, 0.5, ball.shape).astype(np.float32)
    assert smooth_scores(scores, 0) is scores
    smoothed = smooth_scores(scores, 2.0)
    assert smoothed.shape == scores.shape and smoothed.dtype == np.float32
    raw_ap = average_precision_score(ball.ravel(), scores.ravel())
    assert average_precision_score(ball.ravel(), smoothed.ravel()) > raw_ap + 0.3


def test_eval_into_a_read_only_run_dir_or_store_ends_in_one_line(trained, mount_tmpfs):
    import shutil

    run_dir, store, _ = trained
    read_only_run = mount_tmpfs("run", fill=lambda p: shutil.copytree(run_dir, p / "run"), read_only=True) / "run"
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "eval", str(read_only_run), "--store", str(store)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "read-only" in done.stderr and str(read_only_run) in done.stderr
    read_only_store = mount_tmpfs("store", fill=lambda p: shutil.copytree(store, p / "s.zarr"), read_only=True)
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "eval", str(run_dir), "--store",
                           str(read_only_store / "s.zarr")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert "read-only" in done.stderr and str(read_only_store) in done.stderr


def test_eval_out_keeps_other_evaluations_and_options_are_checked(trained, tmp_path):
    run_dir, _, _ = trained
    elsewhere = tmp_path / "second-eval"
    before = {p: p.stat().st_mtime_ns for p in (run_dir / "eval-test").glob("*")} if (run_dir / "eval-test").is_dir() else {}
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "eval", str(run_dir), "--out", str(elsewhere)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"-> {elsewhere}/index.html" in done.stdout
    saved = json.loads((elsewhere / "metrics.json").read_text())
    assert saved["settings"]["seconds_per_tile"] > 0 and saved["settings"]["method_options"] == {}
    assert {p: p.stat().st_mtime_ns for p in before} == before  # RUN_DIR/eval-test untouched
    bad = subprocess.run([sys.executable, "-m", "tessera.cli", "eval", str(run_dir), "--out", str(tmp_path / "x"),
                          "--option", "widht=3"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert bad.returncode != 0 and "widht" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.slow  # ~100 s: `make test-slow`; the demo covers StyleGAN2's training and synthesis in CI
def test_stylegan2_and_its_encoder_are_evaluated_like_any_method(trained, tmp_path):
    """A small StyleGAN2 trained for a few steps with real DeepSpeed: `tessera eval` reports its FD/KD
    against the split's normal tiles beside real vs real; an encoder trained on it is evaluated with
    per-pixel maps and the reconstructions grid."""
    run_dir, store, bench = trained
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def train(run, *sets):
        command = [sys.executable, "-m", "tessera.cli", "train", str(bench / "recipe.yaml"), "--run-dir", str(run)]
        command += [a for s in [f"data.store={store}", "train.micro_batch=8", "train.num_workers=0", *sets]
                    for a in ("--set", s)]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
        assert done.returncode == 0, done.stderr[-3000:]

    gan = tmp_path / "gan"
    train(gan, "method.name=stylegan2", "method.options={resolution: 128, channel_base: 512, channel_max: 16, "
          "z_dim: 16, w_dim: 16, mapping_layers: 2, metrics: false}", "train.steps=2", "train.checkpoint_every=2")
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "eval", str(gan)], cwd=ROOT, capture_output=True,
                          text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "generator: FD-EffNetLite0" in done.stdout
    generator = json.loads((gan / "eval-test" / "metrics.json").read_text())["generator"]
    assert generator["images"] >= 2
    assert generator["FD-EffNetLite0"] > generator["FD-EffNetLite0 real"] >= 0  # an untrained G is far off

    encoder_run = tmp_path / "enc"
    train(encoder_run, "method.name=stylegan2_encoder",
          f"method.options={{generator: {gan}, channel_base: 512, channel_max: 16}}", "train.steps=4",
          "train.checkpoint_every=4", "train.ema_kimg=null")
    done = subprocess.run([sys.executable, "-m", "tessera.cli", "eval", str(encoder_run),
                           "--option", "refine_steps=2"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = json.loads((encoder_run / "eval-test" / "metrics.json").read_text())
    assert saved["settings"]["method_options"] == {"refine_steps": 2} and "generator" not in saved
    assert 0 <= saved["overall"]["image_auroc"] <= 1 and "pixel_ap" in saved["overall"]
    assert (encoder_run / "eval-test" / "reconstructions.png").stat().st_size > 1000


def test_posthoc_on_a_trained_run_judges_the_pick_on_held_out_groups(trained, tmp_path):
    import json

    from trainers.posthoc import posthoc_search

    run_dir, _, _ = trained
    result = posthoc_search(run_dir, {"image_pooling": ["mean", "top"], "pooling_top": [0.05]}, choose_split="test",
                            choose_groups=["ihc_tissue"], out=tmp_path / "ph", log=lambda line: None,
                            unsupervised={"image_pooling": "mean"}, budgets=[1, 3], draws=3)
    saved = json.loads((tmp_path / "ph" / "posthoc.json").read_text())
    assert saved["pick"] == max(saved["trials"], key=lambda t: t["score"])["setting"]
    assert len(saved["trials"]) == 2 and saved["selection"]["normals_shared_with_test"]
    assert all("ihc_tissue" in i or i.startswith("test_normal") for i in saved["selection"]["items"])
    assert "ihc_tissue" not in saved["held_out_groups"] and "he_tissue" in saved["held_out_groups"]
    assert set(saved["pick_minus_default"]) >= {"overall", "he_tissue", "held-out kinds"}
    pooled = saved["pick_minus_default"]["held-out kinds"]  # the kinds the choice never saw, together
    assert pooled["n_anomalous"] == sum(saved["pick_minus_default"][g]["n_anomalous"] for g in saved["held_out_groups"])
    assert saved["apply"].startswith(f"tessera eval {run_dir} --option image_pooling=")
    assert result["test"]["default"]["overall"]["image_auroc"] == pytest.approx(
        json.loads((tmp_path / "ph" / "default-test" / "metrics.json").read_text())["overall"]["image_auroc"])
    # the unsupervised setting is judged beside the pick; the budget curve re-chooses from the saved scores
    assert saved["unsupervised"]["setting"] == {"image_pooling": "mean"} and "held-out kinds" in saved["pick_minus_unsupervised"]
    budget = json.loads((tmp_path / "ph" / "budget.json").read_text())
    assert [len(budget["curve"][b]["items"]) for b in ("1", "3")] == [3, 3]
    assert all(i.startswith("test_ihc_tissue") or "ihc_tissue" in i for b in ("1", "3")
               for items in budget["curve"][b]["items"] for i in items)
    tests = [t["overall"] for t in budget["per_trial_test"]]
    assert budget["hindsight_best"]["overall"] == max(tests)
    assert min(tests) <= budget["curve"]["3"]["overall"]["mean"] <= max(tests)
    assert (tmp_path / "ph" / "budget.png").stat().st_size > 1000
    # trials are judged by their scores: no heatmaps (the pick's evaluation has its own)
    assert not list((tmp_path / "ph" / "trial000-test" / "heatmaps").glob("*.png"))
    assert list((tmp_path / "ph" / "pick-test" / "heatmaps").glob("*.png"))
