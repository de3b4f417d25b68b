"""The local job registry: one JSON file per submitted job under ``$TESSERA_JOBS`` (default
``runs/jobs``), written atomically. It holds the spec (no secret values: JobSpec refuses them) and
what the backend needs to follow the job."""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path


def jobs_dir() -> Path:
    return Path(os.environ.get("TESSERA_JOBS", "runs/jobs"))


def add(record: dict) -> dict:
    record = {"id": f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}", "submitted": time.time(), **record}
    save(record)
    return record


def save(record: dict) -> None:
    folder = jobs_dir()
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / f".{record['id']}.json.partial"
    partial.write_text(json.dumps(record, indent=1, default=str))
    partial.replace(folder / f"{record['id']}.json")


def load(job_id: str) -> dict:
    path = jobs_dir() / f"{job_id}.json"
    if not path.is_file():
        matches = sorted(jobs_dir().glob(f"*{job_id}*.json")) if jobs_dir().is_dir() else []
        if len(matches) == 1:
            path = matches[0]
        else:
            known = ", ".join(p.stem for p in all_paths()[-5:]) or "none"
            raise KeyError(f"no job '{job_id}' in {jobs_dir()} (latest: {known})")
    return json.loads(path.read_text())


def all_paths() -> list[Path]:
    return sorted(jobs_dir().glob("*.json")) if jobs_dir().is_dir() else []


def all_jobs() -> list[dict]:
    return [json.loads(p.read_text()) for p in all_paths()]
