"""Backbone registry, head replacement, safe weight loading and the two-phase freezing helpers."""

from __future__ import annotations

import os

import pytest
import torch
import torchvision
from torch import nn

from dermray.errors import DermrayError
from dermray.models.backbones import (
    BACKBONES,
    backbone_names,
    build_model,
    freeze_batchnorm_stats,
    head_module,
    head_parameters,
    load_weights,
    set_backbone_trainable,
    split_logits,
)


def _train_size(backbone: str) -> int:
    # Small inputs keep the test fast on CPU; inception's auxiliary head only works from 299 px.
    return max(64, BACKBONES[backbone].min_image_size)


def test_registry_lists_the_required_backbones():
    required = {"resnet18", "resnet50", "vgg16", "inception_v3", "efficientnet_b0", "convnext_tiny",
                "mobilenet_v3_small"}
    assert required <= set(backbone_names())
    assert backbone_names() == list(BACKBONES)
    assert BACKBONES["inception_v3"].default_image_size == 299
    assert BACKBONES["resnet18"].default_image_size == 224


@pytest.mark.parametrize("backbone", backbone_names())
def test_every_backbone_trains_one_step_with_a_new_head(backbone):
    torch.manual_seed(0)
    model = build_model(backbone, num_classes=3)
    head = head_module(model, backbone)
    assert isinstance(head, nn.Linear) and head.out_features == 3
    model.train()
    size = _train_size(backbone)
    logits, aux = split_logits(model(torch.randn(2, 3, size, size)))
    assert logits.shape == (2, 3)
    loss = nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    if backbone == "inception_v3":
        assert aux is not None and aux.shape == (2, 3)
        loss = loss + 0.4 * nn.functional.cross_entropy(aux, torch.tensor([0, 2]))
    else:
        assert aux is None
    loss.backward()
    for param in head_parameters(model, backbone):
        assert param.grad is not None and param.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        logits, aux = split_logits(model(torch.randn(1, 3, size, size)))
    assert logits.shape == (1, 3) and aux is None


def test_inception_has_a_replaced_aux_head_among_the_head_parameters():
    model = build_model("inception_v3", num_classes=4)
    assert model.AuxLogits.fc.out_features == 4
    head_ids = {id(p) for p in head_parameters(model, "inception_v3")}
    expected = [*model.fc.parameters(), *model.AuxLogits.fc.parameters()]
    assert {id(p) for p in expected} == head_ids


def test_imagenet_weights_load_into_the_backbone_and_the_head_is_fresh(tmp_path):
    torch.manual_seed(1)
    imagenet = torchvision.models.resnet18(weights=None)  # stands in for the 1000-class ImageNet file
    path = tmp_path / "resnet18.pth"
    torch.save(imagenet.state_dict(), path)
    torch.manual_seed(2)
    model = build_model("resnet18", num_classes=3, weights=str(path))
    assert torch.equal(model.conv1.weight, imagenet.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, imagenet.layer4[1].bn2.running_var)
    assert model.fc.weight.shape == (3, 512)


def test_weights_nested_in_a_training_checkpoint_load(tmp_path):
    source = torchvision.models.resnet18(weights=None)
    path = tmp_path / "checkpoint.pt"
    torch.save({"epoch": 3, "model": source.state_dict()}, path)
    model = build_model("resnet18", num_classes=5, weights=str(path))
    assert torch.equal(model.conv1.weight, source.conv1.weight)


def test_a_differently_sized_head_in_the_file_is_skipped(tmp_path):
    # A fine-tuned 7-class checkpoint still provides the backbone; its head cannot fit and is not needed.
    source = build_model("resnet18", num_classes=7)
    path = tmp_path / "finetuned.pth"
    torch.save(source.state_dict(), path)
    model = build_model("resnet18", num_classes=3, weights=str(path))
    assert torch.equal(model.layer1[0].conv1.weight, source.layer1[0].conv1.weight)


def test_weights_of_another_architecture_are_rejected(tmp_path):
    path = tmp_path / "resnet50.pth"
    torch.save(torchvision.models.resnet50(weights=None).state_dict(), path)
    with pytest.raises(DermrayError, match="resnet50.pth.*does not fit"):
        build_model("resnet18", num_classes=3, weights=str(path))


def test_a_file_without_tensors_is_rejected(tmp_path):
    path = tmp_path / "numbers.pt"
    torch.save({"epoch": 3}, path)
    with pytest.raises(DermrayError, match="no state dict"):
        build_model("resnet18", num_classes=3, weights=str(path))


def test_a_missing_weights_file_is_a_dermray_error(tmp_path):
    with pytest.raises(DermrayError, match="cannot read"):
        build_model("resnet18", num_classes=3, weights=str(tmp_path / "absent.pth"))


class _Exploit:
    """Pickles to a call of os.system: unpickling it without weights_only would run the command."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"fc.weight": _Exploit(str(marker))}, path)
    with pytest.raises(DermrayError, match="refused: not a plain tensor file"):
        build_model("resnet18", num_classes=3, weights=str(path))
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the exploit is real: an unsafe load does run it
    assert marker.exists()


def test_safetensors_needs_its_package(tmp_path):
    path = tmp_path / "weights.safetensors"
    path.write_bytes(b"\x00" * 16)
    try:
        import safetensors  # noqa: F401
    except ImportError:
        with pytest.raises(DermrayError, match="safetensors"):
            load_weights(build_model("resnet18", 3), str(path))
    else:
        with pytest.raises(DermrayError):
            load_weights(build_model("resnet18", 3), str(path))


@pytest.mark.parametrize("backbone", ["vgg16", "inception_v3"])
def test_set_backbone_trainable_freezes_all_but_the_heads(backbone):
    model = build_model(backbone, num_classes=3)
    head = {id(p) for p in head_parameters(model, backbone)}
    set_backbone_trainable(model, backbone, trainable=False)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == head
    set_backbone_trainable(model, backbone, trainable=True)
    assert all(p.requires_grad for p in model.parameters())


def test_frozen_batchnorm_statistics_do_not_drift():
    model = build_model("resnet18", num_classes=3)
    set_backbone_trainable(model, "resnet18", trainable=False)
    model.train()
    freeze_batchnorm_stats(model, "resnet18")
    assert not model.bn1.training and model.training and model.fc.training
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.bn1.running_mean, before)


def test_helpers_see_through_a_data_parallel_wrapper():
    # Ray Train hands the loop a DDP-wrapped model; DataParallel has the same ``.module`` layout on CPU.
    model = build_model("resnet18", num_classes=3)
    wrapped = nn.DataParallel(model)
    assert head_module(wrapped, "resnet18") is model.fc
    set_backbone_trainable(wrapped, "resnet18", trainable=False)
    assert not model.conv1.weight.requires_grad and model.fc.weight.requires_grad


def test_unknown_backbone_names_the_choices():
    with pytest.raises(DermrayError, match="unknown backbone 'alexnet'; choose one of: .*resnet18"):
        build_model("alexnet", num_classes=3)
