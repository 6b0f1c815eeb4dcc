"""The per-worker training function that Ray Train runs on every worker.

Ray is touched only at the edges: the dataset shards, ``prepare_model`` (DDP), the distributed gather of
validation predictions, and ``ray.train.report`` with a checkpoint. Everything in between is ``dermray.train.engine``.

Two phases (the VGG16 transfer-learning recipe): epochs ``[0, head_epochs)`` train only the new head on the
frozen backbone at ``head_lr``; the rest fine-tune everything at ``lr``. Each phase has its own optimizer and
schedule; a checkpoint stores the current phase's, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from torch import nn

from dermray.config import Config
from dermray.errors import DermrayError
from dermray.evaluation.metrics import validation_metrics
from dermray.models.backbones import (
    backbone_fingerprint,
    build_model,
    freeze_batchnorm_stats,
    head_module,
    head_parameters,
    set_backbone_trainable,
)
from dermray.models.checkpoint import STATE_FILE, initial_model, write_checkpoint
from dermray.models.identity import ModelIdentity
from dermray.ray_runtime import keep_off_console
from dermray.train.engine import (
    batch_mixer,
    build_optimizer,
    build_scheduler,
    channels_last_for,
    predict,
    set_hyperparameters,
    slow_bf16_warning,
    train_one_epoch,
    weight_average,
)
from dermray.train.feature_cache import HEAD_DATASETS
from dermray.train.inputs import WorkerInputs
from dermray.train.progress import ProgressLine


@dataclass
class _Phase:
    """The current phase: its name, the DDP-wrapped model and the phase's own optimizer and schedule."""

    name: str
    model: nn.Module  # the whole network, or only its head when the phase trains on cached features
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    cached_features: bool = False
    # train.ema_decay: the moving average of the whole model's weights, which validation scores and the
    # checkpoint serves (shared by the phases: it averages the model, not the phase's optimizer).
    averaged: Any = None


def train_loop_per_worker(train_loop_config: dict) -> None:
    inputs: WorkerInputs = train_loop_config["inputs"]
    _quiet_report_logging()
    if not inputs.debug:
        # Ray Train logs a failed training function's traceback to the console as well as to its log files;
        # the driver's one-line error says what failed (DERMRAY_DEBUG=1 shows the traceback).
        keep_off_console("Error in training function")
    config = Config.model_validate(inputs.identity.config)
    context = ray.train.get_context()
    rank, device = context.get_world_rank(), ray.train.torch.get_device()
    torch.manual_seed(config.train.seed)
    if device.type == "cpu" and inputs.torch_threads:
        torch.set_num_threads(inputs.torch_threads)

    model, resume_state, history = _restore(config, inputs, rank, device)
    averaged = _weight_average(model, config, resume_state, device)
    start_epoch = resume_state["epoch"] + 1 if resume_state else 0
    criterion = nn.CrossEntropyLoss(
        weight=torch.tensor(inputs.class_weights, dtype=torch.float32, device=device) if inputs.class_weights
        else None,
        label_smoothing=config.train.label_smoothing,
    )
    steps_per_epoch = max(1, math.ceil(inputs.train_rows / (config.train.batch_size * context.get_world_size())))
    nodes = _worker_nodes()
    if rank == 0:
        _log(f"[dermray] {context.get_world_size()} worker(s) on {nodes} node(s), device {device}")
        if warning := slow_bf16_warning(device, config.train.amp):
            _log(f"[dermray] warning: {warning}")
    phase: _Phase | None = None
    run_started = time.perf_counter()
    for epoch in range(start_epoch, config.train.epochs):
        if _phase_name(epoch, config) != (phase and phase.name):
            phase = _start_phase(model, config, inputs, epoch, steps_per_epoch, resume_state, averaged)
        # Rank 0 prints a line every few seconds inside the epoch (DERMRAY_PROGRESS_SECONDS; an epoch of a large
        # collection takes hours); its images count for every worker's, as the shards are equal.
        progress = (ProgressLine(epoch + 1, config.train.epochs, phase.name, steps_per_epoch)
                    if rank == 0 else None)
        metrics = _train_and_validate(phase, model, config, inputs, criterion, device, epoch,
                                      progress and (lambda n, p=progress: p.update(n * context.get_world_size())))
        metrics["worker_nodes"] = nodes
        history.append(metrics)
        if rank == 0:
            epochs_done = epoch + 1 - start_epoch
            eta = (time.perf_counter() - run_started) / epochs_done * (config.train.epochs - epoch - 1)
            _log(_epoch_line(metrics, config.train.epochs, eta))
            for observe in inputs.epoch_observers:
                observe(metrics, metrics["epoch"])
        _report(model, phase, inputs.identity, epoch, metrics, history, rank)


def _phase_name(epoch: int, config: Config) -> str:
    return "head" if epoch < config.train.head_epochs else "full"


