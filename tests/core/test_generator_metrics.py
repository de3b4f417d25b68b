"""FD/KD: the Fréchet distance against scipy and the closed form on Gaussians, KID's unbiasedness, two
ranks equal to one, the real-vs-real baseline, and a missing Inception file named in the error."""

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from core.generator_metrics import Embedder, distances, metric_names, with_baseline


def gaussian(n, mean, std, dim=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=generator, dtype=torch.float64) * std + mean


def test_frechet_distance_matches_scipy_and_the_closed_form():
    a, b = gaussian(4000, 0.0, 1.0, seed=1), gaussian(4000, 0.5, 2.0, seed=2)
    got = distances(a, b, kid_subsets=5, kid_subset_size=500)["fd"]
    # scipy on the samples' own moments: the same number up to rounding
    mu1, mu2 = a.mean(0).numpy(), b.mean(0).numpy()
    s1, s2 = np.cov(a.numpy(), rowvar=False), np.cov(b.numpy(), rowvar=False)
    root = scipy.linalg.sqrtm(s1 @ s2).real
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * root))
    assert got == pytest.approx(expected, rel=1e-6)
    # and the population value: 8 · (0.5² + (1 − 2)²) = 10, within sampling error
    assert got == pytest.approx(8 * (0.25 + 1.0), rel=0.05)


def test_kernel_distance_is_unbiased_and_separates():
    same = [distances(gaussian(300, 0, 1, seed=2 * k), gaussian(300, 0, 1, seed=2 * k + 1),
                      kid_subsets=10, kid_subset_size=200)["kd"] for k in range(12)]
    spread = np.std(same) / np.sqrt(len(same))
    assert abs(np.mean(same)) < 3 * spread + 1e-4  # centred on 0 (a biased MMD would sit above it)
    apart = distances(gaussian(300, 0, 1, seed=50), gaussian(300, 1, 1, seed=51), kid_subsets=10, kid_subset_size=200)
    assert apart["kd"] > 10 * max(abs(v) for v in same)


def test_baseline_is_real_against_real_of_the_same_size():
    real, fake = gaussian(1000, 0, 1, seed=3), gaussian(600, 0.3, 1, seed=4)
    out = with_baseline(real, fake, kid_subsets=5, kid_subset_size=200)
    assert out["images"] == 500
    assert out["fd_real"] < out["fd"] and abs(out["kd_real"]) < out["kd"]
    assert out["fd"] == pytest.approx(distances(real[:500], fake[:500], kid_subsets=5, kid_subset_size=200)["fd"])


def test_two_ranks_give_what_one_gives(tmp_path):
    import os
    import subprocess
    import sys

    real, fake = gaussian(400, 0, 1, seed=5), gaussian(400, 0.2, 1.5, seed=6)
    torch.save({"real": real, "fake": fake}, tmp_path / "features.pt")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "tests.core.two_rank_distances", str(tmp_path / "features.pt"), str(tmp_path / "two.pt")],
                          cwd=Path(__file__).resolve().parents[2], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = torch.load(tmp_path / "two.pt", weights_only=True)
    torch.manual_seed(0)
    one = distances(real, fake, kid_subsets=4, kid_subset_size=100)
    assert two["fd"] == pytest.approx(one["fd"], rel=1e-9)
    assert two["kd"] == pytest.approx(one["kd"], rel=1e-9)


def test_missing_inception_weights_name_the_file_and_the_surrogate(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth.*efficientnet_lite0"):
        Embedder("inception", inception_weights=str(tmp_path / "absent.pth"))
    assert metric_names("inception") == ("FID", "KID")
    assert metric_names("efficientnet_lite0") == ("FD-EffNetLite0", "KD-EffNetLite0")


def test_surrogate_embeds_tiles_of_any_size():
    embedder = Embedder("efficientnet_lite0")
    for size in (32, 64):
        features = embedder(torch.rand(3, 3, size, size))
        assert features.shape == (3, 320) and torch.isfinite(features).all()
