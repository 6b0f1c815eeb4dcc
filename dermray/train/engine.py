"""Plain PyTorch training pieces (no Ray here): optimizers, schedules, one epoch of training, prediction.

``train_one_epoch`` and ``predict`` take any iterable of ``{"image": uint8 NHWC, "label": int64}`` batches (or of
``{"feature": float32 (N, D), "label": int64}``: a head trained on cached backbone features), so they run the same
under Ray Train, in a benchmark, or in a unit test with a list of tensors.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from dermray.config import TrainConfig
from dermray.data.ingest import normalize_on_device
from dermray.models.backbones import split_logits


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=True)
    if cfg.optimizer == "rmsprop":
        # Esteva et al.: RMSProp, decay 0.9, momentum 0.9, epsilon 0.1.
        return torch.optim.RMSprop(
            params, lr=lr, alpha=cfg.rmsprop_alpha, eps=cfg.rmsprop_eps, momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
        )
    return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)


def lr_factor(cfg: TrainConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of a phase's base learning rate after ``step`` optimizer steps of ``total_steps``."""
    progress = min(step / max(total_steps, 1), 1.0)
    if cfg.schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.step_gamma ** (step // (cfg.step_epochs * max(steps_per_epoch, 1)))
    if cfg.schedule == "onecycle":
        # Linear warm-up over the first 25% to the peak, then cosine annealing to 1/1000 of it.
        if progress < 0.25:
            return 0.04 + 0.96 * progress / 0.25
        return 1e-3 + (1 - 1e-3) * 0.5 * (1.0 + math.cos(math.pi * (progress - 0.25) / 0.75))
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(cfg, step, total_steps, steps_per_epoch)
    )


def set_hyperparameters(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR, lr: float,
                        weight_decay: float) -> None:
    """Put a config's base learning rate and weight decay into an optimizer and schedule restored from a
    checkpoint, at the schedule's current step. A checkpoint stores the values it ran with; a population-based
    trial continues another trial's checkpoint with hyperparameters of its own (for a plain resume, a no-op)."""
    scheduler.base_lrs = [lr] * len(optimizer.param_groups)
    for group, factor in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"] = lr
        group["lr"] = lr * factor(scheduler.last_epoch)
        group["weight_decay"] = weight_decay


def batch_mixer(cfg: TrainConfig, num_classes: int) -> Callable | None:
    """MixUp and/or CutMix over a batch of (normalised images, int labels) -> (mixed images, soft labels), as
    torchvision implements them; None when both are off."""
    from torchvision.transforms import v2

    mixers = ([v2.MixUp(alpha=cfg.mixup_alpha, num_classes=num_classes)] if cfg.mixup_alpha > 0 else []) + (
        [v2.CutMix(alpha=cfg.cutmix_alpha, num_classes=num_classes)] if cfg.cutmix_alpha > 0 else [])
    if not mixers:
        return None
    return mixers[0] if len(mixers) == 1 else v2.RandomChoice(mixers)


def weight_average(model: nn.Module, decay: float, device: torch.device | None = None) -> AveragedModel:
    """An exponential moving average of ``model``'s weights and BatchNorm statistics (torch's AveragedModel), on
    ``device``; call ``update_parameters(model)`` after each optimizer step. The decay after n updates is
    min(decay, (1 + n) / (10 + n)) (TensorFlow's ExponentialMovingAverage warm-up), so the random initial
    weights do not linger in the average. The update counter stays on the host: no device sync per step."""

    cell: list[AveragedModel] = []

    @torch.no_grad()
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], _updates: torch.Tensor) -> None:
        n = int(cell[0].n_averaged)  # the host copy (the argument is the device's)
        weight = 1.0 - min(decay, (1.0 + n) / (10.0 + n))
        for avg, cur in zip(averaged, current):
            if avg.is_floating_point():
                avg.lerp_(cur, weight)
            else:
                avg.copy_(cur)  # counters (BatchNorm's num_batches_tracked) are not averaged

    cell.append(AveragedModel(model, multi_avg_fn=update, use_buffers=True))
    if device is not None:
        cell[0].module.to(device)
    return cell[0]


def resolved_amp(device: torch.device, amp: str) -> str:
    """``train.amp`` on this device: "bf16" or "off" (auto: bf16 on GPU, full precision on CPU)."""
    return "off" if amp == "off" or (amp == "auto" and device.type != "cuda") else "bf16"


