"""Population-based training that leaves a trial's last epoch alone.

Ray 2.60's asynchronous PBT treats a trial's last report like any other perturbation step: a leader that has just
finished its last epoch becomes the model to clone, and a trailing trial that exploits it restarts from a finished
checkpoint with nothing left to train. It ends as a copy of the leader, its row in ``trials.csv`` would show the
leader's figures, and the exploit leaves no Train run behind to say so. A trailing trial that reports its own last
epoch is no better off: cloning then means ending on someone else's model without training it.
So the last epoch is not a perturbation step: the result goes to Tune, the scheduler lets the trial finish.
"""

from __future__ import annotations

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler


class PopulationBasedTrainingBeforeLastEpoch(PopulationBasedTraining):
    """``PopulationBasedTraining`` whose perturbation steps stop before ``last_time`` (the run's epoch count, in
    units of ``time_attr``): a result at or past it only continues the trial."""

    def __init__(self, *, last_time: int, **kwargs):
        super().__init__(**kwargs)
        self.last_time = last_time

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self.last_time:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
