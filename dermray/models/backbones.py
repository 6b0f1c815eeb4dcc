"""The torchvision backbones dermray fine-tunes, their classifier heads, and safe ImageNet weight loading.

Every model is built with ``weights=None`` (training nodes have no internet); ImageNet weights come from a
file the user names (a local path or storage URI), loaded with ``torch.load(weights_only=True)`` so a
checkpoint can never run code. Weights are loaded into the unmodified 1000-class architecture first and the
head is replaced afterwards, so torchvision's published state dicts load key for key.
"""

from __future__ import annotations

import functools
import hashlib
import io
import pickle
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn
from torchvision.models.inception import InceptionOutputs

from dermray import storage
from dermray.errors import DermrayError
from dermray.models.small_cnn import SmallCNN


@dataclass(frozen=True)
class BackboneSpec:
    """A torchvision architecture and where its final classifier sits.

    ``head`` is the dotted path of the final ``nn.Linear`` (``"classifier.6"`` is index 6 of ``classifier``);
    ``aux_heads`` are further Linear classifiers replaced with it (inception's auxiliary head).
    ``min_image_size`` is the smallest input side the model can train at.
    """

    name: str
    builder: Callable[[], nn.Module]
    default_image_size: int
    head: str
    aux_heads: tuple[str, ...] = ()
    min_image_size: int = 32


def _inception_v3() -> nn.Module:
    # init_weights=False skips torchvision's scipy truncated-normal init (seconds on CPU, and overwritten by
    # ImageNet weights anyway). transform_input=True is what torchvision sets for its ImageNet weights (they
    # were trained on inputs scaled to [-1, 1]): it maps our ImageNet-normalised tensors back to that range.
    return tvm.inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("mobilenet_v3_small", functools.partial(tvm.mobilenet_v3_small, weights=None), 224,
                     "classifier.3"),
        BackboneSpec("resnet18", functools.partial(tvm.resnet18, weights=None), 224, "fc"),
        BackboneSpec("resnet50", functools.partial(tvm.resnet50, weights=None), 224, "fc"),
        BackboneSpec("vgg16", functools.partial(tvm.vgg16, weights=None), 224, "classifier.6"),
        # The auxiliary head's 5x5 conv needs a 17x17 Mixed_6e map, i.e. a 299 px input, in train mode.
        BackboneSpec("inception_v3", _inception_v3, 299, "fc", aux_heads=("AuxLogits.fc",),
                     min_image_size=299),
        BackboneSpec("efficientnet_b0", functools.partial(tvm.efficientnet_b0, weights=None), 224,
                     "classifier.1"),
        BackboneSpec("convnext_tiny", functools.partial(tvm.convnext_tiny, weights=None), 224,
                     "classifier.2"),
        # For 28 px DermaMNIST-style inputs; trains from scratch (no ImageNet weights).
        BackboneSpec("small_cnn", SmallCNN, 28, "fc", min_image_size=16),
    )
}


def backbone_names() -> list[str]:
    """The registered backbone names, in registry order."""
    return list(BACKBONES)


def _spec(backbone: str) -> BackboneSpec:
    spec = BACKBONES.get(backbone)
    if spec is None:
        raise DermrayError(
            f"model.backbone: unknown backbone '{backbone}'; choose one of: {', '.join(backbone_names())}"
        )
    return spec


def _unwrap(model: nn.Module) -> nn.Module:
    # Ray Train's prepare_model wraps the model in DistributedDataParallel; head paths are relative to the
    # torchvision model inside it.
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return model.module
    return model


def _head_paths(spec: BackboneSpec) -> tuple[str, ...]:
    return (spec.head, *spec.aux_heads)


def _replace_linear(model: nn.Module, path: str, num_classes: int) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    old = parent.get_submodule(attr)
    if not isinstance(old, nn.Linear):
        raise TypeError(f"{path} is a {type(old).__name__}, not nn.Linear; fix BACKBONES")
    setattr(parent, attr, nn.Linear(old.in_features, num_classes))


def build_model(backbone: str, num_classes: int, weights: str | None = None) -> nn.Module:
    """A ``backbone`` with a freshly initialised ``num_classes``-way head (and aux head for inception_v3).

    With ``weights`` (a local path or storage URI of a torchvision state dict or .safetensors file) the
    backbone starts from those weights; otherwise from random init. Never downloads anything.
    """
    spec = _spec(backbone)
    if num_classes < 2:
        raise DermrayError(f"model: {num_classes} class(es) given; a classifier needs at least 2 classes")
    model = spec.builder()
    if weights:
        load_weights(model, weights, backbone)
    for path in _head_paths(spec):
        _replace_linear(model, path, num_classes)
    return model


def _read_state_dict(uri: str) -> dict[str, torch.Tensor]:
    try:
        data = storage.read_bytes(uri)
    except (OSError, ValueError) as exc:
        raise DermrayError(f"model.weights: cannot read '{uri}' ({exc}); check the path or URI") from exc
    if uri.endswith(".safetensors"):
        try:
            from safetensors.torch import load as load_safetensors
        except ImportError as exc:
            raise DermrayError(
                f"model.weights: '{uri}' is .safetensors but the safetensors package is not installed; "
                "pip install safetensors or convert the file to a torch .pth state dict"
            ) from exc
        try:
            return load_safetensors(data)
        except Exception as exc:  # safetensors raises its own SafetensorError for corrupt headers
            raise DermrayError(f"model.weights: '{uri}' is not a valid .safetensors file ({exc})") from exc
    try:
        # weights_only=True: the unpickler accepts tensors and plain containers only, so a crafted file
        # cannot execute code on the training nodes. It raises UnpicklingError (or RuntimeError) otherwise.
        loaded: Any = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        raise DermrayError(
            f"model.weights: '{uri}' refused: not a plain tensor file (weights_only); "
            "re-save it with torch.save(model.state_dict(), path)"
        ) from exc
    if isinstance(loaded, dict):
        for key in ("model", "state_dict"):  # training checkpoints nest the state dict under one of these
            if isinstance(loaded.get(key), dict):
                loaded = loaded[key]
                break
    if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
        raise DermrayError(
            f"model.weights: '{uri}' holds no state dict (expected name -> tensor, or one under "
            "'model'/'state_dict'); save it with torch.save(model.state_dict(), path)"
        )
    return loaded


