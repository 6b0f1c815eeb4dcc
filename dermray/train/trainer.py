"""The driver of ``dermray train``: builds the datasets and the ``TorchTrainer``, runs it, and summarises.

It never trains itself: it sizes the workers to the cluster (keeping CPUs for Ray Data, so small machines
do not deadlock), points Ray Train at ``run.storage`` (local or ``s3://``) under ``run.name`` so a relaunch
resumes from the latest checkpoint, and reads the result back into one JSON-able summary.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter

import ray
import ray.data
import ray.train
from ray.train.torch import TorchTrainer

from dermray import storage
from dermray.config import Config, to_yaml
from dermray.data.ingest import build_dataset, train_preset
from dermray.data.manifest import Manifest, manifest_uri, read_manifest
from dermray.data.sources import SourceOptions
from dermray.data.stage import stage
from dermray.errors import DermrayError
from dermray.evaluation.curves import curves_figure
from dermray.models.backbones import build_model
from dermray.models.checkpoint import (
    eval_preset_of,
    read_checkpoint_meta,
    read_history,
    read_ray_checkpoint_meta,
    warm_start_mismatch,
)
from dermray.models.identity import ModelIdentity
from dermray.ops import run_tracking
from dermray.ops.run_tracking import TrackedRun
from dermray.ray_runtime import debug_enabled, ensure_ray
from dermray.train.callbacks import StopOnInputError
from dermray.train.feature_cache import head_datasets
from dermray.train.inputs import WorkerInputs
from dermray.train.sizing import cpus_per_worker
from dermray.train.worker import train_loop_per_worker


def embedded_manifest(config: Config) -> str:
    """The embedded default's data: the synthetic dataset, staged once next to the run store."""

    out = storage.join(storage.parent(storage.normalize(config.run.storage)), "datasets", "synthetic")
    if not storage.exists(manifest_uri(out)):
        print(f"[dermray] staging the embedded synthetic dataset into {out}", file=sys.stderr, flush=True)
        stage("synthetic", SourceOptions(out=out, images_per_class=150, image_size=96, seed=0))
    return manifest_uri(out)


def class_weights(manifest: Manifest, split: str) -> list[float]:
    """Inverse-frequency weights, mean 1 over the present classes (absent classes weigh 0)."""
    counts = Counter(manifest.split(split)["label"].to_pylist())
    present = [c for c in range(len(manifest.classes)) if counts[c]]
    total = sum(counts.values())
    return [total / (len(present) * counts[c]) if counts[c] else 0.0 for c in range(len(manifest.classes))]


def worker_resources(config: Config) -> tuple[dict, int]:
    """Resources per worker and torch threads (on a CPU cluster: ``dermray.train.sizing``)."""

    scaling = config.scaling
    if scaling.use_gpu:
        return {"CPU": scaling.cpus_per_worker, "GPU": scaling.gpus_per_worker}, max(1, int(scaling.cpus_per_worker))
    cpus = cpus_per_worker(ray.cluster_resources().get("CPU", 1.0), scaling)
    return {"CPU": cpus}, scaling.torch_threads or max(1, round(cpus))


RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"


def latest_checkpoint(run_uri: str) -> str | None:
    """The checkpoint a relaunch of this run resumes from, or None for a new run.

    Ray Train's own bookkeeping decides (its checkpoint-manager snapshot names the latest checkpoint, written only
    after the checkpoint's upload completed), so a half-uploaded folder is never taken for the latest.
    """
    snapshot_uri = storage.join(run_uri, RAY_SNAPSHOT)
    if not storage.exists(snapshot_uri):
        return None
    latest = json.loads(storage.read_text(snapshot_uri)).get("latest_checkpoint_result") or {}
    name = latest.get("checkpoint_dir_name")
    return storage.join(run_uri, name) if name else None


