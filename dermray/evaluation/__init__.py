"""Evaluation: batch inference, metrics, plots, reports, predictions and explanations."""
