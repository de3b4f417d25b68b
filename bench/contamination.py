"""The contamination study of pgan_enc's paper: how much do detectors lose when the training data is not
anomaly-free? For each share P of training tiles carrying an unlabelled anomaly, on the slide benchmark:

    python bench/contamination.py --out runs/contamination [--fractions 0 0.02 0.05] [--steps 3000]

builds the benchmark (`tessera make-benchmark slide --contaminate P`; the test split is the same at every
P), ingests it, trains and evaluates with the real commands

- ``pgan_enc`` (configs/pgan_enc_slide_cpu.yaml, the growing schedule scaled to ``--steps``),
- ``fanogan``: the same GAN without encoder, then f-AnoGAN's izi_f encoder against it (``--encoder-steps``),
- ``reference_ae`` (configs/reference_slide.yaml, ``--reference-steps``),

and writes ``table.md`` / ``table.csv`` (test image AUROC with its 95 % bootstrap interval, for each method
and, for the GANs, each score term L_n, L_o and A), ``auroc_vs_contamination.png``, the paired difference
pgan_enc − fanogan on A at each P (``tessera compare``'s bootstrap), and ``latent_P*.png``: the histogram of
‖E(Q)‖ for normal and anomalous test tiles and a PCA of E(Q) coloured by label (the paper's Fig. 2/3).
Every step is skipped when its output exists, so a killed study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # ahead of bench/, whose tune.py would hide the tune package
TERMS = ("combined", "residual", "latent_norm")
LABELS = {"combined": "A", "residual": "L_n", "latent_norm": "L_o"}


def tessera(*args: str) -> None:
    print("+ tessera", " ".join(args), flush=True)
    subprocess.run([sys.executable, "-m", "tessera.cli", *args], cwd=ROOT, check=True)


def sets(*values: str) -> list[str]:
    return [arg for value in values for arg in ("--set", value)]


def growing(steps: int, batch: int = 16) -> str:
    """8 -> 16 -> 32 in four equal stages over the first two thirds of the run, 32² for the last third."""
    stage = max(steps * batch // 6, 1)
    return json.dumps({"start_resolution": 8, "target_resolution": 32, "stable_images": stage, "fade_images": stage})


def train(run_dir: Path, recipe: str, *overrides: str) -> None:
    """Train ``run_dir`` unless finished: resumed from its last checkpoint, or started again when it was
    stopped before its first (nothing of it is worth keeping)."""
    if (run_dir / "final.pt").is_file():
        return
    if (run_dir / "checkpoints" / "latest.json").is_file():
        tessera("train", "--run-dir", str(run_dir), "--resume")
        return
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    tessera("train", str(ROOT / recipe), "--run-dir", str(run_dir), *sets(*overrides))


def train_and_eval(run_dir: Path, recipe: str, *overrides: str) -> dict:
    train(run_dir, recipe, *overrides)
    metrics = run_dir / "eval-test" / "metrics.json"
    if not metrics.is_file():
        tessera("eval", str(run_dir))
    return json.loads(metrics.read_text())


def one_fraction(out: Path, fraction: float, args) -> dict:
    folder = out / f"P{fraction:g}"
    bench, store = folder / "bench", folder / "store.zarr"
    if not (bench / "manifest.csv").is_file():
        tessera("make-benchmark", "slide", "--out", str(bench), "--contaminate", str(fraction), "--seed", str(args.seed))
    if not (store / ".tessera" / "tiles.parquet").is_file():
        tessera("ingest", "--manifest", str(bench / "manifest.csv"), "--store", str(store), "--config",
                str(bench / "recipe.yaml"))
    common = (f"data.store={store}", f"seed={args.seed}")
    gan = (*common, f"train.steps={args.steps}", f"train.growing={growing(args.steps)}",
           f"train.checkpoint_every={max(args.steps // 4, 1)}")
    results = {"pgan_enc": train_and_eval(folder / "pgan_enc", "configs/pgan_enc_slide_cpu.yaml", *gan)}
    plain = folder / "pgan_plain"
    train(plain, "configs/pgan_enc_slide_cpu.yaml", *gan, "method.options.encoder_loss=none")
    results["fanogan"] = train_and_eval(
        folder / "fanogan", "configs/pgan_enc_slide_cpu.yaml", *common, "method.name=fanogan",
        f"method.options={{generator: {plain}}}", "train.growing=null", f"train.steps={args.encoder_steps}",
        "train.snapshot_kimg=null")
    results["reference_ae"] = train_and_eval(folder / "reference_ae", "configs/reference_slide.yaml", *common,
                                             f"train.steps={args.reference_steps}")
    paired = folder / "pgan_enc" / "eval-test" / "compare-fanogan" / "compare.json"
    if not paired.is_file():
        tessera("compare", str(folder / "pgan_enc"), str(folder / "fanogan"))
    results["paired"] = json.loads(paired.read_text())
    latent_figure(folder / "pgan_enc", store, out / f"latent_P{fraction:g}.png", fraction)
    return results


def rows_of(results: dict[float, dict]) -> list[dict]:
    rows = []
    for fraction, by_method in sorted(results.items()):
        for method in ("pgan_enc", "fanogan", "reference_ae"):
            metrics = by_method[method]
            scored = {LABELS[t]: metrics["score_terms"][t]["overall"] for t in TERMS} if "score_terms" in metrics \
                else {"score": metrics["overall"]}
            for term, values in scored.items():
                rows.append({"P": fraction, "method": method, "score": term, "auroc": values["image_auroc"],
                             "low": values.get("image_auroc_low"), "high": values.get("image_auroc_high"),
                             "n_normal": values["n_normal"], "n_anomalous": values["n_anomalous"]})
    return rows


def write_table(rows: list[dict], results: dict, out: Path) -> None:
    with open(out / "table.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fractions = sorted({r["P"] for r in rows})
    lines = ["| method | score | " + " | ".join(f"P = {p:.0%}" for p in fractions) + " |",
             "|---|---|" + "---|" * len(fractions)]
    for key in dict.fromkeys((r["method"], r["score"]) for r in rows):
        cells = []
        for p in fractions:
            r = next(r for r in rows if (r["method"], r["score"]) == key and r["P"] == p)
            cells.append(f"{r['auroc']:.3f} [{r['low']:.2f}, {r['high']:.2f}]")
        lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")
    lines += ["", "Paired bootstrap, pgan_enc − fanogan on A (same test tiles):", ""]
    for p in fractions:
        overall = results[p]["paired"]["groups"]["overall"]
        low, high = overall["difference_ci"]
        lines.append(f"- P = {p:.0%}: {overall['difference']:+.3f} [{low:+.3f}, {high:+.3f}], pgan_enc ahead in "
                     f"{overall['a_ahead']:.0%} of resamples")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for (method, term) in dict.fromkeys((r["method"], r["score"]) for r in rows):
        mine = sorted((r for r in rows if (r["method"], r["score"]) == (method, term)), key=lambda r: r["P"])
        xs = [100 * r["P"] for r in mine]
        ys = [r["auroc"] for r in mine]
        errors = [[y - r["low"] for y, r in zip(ys, mine)], [r["high"] - y for y, r in zip(ys, mine)]]
        ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=f"{method} {term}",
                    linestyle="-" if method == "pgan_enc" else "--" if method == "fanogan" else ":")
    ax.axhline(0.5, color="grey", linewidth=0.8)
    ax.set_xlabel("anomalous share of the training tiles P (%)")
    ax.set_ylabel("test image AUROC (95 % interval)")
    ax.set_title("slide benchmark: detectors trained on contaminated data")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def latent_figure(run_dir: Path, store: Path, path: Path, fraction: float) -> None:
    """‖E(Q)‖ of the test tiles by label, and a PCA of E(Q) coloured by label."""
    if path.is_file():
        return
    import matplotlib
    import numpy as np
    import torch
    from sklearn.decomposition import PCA

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data_plane.stream import TileStream
    from tessera.config import load_config
    from trainers.export import load_method

    config = load_config(run_dir / "config.yaml")
    method, _ = load_method(run_dir)
    stream_config = config.data.stream.model_copy(update={"splits": ["test"], "crop": "none", "augment": "none",
                                                          "labels": ["normal", "anomalous"]})
    codes, labels = [], []
    with torch.no_grad():
        for batch in TileStream(store, stream_config, shuffle=False).batched(32):
            codes.append(method.inverted(batch["image"])["code"])
            labels.append(batch["target"])
    codes, labels = torch.cat(codes).numpy(), torch.cat(labels).numpy()
    norms = np.linalg.norm(codes, axis=1) / np.sqrt(codes.shape[1])
    embedded = PCA(n_components=2, random_state=0).fit_transform(codes)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=110)
    bins = np.linspace(norms.min(), norms.max(), 30)
    for target, name, colour in ((0, "normal", "tab:blue"), (1, "anomalous", "tab:red")):
        axes[0].hist(norms[labels == target], bins=bins, alpha=0.6, density=True, label=name, color=colour)
        axes[1].scatter(*embedded[labels == target].T, s=8, alpha=0.7, label=name, color=colour)
    axes[0].set_xlabel("‖E(Q)‖ / √N_z")
    axes[0].legend()
    axes[1].set_title("PCA of E(Q)")
    axes[1].legend()
    fig.suptitle(f"pgan_enc, test tiles, trained with P = {fraction:.0%} contamination", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/contamination"))
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.02, 0.05])
    parser.add_argument("--steps", type=int, default=3000, help="pgan_enc and the plain GAN's steps")
    parser.add_argument("--encoder-steps", type=int, default=1000, help="fanogan's encoder steps")
    parser.add_argument("--reference-steps", type=int, default=1200, help="reference_ae's steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    args.out.mkdir(parents=True, exist_ok=True)
    results = {p: one_fraction(args.out.resolve(), p, args) for p in args.fractions}
    rows = rows_of(results)
    write_table(rows, results, args.out)
    plot(rows, args.out / "auroc_vs_contamination.png")
    print(f"-> {args.out / 'table.md'}, {args.out / 'auroc_vs_contamination.png'}, {args.out}/latent_P*.png")


if __name__ == "__main__":
    main()