def _restore(config: Config, inputs: WorkerInputs, rank: int, device: torch.device
             ) -> tuple[nn.Module, dict | None, list[dict]]:
    """(the model, the checkpoint state a resumed run continues from or None, the history so far).

    The run's own latest checkpoint (a relaunch) wins, else the one it was told to continue (a population-based
    trial taking over another trial's model): weights, optimizer, schedule and epoch counter alike. Else a warm
    start takes the weights only (the driver checked backbone and classes against its meta.json)."""

    checkpoint = ray.train.get_checkpoint() or inputs.continue_from
    if checkpoint is not None:
        model = _on_device_layout(build_model(config.model.backbone, len(inputs.identity.classes)), device, config)
        with checkpoint.as_directory() as directory:
            state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        # With a weight average, "model" is the average (what inference serves); training goes on from the raw.
        model.load_state_dict(state.get("training_model", state["model"]))
        if rank == 0:
            _log(f"[dermray] resuming after epoch {state['epoch'] + 1} of {config.train.epochs}")
        return model, state, list(state.get("history", []))
    model = _on_device_layout(initial_model(config, len(inputs.identity.classes)), device, config)
    if config.model.init_checkpoint and rank == 0:
        _log(f"[dermray] starting from the weights of {config.model.init_checkpoint}")
    return model, None, []


def _weight_average(model: nn.Module, config: Config, resume_state: dict | None, device: torch.device):
    """The moving average of the weights (``train.ema_decay``; None when off), restored with its update count when
    the checkpoint being resumed kept one (else it starts from the model as it is)."""
    if config.train.ema_decay <= 0:
        return None
    averaged = weight_average(model, config.train.ema_decay, device)
    if resume_state is not None and "training_model" in resume_state:
        averaged.module.load_state_dict(resume_state["model"])
        averaged.n_averaged.fill_(int(resume_state["average_updates"]))
    return averaged


def _on_device_layout(model: nn.Module, device: torch.device, config: Config) -> nn.Module:
    return model.to(memory_format=torch.channels_last) if channels_last_for(device, config.train.amp) else model


def _start_phase(model: nn.Module, config: Config, inputs: WorkerInputs, epoch: int, steps_per_epoch: int,
                 resume_state: dict | None, averaged: Any) -> _Phase:
    """Freeze or unfreeze the backbone, build the phase's optimizer and schedule (restored when the checkpoint
    being resumed was saved in this phase) and wrap the model for DDP. ``averaged`` (the run's weight average or
    None) carries over from phase to phase."""

    name = _phase_name(epoch, config)
    head_only = name == "head"
    set_backbone_trainable(model, config.model.backbone, trainable=not head_only)
    params = head_parameters(model, config.model.backbone) if head_only else list(model.parameters())
    lr = config.train.head_lr if head_only else config.train.lr
    phase_epochs = config.train.head_epochs if head_only else config.train.epochs - config.train.head_epochs
    optimizer = build_optimizer(params, config.train, lr)
    scheduler = build_scheduler(optimizer, config.train, phase_epochs * steps_per_epoch, steps_per_epoch)
    if resume_state is not None and resume_state["phase"] == name:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        set_hyperparameters(optimizer, scheduler, lr, config.train.weight_decay)
    cached = head_only and inputs.cached_features_of is not None
    if cached and backbone_fingerprint(model, config.model.backbone) != inputs.cached_features_of:
        raise DermrayError("the cached head-phase features were computed from other backbone weights than this "
                           "worker's model; delete the run's features/ folder and relaunch")
    # DDP registers gradient hooks for the parameters trainable when it wraps: re-wrap per phase. On cached
    # features only the head runs, so only the head is wrapped.
    trained = head_module(model, config.model.backbone) if cached else model
    return _Phase(name, ray.train.torch.prepare_model(trained), optimizer, scheduler, cached, averaged)


def _batches(name: str, config: Config, inputs: WorkerInputs, device: torch.device, training: bool):
    """The worker's shard of dataset ``name`` as torch batches (pinned on GPU workers): uint8 images, or the
    float32 features of a cached head phase."""

    features = name in HEAD_DATASETS.values()
    # A small local shuffle buffer mixes training batches further (packed shards arrive shard by shard).
    return ray.train.get_dataset_shard(name).iter_torch_batches(
        batch_size=config.train.batch_size, prefetch_batches=config.data.prefetch_batches,
        dtypes={"feature" if features else "image": torch.float32 if features else torch.uint8, "label": torch.int64},
        device="cpu", pin_memory=device.type == "cuda", drop_last=training and inputs.drop_last,
        local_shuffle_buffer_size=4 * config.train.batch_size if training and not features else None,
    )


