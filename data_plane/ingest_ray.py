"""Ingest across a Ray cluster (or a local Ray runtime): one task per item, per-item progress reported to
an actor the driver polls for its bars, and a worker that dies failing its item alone."""

from __future__ import annotations

import os
from pathlib import Path

from data_plane.config import DataConfig
from data_plane.sources import Source
from data_plane.store import is_storage_error


class _ProgressBoard:
    """A Ray actor the workers report per-item progress to; the driver polls it for the bars."""

    def __init__(self):
        self.state: dict[str, tuple[int, int]] = {}

    def update(self, item_id: str, done: int, total: int) -> None:
        self.state[item_id] = (done, total)

    def read(self) -> dict[str, tuple[int, int]]:
        return dict(self.state)


class _ReportTo:
    """A picklable progress callback that forwards to the board at most every 2% of an item."""

    def __init__(self, board):
        self.board, self.last = board, {}

    def __call__(self, item_id: str, done: int, total: int) -> None:
        if done >= total or done - self.last.get(item_id, -total) >= max(1, total // 50):
            self.last[item_id] = done
            self.board.update.remote(item_id, done, total)


def ingest_with_ray(todo: list[Source], root: Path, config: DataConfig, workers: int,
                     ray_address: str | None, finish, item_progress) -> None:
    import ray

    from data_plane.ingest import ingest_item_safely  # the driver's module, loaded before it calls this

    started_here = not ray.is_initialized()
    if started_here:
        if ray_address:
            ray.init(address=ray_address, log_to_driver=False)
        else:
            ray.init(address="local", num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     _temp_dir=os.environ.get("RAY_TMPDIR"))
    try:
        board = ray.remote(num_cpus=0)(_ProgressBoard).remote()
        task = ray.remote(num_cpus=1, max_retries=0)(ingest_item_safely)
        pending = {task.remote(source, str(root), config, _ReportTo(board)): source for source in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for item_id, (done, total) in ray.get(board.read.remote()).items():
                item_progress(item_id, done, total)
            for ref in ready:
                source = pending.pop(ref)
                try:
                    entry = ray.get(ref)
                except Exception as exc:  # the worker process died (e.g. out of memory)
                    if is_storage_error(getattr(exc, "cause", None) or exc, root):
                        raise getattr(exc, "cause", None) or exc from None
                    entry = {"status": "failed", "kind": source.kind, "source": str(source.path),
                             "reason": f"worker died while ingesting: {type(exc).__name__}: {exc}"}
                finish(source, entry)
    finally:
        if started_here:
            ray.shutdown()
