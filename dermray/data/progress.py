"""Ray Data's own progress display for the commands whose Ray Data jobs run in the driver (stage, evaluate,
predict), on stderr; stdout keeps the command's one JSON line.

How Ray 2.60 picks the display, once per dataset execution, in the process that runs the execution
(``ray/data/_internal/progress/__init__.py``, ``get_progress_manager``):

- ``enable_progress_bars`` False: nothing (and a one-off WARNING saying so, from the
  ``ray.data._internal.progress`` logger);
- else, when ``sys.stdout`` is not a terminal (and not a Ray worker with ``use_ray_tqdm``): a text block logged
  at INFO every ``RAY_DATA_NON_TTY_PROGRESS_LOG_INTERVAL`` seconds (10) by the
  ``ray.data._internal.progress.logging_progress`` logger. dermray sets ``RAY_DATA_LOG_LEVEL=WARNING``
  (``dermray/__init__.py``, before any Ray import), which hides it, and leaves it hidden: a job's log or a
  script capturing stderr gets no 7-line block every 10 s (and a bad input's error stays the one line on stderr);
- else tqdm bars: with ``use_ray_tqdm`` (Ray's default) through ``ray.experimental.tqdm_ray``, which in the driver
  also replaces ``builtins.print`` with its own; without it, plain ``tqdm.tqdm`` on ``sys.stderr``. Either way
  without tqdm installed: no bars, and "tqdm is not installed. Progress bars will be disabled." (tqdm_ray) or
  "[dataset]: Run `pip install tqdm`" (plain) instead.

The CLI runs every command under ``contextlib.redirect_stdout(sys.stderr)``, so the terminal test Ray makes of
``sys.stdout`` is in effect a test of stderr, where the bars and the log lines go (tqdm's default file, Ray's
console log handler writes to ``sys.stderr`` at emit time): bars when stderr is a terminal, nothing when it is
a file or a pipe.

Training is left alone: its datasets execute in Ray Train's dataset actor (a Ray worker, stdout not a terminal),
where ``use_ray_tqdm = False`` (set by the trainer and here; the DataContext travels with the dataset) gives the
logging display at INFO, below that process's inherited ``RAY_DATA_LOG_LEVEL=WARNING``: quiet. Logger levels
set here stay in this process.
"""

from __future__ import annotations

import logging

PROGRESS_LOGGER = "ray.data._internal.progress"


def show_data_progress(enabled: bool = True) -> None:
    """Show (or hide) Ray Data's progress for the dataset executions this process runs from now on: tqdm bars on
    stderr when stderr is a terminal; nothing when it is a file or a pipe. Call it in the driver
    after ``ensure_ray()`` (or before: the DataContext is this process's) and before the dataset executes."""
    import ray.data

    context = ray.data.DataContext.get_current()
    # Plain tqdm: bars drawn by this process on sys.stderr, without tqdm_ray's replacement of builtins.print,
    # and the setting the trainer needs for its datasets anyway (a later train in the same process is quiet).
    context.use_ray_tqdm = False
    context.enable_progress_bars = enabled
    context.enable_operator_progress_bars = enabled
    # Off: also keep Ray's one-off "Progress bars disabled. To enable, ..." WARNING off the console.
    logging.getLogger(PROGRESS_LOGGER).setLevel(logging.NOTSET if enabled else logging.ERROR)

