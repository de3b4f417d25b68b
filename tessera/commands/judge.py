"""Commands that judge and choose: compare (paired intervals), posthoc (scoring settings chosen by a few
known anomalies), fuse (several runs' scores in one)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from tessera.app import SET_HELP, ConfigArg, _fail, _load, _WritingTo, app  # noqa: F401


@app.command()
def compare(a: str = typer.Argument(..., help="Run directory (or evaluation folder) A; several, comma-separated "
                                        "(e.g. one per seed), are averaged."),
            b: str = typer.Argument(..., help="Run directory (or evaluation folder) B, evaluated on the same items; "
                                        "comma-separated like A."),
            split: str = typer.Option("test", help="The split both were evaluated on (RUN_DIR/eval-SPLIT)."),
            out: Optional[Path] = typer.Option(None, help="Output folder; default A's eval folder/compare-<B>."),
            resamples: int = typer.Option(2000, min=100, help="Paired bootstrap resamples."),
            level: float = typer.Option(0.95, min=0.5, max=0.999, help="Coverage of the intervals.")) -> None:
    """Is A better than B? Image AUROC (and pixel AP) per group with paired bootstrap intervals: compare.json,
    compare.png."""
    from rich.console import Console
    from rich.table import Table

    from trainers.compare import compare_evals

    try:
        result = compare_evals([p for p in a.split(",") if p], [p for p in b.split(",") if p], split, out,
                               resamples, level)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    table = Table(title=f"image AUROC: A = {result['name_a']}, B = {result['name_b']} "
                        f"({level:.0%} intervals, {resamples} paired bootstrap resamples)")
    several = len(result["a"]) > 1 or len(result["b"]) > 1
    columns = ["group", "normal", "anomalous", "A", "B", "A − B", "A ahead"] + (["A runs", "B runs"] if several else [])
    for column in columns:
        table.add_column(column, justify="left" if column == "group" else "right")
    for name, row in result["groups"].items():
        low, high = row["difference_ci"]
        verdict = "green" if low > 0 else "red" if high < 0 else "default"
        cells = [name, str(row["n_normal"]), str(row["n_anomalous"]),
                 "{:.3f} [{:.2f}, {:.2f}]".format(row["auroc_a"], *row["auroc_a_ci"]),
                 "{:.3f} [{:.2f}, {:.2f}]".format(row["auroc_b"], *row["auroc_b_ci"]),
                 f"[{verdict}]{row['difference']:+.3f} [{low:+.2f}, {high:+.2f}][/]", f"{row['a_ahead']:.0%}"]
        if several:
            cells += [" ".join(f"{v:.2f}" for v in row["runs_a"]), " ".join(f"{v:.2f}" for v in row["runs_b"])]
        table.add_row(*cells)
    console = Console()
    console.print(table)
    pixel_rows = {name: row["pixel_ap"] for name, row in result["groups"].items() if "pixel_ap" in row}
    if pixel_rows:
        table = Table(title=f"pixel AP (pooled voxels; cases resampled, {level:.0%} intervals)")
        for column in columns[:1] + columns[3:]:
            table.add_column(column, justify="left" if column == "group" else "right")
        for name, row in pixel_rows.items():
            low, high = row["difference_ci"]
            verdict = "green" if low > 0 else "red" if high < 0 else "default"
            cells = [name, "{:.3f} [{:.2f}, {:.2f}]".format(row["a"], *row["a_ci"]),
                     "{:.3f} [{:.2f}, {:.2f}]".format(row["b"], *row["b_ci"]),
                     f"[{verdict}]{row['difference']:+.3f} [{low:+.2f}, {high:+.2f}][/]", f"{row['a_ahead']:.0%}"]
            if several:
                cells += [" ".join(f"{v:.2f}" for v in row["runs_a"]), " ".join(f"{v:.2f}" for v in row["runs_b"])]
            table.add_row(*cells)
        console.print(table)
    if several:
        console.print(f"A: {', '.join(result['a'])}\nB: {', '.join(result['b'])}", highlight=False)
    console.print(f"an interval across 0 makes no call; -> {result['out']}/compare.png", highlight=False)


@app.command()
def posthoc(run_dir: Path = typer.Argument(..., help="A finished training run directory."),
            search: list[str] = typer.Option(..., "--search", help="KEY=V1,V2,… a scoring setting and its values: a "
                                             "method option that shapes scoring (image_pooling=mean,top), or "
                                             "score_smoothing / normal_baseline (volume runs). Repeatable."),
            choose_split: str = typer.Option("val", help="The split whose known anomalies choose."),
            choose_groups: Optional[str] = typer.Option(None, help="Comma-separated anomaly groups that choose; the "
                                                                   "others are judged as kinds never seen."),
            test_split: str = typer.Option("test", help="The split the pick and the default are judged on."),
            out: Optional[Path] = typer.Option(None, help="Output folder (default RUN_DIR/posthoc)."),
            workers: int = typer.Option(0, min=0, help="DataLoader workers per evaluation."),
            unsupervised: list[str] = typer.Option([], "--unsupervised", help="KEY=VALUE: the setting a user "
                                                   "without known anomalies would run (e.g. score_smoothing=0), "
                                                   "judged beside the pick. Repeatable."),
            anomaly_budget: Optional[str] = typer.Option(None, help="Comma-separated counts (e.g. 1,5,20,50): repeat "
                                                         "the choice with only that many known anomalies "
                                                         "(budget.json, budget.png)."),
            draws: int = typer.Option(20, min=1, help="Random draws of the choosing anomalies per budget."),
            objective: str = typer.Option("image_auroc", help="What chooses: image_auroc (of the choosing items), "
                                          "pixel_ap (their maps against their masks), or mean (of the two).")
            ) -> None:
    """Choose scoring settings of a trained run by a few known anomalies, without retraining; judge the pick
    against the default (and an unsupervised setting) on the test split: paired intervals, overall and on
    held-out groups."""
    from trainers.posthoc import parse_setting, parse_space, posthoc_search

    try:
        space = parse_space(search)
        budgets = [int(b) for b in anomaly_budget.split(",") if b.strip()] if anomaly_budget else None
        result = posthoc_search(run_dir, space, choose_split, [g for g in (choose_groups or "").split(",") if g] or None,
                                test_split, out, workers, log=typer.echo,
                                unsupervised=parse_setting(unsupervised) if unsupervised else None,
                                budgets=budgets, draws=draws, objective=objective)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    typer.echo(f"pick: {result['pick']} (chosen on {choose_split}, anomalies of {result['selection']['groups']})")
    for group, row in result["pick_minus_default"].items():
        low, high = row["difference_ci"]
        held = " (held out of the choice)" if group in result["held_out_groups"] else ""
        typer.echo(f"  {test_split} {group}: pick {row['auroc_a']:.3f}, default {row['auroc_b']:.3f}, "
                   f"difference {row['difference']:+.3f} [{low:+.2f}, {high:+.2f}]{held}")
    for group, row in result.get("pick_minus_unsupervised", {}).items():
        low, high = row["difference_ci"]
        typer.echo(f"  {test_split} {group}: pick {row['auroc_a']:.3f}, unsupervised {row['auroc_b']:.3f}, "
                   f"difference {row['difference']:+.3f} [{low:+.2f}, {high:+.2f}]")
    typer.echo(f"apply it: {result['apply']}")


@app.command()
def fuse(runs: list[str] = typer.Argument(..., help="Two or more run directories (or evaluation folders), "
                                                 "evaluated on the same items."),
         out: Path = typer.Option(..., help="Output folder: an evaluation (scores.csv, metrics.json, curves) "
                                            "that `tessera compare` takes."),
         split: str = typer.Option("test", help="The split the runs were evaluated on (RUN_DIR/eval-SPLIT)."),
         normalise: str = typer.Option("rank", help="Each run's scale before the sum: rank or robust-z (label-free)."),
         choose_on: Optional[str] = typer.Option(None, help="Choose the weights by AUROC on this split's evaluations "
                                                            "(e.g. val: a few known anomalies); default equal weights."),
         choose_groups: Optional[str] = typer.Option(None, help="Comma-separated anomaly groups that choose; the "
                                                                "other groups are held out (kinds never seen)."),
         step: float = typer.Option(0.1, min=0.01, max=0.5, help="Weight grid step.")) -> None:
    """Fuse several runs' scores into one (rank- or robust-z-normalised weighted sum), with weights chosen by a
    few known anomalies or equal: metrics per group with intervals, fusion.json with what chose the weights."""
    from trainers.fuse import fuse_evals

    try:
        result = fuse_evals(runs, out, split, normalise, choose_on,
                            [g for g in (choose_groups or "").split(",") if g] or None, step)
    except (FileNotFoundError, ValueError) as exc:
        _fail(str(exc))
    fusion = result["fusion"]
    chose = (f"chosen on {fusion['selection']['split']} ({fusion['selection']['anomalous']} anomalies of "
             f"{', '.join(fusion['selection']['groups'])}; AUROC there {fusion['selection']['auroc']:.3f})"
             if fusion["selection"] else "equal")
    typer.echo(f"weights {chose}: " + ", ".join(f"{n} {w:.2f}" for n, w in zip(fusion["names"], fusion["weights"])))
    typer.echo(f"{split} image AUROC: fused {result['overall']['image_auroc']:.3f} "
               f"[{result['overall']['image_auroc_low']:.2f}-{result['overall']['image_auroc_high']:.2f}]; "
               + ", ".join(f"{n} {a:.3f}" for n, a in fusion["single_auroc"].items()))
    for group, values in result["groups"].items():
        held = " (held out of the choice)" if fusion["held_out_groups"] and group in fusion["held_out_groups"] else ""
        typer.echo(f"  {group}: {values['image_auroc']:.3f}{held}")
    typer.echo(f"written to {out}; pair it with a run: tessera compare {out} RUN --split {split}")
