"""The per-worker training function that Ray Train runs on every worker.

Ray is touched only at the edges: the dataset shards, ``prepare_model`` (DDP), the distributed gather of
validation predictions, and ``ray.train.report`` with a checkpoint. Everything in between is ``dermray.train.engine``.

Two phases (the VGG16 transfer-learning recipe): epochs ``[0, head_epochs)`` train only the new head on the
frozen backbone at ``head_lr``; the rest fine-tune everything at ``lr``. Each phase has its own optimizer and
schedule; a checkpoint stores the current phase's, so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time

import numpy as np
import torch
from torch import nn

from dermray.config import Config
from dermray.errors import DermrayError
from dermray.models.backbones import build_model, freeze_batchnorm_stats, head_parameters, set_backbone_trainable
from dermray.models.checkpoint import META_FILE, STATE_FILE, read_checkpoint_state
from dermray.ray_runtime import keep_off_console
from dermray.train.engine import (
    build_optimizer,
    build_scheduler,
    classification_metrics,
    predict,
    set_hyperparameters,
    train_one_epoch,
)


def _phase(epoch: int, config: Config) -> str:
    return "head" if epoch < config.train.head_epochs else "full"


def _gather_predictions(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every worker's validation predictions, on every worker (so all ranks report identical metrics)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return probs, labels
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, (probs, labels))
    parts = [g for g in gathered if len(g[1])]
    return np.concatenate([p for p, _ in parts]), np.concatenate([lab for _, lab in parts])


def _worker_nodes() -> int:
    """How many distinct Ray nodes the workers run on (proves spread placement on a multi-node cluster)."""
    import ray
    import torch.distributed as dist

    node = ray.get_runtime_context().get_node_id()
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    nodes: list = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, node)
    return len(set(nodes))


def _sum_over_workers(value: float, device: torch.device) -> float:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return value
    # On the worker's device: NCCL (the GPU backend) reduces CUDA tensors only; gloo takes CPU tensors.
    tensor = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return float(tensor.item())


def _save_checkpoint(directory: str, model: nn.Module, optimizer, scheduler, epoch: int, phase: str,
                     loop_config: dict, metrics: dict, history: list) -> None:
    """Everything needed to resume (weights, optimizer, schedule, epoch) and to serve (classes, taxonomy,
    config), as plain tensors and containers that ``torch.load(weights_only=True)`` accepts."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "epoch": epoch,
        "phase": phase,
        "classes": loop_config["classes"],
        "taxonomy": loop_config["taxonomy"],
        "melanoma_class": loop_config.get("melanoma_class"),
        "config": loop_config["config"],
        "history": history,
    }
    torch.save(state, os.path.join(directory, STATE_FILE))
    model_config = loop_config["config"]["model"]
    meta = {"epoch": epoch, "phase": phase, "backbone": model_config["backbone"],
            "image_size": model_config["image_size"], "resize_ratio": loop_config["config"]["data"]["resize_ratio"],
            "classes": loop_config["classes"], "taxonomy": loop_config["taxonomy"],
            "melanoma_class": loop_config.get("melanoma_class"), "metrics": metrics,
            # Here too, so that a report can show the config without fetching the (large) state.
            "config": loop_config["config"]}
    with open(os.path.join(directory, META_FILE), "w") as handle:
        json.dump(meta, handle, indent=2)


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


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    _quiet_report_logging()
    if not loop_config.get("debug"):
        # Ray Train logs a failed training function's traceback to the console as well as to its log files;
        # the driver's one-line error says what failed (DERMRAY_DEBUG=1 shows the traceback).
        keep_off_console("Error in training function")

    config = Config.model_validate(loop_config["config"])
    classes: list[str] = loop_config["classes"]
    context = ray.train.get_context()
    rank = context.get_world_rank()
    device = ray.train.torch.get_device()
    torch.manual_seed(config.train.seed)
    if device.type == "cpu" and loop_config.get("torch_threads"):
        torch.set_num_threads(loop_config["torch_threads"])

    model = build_model(config.model.backbone, len(classes), config.model.weights)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    start_epoch, resume_state, history = 0, None, []
    # The run's own latest checkpoint (a relaunch), else the one it was told to continue (a population-based
    # trial taking over another trial's model): weights, optimizer, schedule and epoch counter alike.
    checkpoint = ray.train.get_checkpoint() or loop_config.get("continue_from")
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume_state = torch.load(os.path.join(directory, STATE_FILE), map_location="cpu", weights_only=True)
        model.load_state_dict(resume_state["model"])
        start_epoch = resume_state["epoch"] + 1
        history = list(resume_state.get("history", []))
        if rank == 0:
            _log(f"[dermray] resuming after epoch {start_epoch} of {config.train.epochs}")
    elif config.model.init_checkpoint:
        # Warm start (the driver checked backbone and classes against the checkpoint's meta.json).
        model.load_state_dict(read_checkpoint_state(config.model.init_checkpoint)["model"])
        if rank == 0:
            _log(f"[dermray] starting from the weights of {config.model.init_checkpoint}")

    weights = loop_config.get("class_weights")
    criterion = nn.CrossEntropyLoss(
        weight=torch.tensor(weights, dtype=torch.float32, device=device) if weights else None,
        label_smoothing=config.train.label_smoothing,
    )
    global_batch = config.train.batch_size * context.get_world_size()
    steps_per_epoch = max(1, math.ceil(loop_config["train_rows"] / global_batch))
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")
    pin = device.type == "cuda"

    def batches(shard, training: bool):
        # A small local shuffle buffer mixes training batches further (packed shards arrive shard by shard).
        return shard.iter_torch_batches(
            batch_size=config.train.batch_size, prefetch_batches=config.data.prefetch_batches,
            dtypes={"image": torch.uint8, "label": torch.int64}, device="cpu", pin_memory=pin,
            drop_last=training and loop_config.get("drop_last", True),
            local_shuffle_buffer_size=4 * config.train.batch_size if training else None,
        )

    nodes = _worker_nodes()
    if rank == 0:
        _log(f"[dermray] {context.get_world_size()} worker(s) on {nodes} node(s), device {device}")
    phase, ddp_model, optimizer, scheduler = None, None, None, None
    run_started = time.perf_counter()
    for epoch in range(start_epoch, config.train.epochs):
        if _phase(epoch, config) != phase:
            phase = _phase(epoch, config)
            head_only = phase == "head"
            set_backbone_trainable(model, config.model.backbone, trainable=not head_only)
            params = head_parameters(model, config.model.backbone) if head_only else list(model.parameters())
            lr = config.train.head_lr if head_only else config.train.lr
            phase_epochs = config.train.head_epochs if head_only else config.train.epochs - config.train.head_epochs
            optimizer = build_optimizer(params, config.train, lr)
            scheduler = build_scheduler(optimizer, config.train, phase_epochs * steps_per_epoch, steps_per_epoch)
            if resume_state is not None and resume_state["phase"] == phase:
                optimizer.load_state_dict(resume_state["optimizer"])
                scheduler.load_state_dict(resume_state["scheduler"])
                set_hyperparameters(optimizer, scheduler, lr, config.train.weight_decay)
            # DDP registers gradient hooks for the parameters trainable when it wraps: re-wrap per phase.
            ddp_model = ray.train.torch.prepare_model(model)

        frozen_bn = (lambda m: freeze_batchnorm_stats(m, config.model.backbone)) if phase == "head" else None
        stats = train_one_epoch(
            ddp_model, batches(train_shard, training=True), optimizer, scheduler, criterion, device,
            config.train.amp, config.train.aux_loss_weight, after_train_mode=frozen_bn,
        )
        probs, labels = predict(ddp_model, batches(val_shard, training=False), device, config.train.amp)
        probs, labels = _gather_predictions(probs, labels)
        val = classification_metrics(probs, labels, len(classes))
        images = _sum_over_workers(stats.images, device)
        if images == 0 or len(labels) == 0:
            # Every row was dropped as unreadable (each one logged): there is nothing to learn from or judge by.
            # The input's fault, not the cluster's: a DermrayError, which no failure retry is spent on.
            raise DermrayError(f"epoch {epoch + 1} read no {'training' if images == 0 else 'validation'} images: "
                               "every one was unreadable (see the 'dermray ingest: skipped' warnings)")
        train_loss = _sum_over_workers(stats.loss * stats.images, device) / max(images, 1)
        metrics = {
            "epoch": epoch + 1,
            "phase": phase,
            # Which run trained this epoch: a checkpoint's history then shows a model's lineage (a PBT trial's
            # model begins with the epochs of the trial whose checkpoint it took over).
            "run": config.run.name,
            "train_loss": round(train_loss, 5),
            "images_per_s": round(images / max(stats.seconds, 1e-9), 1),
            "lr": optimizer.param_groups[0]["lr"],
            "val_images": int(len(labels)),
            "worker_nodes": nodes,
            **{f"val_{k}": round(v, 5) for k, v in val.items()},
        }
        history.append(metrics)
        done = epoch + 1 - start_epoch
        eta = (time.perf_counter() - run_started) / done * (config.train.epochs - epoch - 1)
        if rank == 0:
            _log(
                f"[dermray] epoch {epoch + 1}/{config.train.epochs} ({phase}) train_loss {train_loss:.4f} "
                f"val_loss {val['loss']:.4f} val_acc {val['accuracy']:.3f} val_bacc {val['balanced_accuracy']:.3f}"
                + (f" val_auc {val['roc_auc']:.3f}" if "roc_auc" in val else "")
                + f" | {metrics['images_per_s']:.0f} img/s | ETA {eta:.0f}s"
            )
        with tempfile.TemporaryDirectory() as directory:
            checkpoint_out = None
            if rank == 0:
                _save_checkpoint(directory, model, optimizer, scheduler, epoch, phase, loop_config, metrics, history)
                checkpoint_out = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint_out)