def train(config: Config, callbacks: list | None = None, continue_from=None,
          tracking_parent: TrackedRun | None = None) -> dict:
    """Run (or resume) the training described by ``config``; returns the JSON summary (also written to
    ``<run>/summary.json``). ``callbacks`` are Ray Train callbacks (a Tune sweep passes its report callback);
    ``continue_from`` is a ``ray.train.Checkpoint`` that a new run starts from (weights, optimizer, schedule and
    epoch counter: a population-based trial taking over another's model); the run's own checkpoints win.
    ``tracking_parent``: the sweep's MLflow run, which this run's MLflow run nests under."""

    started = time.monotonic()
    if tracking_parent is None:
        run_tracking.check_server(config)  # an unreachable tracking server: one line, before anything else
    config, manifest, untrainable = _checked_inputs(config)
    run_uri = storage.join(storage.normalize(config.run.storage), config.run.name)
    resumed_from = latest_checkpoint(run_uri)
    tracked = run_tracking.open_training_run(config, run_uri, bool(resumed_from), tracking_parent)
    summary = None
    try:
        ensure_ray()
        # Built before anything is written: a manifest whose images moved since staging is refused here.
        datasets = _datasets(config, manifest)
        if resumed_from:
            print(f"[dermray] run '{config.run.name}' exists: resuming from {resumed_from}", file=sys.stderr,
                  flush=True)
        elif continue_from is not None:
            print(f"[dermray] run '{config.run.name}' continues from the checkpoint {continue_from.path}",
                  file=sys.stderr, flush=True)
        storage.write_text(storage.join(run_uri, "config.yaml"), to_yaml(config))
        resources, threads = worker_resources(config)
        inputs = _worker_inputs(config, manifest, threads, continue_from, tracked)
        if config.train.head_on_cached_features and _head_epochs_left(config, resumed_from, continue_from):
            head_data, fingerprint = head_datasets(config, manifest, run_uri)
            datasets |= head_data
            inputs = dataclasses.replace(inputs, cached_features_of=fingerprint)
        result = _fit(_torch_trainer(config, inputs, datasets, resources, callbacks or []))
        summary = summarize(result, run_uri, resumed_from, time.monotonic() - started, config.data.manifest,
                            config.run.checkpoint_score)
        summary["classes_without_training_images"] = untrainable
        summary["curves"] = write_curves(summary, run_uri, config)
        if tracked:
            summary["mlflow_run_id"] = tracked.run_id
        storage.write_text(storage.join(run_uri, "summary.json"), json.dumps(summary, indent=2))
        return summary
    finally:
        # A sweep's trial is stopped from outside (Tune, at an ASHA rung or its last epoch), which lands here as
        # an exception: its run is left to the sweep, which knows whether the trial completed.
        if summary is not None or tracking_parent is None:
            run_tracking.close_training_run(tracked, config, summary)


def write_curves(summary: dict, run_uri: str, config: Config) -> str | None:
    """``<run>/curves.png``: the whole history (resumed epochs included, from the latest checkpoint) with the
    best checkpoint's epoch marked; None when the run has no checkpoint to read it from."""

    latest = summary.get("latest_checkpoint") or summary.get("checkpoint")
    if not latest:
        return None
    png = curves_figure(read_history(latest), best_epoch=summary["metrics"].get("epoch"),
                        score=config.run.checkpoint_score[0], title=f"run {config.run.name}")
    return storage.write_bytes(storage.join(run_uri, "curves.png"), png)


def _checked_inputs(config: Config) -> tuple[Config, Manifest, list[str]]:
    """(the config with its data-dependent defaults resolved, the manifest, the classes with no training image).

    Everything that can refuse the run (manifest, warm-start checkpoint, weights) is checked before Ray starts: a
    mistyped path is a one-line error in the time Python takes to import, not after a cluster start-up."""
    config = config.with_absolute_paths()
    manifest_location = config.data.manifest or embedded_manifest(config)
    manifest = read_manifest(manifest_location)
    # Resolve the defaults that depend on the data, so the saved config (and every checkpoint) says what ran.
    config = config.with_manifest(manifest_uri(manifest_location), manifest.source)
    return config, manifest, preflight(config, manifest)


def _datasets(config: Config, manifest: Manifest) -> dict:
    # With tqdm installed, Ray Data draws its progress bars from the datasets' split coordinators (Ray workers)
    # through log_to_driver: hundreds of broken lines per epoch. Without Ray's tqdm it logs progress at INFO
    # instead, below RAY_DATA_LOG_LEVEL's WARNING; the per-epoch line is training's progress.
    ray.data.DataContext.get_current().use_ray_tqdm = False
    augment_preset = train_preset(config.image_size, config.data.augment, config.data.color_constancy)
    eval_preset = eval_preset_of(config)
    return {
        "train": build_dataset(manifest, config.data.train_split, augment_preset, config.data.read_threads,
                               shuffle=True, balanced=config.train.imbalance == "balanced_sampling"),
        "val": build_dataset(manifest, config.data.val_split, eval_preset, config.data.read_threads),
    }


def _head_epochs_left(config: Config, resumed_from: str | None, continue_from) -> bool:
    """Whether the run still has head-phase epochs to train (a relaunch after phase 1 needs no features)."""
    if resumed_from:
        done = read_checkpoint_meta(resumed_from)["epoch"] + 1
    elif continue_from is not None:
        done = read_ray_checkpoint_meta(continue_from)["epoch"] + 1
    else:
        done = 0
    return done < config.train.head_epochs


def _worker_inputs(config: Config, manifest: Manifest, threads: int, continue_from,
                   tracked: TrackedRun | None) -> WorkerInputs:
    train_rows = manifest.split(config.data.train_split).num_rows
    identity = ModelIdentity.of(config, manifest.classes, manifest.taxonomy)
    return WorkerInputs(
        identity=identity,
        train_rows=train_rows,
        class_weights=class_weights(manifest, config.data.train_split)
        if config.train.imbalance == "weighted_loss" else None,
        # The last partial batch is dropped (a batch of one breaks BatchNorm), unless a pilot collection's
        # split is smaller than one batch: then that partial batch is all there is to train on.
        drop_last=train_rows >= config.train.batch_size * config.scaling.num_workers,
        torch_threads=threads,
        continue_from=continue_from,
        debug=debug_enabled(),
        epoch_observers=[tracked.epoch_logger().log] if tracked else [],
    )