def load_weights(model: nn.Module, uri: str, backbone: str | None = None) -> None:
    """Copy the tensors in ``uri`` into ``model``; every backbone tensor must match by name and shape.

    With ``backbone``, head tensors (named by ``BACKBONES[backbone]``) that are missing or shaped
    differently are skipped, since the head is replaced anyway. A file for another architecture, or one
    that is not a plain tensor file, raises ``DermrayError``.
    """
    state = _read_state_dict(uri)
    # State dicts saved from a DDP-wrapped model prefix every key with "module.".
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    target = _unwrap(model)
    heads = tuple(p + "." for p in _head_paths(_spec(backbone))) if backbone else ()
    own = target.state_dict()

    def is_head(key: str) -> bool:
        return key.startswith(heads) if heads else False

    usable = {k: v for k, v in state.items() if not (is_head(k) and k in own and own[k].shape != v.shape)}
    # num_batches_tracked only counts steps (older torchvision files lack it); BatchNorm fills it in.
    missing = sorted(
        k for k in own if k not in usable and not is_head(k) and not k.endswith("num_batches_tracked")
    )
    unexpected = sorted(k for k in usable if k not in own)
    wrong_shape = sorted(k for k in usable if k in own and own[k].shape != usable[k].shape)
    if missing or unexpected or wrong_shape:
        problems = (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape))
        details = "; ".join(
            f"{label} ({len(keys)}): {', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''}"
            for label, keys in problems
            if keys
        )
        name = f" for {backbone}" if backbone else ""
        raise DermrayError(
            f"model.weights: '{uri}' does not fit the model{name} ({details}); "
            "use the ImageNet weights of the same architecture as model.backbone"
        )
    # strict=False only because skipped head tensors and absent num_batches_tracked buffers are allowed;
    # everything else was checked above.
    target.load_state_dict(usable, strict=False)


def head_module(model: nn.Module, backbone: str) -> nn.Module:
    """The final classifier Linear of a ``build_model(backbone, ...)`` model, DDP-wrapped or not."""
    return _unwrap(model).get_submodule(_spec(backbone).head)


@contextmanager
def captured_head_inputs(model: nn.Module, backbone: str) -> Iterator[list[torch.Tensor]]:
    """Collects, while open, the input of the final classifier Linear on every forward pass: the penultimate
    features (N, D), detached, one tensor per pass."""
    captured: list[torch.Tensor] = []
    hook = head_module(model, backbone).register_forward_hook(
        lambda _module, inputs, _output: captured.append(inputs[0].detach()))
    try:
        yield captured
    finally:
        hook.remove()


def head_parameters(model: nn.Module, backbone: str) -> list[nn.Parameter]:
    """The parameters of every replaced head: the classifier, plus inception_v3's auxiliary classifier."""
    target = _unwrap(model)
    return [p for path in _head_paths(_spec(backbone)) for p in target.get_submodule(path).parameters()]


def backbone_fingerprint(model: nn.Module, backbone: str) -> str:
    """A SHA-256 of every weight and buffer outside the head(s): equal exactly when two models' frozen backbones
    compute the same features (cached features are checked against it before a head trains on them)."""
    head_keys = tuple(f"{path}." for path in _head_paths(_spec(backbone)))
    digest = hashlib.sha256()
    for key, tensor in sorted(_unwrap(model).state_dict().items()):
        if not key.startswith(head_keys):
            digest.update(key.encode())
            digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def set_backbone_trainable(model: nn.Module, backbone: str, trainable: bool) -> None:
    """Set ``requires_grad=trainable`` on every non-head parameter; head parameters are always trainable.

    Phase 1 of the two-phase recipe (``trainable=False``) trains only the new head on frozen ImageNet
    features; phase 2 (``trainable=True``) fine-tunes the whole network.
    """
    head = {id(p) for p in head_parameters(model, backbone)}
    for param in _unwrap(model).parameters():
        param.requires_grad_(trainable or id(param) in head)


def freeze_batchnorm_stats(model: nn.Module, backbone: str) -> None:
    """Put every BatchNorm layer outside the head in eval mode; call it after ``model.train()`` in phase 1.

    In train mode BatchNorm normalises with batch statistics and updates its running mean/var even when its
    affine parameters are frozen, so the "frozen" features would drift with every batch (and differ between
    training and evaluation). Eval mode uses, and keeps, the ImageNet running statistics.
    """
    target = _unwrap(model)
    heads = [target.get_submodule(path) for path in _head_paths(_spec(backbone))]
    head_modules = {id(m) for head in heads for m in head.modules()}
    for module in target.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and id(module) not in head_modules:
            module.eval()


def split_logits(output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits, aux_logits)`` from a model's output.

    inception_v3 in train mode returns ``InceptionOutputs(logits, aux_logits)``; every other model, and
    inception in eval mode, returns the logits tensor, giving ``(output, None)``.
    """
    if isinstance(output, InceptionOutputs):
        return output.logits, output.aux_logits
    return output, None
