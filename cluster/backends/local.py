"""``local``: the job as a detached process group on this machine, its output in a log file and its
exit status in a file next to it (so any later ``tessera jobs status`` can tell how it ended)."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

from cluster.backends import Backend, BackendError, register_backend
from cluster.spec import JobSpec


@register_backend("local")
class LocalBackend(Backend):
    def render(self, spec: JobSpec) -> str:
        if spec.nodes > 1:
            raise BackendError("the local backend runs on this machine only: --nodes must be 1")
        lines = ["#!/bin/sh", f"cd {shlex.quote(str(spec.workdir.resolve()))}"]
        lines += [f"export {key}={shlex.quote(value)}" for key, value in spec.env.items()]
        lines.append(shlex.join([spec.python, "-m", "tessera.cli", *spec.tessera_args()]))
        return "\n".join(lines) + "\n"

    def submit(self, spec: JobSpec) -> dict:
        log_dir = spec.log_dir.resolve()
        log_dir.mkdir(parents=True, exist_ok=True)
        stem = log_dir / f"{spec.name}-{os.getpid()}-{len(os.listdir(log_dir))}"
        script, log, rc = stem.with_suffix(".sh"), stem.with_suffix(".log"), stem.with_suffix(".rc")
        script.write_text(self.render(spec))
        # The shell records the exit status after the job; the job's own output goes to the log.
        wrapper = f"sh {shlex.quote(str(script))} > {shlex.quote(str(log))} 2>&1; echo $? > {shlex.quote(str(rc))}"
        env = {**os.environ}  # pass_env: the submitting environment is inherited as is
        proc = subprocess.Popen(["sh", "-c", wrapper], start_new_session=True, env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return {"backend_id": str(proc.pid), "log": str(log), "rc_file": str(rc), "script": str(script)}

    def status(self, record: dict) -> str:
        rc = Path(record["rc_file"])
        if rc.is_file() and rc.read_text().strip():
            return "COMPLETED" if rc.read_text().strip() == "0" else "FAILED"
        try:
            os.kill(int(record["backend_id"]), 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
        if alive:
            return "RUNNING"  # also while a cancelled job is still shutting down
        # gone without writing its status: cancelled here, or killed from outside
        return "CANCELLED" if record.get("cancelled") else "FAILED"

    def logs(self, record: dict) -> str:
        log = Path(record["log"])
        return log.read_text(errors="replace") if log.is_file() else ""

    def cancel(self, record: dict) -> None:
        try:
            os.killpg(int(record["backend_id"]), signal.SIGTERM)
        except ProcessLookupError:
            pass
        record["cancelled"] = True
