"""Methods with feature statistics (DPA's μ, σ; MKD's λ) through the real trainer: the statistics are
computed once per run into feature_stats.pt (or taken from `tessera features stats`), every saved
model carries them, and the pretrained extractor stays out of final.pt."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from trainers.files import load_file
from trainers.checkpoint import load_statistics

ROOT = Path(__file__).resolve().parents[2]
OPTIONS = {"dpa": "{resolution: 32, base: 4, max_channels: 16, latent: 8, net: efficientnet_lite0, "
                  "layers: [reduction1, reduction2]}",
           "mkd": "{net: efficientnet_lite0, layers: [reduction2, reduction3], cloner_base: 4}"}


def tessera(*args):
    done = subprocess.run([sys.executable, "-m", "tessera.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def sets(store, method, *extra):
    values = [f"data.store={store}", "data.stream.crop=random", "data.stream.crop_size=32",
              "data.stream.min_tissue_fraction=0.3", f"method.name={method}", f"method.options={OPTIONS[method]}",
              "train.micro_batch=4", "train.num_workers=0", "train.steps=4", "train.checkpoint_every=2",
              "train.statistics_batches=2", *extra]
    return [arg for value in values for arg in ("--set", value)]


@pytest.mark.parametrize("method", ["dpa", "mkd"])
def test_statistics_are_computed_once_and_saved_with_the_model(sample_store, tmp_path, method):
    run_dir = tmp_path / "run"
    tessera("train", "--run-dir", str(run_dir), *sets(sample_store, method))
    stats = load_statistics(run_dir / "feature_stats.pt")
    final = load_file(run_dir / "final.pt", "tessera-final")["state"]
    assert not [key for key in final if key.startswith(("features.", "source."))]  # pretrained: reloaded
    if method == "dpa":
        assert set(stats) == {"reduction1", "reduction2"}
        torch.testing.assert_close(final["mean_reduction2"].flatten(), stats["reduction2"]["mean"])
        torch.testing.assert_close(final["std_reduction1"].flatten(), stats["reduction1"]["std"])
        assert bool(final["statistics_ready"])
    else:
        assert stats["lambda"] > 0
        torch.testing.assert_close(final["lambda_dir"], torch.tensor(stats["lambda"]))
    assert (run_dir / "log.txt").read_text().count("feature statistics over 2 batches") == 1


def test_features_stats_command_feeds_training(sample_store, tmp_path):
    out = tmp_path / "stats.pt"
    printed = tessera("features", "stats", *sets(sample_store, "dpa"), "--out", str(out), "--batches", "3")
    assert "reduction2" in printed and out.is_file()
    run_dir = tmp_path / "run"
    tessera("train", "--run-dir", str(run_dir), *sets(sample_store, "dpa", f"train.statistics_file={out}"))
    given, used = load_statistics(out), load_statistics(run_dir / "feature_stats.pt")
    assert given["reduction1"]["count"] == used["reduction1"]["count"] > 0
    torch.testing.assert_close(given["reduction2"]["mean"], used["reduction2"]["mean"])
    assert "feature statistics from" in (run_dir / "log.txt").read_text()
