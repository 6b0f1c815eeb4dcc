"""How many CPUs a Train worker gets on a CPU cluster: the one formula for ``dermray train`` and ``dermray tune``.

``scaling.data_cpus`` CPUs stay free for Ray Data's read and decode tasks: on a 2-CPU node, 2 workers x 1 CPU
would leave none, and the first batch would never arrive. The rest is shared among the workers (of every trial
running at once), never more than ``scaling.cpus_per_worker`` each.
"""

from __future__ import annotations

import math

from dermray.config import ScalingConfig


def free_cpus(cluster_cpus: float, scaling: ScalingConfig) -> float:
    """The CPUs left for Train workers once Ray Data has its share (at least 0.1 per worker, so a run that
    oversubscribes a tiny cluster still schedules)."""
    return max(cluster_cpus - scaling.data_cpus, 0.1 * scaling.num_workers)


def cpus_per_worker(cluster_cpus: float, scaling: ScalingConfig, trials: int = 1, reserved: float = 0.0) -> float:
    """Each worker's CPUs when ``trials`` runs of ``scaling.num_workers`` workers share the cluster and
    ``reserved`` CPUs are held elsewhere (the trials' drivers); rounded down to Ray's 0.001 resolution."""
    share = (free_cpus(cluster_cpus, scaling) - reserved) / (trials * scaling.num_workers)
    return math.floor(min(scaling.cpus_per_worker, share) * 1000) / 1000
