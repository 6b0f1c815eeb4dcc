"""The in-epoch progress line (dermray.train.progress) on a fake clock: a line every interval and no more, the
right rate and ETA, off at 0, an unknown batch count. Pure: no Ray, no torch."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from dermray.train.progress import PROGRESS_ENV, ProgressLine, format_duration, progress_interval


class Clock:
    def __init__(self, now: float = 100.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def run_batches(progress: ProgressLine, clock: Clock, batches: int, seconds_per_batch: float, images: int = 32):
    for _ in range(batches):
        clock.now += seconds_per_batch
        progress.update(images)


def test_a_line_every_interval_with_rate_and_eta():
    clock, lines = Clock(), []
    progress = ProgressLine(3, 12, "full", total_batches=250, interval_s=10, clock=clock, write=lines.append)
    run_batches(progress, clock, 39, 0.5)  # 19.5 s: one line, at 10 s (batch 20)
    assert lines == ["[dermray] epoch 3/12 (full) batch 20/250 | 64 img/s | epoch ETA 1m55s"]
    run_batches(progress, clock, 1, 0.5)  # 20 s since the start, 10 s since the line
    assert len(lines) == 2 and lines[1].startswith("[dermray] epoch 3/12 (full) batch 40/250 | 64 img/s")
    assert lines[1].endswith("epoch ETA 1m45s")  # 210 batches at 0.5 s
    run_batches(progress, clock, 210, 0.5)  # 105 s more: ten more lines, one per 10 s
    assert len(lines) == 12 and progress.lines == 12
    assert progress.batches == 250 and progress.images == 250 * 32


def test_rate_and_eta_follow_the_last_interval():
    clock, lines = Clock(), []
    progress = ProgressLine(1, 2, "head", total_batches=100, interval_s=10, clock=clock, write=lines.append)
    clock.now += 9.0  # the input pipeline filling: a slow first batch
    run_batches(progress, clock, 2, 0.5, images=16)
    assert lines == ["[dermray] epoch 1/2 (head) batch 2/100 | 3.2 img/s | epoch ETA 8m10s"]
    run_batches(progress, clock, 40, 0.25, images=16)  # steady: 64 img/s, 58 batches left at 0.25 s
    assert lines[-1] == "[dermray] epoch 1/2 (head) batch 42/100 | 64 img/s | epoch ETA 15s"


def test_slow_batches_give_one_line_per_batch_at_most():
    clock, lines = Clock(), []
    progress = ProgressLine(1, 1, "full", total_batches=3, interval_s=5, clock=clock, write=lines.append)
    run_batches(progress, clock, 3, 30.0, images=8)
    assert len(lines) == 3
    assert lines[0] == "[dermray] epoch 1/1 (full) batch 1/3 | 0.3 img/s | epoch ETA 1m00s"
    assert lines[-1].endswith("batch 3/3 | 0.3 img/s | epoch ETA 0s")


def test_off_at_zero():
    clock, lines = Clock(), []
    progress = ProgressLine(1, 1, "full", total_batches=10, interval_s=0, clock=clock, write=lines.append)
    run_batches(progress, clock, 10, 60.0)
    assert lines == [] and not progress.enabled and progress.batches == 10


def test_unknown_or_exceeded_total_has_no_eta():
    clock, lines = Clock(), []
    progress = ProgressLine(2, None, "", total_batches=None, interval_s=1, clock=clock, write=lines.append)
    run_batches(progress, clock, 4, 0.5, images=10)
    assert lines == ["[dermray] epoch 2 batch 2 | 20 img/s", "[dermray] epoch 2 batch 4 | 20 img/s"]
    lines.clear()
    approximate = ProgressLine(1, 1, "full", total_batches=2, interval_s=1, clock=clock, write=lines.append)
    run_batches(approximate, clock, 4, 1.0, images=10)  # more batches than expected: the total is dropped
    assert lines[1].endswith("batch 2/2 | 10 img/s | epoch ETA 0s")
    assert lines[-1] == "[dermray] epoch 1/1 (full) batch 4 | 10 img/s"


def test_validation_label_and_track():
    clock, lines = Clock(), []
    progress = ProgressLine(4, 8, "val", total_batches=6, interval_s=2, clock=clock, write=lines.append)
    batches = [{"image": [0] * 5, "label": [0] * 5} for _ in range(6)]
    seen = []
    for batch in progress.track(batches):
        clock.now += 1.0  # the consumer's work on the batch: counted when it asks for the next one
        seen.append(batch)
    assert seen == batches and progress.images == 30
    assert lines[0] == "[dermray] epoch 4/8 (val) batch 2/6 | 5.0 img/s | val ETA 4s"
    assert len(lines) == 3


def test_interval_from_the_environment(monkeypatch):
    monkeypatch.delenv(PROGRESS_ENV, raising=False)
    assert progress_interval() == 10.0
    monkeypatch.setenv(PROGRESS_ENV, "2.5")
    assert progress_interval() == 2.5 and ProgressLine(1, interval_s=None, write=print).interval_s == 2.5
    monkeypatch.setenv(PROGRESS_ENV, "0")
    assert not ProgressLine(1, write=print).enabled
    monkeypatch.setenv(PROGRESS_ENV, "soon")
    assert progress_interval() == 10.0


@pytest.mark.parametrize("seconds, text", [(0, "0s"), (44.6, "45s"), (92, "1m32s"), (3599, "59m59s"),
                                           (7500, "2h05m"), (-3, "0s")])
def test_durations(seconds, text):
    assert format_duration(seconds) == text


def test_the_line_goes_to_file_descriptor_2_and_imports_neither_ray_nor_torch():
    code = ("import sys\nfrom dermray.train.progress import ProgressLine\n"
            "ProgressLine(1, 1, 'full', 4, interval_s=1e-9).update(8)\n"
            "assert 'ray' not in sys.modules and 'torch' not in sys.modules, sorted(sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, PROGRESS_ENV: ""})
    assert done.returncode == 0, done.stderr
    assert done.stdout == ""
    assert done.stderr.startswith("[dermray] epoch 1/1 (full) batch 1/4 | ")
