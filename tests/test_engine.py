"""The plain-PyTorch training pieces, on CPU tensors."""

import pytest
import torch

from dermray.config import TrainConfig
from dermray.train.engine import (
    EpochStats,
    batch_mixer,
    build_optimizer,
    build_scheduler,
    lr_factor,
    set_hyperparameters,
    train_one_epoch,
    weight_average,
)


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


def test_bf16_on_cpu_trains_channels_last_and_predicts_like_full_precision():
    """train.amp=bf16 on a CPU: autocast with channels-last memory (oneDNN's bf16 path). It must still learn,
    and its probabilities must stay close to the same model's in full precision."""
    from torch import nn

    from dermray.models.backbones import build_model
    from dermray.train.engine import channels_last_for, predict, train_one_epoch

    cpu = torch.device("cpu")
    assert channels_last_for(cpu, "bf16") and not channels_last_for(cpu, "auto") and not channels_last_for(cpu, "off")
    torch.manual_seed(0)
    # Two classes a model can tell apart: dark and bright images, uint8 HWC as the pipeline delivers them.
    labels = torch.arange(64) % 2
    images = (labels.view(-1, 1, 1, 1) * 150 + torch.randint(0, 100, (64, 28, 28, 3))).to(torch.uint8)  # NHWC
    batches = [{"image": images[i:i + 16], "label": labels[i:i + 16]} for i in range(0, 64, 16)]
    model = build_model("small_cnn", 2).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    criterion = nn.CrossEntropyLoss()
    losses = [train_one_epoch(model, batches, optimizer, scheduler, criterion, cpu, amp="bf16").loss
              for _ in range(4)]
    assert losses[-1] < 0.5 * losses[0], losses
    probs_bf16, seen = predict(model, batches, cpu, amp="bf16")
    probs_fp32, _ = predict(model, batches, cpu, amp="off")
    assert (seen == labels.numpy()).all()
    assert float(abs(probs_bf16 - probs_fp32).max()) < 0.05
    assert (probs_bf16.argmax(1) == labels.numpy()).mean() >= 0.9


def test_bf16_on_a_cpu_that_emulates_it_is_warned_about_and_only_then():
    from dermray.train.engine import slow_bf16_warning

    cpu = torch.device("cpu")
    native = torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()
    assert (slow_bf16_warning(cpu, "bf16") is None) == native  # this machine's own answer, either way
    assert slow_bf16_warning(cpu, "auto") is None and slow_bf16_warning(cpu, "off") is None
    assert slow_bf16_warning(torch.device("cuda"), "bf16") is None


def _batch(n: int = 6, classes: int = 3):
    torch.manual_seed(1)
    images = torch.rand(n, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    return images, torch.arange(n) % classes


def test_mixup_blends_each_image_with_its_neighbour_by_the_weight_its_labels_carry():
    assert batch_mixer(TrainConfig(), 3) is None
    images, labels = _batch()
    mixed, soft = batch_mixer(TrainConfig(mixup_alpha=0.4), 3)(images, labels)
    assert soft.shape == (6, 3) and torch.allclose(soft.sum(1), torch.ones(6))
    weight = soft[torch.arange(6), labels]  # the share of each image's own class
    assert torch.allclose(weight, weight[0]) and 0 < weight[0] < 1  # one draw per batch
    neighbour = images.roll(1, 0)
    assert torch.allclose(mixed, weight[0] * images + (1 - weight[0]) * neighbour, atol=1e-6)
    assert torch.allclose(soft[torch.arange(6), labels.roll(1, 0)], 1 - weight)


def test_cutmix_pastes_a_box_of_the_neighbour_and_mixes_the_labels_by_its_area():
    images, labels = _batch()
    torch.manual_seed(3)
    mixed, soft = batch_mixer(TrainConfig(cutmix_alpha=1.0), 3)(images, labels)
    pasted = (mixed != images).any(dim=1)  # (N, H, W): pixels taken from the neighbour
    assert torch.equal(mixed[:, :, pasted[0]], images.roll(1, 0)[:, :, pasted[0]])
    assert torch.equal(pasted, pasted[:1].expand_as(pasted))  # the same box in every image of the batch
    kept = 1 - pasted[0].float().mean()
    assert 0 < kept < 1
    assert torch.allclose(soft[torch.arange(6), labels], kept.expand(6), atol=1e-6)


def test_a_mixed_epoch_trains_on_soft_labels_with_label_smoothing():
    cfg = TrainConfig(mixup_alpha=0.2, cutmix_alpha=1.0, label_smoothing=0.1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 3))
    optimizer = build_optimizer(list(model.parameters()), cfg, 0.01)
    scheduler = build_scheduler(optimizer, cfg, total_steps=4, steps_per_epoch=4)
    batches = [{"image": torch.randint(0, 256, (8, 16, 16, 3), dtype=torch.uint8), "label": torch.arange(8) % 3}
               for _ in range(4)]
    before = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(model, batches, optimizer, scheduler,
                            torch.nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing), torch.device("cpu"),
                            amp="off", mix=batch_mixer(cfg, 3))
    assert isinstance(stats, EpochStats) and stats.images == 32 and 0 < stats.loss < 10
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_the_weight_average_is_an_ema_with_warm_up_over_weights_and_batchnorm_statistics():
    """train.ema_decay: after the first update (a copy), each update k blends by min(decay, (1 + k) / (10 + k)):
    the warm-up for the first steps, then the cap; BatchNorm running statistics are averaged, its batch counter
    copied. A hand-kept average of the same sequence of weights must match it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    averaged = weight_average(model, decay=0.5)
    expected: dict[str, torch.Tensor] = {}
    for k in range(12):  # the cap 0.5 takes over from the warm-up at k = 8
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        model.train()
        model(torch.randn(8, 3) * (k + 1))  # moves the running statistics
        averaged.update_parameters(model)
        decay = min(0.5, (1 + k) / (10 + k))
        for name, value in model.state_dict().items():
            if k == 0 or not value.is_floating_point():
                expected[name] = value.clone()
            else:
                expected[name] = decay * expected[name] + (1 - decay) * value
    served = averaged.module.state_dict()
    assert served.keys() == expected.keys() and int(averaged.n_averaged) == 12
    for name, value in expected.items():
        assert torch.allclose(served[name], value, atol=1e-5), name
    assert int(served["1.num_batches_tracked"]) == 12
    assert not torch.allclose(served["0.weight"], model.state_dict()["0.weight"])  # an average, not a copy


def test_an_epoch_calls_after_step_once_per_optimizer_step():
    cfg = TrainConfig()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2))
    optimizer = build_optimizer(list(model.parameters()), cfg, 0.01)
    scheduler = build_scheduler(optimizer, cfg, total_steps=5, steps_per_epoch=5)
    averaged = weight_average(model, decay=0.9)
    batches = [{"image": torch.randint(0, 256, (4, 4, 4, 3), dtype=torch.uint8), "label": torch.arange(4) % 2}
               for _ in range(5)]
    train_one_epoch(model, batches, optimizer, scheduler, torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                    amp="off", after_step=lambda: averaged.update_parameters(model))
    assert int(averaged.n_averaged) == 5
