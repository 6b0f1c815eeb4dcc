"""Sweeps: Ray Tune over dermray train (search space, schedulers, trial checkpoints)."""