def _train_and_validate(phase: _Phase, model: nn.Module, config: Config, inputs: WorkerInputs,
                        criterion: nn.Module, device: torch.device, epoch: int, on_batch=None) -> dict:
    """One epoch of training and validation; the epoch's metrics, identical on every worker. ``model`` is the
    whole unwrapped network (``phase.model`` may be its DDP wrapper or only its head): the weight average
    follows it."""
    names = HEAD_DATASETS if phase.cached_features else {"train": "train", "val": "val"}
    frozen_bn = ((lambda m: freeze_batchnorm_stats(m, config.model.backbone))
                 if phase.name == "head" and not phase.cached_features else None)
    stats = train_one_epoch(
        phase.model, _batches(names["train"], config, inputs, device, training=True), phase.optimizer,
        phase.scheduler, criterion, device, config.train.amp, config.train.aux_loss_weight,
        after_train_mode=frozen_bn, on_batch=on_batch,
        # Images only: cached head-phase features are the eval preset's, unaugmented, as in the VGG16 source.
        mix=None if phase.cached_features else batch_mixer(config.train, len(inputs.identity.classes)),
        after_step=None if phase.averaged is None else (lambda: phase.averaged.update_parameters(model)),
    )
    # The average scores the epoch when there is one. Cached features feed only a head: the average's head then
    # (the backbone, frozen in that phase, is the same in both).
    scored = phase.averaged.module if phase.averaged is not None else phase.model
    if phase.averaged is not None and phase.cached_features:
        scored = head_module(phase.averaged.module, config.model.backbone)
    probs, labels = predict(scored, _batches(names["val"], config, inputs, device, training=False), device,
                            config.train.amp)
    probs, labels = _gather_predictions(probs, labels)
    images = _sum_over_workers(stats.images, device)
    if images == 0 or len(labels) == 0:
        # Every row was dropped as unreadable (each one logged): there is nothing to learn from or judge by.
        # The input's fault, not the cluster's: a DermrayError, which no failure retry is spent on.
        raise DermrayError(f"epoch {epoch + 1} read no {'training' if images == 0 else 'validation'} images: "
                           "every one was unreadable (see the 'dermray ingest: skipped' warnings)")
    val = validation_metrics(probs, labels, len(inputs.identity.classes))
    return {
        "epoch": epoch + 1,
        "phase": phase.name,
        # Which run trained this epoch: a checkpoint's history then shows a model's lineage (a PBT trial's
        # model begins with the epochs of the trial whose checkpoint it took over).
        "run": config.run.name,
        "train_loss": round(_sum_over_workers(stats.loss * stats.images, device) / max(images, 1), 5),
        "images_per_s": round(images / max(stats.seconds, 1e-9), 1),
        "lr": phase.optimizer.param_groups[0]["lr"],
        "val_images": int(len(labels)),
        **{f"val_{k}": round(v, 5) for k, v in val.items()},
    }


def _epoch_line(metrics: dict, epochs: int, eta_s: float) -> str:
    return (
        f"[dermray] epoch {metrics['epoch']}/{epochs} ({metrics['phase']}) train_loss {metrics['train_loss']:.4f} "
        f"val_loss {metrics['val_loss']:.4f} val_acc {metrics['val_accuracy']:.3f} "
        f"val_bacc {metrics['val_balanced_accuracy']:.3f}"
        + (f" val_auc {metrics['val_roc_auc']:.3f}" if "val_roc_auc" in metrics else "")
        + f" | {metrics['images_per_s']:.0f} img/s | ETA {eta_s:.0f}s"
    )


def _report(model: nn.Module, phase: _Phase, identity: ModelIdentity, epoch: int, metrics: dict,
            history: list[dict], rank: int) -> None:
    """Report the epoch to Ray Train; rank 0 attaches the checkpoint (every rank must call report)."""

    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            write_checkpoint(directory, identity, model, phase.optimizer, phase.scheduler, epoch, phase.name,
                             metrics, history, averaged=phase.averaged)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def _gather_predictions(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every worker's validation predictions, on every worker (so all ranks report identical metrics)."""

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return probs, labels
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (probs, labels))
    parts = [g for g in gathered if len(g[1])]
    return np.concatenate([p for p, _ in parts]), np.concatenate([lab for _, lab in parts])


def _worker_nodes() -> int:
    """How many distinct Ray nodes the workers run on (proves spread placement on a multi-node cluster)."""

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def _sum_over_workers(value: float, device: torch.device) -> float:
    if not (dist.is_available() and dist.is_initialized()):
        return value
    # On the worker's device: NCCL (the GPU backend) reduces CUDA tensors only; gloo takes CPU tensors.
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def _log(message: str) -> None:
    # Straight to file descriptor 2: stdout carries only the command's JSON summary, and Ray Train tees the
    # Python-level sys.stderr into its own log, which would print every line twice.
    os.write(2, (message + "\n").encode())


def _quiet_report_logging() -> None:
    # Ray Train 2.60 logs every ray.train.report call (the whole metrics dict) at INFO through a logger named
    # after its source file, outside the "ray.train" hierarchy that LoggingConfig controls; the per-epoch line
    # below already says it all.
    try:
        from ray.train.v2._internal.execution import context as train_context
    except ImportError:
        return
    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)