def autocast_for(device: torch.device, amp: str):
    """bf16 autocast on GPU (no loss scaling needed, unlike fp16); full precision on CPU unless asked."""
    if resolved_amp(device, amp) == "off":
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)


def slow_bf16_warning(device: torch.device, amp: str) -> str | None:
    """A warning when bf16 is asked for on a CPU that would emulate it (no AMX, no AVX512-BF16): there it is
    slower than full precision. None when it is native, not asked for, or the CPU cannot be queried."""
    if amp != "bf16" or device.type != "cpu":
        return None
    # torch.cpu's capability probes (underscored, present since torch 2.1): not guessed from lscpu's text.
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    if any(probe is None for probe in probes) or any(probe() for probe in probes):
        return None
    return ("train.amp=bf16 on a CPU without native bf16 (no AMX or AVX512-BF16): slower than full precision; "
            "--set train.amp=off")


def channels_last_for(device: torch.device, amp: str) -> bool:
    """Channels-last memory on GPU, and on CPU under bf16 autocast: oneDNN's bf16 convolutions (AMX) run on NHWC.
    resnet18 at 96 px, batch 64, 2 threads on an AMX CPU (`dermray bench train --amp`): 75.7 images/s fp32,
    169.1 bf16 channels-last; channels-last is about a fifth of that gain (docs/benchmarks.md)."""
    return device.type == "cuda" or amp == "bf16"


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device, channels_last: bool) -> torch.Tensor:
    """The batch as the model takes it: images normalised on the device, or cached features as they are."""
    if "feature" in batch:
        return batch["feature"].to(device, non_blocking=True).float()
    return normalize_on_device(batch["image"], device, channels_last)


@dataclass
class EpochStats:
    loss: float
    images: int
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.images / max(self.seconds, 1e-9)


def train_one_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    criterion: nn.Module,
    device: torch.device,
    amp: str = "auto",
    aux_loss_weight: float = 0.4,
    after_train_mode=None,
    on_batch: Callable[[int], None] | None = None,
    mix: Callable | None = None,
    after_step: Callable[[], None] | None = None,
) -> EpochStats:
    """One pass over ``batches``; returns the mean loss and the images/s of this worker. ``on_batch`` is called
    with each batch's image count after its step (a progress line); ``mix`` (``batch_mixer``) mixes each batch
    of images and its labels before the step (the reported loss is then against the mixed labels);
    ``after_step`` runs after each optimizer step (a weight average's update)."""
    model.train()
    if after_train_mode is not None:
        after_train_mode(model)  # e.g. keep a frozen backbone's BatchNorm statistics fixed
    channels_last = channels_last_for(device, amp)
    # The loss is summed on the device: a .item() per step would make the host wait for the GPU every batch.
    total_loss, seen, started = torch.zeros((), device=device), 0, time.perf_counter()
    for batch in batches:
        images = model_inputs(batch, device, channels_last)
        labels = batch["label"].to(device, non_blocking=True)
        if mix is not None:
            images, labels = mix(images, labels)
        with autocast_for(device, amp):
            logits, aux = split_logits(model(images))
            loss = criterion(logits.float(), labels)
            if aux is not None:
                loss = loss + aux_loss_weight * criterion(aux.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if after_step is not None:
            after_step()
        total_loss += loss.detach().float() * len(labels)
        seen += len(labels)
        if on_batch is not None:
            on_batch(len(labels))
    return EpochStats(float(total_loss) / max(seen, 1), seen, time.perf_counter() - started)


@torch.no_grad()
def predict(
    model: nn.Module, batches: Iterable[dict[str, torch.Tensor]], device: torch.device, amp: str = "auto"
) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities (N, K), labels (N,)) over ``batches``, in eval mode."""
    model.eval()
    channels_last = channels_last_for(device, amp)
    probs, labels = [], []
    for batch in batches:
        images = model_inputs(batch, device, channels_last)
        with autocast_for(device, amp):
            logits, _ = split_logits(model(images))
        probs.append(torch.softmax(logits.float(), dim=1).cpu().numpy())
        labels.append(batch["label"].cpu().numpy())
    if not probs:
        return np.zeros((0, 0), np.float32), np.zeros((0,), np.int64)
    return np.concatenate(probs), np.concatenate(labels)
