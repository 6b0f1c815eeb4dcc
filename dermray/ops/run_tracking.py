"""What each command records in MLflow, when tracking is on (``run.mlflow_tracking_uri`` or
``MLFLOW_TRACKING_URI``): the glue between dermray's runs and the MLflow layer (``dermray.ops.tracking``).

- ``dermray train``: one MLflow run per run folder (a resumed run reopens its MLflow run): the resolved config as
  params, tags for the manifest, the git commit and dermray's version, every epoch's metrics from rank 0 as they
  happen, and at the end ``config.yaml``, ``curves.png`` and ``summary.json`` as artifacts and the checkpoint URIs
  as tags (never a copy of the weights).
- ``dermray tune``: a parent run for the sweep, each trial's training run nested under it; the sweep's
  ``trials.csv``, ``sweep.png`` and ``best_config.yaml`` on the parent.
- ``dermray evaluate``: its metrics (``eval-<split>/...``) and ``report.html`` on the run the checkpoint came from.
- ``dermray nightly``: a promoted challenger becomes a version of ``nightly.mlflow_model_name`` with the alias
  ``champion``, after dermray's own registry promoted it (dermray's registry stays the source of truth).

The server is checked before anything trains: an unreachable one is a one-line error. After that, MLflow trouble
is a warning and never fails or changes what dermray does.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass

from dermray import __version__, storage
from dermray.config import Config, to_yaml
from dermray.models.checkpoint import read_history
from dermray.ops import tracking


@dataclass(frozen=True)
class TrackedRun:
    """An open MLflow run: where it is and its id."""

    uri: str
    run_id: str

    def epoch_logger(self) -> tracking.EpochLogger:
        return tracking.EpochLogger(self.uri, self.run_id)


def tracking_uri(config: Config) -> str | None:
    return tracking.resolve_tracking_uri(config.run.mlflow_tracking_uri)


def _tags(config: Config, kind: str) -> dict[str, str]:
    tags = {"dermray.kind": kind, "dermray.version": __version__}
    if config.data.manifest:
        tags["dermray.manifest"] = config.data.manifest
    commit = tracking.git_commit()
    if commit:
        tags[tracking.GIT_COMMIT_TAG] = commit
    return tags


def check_server(config: Config) -> None:
    """One line (DermrayError) when tracking is on and its server cannot be reached or mlflow is missing: called
    first, before staging, Ray or training spend anything."""
    uri = tracking_uri(config)
    if uri is not None:
        tracking.check_reachable(uri)


def open_training_run(config: Config, run_uri: str, resumed: bool, parent: TrackedRun | None = None
                      ) -> TrackedRun | None:
    """Open (or reopen, for a resumed run) the run's MLflow run, nested under ``parent`` (a sweep's); None when
    tracking is off. Raises DermrayError (one line) when it cannot: nothing has trained yet."""
    uri = parent.uri if parent else tracking_uri(config)
    if uri is None:
        return None
    run_id = tracking.start_run(uri, config.run.mlflow_experiment, config.run.name,
                                params=config.model_dump(mode="json", exclude={"nightly", "tune"}),
                                tags=_tags(config, "train"), parent_run_id=parent.run_id if parent else None,
                                run_uri=run_uri, resume=resumed)
    return TrackedRun(uri, run_id)


def close_training_run(run: TrackedRun | None, config: Config, summary: dict | None) -> None:
    """Artifacts, checkpoint tags and the end status (FAILED when ``summary`` is None)."""
    if run is None:
        return
    if summary is None:
        tracking.set_terminated(run.uri, run.run_id, "FAILED")
        return

    _send_missing_epochs(run, summary)
    files: dict[str, bytes] = {"config.yaml": to_yaml(config).encode(),
                               "summary.json": json.dumps(summary, indent=2, default=str).encode()}
    if summary.get("curves"):
        files["curves.png"] = storage.read_bytes(summary["curves"])
    tracking.log_artifacts(run.uri, run.run_id, files)
    tracking.set_tags(run.uri, run.run_id, {tracking.CHECKPOINT_TAG: summary["checkpoint"],
                                            "dermray.latest_checkpoint": summary.get("latest_checkpoint") or ""})
    tracking.set_terminated(run.uri, run.run_id, "FINISHED")


def _send_missing_epochs(run: TrackedRun, summary: dict) -> None:
    """Log the epochs of the run's history that never reached MLflow (the server was down when the worker sent
    them, and still down at the last epoch): the checkpoint's history is the record, MLflow a view of it."""

    latest = summary.get("latest_checkpoint") or summary.get("checkpoint")
    logged = tracking.logged_steps(run.uri, run.run_id, "train_loss")
    if latest is None or logged is None:
        return
    missing = [h for h in read_history(latest) if h.get("epoch") not in logged]
    logger = run.epoch_logger()
    for epoch in missing:
        logger.log(epoch, step=epoch["epoch"])


