"""A progress line inside an epoch: rank 0 reports every batch, and every few seconds one line goes to stderr,

    [dermray] epoch 3/12 (full) batch 120/250 | 85 img/s | epoch ETA 1m32s

Pure Python (no Ray, no torch): the worker loop wraps its batch iterator (``ProgressLine.track``) or calls
``update`` after each batch. The line goes straight to file descriptor 2: stdout carries only the command's JSON
summary, and Ray Train tees the Python-level ``sys.stderr`` into its own log, which would print it twice.

The rate and the ETA are those of the last interval (since the previous line, or since the start for the first
one): an epoch's first batches wait for the input pipeline to fill, and a long epoch's ETA should follow its
steady pace, not its start.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

PROGRESS_ENV = "DERMRAY_PROGRESS_SECONDS"
DEFAULT_INTERVAL_S = 10.0


def progress_interval(default: float = DEFAULT_INTERVAL_S) -> float:
    """Seconds between progress lines: ``DERMRAY_PROGRESS_SECONDS`` when set to a number (0 or less: no lines),
    else ``default``."""
    value = os.environ.get(PROGRESS_ENV, "").strip()
    if not value:
        return default
    try:
        return max(0.0, float(value))
    except ValueError:
        return default


def format_duration(seconds: float) -> str:
    """``45s``, ``1m32s``, ``2h05m``."""
    seconds = max(0, math.floor(seconds + 0.5))  # half up: 14.5 s is 15s
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def _format_rate(per_s: float) -> str:
    return f"{per_s:.1f}" if per_s < 10 else f"{per_s:.0f}"


def _write_stderr(line: str) -> None:
    os.write(2, (line + "\n").encode())


def batch_images(batch: Any) -> int:
    """Images in a batch: the length of its "label" (or "image") column, else of the batch itself."""
    if isinstance(batch, dict):
        for key in ("label", "image"):
            if key in batch:
                return len(batch[key])
        return len(next(iter(batch.values()))) if batch else 0
    return len(batch)


class ProgressLine:
    """One epoch's (or one validation pass's) progress: ``update(images)`` after every batch; a line is written
    when ``interval_s`` seconds have passed since the previous one (or since the start), never more often.

    ``epoch`` counts from 1; ``phase`` is "head", "full" or "val" (validation: the ETA says "val ETA");
    ``total_batches`` is this process's expected batches in the epoch (approximate is fine; None or 0: unknown,
    then the line has no ETA; once exceeded, it is dropped). ``interval_s`` None: ``progress_interval()``, 0: off.
    ``clock`` and ``write`` are injectable for tests.
    """

    def __init__(self, epoch: int, epochs: int | None = None, phase: str = "", total_batches: int | None = None,
                 *, interval_s: float | None = None, clock: Callable[[], float] = time.monotonic,
                 write: Callable[[str], None] = _write_stderr, prefix: str = "[dermray]") -> None:
        self.epoch, self.epochs, self.phase = epoch, epochs, phase
        self.total_batches = total_batches if total_batches and total_batches > 0 else None
        self.interval_s = progress_interval() if interval_s is None else max(0.0, interval_s)
        self.clock, self.write, self.prefix = clock, write, prefix
        self.started = self.clock()
        self.batches = 0
        self.images = 0
        self.lines = 0
        self._mark_time, self._mark_batches, self._mark_images = self.started, 0, 0

    @property
    def enabled(self) -> bool:
        return self.interval_s > 0

    def update(self, images: int, batches: int = 1) -> str | None:
        """Count ``batches`` batches holding ``images`` images; returns the line when one was written."""
        self.batches += batches
        self.images += images
        if not self.enabled:
            return None
        now = self.clock()
        if now - self._mark_time < self.interval_s:
            return None
        line = self.line(now)
        self._mark_time, self._mark_batches, self._mark_images = now, self.batches, self.images
        self.lines += 1
        self.write(line)
        return line

    def line(self, now: float | None = None) -> str:
        """The progress line as of ``now`` (the clock's time by default), without writing it."""
        now = self.clock() if now is None else now
        seconds = max(now - self._mark_time, 1e-9)
        rate = (self.images - self._mark_images) / seconds
        label = f"epoch {self.epoch}" + (f"/{self.epochs}" if self.epochs else "")
        if self.phase:
            label += f" ({self.phase})"
        total = self.total_batches if self.total_batches and self.batches <= self.total_batches else None
        parts = [f"{self.prefix} {label} batch {self.batches}" + (f"/{total}" if total else ""),
                 f"{_format_rate(rate)} img/s"]
        window_batches = self.batches - self._mark_batches
        if total and window_batches > 0:
            eta = (total - self.batches) * seconds / window_batches
            parts.append(f"{'val' if self.phase == 'val' else 'epoch'} ETA {format_duration(eta)}")
        return " | ".join(parts)

    def track(self, batches: Iterable, images: Callable[[Any], int] = batch_images) -> Iterator:
        """Yield every batch of ``batches``, counting each once the consumer asks for the next one (its work done)."""
        for batch in batches:
            yield batch
            self.update(images(batch))
