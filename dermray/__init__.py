"""dermray: train dermatology image classifiers on Ray (Ray Data ingest, Ray Train, Ray Tune)."""

import os

# Set here, before any module of the package can import Ray: Ray Data reads its log level once, when ray.data is
# first imported (a command that imported it before these lines ran would print every execution plan at INFO).
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
# Ray Data logs every dataset execution plan at INFO, once per epoch per split: dozens of lines that bury
# dermray's own progress lines. Processes of a local instance inherit this; set it to INFO to see them again.
os.environ.setdefault("RAY_DATA_LOG_LEVEL", "WARNING")

__version__ = "0.1.0"
