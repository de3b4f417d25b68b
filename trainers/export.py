"""A trained method back from its run directory (``final.pt``) or from an export, and the export itself:
one file that scores without the run directory (`tessera export`)."""

from __future__ import annotations

import json
from pathlib import Path

from trainers.files import load_file, save_file

EXPORT_FORMAT = "tessera-export"


def load_method(run_dir: Path, options: dict | None = None):
    """The trained method of a run (``final.pt``) or an export, in eval mode on the CPU. ``options``
    replace method options that shape scoring only (StyleGAN2's ``score``, ``projector_steps``; an
    encoder's ``refine_steps``): the weights must still fit, which load_state_dict checks."""
    from core.methods import create_method
    from trainers.checkpoint import STATISTICS_FILE, load_statistics

    run_dir = Path(run_dir)
    path = run_dir / "final.pt" if run_dir.is_dir() else run_dir
    if not path.is_file():
        raise FileNotFoundError(f"no trained weights at '{path}': train the run to the end first "
                                f"(or resume it with `tessera train --run-dir {run_dir} --resume`)")
    saved = load_file(path, ("tessera-final", EXPORT_FORMAT), "trained weights")
    saved["method"] = json.loads(saved["method_json"])
    method = create_method(saved["method"]["name"], {**saved["method"]["options"], **(options or {})})
    method.load_state_dict(saved["state"])
    for name, network in method.ema_networks().items():  # G_ema, where the run kept one, scores and samples
        if saved.get("ema"):
            network.load_state_dict(saved["ema"][name])
    if method.uses_statistics and (path.parent / STATISTICS_FILE).is_file() and run_dir.is_dir():
        # the statistics the run trained with: the same values its weights hold, plus any a newer tessera
        # derives from them (MKD's map scale) that weights saved by an older one lack
        method.set_statistics(load_statistics(path.parent / STATISTICS_FILE))
    return method.eval(), saved


def export_run(run_dir: str | Path, out: str | Path) -> Path:
    """One file that scores without the run directory: weights, method config, the run's data config."""
    from core.run_config import load_config

    run_dir = Path(run_dir)
    method, saved = load_method(run_dir)
    config = load_config(run_dir / "config.yaml")
    # the file's state plus what the run's statistics add to weights saved before a buffer existed (MKD's
    # map scale); the file's own values stay (the loaded method's generator holds G_ema, not G)
    state = {**method.state_dict(), **saved["state"]}
    bundle = {"method_json": saved["method_json"], "state": state, "averaged": saved.get("averaged"),
              "ema": saved.get("ema"),
              "config_json": json.dumps(config.model_dump(mode="json")), "source_run": str(run_dir.resolve()),
              "code": (run_dir / "git.txt").read_text() if (run_dir / "git.txt").is_file() else ""}
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    return save_file(bundle, out, EXPORT_FORMAT)
