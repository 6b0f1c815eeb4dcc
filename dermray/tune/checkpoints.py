"""Retention of the checkpoints a PBT sweep hands to Tune: each trial's last few, and any a trial will start from.

Tune's own ``CheckpointConfig(num_to_keep=k)`` cannot be used for this. Tune registers the same checkpoint
again each time it saves a trial (PBT saves the leading trials at every perturbation step, and pausing a trial
saves it once more), and Ray 2.60 counts every registration against ``k``. When the oldest registration drops
out, its folder is deleted even though later registrations of the same checkpoint are still kept. A trial that exploited
that checkpoint and has not restarted yet then fails with "No such file or directory". This callback counts a
checkpoint once, by path, and never deletes one that a trial's next start would load.
"""

from __future__ import annotations

from ray.tune import Callback


class KeepRecentAndPendingCheckpoints(Callback):
    """Runs on the sweep's driver. Keeps each trial's ``keep`` most recent checkpoints, and every checkpoint that is
    some trial's latest. After an exploit step, that latest is the leader's checkpoint the trailing trial will
    continue when it restarts. ``keep`` must exceed the perturbation interval: PBT clones the checkpoint a leader
    had at its last perturbation step, up to that many reports ago."""

    def __init__(self, keep: int):
        if keep < 1:
            raise ValueError(f"keep must be at least 1, got {keep}")
        self.keep = keep
        self.recent: dict[str, list] = {}  # trial id -> its distinct checkpoints, oldest first

    def on_checkpoint(self, iteration: int, trials: list, trial, checkpoint, **info) -> None:
        recent = self.recent.setdefault(trial.trial_id, [])
        if all(kept.path != checkpoint.path for kept in recent):
            recent.append(checkpoint)
        # Tune calls this before it records ``checkpoint`` as the trial's latest, so it is added here by hand.
        pending = {other.checkpoint.path for other in trials if other.checkpoint is not None} | {checkpoint.path}
        for old in recent[:-self.keep]:
            if old.path in pending:
                continue
            recent.remove(old)
            try:
                old.filesystem.delete_dir(old.path)
            except FileNotFoundError:
                pass  # already gone (deleted by hand, or a sweep restored from an older state)
