"""All rank logic in one place: who this process is, and the one flag that gates logging and checkpoints."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    local_rank: int
    world_size: int
    init_method: str | None = None   # "file://…" for a lone in-process rank: no port to race for

    @property
    def is_main(self) -> bool:
        return self.rank == 0  # this process logs, writes metrics and checkpoints' shared files

    @classmethod
    def from_env(cls) -> "DistEnv":
        """From the launcher's variables (torchrun, the DeepSpeed launcher, srun); a lone process is rank 0 of 1."""
        if "RANK" not in os.environ:  # in-process run: give DeepSpeed the variables a launcher would
            import tempfile

            os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())})
            # A free port found now may be taken by the time the store binds it; a file store cannot be.
            handle, path = tempfile.mkstemp(prefix="tessera-rendezvous-")
            os.close(handle)
            os.unlink(path)
            return cls(0, 0, 1, f"file://{path}")
        return cls(int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0)), int(os.environ["WORLD_SIZE"]))

    def init(self):
        """Start the process group (NCCL on GPUs, gloo on CPU); returns the torch device of this rank."""
        import deepspeed
        import torch

        if torch.distributed.is_initialized():  # a second run in the same process (e.g. the demo)
            return torch.device("cuda", self.local_rank) if torch.cuda.is_available() else torch.device("cpu")
        kwargs = {"init_method": self.init_method, "rank": self.rank, "world_size": self.world_size} \
            if self.init_method else {}
        if torch.cuda.is_available():
            torch.cuda.set_device(self.local_rank)
            deepspeed.init_distributed(dist_backend="nccl", **kwargs)
            return torch.device("cuda", self.local_rank)
        if self.world_size == 1:
            # DeepSpeed builds its shared-memory allreduce op (ninja, minutes with an empty extension cache)
            # whenever it starts on a CPU; a lone rank has no peer to share memory with, so skip it
            import deepspeed.ops

            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        deepspeed.init_distributed(dist_backend="gloo", **kwargs)
        return torch.device("cpu")


def die_with_parent(signal_number: int | None = None) -> None:
    """Ask Linux to send this process ``signal_number`` (default SIGTERM) when its parent dies, so that
    `kill -9` of `tessera train` does not leave torchrun and its ranks training as orphans (they would
    keep writing checkpoints beside a resumed run). The launcher gets it through :func:`guarded`; each rank
    asks for it at start (:func:`die_with_launcher`). A no-op where prctl does not exist (macOS)."""
    import ctypes
    import signal

    number = signal.SIGTERM if signal_number is None else signal_number
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError:
        return
    PR_SET_PDEATHSIG = 1
    libc.prctl(PR_SET_PDEATHSIG, int(number), 0, 0, 0)



# Run as `python -c GUARD COMMAND…`: ask for SIGTERM when the parent (`tessera train`) dies, check it has not
# died already, then become COMMAND (exec keeps the request). A wrapper rather than subprocess's
# preexec_fn, which is unsafe in a process that has threads (torch starts some at import).
_GUARD = ("import ctypes, os, signal, sys\n"
          "ctypes.CDLL('libc.so.6').prctl(1, int(signal.SIGTERM), 0, 0, 0)\n"
          "if os.getppid() == 1: sys.exit('error: tessera train is gone; not starting ' + sys.argv[1])\n"
          "os.execv(sys.argv[1], sys.argv[1:])\n")


def guarded(command: list[str]) -> list[str]:
    """``command`` started so that it dies with this process (see :func:`die_with_parent`), on Linux."""
    import sys

    if not sys.platform.startswith("linux"):
        return command
    return [sys.executable, "-c", _GUARD, *command]


def die_with_launcher() -> None:
    """A rank's start: die with the launcher (torchrun) that started it; if it is already gone (it died
    before the request took effect, and init adopted us), stop now."""
    die_with_parent()
    if os.getppid() == 1:
        raise SystemExit("error: the launcher that started this rank is gone; this rank stops")
