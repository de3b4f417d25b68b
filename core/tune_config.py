"""The ``tune`` section of a run config: the search space over any config key, the searcher and
scheduler, the weakly-supervised validation protocol, and the resources of a trial."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from core.config import StrictConfig


class Dimension(StrictConfig):
    """One searched key: ``choice``/``grid`` over ``values``, ``uniform``/``loguniform`` in [low, high],
    ``randint`` in [low, high)."""

    type: Literal["choice", "grid", "uniform", "loguniform", "randint"]
    values: list[Any] | None = None
    low: float | None = None
    high: float | None = None

    @model_validator(mode="after")
    def _complete(self):
        if self.type in ("choice", "grid"):
            if not self.values:
                raise ValueError(f"a {self.type} dimension needs a non-empty 'values' list")
        elif self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} dimension needs low < high (got low={self.low}, high={self.high})")
        elif self.type == "loguniform" and self.low <= 0:
            raise ValueError("a loguniform dimension needs low > 0")
        return self


class TuneConfig(StrictConfig):
    space: dict[str, Dimension] = {}                  # dotted config key -> dimension, e.g. train.lr: {type: loguniform, …}
    searcher: Literal["random", "grid", "optuna"] = "random"  # optuna: TPE through Ray Tune's Optuna integration
    scheduler: Literal["asha", "fifo"] = "asha"       # asha stops weak trials early on the validation AUROC
    samples: int = Field(8, ge=1)                     # trials (grid: repeats of the whole grid)
    folds: int = Field(3, ge=2)                       # K folds of the normal training items
    report_every: int = Field(100, ge=1)              # steps between validation reports (ASHA's time unit)
    grace_period: int = Field(1, ge=1)                # reports before ASHA may stop a trial
    reduction_factor: int = Field(3, ge=2)            # ASHA keeps the best 1/reduction_factor at each rung
    val_split: str = "val"                            # split holding the known validation anomalies
    val_anomaly_groups: list[str] | None = None       # only anomalies of these groups choose (None: any group)
    val_anomaly_count: int | None = Field(None, ge=1)  # at most this many anomalous items (None: all)
    max_failures: int = Field(2, ge=0)                # retries of a failing trial before it is reported failed
    max_concurrent: int | None = Field(None, ge=1)    # trials at once (None: as resources allow)
    workers_per_trial: int = Field(1, ge=1)           # ranks training each fold model: > 1 runs torchrun per
                                                      # report segment (validation in between, in the trial)
    cpus_per_trial: float = Field(1, gt=0)            # Ray resources of a whole trial (all its workers)
    gpus_per_trial: float = Field(0, ge=0)
    reuse_actors: bool = True                         # run the next trial in a finished trial's process:
                                                      # saves a process start + imports per trial (bench/tune.py)
    experiments_dir: str = "runs/tune"                # experiment folders: <experiments_dir>/<name>

    @model_validator(mode="after")
    def _searcher_fits_space(self):
        grids = [k for k, d in self.space.items() if d.type == "grid"]
        if grids and self.searcher == "optuna":
            raise ValueError(f"the optuna searcher samples; it cannot take grid dimensions {grids}: use choice")
        if self.searcher == "grid" and any(d.type != "grid" for d in self.space.values()):
            raise ValueError("searcher 'grid' needs every dimension of tune.space to be of type grid")
        return self