def _torch_trainer(config: Config, inputs: WorkerInputs, datasets: dict, resources: dict, callbacks: list):
    # S3 through a retrying filesystem: a short outage during a checkpoint upload costs no failure slot.
    storage_path, storage_filesystem = storage.train_storage(config.run.storage)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"inputs": inputs},
        scaling_config=ray.train.ScalingConfig(
            num_workers=config.scaling.num_workers, use_gpu=config.scaling.use_gpu,
            resources_per_worker=resources, placement_strategy=config.scaling.placement_strategy,
        ),
        run_config=ray.train.RunConfig(
            name=config.run.name,
            storage_path=storage_path, storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=config.run.max_failures),
            callbacks=[*callbacks, StopOnInputError(inputs.debug)],
            # Ray Train's own per-report INFO lines drown the per-epoch progress line; warnings still show.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=config.run.checkpoints_to_keep,
                checkpoint_score_attribute=config.run.checkpoint_score[0],
                checkpoint_score_order=config.run.checkpoint_score[1],
            ),
        ),
        datasets=datasets,
    )


def _fit(trainer):
    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as error:
        cause = getattr(error, "controller_failure", None)
        if isinstance(cause, DermrayError):  # the input's fault, stopped at once by StopOnInputError
            raise DermrayError(str(cause)) from None
        raise DermrayError(f"training failed: {failure_reason(error)}") from None


def preflight(config: Config, manifest: Manifest) -> list[str]:
    """Refuse, before Ray starts, what would fail only inside the workers (after a cluster start and a model
    load, minutes on a small machine): empty or too small splits, a weights file that is unsafe or does not fit
    the backbone, a warm-start checkpoint of another model. Returns the classes with no training image."""
    counts = {split: manifest.split(split).num_rows for split in (config.data.train_split, config.data.val_split)}
    for split, rows in counts.items():
        if rows == 0:
            present = dict(Counter(manifest.table["split"].to_pylist()))
            raise DermrayError(f"the manifest has no '{split}' images (it has {present}); stage with a fraction "
                               "for that split or set data.train_split / data.val_split")
    workers = config.scaling.num_workers
    if counts[config.data.train_split] < 2 * workers:
        raise DermrayError(f"the '{config.data.train_split}' split has {counts[config.data.train_split]} image(s): "
                           f"too few to train {workers} worker(s) on (at least 2 each)")
    untrainable = [name for name, count in manifest.class_counts(config.data.train_split).items() if count == 0]
    if untrainable:
        # Not fatal (a class may be declared for the taxonomy or arrive later), but the model cannot learn it.
        print(f"[dermray] warning: no '{config.data.train_split}' images for class(es) {', '.join(untrainable)}: "
              "the model cannot learn them", file=sys.stderr, flush=True)
    if config.model.weights:
        # The workers load the same file the same way; a bad one is refused here in seconds.
        build_model(config.model.backbone, len(manifest.classes), config.model.weights)
    if config.model.init_checkpoint:
        mismatch = warm_start_mismatch(config.model.init_checkpoint, config.model.backbone, manifest.classes)
        if mismatch:
            raise DermrayError(f"model.init_checkpoint: {mismatch}")
    return untrainable


def failure_reason(error: Exception) -> str:
    """One line saying why training failed: the workers' own error (its last line, e.g. ``RuntimeError: ...``)
    rather than Ray's generic "Training failed due to worker errors:" heading."""
    causes = list((getattr(error, "worker_failures", None) or {}).values())
    causes.append(getattr(error, "controller_failure", None))
    for cause in causes:
        lines = [line.strip() for line in str(cause or "").splitlines() if line.strip()]
        if lines:
            return lines[-1]
    return str(error).strip().splitlines()[0]


def _checkpoint_uri(checkpoint, run_uri: str) -> str:
    # Ray reports paths without the scheme for S3 (bucket/key): give users a URI they can pass back.
    return storage.join(run_uri, storage.basename(checkpoint.path))


def summarize(result, run_uri: str, resumed_from: str | None, seconds: float, manifest: str,
              score: tuple[str, str] = ("val_balanced_accuracy", "max")) -> dict:
    name, order = score
    best = (max if order == "max" else min)(
        (pair for pair in (result.best_checkpoints or []) if name in pair[1]),
        key=lambda pair: pair[1][name],
        default=None,
    )
    checkpoint, metrics = best if best else (result.checkpoint, result.metrics or {})
    if checkpoint is None:
        raise DermrayError(f"training produced no checkpoint under {run_uri}")
    last = result.metrics or metrics
    return {
        "checkpoint": _checkpoint_uri(checkpoint, run_uri),
        "metrics": {k.removeprefix("val_"): v for k, v in metrics.items() if k.startswith("val_")}
        | {"epoch": metrics.get("epoch")},
        "epochs_completed": last.get("epoch"),
        "resumed_from": resumed_from,
        "latest_checkpoint": _checkpoint_uri(result.checkpoint, run_uri) if result.checkpoint else None,
        "run": run_uri,
        "manifest": manifest,
        "images_per_s": last.get("images_per_s"),
        "worker_nodes": last.get("worker_nodes"),
        "seconds": round(seconds, 1),
    }
