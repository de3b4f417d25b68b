"""A real single-node Slurm for the tests: Debian's slurm-wlm and munge (installed if missing, which
needs root and the package index), a slurm.conf for this host, munged, slurmctld and slurmd started
here and stopped afterwards. Where the machine cannot run it, the tests that need it are skipped
with the reason shown."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def _install() -> str | None:
    """None when Slurm and munge are there (installing them if possible), else why they are not."""
    if shutil.which("slurmctld") and shutil.which("munged"):
        return None
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return "slurm-wlm is not installed and this user cannot apt-get install it"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "slurm-wlm", "munge"]):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
        if done.returncode:
            return f"{' '.join(command)} failed: {done.stderr.strip()[-300:]}"
    return None


def _memory_mib() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) // 1024
    return 4096


def _wait(check, what: str, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise TimeoutError(f"{what} within {timeout:.0f} s")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = _install()
    if reason:
        pytest.skip(f"no Slurm here: {reason}")
    root = tmp_path_factory.mktemp("slurm")
    host = socket.gethostname()
    for folder in ("state", "spool", "log", "run"):
        (root / folder).mkdir()
    key = Path("/etc/munge/munge.key")
    if not key.is_file():
        key.write_bytes(os.urandom(1024))
    shutil.chown(key, "munge", "munge")
    key.chmod(0o400)
    Path("/run/munge").mkdir(exist_ok=True)
    shutil.chown("/run/munge", "munge", "munge")
    munged = None
    if subprocess.run(["munge", "-n"], capture_output=True).returncode:  # no munged running yet: start ours
        munged = subprocess.run(["runuser", "-u", "munge", "--", "munged", "--force"], capture_output=True, text=True)
        assert munged.returncode == 0, munged.stderr
    conf = root / "slurm.conf"
    conf.write_text(f"""ClusterName=tessera-test
SlurmctldHost={host}
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=600
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
NodeName={host} CPUs={os.cpu_count()} RealMemory={max(_memory_mib() - 1024, 1024)} State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    os.environ["SLURM_CONF"] = str(conf)  # for sbatch/squeue/scontrol called by tessera in this process
    for daemon in ("slurmctld", "slurmd"):
        done = subprocess.run([daemon, "-f", str(conf)], capture_output=True, text=True, env=env)
        assert done.returncode == 0, f"{daemon}: {done.stderr}"

    def idle():
        out = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, env=env).stdout
        return out.strip() in ("idle", "mix", "alloc")

    try:
        _wait(idle, "the Slurm node did not become idle")
        yield {"conf": conf, "partition": "debug", "root": root}
    finally:
        for pid_file in ("slurmd.pid", "slurmctld.pid"):
            path = root / "run" / pid_file
            if path.is_file():
                try:
                    os.kill(int(path.read_text().strip()), signal.SIGTERM)
                except (ProcessLookupError, ValueError):
                    pass
        os.environ.pop("SLURM_CONF", None)
