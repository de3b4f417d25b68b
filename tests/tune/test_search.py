"""A real weakly-supervised search on a real local Ray runtime, on tiny brain volumes: 4 trials x 2
folds pick the config with the best mean fold AUROC (checked against results.parquet); a trial that
raises is retried and then reported; a killed driver resumes the experiment."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def brain_store(tmp_path_factory):
    from data_plane.benchmarks import make_brain_benchmark
    from data_plane.ingest import ingest, resolve_sources
    from tessera.config import load_config

    folder = tmp_path_factory.mktemp("brain")
    manifest = make_brain_benchmark(folder / "bench", subjects=8, resolution=2, seed=5, show_progress=False,
                                    val_anomalous=2)
    store = folder / "brain.zarr"
    assert not ingest(resolve_sources([], manifest), store, load_config(None).data, show_progress=False).failed
    return store


def recipe(tmp_path, store, **tune):
    tree = {"name": "search", "seed": 0,
            # relative to where tessera runs, as users write it: trials run in their own directories
            "data": {"store": os.path.relpath(store, ROOT),
                     "volume_stream": {"slice_size": 32, "min_foreground": 0.05, "normal_baseline": "train"}},
            "method": {"name": "reference_ae", "options": {"in_channels": 1, "width": 4, "depth": 2, "bottleneck": 4}},
            "train": {"data": "slices", "steps": 8, "micro_batch": 8, "num_workers": 0, "log_every": 4},
            "tune": {"space": {"method.options.width": {"type": "grid", "values": [4, 8]},
                               "train.lr": {"type": "grid", "values": [0.003, 0.0003]}},
                     "searcher": "grid", "scheduler": "fifo", "samples": 1, "folds": 2, "report_every": 4,
                     "cpus_per_trial": 1, "experiments_dir": str(tmp_path / "experiments"), **tune}}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def tessera(*args, **kwargs):
    return subprocess.run([sys.executable, "-m", "tessera.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"}, **kwargs)


def test_grid_search_picks_the_best_mean_fold_auroc(brain_store, tmp_path):
    done = tessera("tune", str(recipe(tmp_path, brain_store)), "--anomaly-budget", "1,2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    experiment = tmp_path / "experiments" / "search"
    table = pd.read_parquet(experiment / "results.parquet")
    assert table["trial"].nunique() == 4 and set(table["fold"]) == {0, 1}
    assert set(table["report"]) == {1, 2}
    last = table[table["report"] == 2]
    means = last.groupby("trial")["val_auroc"].mean()
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["best"]["trial"] == means.idxmax()
    assert summary["best"]["mean_val_auroc"] == pytest.approx(means.max())
    assert summary["unsupervised"]["trial"] == last.groupby("trial")["val_loss"].mean().idxmin()
    assert summary["validation"]["anomalies"] and len(summary["validation"]["normals_per_fold"]) == 2
    best = yaml.safe_load((experiment / "best.yaml").read_text())
    assert best["train"]["lr"] == summary["best"]["params"]["train.lr"] and "tune" not in best
    folds = json.loads((experiment / "folds.json").read_text())
    assert not set(folds["folds"][0]) & set(folds["folds"][1]) and folds["anomalies"]
    for name in ("objective_vs_params.png", "best_so_far.png", "auroc_by_fold.png"):
        assert (experiment / name).stat().st_size > 1000
    # each trial fold is a normal run directory that reproduces itself
    fold_dir = next((experiment / "trials").glob("*/fold0"))
    assert (fold_dir / "config.yaml").is_file() and (fold_dir / "metrics.jsonl").read_text()
    assert (fold_dir / "final.pt").is_file()
    # reuse_actors (the default): later trials ran in the processes of finished ones
    pids = {json.loads(line)["pid"] for p in (experiment / "trials").glob("*/attempts.jsonl")
            for line in p.read_text().splitlines()}
    assert len(pids) < 4
    # ... and each trial still logged into its own run directories
    for trial in (experiment / "trials").iterdir():
        for fold in ("fold0", "fold1"):
            log = (trial / fold / "log.txt").read_text()
            assert log.count("training reference_ae for 8 steps") == 1, (trial.name, fold, log)
    # the anomaly-budget study re-picks from the saved per-item validation scores
    scores = json.loads((fold_dir / "val_scores.json").read_text())["scores"]
    assert {label for _, label, _ in scores} == {0, 1} and len([s for s in scores if s[1]]) == len(folds["anomalies"])
    study = json.loads((experiment / "budget.json").read_text())
    assert study["trials"] == 4 and study["pool"] == len(folds["anomalies"]) == 2
    rows = {(r["setting"], r["budget"]): r for r in study["rows"]}
    assert "skipped" in rows[("one group", 2)]  # each validation anomaly is of its own kind
    tests = study["test_auroc"].values()
    for key in (("one group", 1), ("several groups", 1), ("several groups", 2)):
        assert min(tests) <= rows[key]["test_auroc_mean"] <= max(tests) == study["best_in_hindsight"]
    assert study["unsupervised_pick"]["trial"] in summary["unsupervised"]["trial"]
    assert study["unsupervised_pick"]["test_auroc"] == study["test_auroc"][study["unsupervised_pick"]["trial"]]
    assert (experiment / "budget.png").stat().st_size > 1000 and "anomaly budget" in done.stdout


def test_a_failing_trial_is_retried_then_reported(brain_store, tmp_path):
    # depth 9 is outside reference_ae's range: those trials raise in their Ray worker on every attempt
    path = recipe(tmp_path, brain_store, max_failures=1,
                  space={"method.options.depth": {"type": "grid", "values": [2, 9]}})
    done = tessera("tune", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    experiment = tmp_path / "experiments" / "search"
    summary = json.loads((experiment / "summary.json").read_text())
    assert len(summary["failed"]) == 1 and "depth" in summary["failed"][0]["error"]
    assert "failed:" in done.stdout
    assert summary["best"]["params"]["method.options.depth"] == 2
    attempts = {p.parent.name: len(p.read_text().splitlines()) for p in (experiment / "trials").glob("*/attempts.jsonl")}
    assert sorted(attempts.values()) == [1, 2]  # the failing trial ran again once (max_failures: 1)


def test_killed_driver_resumes_the_experiment(brain_store, tmp_path):
    path = recipe(tmp_path, brain_store)
    proc = subprocess.Popen([sys.executable, "-m", "tessera.cli", "tune", str(path)], cwd=ROOT,
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    experiment = tmp_path / "experiments" / "search"
    deadline = time.time() + 600
    # killed once a trial has made its first report and is training towards its second
    while time.time() < deadline and not list((experiment / "trials").glob("*/reports.jsonl")):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray runtime it started
    proc.wait()
    assert not (experiment / "results.parquet").exists(), "the search finished before it could be killed"
    done = tessera("tune", str(path), "--resume")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = pd.read_parquet(experiment / "results.parquet")
    # every trial counted with both of its reports: the interrupted one keeps the report it made before the
    # kill and finishes from its folds' checkpoints
    assert table["trial"].nunique() == 4
    assert table.groupby("trial")["report"].apply(lambda r: sorted(set(r))).tolist() == [[1, 2]] * 4
    summary = json.loads((experiment / "summary.json").read_text())
    assert summary["trials"] == 4 and summary["failed"] == [] and summary["stopped_early"] == []


def test_a_trial_can_train_each_fold_on_two_ranks(brain_store, tmp_path):
    path = recipe(tmp_path, brain_store, workers_per_trial=2, cpus_per_trial=2,
                  space={"train.lr": {"type": "grid", "values": [0.003]}})
    done = tessera("tune", str(path))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    experiment = tmp_path / "experiments" / "search"
    table = pd.read_parquet(experiment / "results.parquet")
    assert table["trial"].nunique() == 1 and set(table["report"]) == {1, 2} and set(table["fold"]) == {0, 1}
    assert table["val_auroc"].between(0, 1).all()
    for fold in (experiment / "trials").glob("*/fold*"):
        log = (fold / "log.txt").read_text()
        assert "on 2 rank(s)" in log and "resumed from step00000004" in log  # two segments, one per report
        assert (fold / "final.pt").is_file()
        records = [json.loads(line) for line in (fold / "metrics.jsonl").read_text().splitlines()]
        assert records[-1]["global_batch"] == 8 * 2  # micro batch x 2 ranks
