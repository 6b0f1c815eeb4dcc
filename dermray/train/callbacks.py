"""A Ray Train callback that stops a run at once when a worker failed because of the input.

``run.max_failures`` restarts workers after a failure, which is right for a lost node or a preempted GPU, and
wasted minutes for an error that is the input's fault (a split whose every image is unreadable, a weights file
that does not fit, a checkpoint that holds code): each retry starts the workers again only to fail the same way.
Such errors are raised as ``DermrayError`` in the workers. This callback runs in Ray Train's controller; an
exception there is a controller error, which Ray Train's failure policy never retries, so the run ends after the
first attempt with the workers' own message.
"""

from __future__ import annotations

from ray.train import UserCallback

from dermray.errors import DermrayError
from dermray.ray_runtime import keep_off_console


def input_error(error: BaseException) -> DermrayError | None:
    """The ``DermrayError`` a worker raised, if that is what this worker failure is."""
    base = getattr(error, "_base_exc", error)  # Ray Train wraps the worker's exception with its traceback text
    return base if isinstance(base, DermrayError) else None


class StopOnInputError(UserCallback):
    def __init__(self, debug: bool = False) -> None:
        self.debug = debug

    def after_exception(self, run_context, worker_exceptions: dict[int, BaseException]) -> None:
        for error in worker_exceptions.values():
            cause = input_error(error)
            if cause is not None:
                if not self.debug:
                    # The controller logs this exception with a traceback: it stays in Ray Train's log files.
                    keep_off_console("Error in control loop iteration")
                raise DermrayError(str(cause))
