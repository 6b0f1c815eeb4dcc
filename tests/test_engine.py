"""The plain-PyTorch training pieces, on CPU tensors."""

import pytest
import torch

from dermray.config import TrainConfig
from dermray.train.engine import build_optimizer, build_scheduler, lr_factor, set_hyperparameters


def _stepped(cfg: TrainConfig, lr: float, steps: int):
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(list(model.parameters()), cfg, lr)
    scheduler = build_scheduler(optimizer, cfg, total_steps=100, steps_per_epoch=10)
    for _ in range(steps):
        model(torch.ones(1, 4)).sum().backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def test_a_restored_optimizer_takes_the_new_learning_rate_at_the_schedules_step():
    """A population-based trial continues another trial's checkpoint (saved at lr 1e-3, weight decay 0.01) with
    its own lr 4e-3 and weight decay 0.05: the schedule keeps its place, the values are the new ones."""
    cfg = TrainConfig(schedule="onecycle", weight_decay=0.01)
    _, saved_optimizer, saved_scheduler = _stepped(cfg, lr=1e-3, steps=30)

    new_cfg = TrainConfig(schedule="onecycle", weight_decay=0.05)
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer(list(model.parameters()), new_cfg, 4e-3)
    scheduler = build_scheduler(optimizer, new_cfg, total_steps=100, steps_per_epoch=10)
    optimizer.load_state_dict(saved_optimizer.state_dict())
    scheduler.load_state_dict(saved_scheduler.state_dict())
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * lr_factor(cfg, 30, 100, 10))  # the old value

    set_hyperparameters(optimizer, scheduler, lr=4e-3, weight_decay=0.05)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * lr_factor(new_cfg, 30, 100, 10))
    assert optimizer.param_groups[0]["weight_decay"] == 0.05
    scheduler.step()  # and the schedule goes on from step 31 at the new base rate
    assert optimizer.param_groups[0]["lr"] == pytest.approx(4e-3 * lr_factor(new_cfg, 31, 100, 10))
    # The optimizer's moments came across.
    assert optimizer.state_dict()["state"][0]["step"] == 30


def test_setting_the_same_hyperparameters_changes_nothing():
    cfg = TrainConfig(schedule="cosine", weight_decay=0.02)
    _, optimizer, scheduler = _stepped(cfg, lr=2e-3, steps=17)
    before = optimizer.param_groups[0]["lr"]
    set_hyperparameters(optimizer, scheduler, lr=2e-3, weight_decay=0.02)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(before)
