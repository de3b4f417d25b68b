"""Run directories: everything needed to reproduce a run, and its plain-text record.

``runs/<name>-<timestamp>/`` holds

- ``config.yaml``   the fully resolved config (every default spelled out),
- ``command.txt``   the exact command line,
- ``git.txt``       the code version (commit, dirty flag, tessera version),
- ``log.txt``       the human-readable log,
- ``metrics.jsonl`` one JSON object per line, appended as the run goes.

A run is rerun from its directory alone: ``tessera <cmd> runs/<dir>/config.yaml``.
"""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from core.config import StrictConfig

CODE_ROOT = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """Commit and dirty flag of the checkout tessera runs from (or a note that it is not one)."""
    from trainers.files import tessera_version

    __version__ = tessera_version()

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(CODE_ROOT), *args], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        return f"commit: {commit}\ndirty: {str(dirty).lower()}\ntessera: {__version__}\n"
    except (OSError, subprocess.SubprocessError):
        return f"commit: unknown (not a git checkout: {CODE_ROOT})\ndirty: unknown\ntessera: {__version__}\n"


class RunDir:
    """An open run directory: a logger writing ``log.txt`` and a ``metrics.jsonl`` appender."""

    def __init__(self, path: Path):
        self.path = path
        # One logger per directory, by its full path: tune's reused workers open fold0/ of trial after trial,
        # and a logger named by the folder alone would keep writing into the first trial's log.txt.
        self.logger = logging.getLogger(f"tessera.run.{Path(path).resolve()}")
        self.logger.setLevel(logging.INFO)
        self.logger.propagate = False
        if not self.logger.handlers:
            handler = logging.FileHandler(path / "log.txt", encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            self.logger.addHandler(handler)

    def log(self, message: str) -> None:
        self.logger.info(message)

    def metrics(self, record: dict[str, Any]) -> None:
        """Append one record (a tick, an evaluation) to ``metrics.jsonl`` with a wall-clock stamp."""
        line = json.dumps({"time": round(time.time(), 3), **record})
        with open(self.path / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def close(self) -> None:
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)


def create_run_dir(config: StrictConfig, name: str, root: str | Path = "runs",
                   command: list[str] | None = None, path: str | Path | None = None) -> RunDir:
    """Make ``<root>/<name>-<timestamp>/`` (or exactly ``path``) and write what reproduces the run into it."""
    if path is not None:
        path = Path(path)
        path.mkdir(parents=True)  # an existing run directory is resumed, never overwritten
    else:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        path = root / f"{name}-{stamp}"
        suffix = 1
        while True:  # two runs started within one second get distinct directories
            try:
                path.mkdir()
                break
            except FileExistsError:
                path = root / f"{name}-{stamp}-{suffix}"
                suffix += 1
    (path / "config.yaml").write_text(config.to_yaml())
    (path / "command.txt").write_text(shlex.join(command if command is not None else sys.argv) + "\n")
    (path / "git.txt").write_text(code_version())
    (path / "metrics.jsonl").touch()
    return RunDir(path)


def join_run_dir(config: StrictConfig, name: str, path: str | Path, timeout: float = 60.0) -> Path:
    """The run directory every node of a multi-node run shares: created by whichever node comes first,
    joined by the others, refused if it holds a different config (a stale directory, not this run)."""
    path = Path(path)
    try:
        create_run_dir(config, name, path=path)
        return path
    except FileExistsError:
        pass
    wanted = config.to_yaml()
    deadline = time.time() + timeout
    while True:
        text = (path / "config.yaml").read_text() if (path / "config.yaml").is_file() else ""
        if text == wanted:
            return path
        if not wanted.startswith(text):  # a prefix may be another node's config still being written
            raise FileExistsError(f"run directory '{path}' holds another run's config.yaml; every node must be "
                                  f"given the same config and overrides, or choose a new --run-dir")
        if time.time() > deadline:
            raise TimeoutError(f"run directory '{path}' exists but its config.yaml did not appear within "
                               f"{timeout:.0f} s")
        time.sleep(0.2)


def record_resume_overrides(path: Path, config: StrictConfig, overrides: list[str], command: list[str]) -> None:
    """A resume with ``--set``: config.yaml becomes the config the run continues with (written whole, then
    renamed); ``overrides.jsonl`` keeps when and from which step each change applied, and command.txt every
    command, so the directory still says how its weights were made."""
    from data_plane.store import atomic_write_text

    latest = path / "checkpoints" / "latest.json"
    step = json.loads(latest.read_text())["step"] if latest.is_file() else 0
    with open(path / "overrides.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"time": round(time.time(), 3), "from_step": step, "set": overrides}) + "\n")
    atomic_write_text(path / "config.yaml", config.to_yaml())
    with open(path / "command.txt", "a", encoding="utf-8") as f:
        f.write(shlex.join(command) + "\n")


class RunLocked(RuntimeError):
    """Another process is training in this run directory."""


class RunLock:
    """One trainer per run directory: an exclusive POSIX lock (``lockf``) on ``RUN_DIR/.train.lock``, which
    also holds the holder's pid and host for the message. The kernel drops the lock when its holder dies,
    however it dies (kill -9 included), so a stale lock never blocks a resume; a live one is never taken
    over. A POSIX lock belongs to the process alone: the DataLoader workers it forks do not hold it (an
    ``flock`` would be shared with them and outlive a killed rank until they notice)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / ".train.lock"
        self._file = None

    def holder(self) -> str | None:
        """Who holds the lock ("pid 123 on host"), or None when it is free (checked without taking it)."""
        if self._file is not None:
            return None
        try:
            self.acquire()
        except RunLocked as exc:
            return str(exc.args[1]) if len(exc.args) > 1 else "another process"
        self.release()
        return None

    def acquire(self) -> "RunLock":
        import errno
        import fcntl
        import os
        import socket

        handle = open(self.path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EACCES, errno.EAGAIN):
                handle.close()
                raise
            handle.seek(0)
            who = handle.read().strip() or "another process"
            handle.close()
            raise RunLocked(f"run directory '{self.path.parent}' is being trained by {who}; wait for it to "
                            f"finish or stop it (`kill {who.split()[1] if who.startswith('pid ') else 'PID'}`) "
                            f"before resuming", who) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()} on {socket.gethostname()}")
        handle.flush()
        self._file = handle
        return self

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the lock
            self._file = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
