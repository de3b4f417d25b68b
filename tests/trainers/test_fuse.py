"""Score fusion: a few known anomalies choose the weights (never a test item, never a held-out group),
and a perfect scorer fused with a random one stays near perfect; the result pairs with `tessera compare`."""

import csv
import json

import numpy as np
from typer.testing import CliRunner

from tessera.cli import app
from trainers.fuse import choose_weights, fuse_evals, normalised


def write_eval(folder, items):
    """An evaluation folder's scores.csv from (id, label, group, score) rows."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "scores.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["id", "label", "group", "score"])
        writer.writerows(items)
    return folder


def make_runs(tmp_path, split, seed):
    """Run 'perfect' scores anomalies of every group above normals; run 'random' scores at random."""
    rng = np.random.default_rng(seed)
    rows = [(f"{split}-n{i}", 0, "normal") for i in range(40)]
    rows += [(f"{split}-{g}{i}", 1, g) for g in ("kind_a", "kind_b") for i in range(15)]
    perfect = [(i, label, g, float(label + rng.uniform(0, 0.9))) for i, label, g in rows]
    random = [(i, label, g, float(rng.normal())) for i, label, g in rows]
    for name, items in (("perfect", perfect), ("random", random)):
        write_eval(tmp_path / name / f"eval-{split}", items)
    return [tmp_path / "perfect", tmp_path / "random"]


def test_normalisers_keep_the_order_and_need_no_labels():
    scores = np.array([3.0, -1.0, 10.0, 2.0])
    for how in ("rank", "robust-z"):
        assert np.argsort(normalised(scores, how)).tolist() == np.argsort(scores).tolist()
    assert normalised(scores, "rank").tolist() == [0.625, 0.125, 0.875, 0.375]


def test_weights_chosen_on_a_few_anomalies_pick_the_perfect_scorer():
    rng = np.random.default_rng(0)
    labels = np.array([0] * 30 + [1] * 5)
    perfect = labels + rng.uniform(0, 0.5, len(labels))
    weights, auroc = choose_weights(np.stack([rng.normal(size=len(labels)), perfect]), labels, "rank")
    assert auroc == 1.0 and weights[1] >= 0.8


def test_fusion_of_a_perfect_and_a_random_scorer_is_near_the_perfect_one(tmp_path):
    runs = make_runs(tmp_path, "test", 1)
    make_runs(tmp_path, "val", 2)
    equal = fuse_evals(runs, tmp_path / "equal", "test")
    chosen = fuse_evals(runs, tmp_path / "chosen", "test", choose_on="val", choose_groups=["kind_a"])
    assert chosen["fusion"]["single_auroc"]["perfect"] == 1.0
    assert chosen["overall"]["image_auroc"] >= 0.98 > equal["overall"]["image_auroc"]
    assert chosen["fusion"]["weights"][0] >= 0.8
    # leave-kinds-out: only val items chose, and of kind_a only; kind_b is reported as held out
    selection = chosen["fusion"]["selection"]
    assert all(i.startswith("val-") for i in selection["items"])
    assert selection["groups"] == ["kind_a"] and not any("kind_b" in i for i in selection["items"])
    assert selection["anomalous"] == 15 and selection["normal"] == 40
    assert chosen["fusion"]["held_out_groups"] == ["kind_b"] and chosen["groups"]["kind_b"]["image_auroc"] >= 0.98
    assert json.loads((tmp_path / "chosen" / "fusion.json").read_text())["weights"] == chosen["fusion"]["weights"]
    # the fused folder is an evaluation: `tessera compare` pairs it with a single run
    result = CliRunner().invoke(app, ["compare", str(tmp_path / "chosen"), str(runs[1] / "eval-test"),
                                      "--out", str(tmp_path / "cmp"), "--resamples", "200"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["groups"]["overall"]["difference_ci"][0] > 0


def test_cli_fuse_says_what_chose_and_refuses_different_items(tmp_path):
    runs = make_runs(tmp_path, "test", 1)
    make_runs(tmp_path, "val", 2)
    result = CliRunner().invoke(app, ["fuse", *map(str, runs), "--out", str(tmp_path / "f"), "--choose-on", "val",
                                      "--choose-groups", "kind_a"])
    assert result.exit_code == 0, result.output
    assert "chosen on val (15 anomalies of kind_a" in result.output and "kind_b" in result.output
    assert "(held out of the choice)" in result.output
    write_eval(tmp_path / "other" / "eval-test", [("x", 0, "normal", 0.1), ("y", 1, "kind_a", 0.9)])
    result = CliRunner().invoke(app, ["fuse", str(runs[0]), str(tmp_path / "other"), "--out", str(tmp_path / "g")])
    assert result.exit_code == 2 and "scored different items" in result.output
