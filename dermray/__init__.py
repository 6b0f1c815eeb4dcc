"""dermray: train dermatology image classifiers on Ray (Ray Data ingest, Ray Train, Ray Tune)."""

__version__ = "0.1.0"
