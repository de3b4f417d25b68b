"""Killing a training run the hard way, for resume tests."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def kill_after_checkpoint(command: list[str], env: dict, run_dir: Path, step: int) -> int:
    """Start ``command`` (a `tessera train`) in its own session, SIGKILL the whole session once a
    checkpoint at ``step`` or later is the latest, wait until every process of it is gone; returns the
    step of the checkpoint a resume starts from."""
    proc = subprocess.Popen(command, cwd=ROOT, start_new_session=True, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    latest = run_dir / "checkpoints" / "latest.json"
    deadline = time.time() + 300
    while time.time() < deadline and not (latest.is_file() and json.loads(latest.read_text())["step"] >= step):
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            os.killpg(proc.pid, 0)
            time.sleep(0.1)
        except ProcessLookupError:
            break
    assert not (run_dir / "final.pt").exists(), "the run finished before it could be killed"
    return json.loads(latest.read_text())["step"]
