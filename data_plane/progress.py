"""Progress that reads well both on a terminal and in a log file (Slurm's, nohup's).

On a terminal: rich's live bar. Otherwise (stdout is a file or a pipe) a live bar would print nothing
until it ends, so :func:`track` writes one plain line at the start, whenever another tenth of the work
is done or 30 s have passed, and at the end, each with the count, the rate and the time left.
"""

from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def interactive() -> bool:
    return sys.stdout.isatty()


def clock(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class ProgressLines:
    """Plain progress lines for ``total`` units of work, ``start`` of them done before: ``update(done)``
    prints when due (another tenth done, or ``every_seconds`` passed) or when forced."""

    def __init__(self, description: str, total: int | None, unit: str = "", every_seconds: float = 30.0,
                 stream=None, start: int = 0):
        self.description, self.total, self.unit, self.start = description, total, unit, start
        self.every_seconds, self.stream = every_seconds, stream or sys.stdout
        self.started = self.last_time = time.perf_counter()
        self.last_tenth = -1

    def line(self, done: int, extra: str = "") -> str:
        elapsed = time.perf_counter() - self.started
        rate = (done - self.start) / elapsed if elapsed > 0 else 0.0  # this process's own rate (a resumed run)
        text = f"{self.description}: {done}"
        if self.total:
            text += f"/{self.total} ({100 * done / self.total:.0f}%)"
        text += f", {rate:.3g} {self.unit or 'items'}/s, {clock(elapsed)} elapsed"
        if self.total and rate > 0 and done < self.total:
            text += f", ETA {clock((self.total - done) / rate)}"
        return text + (f"; {extra}" if extra else "")

    def update(self, done: int, extra: str = "", force: bool = False) -> None:
        now = time.perf_counter()
        tenth = int(10 * done / self.total) if self.total else -1
        if force or tenth > self.last_tenth or now - self.last_time >= self.every_seconds:
            print(self.line(done, extra), file=self.stream, flush=True)
            self.last_tenth, self.last_time = max(tenth, self.last_tenth), now


def track(items: Iterable[T], total: int | None = None, description: str = "", show: bool = True) -> Iterator[T]:
    """``items``, showing progress: rich's bar on a terminal, plain lines in a log, nothing if not ``show``."""
    if not show:
        yield from items
        return
    if total is None and hasattr(items, "__len__"):
        total = len(items)
    if interactive():
        from rich.progress import track as rich_track

        yield from rich_track(items, total=total, description=description)
        return
    lines = ProgressLines(description, total)
    lines.update(0, force=True)
    done = 0
    for item in items:
        yield item
        done += 1
        lines.update(done)
    if lines.last_tenth < 10 or not total:
        lines.update(done, force=True)
