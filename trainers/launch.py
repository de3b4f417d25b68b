"""How `tessera train` starts its ranks: in-process, torchrun on one node or per node (the form a Slurm
allocation runs, one `srun` task per node), or the DeepSpeed launcher over a hostfile (ssh/pdsh to
each node). Only the argument list is built here, so every form can be checked without the hosts.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Launch:
    nproc: int = 1                      # ranks per node
    nnodes: int = 1                     # torchrun: nodes taking part (one torchrun per node)
    rdzv_endpoint: str | None = None    # torchrun: HOST:PORT of the rendezvous, on the first node
    hostfile: Path | None = None        # DeepSpeed launcher: MPI-style hostfile ("host slots=N" lines)
    nodes: tuple[str, ...] = ()         # DeepSpeed launcher: these hosts, nproc slots each
    master_port: int = 29500

    def __post_init__(self):
        if self.hostfile is not None and self.nodes:
            raise ValueError("give either --hostfile or --nodes, not both")
        if (self.hostfile is not None or self.nodes) and (self.nnodes > 1 or self.rdzv_endpoint):
            raise ValueError("--hostfile/--nodes start every node from here (DeepSpeed launcher); --nnodes/"
                             "--rdzv-endpoint are for one torchrun per node (e.g. under srun): choose one form")
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise ValueError(f"--nnodes {self.nnodes} needs --rdzv-endpoint HOST:PORT on the first node, "
                             "the same on every node")
        if self.hostfile is not None and not Path(self.hostfile).is_file():
            raise ValueError(f"hostfile '{self.hostfile}' does not exist")

    @property
    def in_process(self) -> bool:
        return self.nproc == 1 and self.nnodes == 1 and self.hostfile is None and not self.nodes

    def command(self, run_dir: Path, resume: bool, until: int | None = None) -> list[str]:
        """The argument list that starts every rank of this node (or of all nodes, for a hostfile)."""
        tail = [str(run_dir)] + (["--resume"] if resume else []) + (["--until", str(until)] if until else [])
        if self.hostfile is not None or self.nodes:
            hostfile = self.hostfile or self.write_hostfile(run_dir)
            hosts = _hosts(hostfile)
            # One host needs no ssh: the launcher then starts the ranks locally, and its ssh probe would only fail.
            lone = ["--no_ssh_check"] if len(hosts) == 1 else []
            return [sys.executable, "-m", "deepspeed.launcher.runner", "--hostfile", str(hostfile), *lone,
                    "--master_addr", hosts[0], "--master_port", str(self.master_port),
                    "--no_local_rank", "--module", "trainers.worker", *tail]
        if self.nnodes > 1:
            return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={self.nnodes}",
                    f"--nproc_per_node={self.nproc}", "--rdzv_backend=c10d", f"--rdzv_endpoint={self.rdzv_endpoint}",
                    f"--rdzv_id={Path(run_dir).name}", "-m", "trainers.worker", *tail]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.nproc}",
                "-m", "trainers.worker", *tail]

    def write_hostfile(self, run_dir: Path) -> Path:
        """--nodes as a hostfile in the run directory, so the run records where it ran."""
        path = Path(run_dir) / "hostfile"
        path.write_text("".join(f"{host} slots={self.nproc}\n" for host in self.nodes))
        return path


def _hosts(hostfile: Path) -> list[str]:
    hosts = [line.split("#", 1)[0].split()[0] for line in Path(hostfile).read_text().splitlines()
             if line.split("#", 1)[0].strip()]
    if not hosts:
        raise ValueError(f"hostfile '{hostfile}' names no host")
    return hosts