def open_sweep_run(config: Config, sweep_dir: str) -> TrackedRun | None:
    """The sweep's parent run (its trials nest under it); None when tracking is off."""
    uri = tracking_uri(config)
    if uri is None:
        return None
    params = {"tune": config.tune.model_dump(mode="json"), **config.model_dump(mode="json", exclude={"nightly",
                                                                                                      "tune"})}
    run_id = tracking.start_run(uri, config.run.mlflow_experiment, config.tune.name, params=params,
                                tags=_tags(config, "sweep"), run_uri=sweep_dir,
                                resume=tracking.find_run(uri, config.run.mlflow_experiment, sweep_dir) is not None)
    return TrackedRun(uri, run_id)


def close_sweep_run(run: TrackedRun | None, summary: dict | None) -> None:
    """The sweep's artifacts, best trial and end status. Tune stops a trial from outside (ASHA at a rung, and at
    its last epoch), so a trial's own end-of-run code rarely runs: its run is closed here, FINISHED when the trial
    completed its epochs, KILLED when it was stopped early or failed."""
    if run is None:
        return
    tracking.end_open_children(run.uri, run.run_id, _trial_status(summary))
    if summary is None:
        tracking.set_terminated(run.uri, run.run_id, "FAILED")
        return
    files = {name: storage.read_bytes(summary[key]) for name, key in
             (("trials.csv", "results"), ("sweep.png", "plot"), ("best_config.yaml", "best_config"))}
    tracking.log_artifacts(run.uri, run.run_id, files)
    tracking.log_evaluation(run.uri, run.run_id, {"best_metric": summary["best_metric"]}, prefix="sweep")
    tracking.set_tags(run.uri, run.run_id, {"dermray.best_trial": summary["best_trial"],
                                            tracking.CHECKPOINT_TAG: summary.get("best_checkpoint") or ""})
    tracking.set_terminated(run.uri, run.run_id, "FINISHED")


def _trial_status(summary: dict | None):
    """Run name -> end status, from trials.csv (a trial's Train runs are named after it: ``<trial>`` or
    ``<trial>-from-...`` under PBT)."""
    import pandas as pd

    completed: set[str] = set()
    if summary is not None:
        table = pd.read_csv(io.BytesIO(storage.read_bytes(summary["results"])), dtype={"trial": str})
        completed = set(table.loc[table["status"] == "completed", "trial"])

    def status(run_name: str) -> tracking.RunStatus:
        return "FINISHED" if run_name.split("-")[0] in completed else "KILLED"
    return status


def log_evaluation(checkpoint: str, checkpoint_config: dict, split: str, metrics: dict, report_uri: str) -> None:
    """An evaluation's metrics and report on the MLflow run of the checkpoint's training run, when tracking is on
    and that run is found (a warning otherwise: the evaluation itself is complete either way)."""
    run = checkpoint_config.get("run") or {}
    uri = tracking.resolve_tracking_uri(run.get("mlflow_tracking_uri"))
    if uri is None:
        return
    experiment = run.get("mlflow_experiment", "dermray")
    run_id = tracking.find_run(uri, experiment, storage.parent(storage.normalize(checkpoint)))
    if run_id is None:
        tracking.warn(f"no MLflow run of experiment '{experiment}' for {checkpoint}: the evaluation is not logged "
                      "there")
        return
    tracking.log_evaluation(uri, run_id, metrics, storage.read_bytes(report_uri), prefix=f"eval-{split}")


def register_champion(config: Config, challenger: dict) -> str | None:
    """After dermray's registry promoted the challenger: its checkpoint as a version of the registered model,
    with the alias ``champion``; the version, or None (tracking off, or a warning)."""
    run_id = challenger.get("mlflow_run_id")
    uri = tracking_uri(config)
    if uri is None or run_id is None:
        return None
    return tracking.register_champion(uri, config.nightly.mlflow_model_name, run_id, challenger["checkpoint"])
