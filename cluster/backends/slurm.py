"""``slurm``: an sbatch script from cluster/templates/sbatch.sh.j2. Training runs one torchrun per node
(``srun``, one task per node) meeting at a c10d rendezvous on the first node; tune and ingest on
several nodes get a Ray cluster inside the allocation (head on the first node, workers on the rest)."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

from cluster.backends import Backend, BackendError, register_backend
from cluster.spec import JobSpec

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"


def _size_mib(size: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]?)", size).groups()
    return int(number) * {"K": 1 / 1024, "": 1, "M": 1, "G": 1024, "T": 1024**2}[unit]


def _run(command: list[str], what: str) -> str:
    if shutil.which(command[0]) is None:
        raise BackendError(f"'{command[0]}' not found on PATH: {what} needs Slurm's client tools on this machine "
                           f"(Debian: apt-get install slurm-client), or choose another --backend")
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    if done.returncode:
        raise BackendError(f"{shlex.join(command)} failed: {(done.stderr or done.stdout).strip()}")
    return done.stdout


@register_backend("slurm")
class SlurmBackend(Backend):
    def render(self, spec: JobSpec, log: str | None = None) -> str:
        from jinja2 import Environment, FileSystemLoader, StrictUndefined

        environment = Environment(loader=FileSystemLoader(str(TEMPLATES)), undefined=StrictUndefined,
                                  keep_trailing_newline=True)
        tessera = shlex.join([spec.python, "-m", "tessera.cli", *spec.tessera_args()])
        container = ""
        if spec.image:  # pyxis/enroot, the common container route on GPU Slurm clusters
            container = (f" --container-image={shlex.quote(spec.image)}"
                         f" --container-workdir={shlex.quote(str(spec.workdir))}"
                         f" --container-mounts={shlex.quote(str(spec.workdir))}")
        ranks = spec.ranks_per_node if spec.kind == "train" else 1
        mem = f"{_size_mib(spec.mem_per_task) * ranks}M" if spec.mem_per_task else None
        return environment.get_template("sbatch.sh.j2").render(
            spec=spec, q=shlex.quote, kind=spec.kind, tessera=tessera, container=container,
            command_text=shlex.join(spec.command).replace("\n", " "), cpus_per_node=spec.cpus_per_task * ranks,
            mem_per_node=mem, workdir=str(spec.workdir.resolve()),
            log=log or str(spec.log_dir.resolve() / (f"{spec.name}-%A_%a.out" if spec.array else f"{spec.name}-%j.out")))

    def check_partition(self, spec: JobSpec) -> None:
        if spec.partition is None:
            return
        names = [p.rstrip("*") for p in _run(["sinfo", "-h", "-o", "%P"], "checking the partition").split()]
        if spec.partition not in names:
            raise BackendError(f"partition '{spec.partition}' does not exist on this cluster "
                               f"(partitions: {', '.join(names) or 'none'})")

    def submit(self, spec: JobSpec) -> dict:
        if shutil.which("sbatch") is None:
            raise BackendError("'sbatch' not found on PATH: the slurm backend submits from a Slurm login node "
                               "(Debian: apt-get install slurm-client); or use --backend local, ray or kubernetes")
        self.check_partition(spec)
        log_dir = spec.log_dir.resolve()
        log_dir.mkdir(parents=True, exist_ok=True)
        script = log_dir / f"{spec.name}-{time.strftime('%Y%m%d-%H%M%S')}.sbatch"
        script.write_text(self.render(spec))
        job_id = _run(["sbatch", "--parsable", str(script)], "submitting").strip().split(";")[0]
        if spec.array:  # one log per task: name-<job>_<task>.out, read together by logs()
            return {"backend_id": job_id, "script": str(script), "array": spec.array,
                    "log": str(log_dir / f"{spec.name}-{job_id}_0.out")}
        return {"backend_id": job_id, "script": str(script), "log": str(log_dir / f"{spec.name}-{job_id}.out")}

    def status(self, record: dict) -> str:
        done = subprocess.run(["scontrol", "show", "job", "-o", record["backend_id"]], capture_output=True,
                              text=True, timeout=60)
        states = re.findall(r"JobState=(\S+)", done.stdout)  # an array job: one line per task
        if not states:
            return "UNKNOWN"  # purged from slurmctld's memory after MinJobAge
        for waiting in ("RUNNING", "COMPLETING", "CONFIGURING", "PENDING"):
            if waiting in states:
                return waiting
        return next((state for state in states if state != "COMPLETED"), "COMPLETED")

    def logs(self, record: dict) -> str:
        log = Path(record["log"])
        if record.get("array"):  # every task's log, in task order
            prefix = log.name.rsplit("_", 1)[0]
            parts = sorted(log.parent.glob(f"{prefix}_*.out"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
            return "".join(f"== task {p.stem.rsplit('_', 1)[1]} ==\n{p.read_text(errors='replace')}" for p in parts)
        return log.read_text(errors="replace") if log.is_file() else ""

    def cancel(self, record: dict) -> None:
        _run(["scancel", record["backend_id"]], "cancelling")
