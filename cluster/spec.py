"""What a job is, independent of where it runs: the tessera command and the resources it needs."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Commands whose parallel form is a Ray cluster (head on the first node, workers on the rest).
RAY_COMMANDS = ("tune", "ingest")
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|PRIVATE_?KEY|ACCESS_?KEY)", re.I)


class JobSpec(BaseModel):
    """One job: ``tessera <command…>`` with its resources. Values are data, never shell text: every
    backend quotes them (shlex.quote) or passes them as argument lists."""

    # as core.config.StrictConfig, without importing the project: cluster loads nothing of it at import
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    command: list[str] = Field(..., min_length=1)    # tessera's arguments, e.g. ["train", "configs/x.yaml"]
    name: str = "tessera"                             # job name (letters, digits, . _ -)
    nodes: int = Field(1, ge=1)
    gpus_per_node: int = Field(0, ge=0)
    tasks_per_node: int | None = Field(None, ge=1)    # ranks per node; default gpus_per_node, or 1 without GPUs
    cpus_per_task: int = Field(4, ge=1)
    mem_per_task: str | None = "16G"                  # Slurm-style size (K/M/G/T); None = the scheduler's default
    time: str = "04:00:00"                            # wall-clock limit, [D-]HH:MM:SS
    partition: str | None = None                      # Slurm partition / queue
    account: str | None = None
    qos: str | None = None
    image: str | None = None                          # container image (Kubernetes; Slurm through pyxis' srun flags)
    env: dict[str, str] = {}                          # environment for the job (no secrets: see pass_env)
    pass_env: list[str] = []                          # variables forwarded by name from the submitting shell
    workdir: Path = Path(".")                         # where the command runs (the tessera checkout or a copy)
    log_dir: Path = Path("runs/jobs")                 # where the job's output goes
    python: str = "python"                            # the interpreter on the nodes (with tessera installed)
    rdzv_port: int = Field(29400, ge=1024, le=65535)  # torchrun c10d rendezvous port on the first node
    ray_port: int = Field(6379, ge=1024, le=65535)    # Ray head port inside an allocation
    namespace: str = "default"                        # Kubernetes namespace
    shared_volume: str | None = None                  # Kubernetes PVC mounted at workdir (run dirs must be shared)
    ray_address: str | None = None                    # Ray backend: the cluster's dashboard address (http://host:8265)
    array: int | None = Field(None, ge=1)             # Slurm job array of this many tasks (e.g. synthesize shares)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}", value):
            raise ValueError(f"job name {value!r}: use letters, digits, '.', '_' or '-' (at most 63)")
        return value

    @field_validator("time")
    @classmethod
    def _slurm_time(cls, value: str) -> str:
        if not re.fullmatch(r"(\d+-)?\d{1,2}:\d{2}:\d{2}", value):
            raise ValueError(f"time {value!r}: expected [D-]HH:MM:SS, e.g. 04:00:00 or 2-00:00:00")
        return value

    @field_validator("mem_per_task")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch(r"\d+[KMGT]?", value):
            raise ValueError(f"mem_per_task {value!r}: expected a size such as 16G or 512M")
        return value

    @model_validator(mode="after")
    def _array_of_plain_commands(self):
        if self.array is not None and (self.kind != "plain" or self.nodes > 1):
            raise ValueError(f"array: a job array runs one task per share of a command such as synthesize; "
                             f"'{self.command[0]}' on {self.nodes} node(s) spreads with --nodes/--tasks-per-node instead")
        return self

    @model_validator(mode="after")
    def _no_secrets_in_files(self):
        leaked = [key for key in self.env if SECRET_NAME.search(key)]
        if leaked:
            raise ValueError(f"env {leaked} look like secrets and would be written into job scripts and the job "
                             f"registry: export them in the submitting shell and name them in pass_env instead")
        bad = [key for key in [*self.env, *self.pass_env] if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key)]
        if bad:
            raise ValueError(f"environment variable names {bad} are not valid")
        return self

    @property
    def ranks_per_node(self) -> int:
        return self.tasks_per_node or max(self.gpus_per_node, 1)

    @property
    def kind(self) -> Literal["train", "ray", "plain"]:
        """How the job spreads over nodes: torchrun ranks (train), a Ray cluster (tune, ingest), or not at all."""
        if self.command[0] == "train":
            return "train"
        return "ray" if self.command[0] in RAY_COMMANDS else "plain"

    def option(self, flag: str) -> str | None:
        """The value the command gives a flag (``--run-dir D`` or ``--run-dir=D``), if any."""
        for i, arg in enumerate(self.command):
            if arg == flag and i + 1 < len(self.command):
                return self.command[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
        return None

    def tessera_args(self, rendezvous: str | None = None, ray_address: str | None = None) -> list[str]:
        """The command with the flags its parallel form needs: ranks, nodes and rendezvous for training
        (``rendezvous`` may be shell text such as ``$head:29400``: callers quote everything else), the
        Ray address for tune/ingest."""
        args = list(self.command)
        if self.kind == "train":
            if self.ranks_per_node > 1 and self.option("--nproc") is None:
                args += ["--nproc", str(self.ranks_per_node)]
            if self.nodes > 1:
                if self.option("--run-dir") is None:
                    raise ValueError("a multi-node training job needs --run-dir in its command: every node writes "
                                     "into that one (shared) run directory")
                args += ["--nnodes", str(self.nodes)] + (["--rdzv-endpoint", rendezvous] if rendezvous else [])
        elif self.kind == "ray" and ray_address and self.option("--ray-address") is None:
            args += ["--ray-address", ray_address]
        return args
