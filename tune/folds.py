"""The weakly-supervised protocol's data: K folds of the normal training items (slides or volumes) and
a confined set of known validation anomalies. Deterministic from the seed, and saved with the
experiment so every trial and every rerun uses the same split."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np


@dataclass
class Folds:
    kind: str                           # "tiles" or "volumes"
    train: list[str]                    # every normal training item
    folds: list[list[str]]              # held-out normal items of each fold
    anomalies: list[str]                # the known validation anomalies (items)
    groups: list[str]                   # their groups

    def fold_train(self, k: int) -> list[str]:
        held = set(self.folds[k])
        return [item for item in self.train if item not in held]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path: Path) -> "Folds":
        return cls(**json.loads(path.read_text()))


def item_table(config):
    """(items with split, label and group) of the store the config trains from: slides or volumes."""
    import pandas as pd

    from data_plane.kinds import reads_volumes

    if reads_volumes(config.train.data):
        from data_plane.volumes import volume_index

        volumes = volume_index(config.data.store)
        return "volumes", volumes.rename(columns={"volume_id": "item"})[["item", "split", "label", "group"]]
    from data_plane.store import read_tile_index

    tiles = read_tile_index(config.data.store)
    anomalous = tiles.groupby("slide_id")["label"].apply(lambda labels: bool((labels == "anomalous").any()))
    table = tiles.groupby("slide_id").agg(split=("split", "first"), group=("group", "first")).reset_index()
    table["label"] = np.where(table["slide_id"].map(anomalous), "anomalous", "normal")
    return "tiles", pd.DataFrame({"item": table["slide_id"], "split": table["split"], "label": table["label"],
                                  "group": table["group"]})


def make_folds(config) -> Folds:
    tune = config.tune
    kind, table = item_table(config)
    normal = sorted(table[(table["split"] == "train") & (table["label"] == "normal")]["item"])
    if len(normal) < tune.folds:
        raise ValueError(f"{len(normal)} normal training item(s) in '{config.data.store}' cannot make "
                         f"{tune.folds} folds: lower tune.folds or add training items")
    rng = np.random.default_rng(config.seed)
    shuffled = [normal[i] for i in rng.permutation(len(normal))]
    folds = [sorted(shuffled[k::tune.folds]) for k in range(tune.folds)]
    candidates = table[(table["split"] == tune.val_split) & (table["label"] == "anomalous")]
    if tune.val_anomaly_groups is not None:
        candidates = candidates[candidates["group"].isin(tune.val_anomaly_groups)]
    candidates = candidates.sort_values("item")
    if len(candidates) == 0:
        raise ValueError(f"no anomalous item in split '{tune.val_split}'"
                         f"{f' of groups {tune.val_anomaly_groups}' if tune.val_anomaly_groups else ''} in "
                         f"'{config.data.store}': the search needs a few known anomalies to choose by "
                         f"(tune.val_split, tune.val_anomaly_groups)")
    order = rng.permutation(len(candidates))[: tune.val_anomaly_count or len(candidates)]
    chosen = candidates.iloc[sorted(order)]
    return Folds(kind, normal, folds, list(chosen["item"]), list(chosen["group"]))
