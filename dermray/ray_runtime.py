"""Connecting to Ray: the cluster a job was submitted to, or a local instance when run by hand."""

from __future__ import annotations

import os

os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# Ray Data logs every dataset execution plan at INFO, once per epoch per split: dozens of lines that bury
# dermray's own progress lines. Processes of a local instance inherit this; set it to INFO to see them again.
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")


def ensure_ray() -> None:
    """Connect once per process. Under `ray job submit` RAY_ADDRESS names the cluster; otherwise a local
    instance starts, sized to this machine, with the dashboard on (Ray Train V2 queries it)."""
    import ray

    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return
    store = os.environ.get("DERMRAY_OBJECT_STORE_BYTES")
    ray.init(
        include_dashboard=True,
        object_store_memory=int(store) if store else None,
        logging_level="WARNING",
        log_to_driver=True,
    )
