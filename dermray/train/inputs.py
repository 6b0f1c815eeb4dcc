"""What the driver hands every Train worker, in a module of its own.

Ray Train's controller unpickles ``train_loop_config`` when it starts: defined beside the training function
(torch, torchvision, scikit-learn), ``WorkerInputs`` made every run's controller import all of them first: 2.6 s
of a one-epoch run's 16-23 s on 2 CPUs (docs/internals.md). Only the workers need the heavy modules.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dermray.models.identity import ModelIdentity


@dataclass(frozen=True)
class WorkerInputs:
    """Everything the driver decided that every worker needs, passed as ``train_loop_config["inputs"]``."""

    identity: ModelIdentity  # classes, taxonomy, melanoma class, resolved config (JSON): into every checkpoint
    train_rows: int  # rows of the training split (for the schedule's steps per epoch)
    class_weights: list[float] | None = None  # the weighted loss's, when train.imbalance is weighted_loss
    # False only for a pilot split smaller than one batch: its partial batch is all there is to train on.
    drop_last: bool = True
    torch_threads: int | None = None  # CPU workers: the CPUs each was given
    continue_from: Any = None  # a ray.train.Checkpoint a new run starts from (a PBT trial's takeover)
    # train.head_on_cached_features: the fingerprint of the backbone the cached features came from (else None).
    cached_features_of: str | None = None
    debug: bool = False  # DERMRAY_DEBUG: worker tracebacks stay on the console
    # Rank 0 calls each with (metrics, epoch number) after every epoch: the MLflow run's EpochLogger.log.
    epoch_observers: list = field(default_factory=list)
