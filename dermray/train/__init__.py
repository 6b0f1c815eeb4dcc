"""Training: the per-epoch engine, the per-worker loop, and the Ray Train driver."""
