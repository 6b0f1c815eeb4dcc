"""Reports a Ray Train run's epochs to the Tune trial that runs it, checkpoints included.

Under Ray Train V2 a trial's ``TorchTrainer`` trains in a controller actor of its own. Ray's ``TuneReportCallback``
forwards that run's metrics to the trial but not its checkpoints, and population-based training needs those: a
trailing trial continues from a leading trial's checkpoint. So the trial trains in a thread, and this callback
hands each report (the metrics, and the checkpoint when asked to) to the trial's main thread through a Ray queue.
The main thread reports both to Tune, which copies the checkpoint into the trial's own folder (out of reach of
Train's retention of the best k), and only then lets training go on: an epoch never starts before the scheduler
has decided on the one before, so ASHA and PBT act exactly at their epochs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import ray.tune
from ray.train import UserCallback
from ray.util.queue import Empty, Queue

POLL_S = 1.0


class TuneBridge(UserCallback):
    """The Train-side half: runs in the Train controller, blocks each report until the trial took it."""

    def __init__(self, share_checkpoints: bool):
        # Queues are small actors owned by the trial: they go when the trial goes (ASHA stop, PBT pause).
        self.reports = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.acks = Queue(maxsize=1, actor_options={"num_cpus": 0})
        self.share_checkpoints = share_checkpoints

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        # Every rank reports the same (gathered) validation metrics: rank 0's stand for the run.
        self.reports.put((metrics[0], checkpoint if self.share_checkpoints else None))
        self.acks.get()


def train_reporting_to_tune(train: Callable[[list], dict], share_checkpoints: bool) -> dict:
    """Run ``train(callbacks)`` (a Train run) in a thread of this Tune trial, reporting each of its epochs to Tune
    from here; returns its summary or raises its error."""

    bridge = TuneBridge(share_checkpoints)
    outcome: dict = {}

    def target() -> None:
        try:
            outcome["summary"] = train([bridge])
        except BaseException as error:  # re-raised in the trial's thread below
            outcome["error"] = error

    # A daemon: when Tune stops the trial (ASHA) or pauses it (PBT) the actor exits without waiting for it, and
    # the Train run, owned by this actor, goes with it.
    worker = threading.Thread(target=target, name="dermray-train", daemon=True)
    worker.start()
    while worker.is_alive():
        try:
            metrics, checkpoint = bridge.reports.get(timeout=POLL_S)
        except Empty:
            continue
        ray.tune.report(metrics, checkpoint=checkpoint)
        bridge.acks.put(True)
    worker.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["summary"]
