"""The checkpoint format, in one place: a folder (local or ``s3://``) written by the train loop holding

* ``state.pt``: weights, optimizer and scheduler state, epoch, phase, class names, taxonomy tree, melanoma class,
  the resolved config and the per-epoch history, as plain tensors and containers;
* ``meta.json``: epoch, phase, backbone, input geometry, classes, taxonomy, config, the epoch's validation
  metrics and the per-epoch history (cheap to read).

``write_checkpoint`` writes both (the train loop's only way to), the readers below read them.

Loading never unpickles code: ``torch.load(weights_only=True)`` accepts tensors and plain containers only.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from dermray import storage
from dermray.config import Config
from dermray.data.transforms import EvalPreset
from dermray.errors import DermrayError
from dermray.models.backbones import build_model
from dermray.models.identity import ModelIdentity

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def ensemble_members(checkpoint: str | Sequence[str], command: str) -> list[str]:
    """The normalized URIs of one checkpoint, or of an ensemble's members (the same one named twice refused)."""
    members = [storage.normalize(c) for c in ([checkpoint] if isinstance(checkpoint, str) else checkpoint)]
    if not members or len(set(members)) != len(members):
        raise DermrayError(f"{command}: give each checkpoint once (several different ones make an ensemble)")
    return members


def read_checkpoint_state(checkpoint_uri: str) -> dict:
    """The ``state.pt`` of a checkpoint folder (local or s3://), loaded without unpickling code."""

    uri = storage.join(storage.normalize(checkpoint_uri), STATE_FILE)
    if not storage.exists(uri):
        raise DermrayError(f"checkpoint: no {STATE_FILE} in {checkpoint_uri} (pass a checkpoint_* folder of a run)")
    try:
        return torch.load(io.BytesIO(storage.read_bytes(uri)), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as error:
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DermrayError(f"checkpoint: {uri} refused: not a plain tensor file ({first_line})") from None


def read_checkpoint_meta(checkpoint_uri: str) -> dict:
    uri = storage.join(storage.normalize(checkpoint_uri), META_FILE)
    if not storage.exists(uri):
        raise DermrayError(f"checkpoint: no {META_FILE} in {checkpoint_uri} (pass a checkpoint_* folder of a run)")
    return json.loads(storage.read_text(uri))


def write_checkpoint(directory: str, identity: ModelIdentity, model: nn.Module, optimizer, scheduler, epoch: int,
                     phase: str, metrics: dict, history: list[dict], averaged=None) -> None:
    """Write ``state.pt`` (everything needed to resume: weights, optimizer, schedule, epoch; and to serve:
    classes, taxonomy, config) as plain tensors and containers that ``torch.load(weights_only=True)`` accepts,
    and ``meta.json`` (what the model is and how it scored, cheap to read) into the local ``directory``.

    With a weight average (``train.ema_decay``; a torch ``AveragedModel`` of ``model``), ``model`` in the state
    is the average, the weights every reader serves, and ``training_model`` the raw weights a resumed run
    continues from, with ``average_updates``."""

    common = {"epoch": epoch, "phase": phase, "classes": identity.classes, "taxonomy": identity.taxonomy,
              "melanoma_class": identity.melanoma_class, "config": identity.config}
    state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "history": history, **common}
    if averaged is not None:
        state.update(model=averaged.module.state_dict(), training_model=model.state_dict(),
                     average_updates=int(averaged.n_averaged))
    torch.save(state, os.path.join(directory, STATE_FILE))
    model_config = identity.config["model"]
    # The config is in meta.json too, so that a report can show it without fetching the (large) state.
    # The history too (a few hundred bytes an epoch): learning curves are drawn from meta.json alone.
    meta = {"backbone": model_config["backbone"], "image_size": model_config["image_size"],
            "resize_ratio": identity.config["data"]["resize_ratio"],
            "color_constancy": identity.config["data"]["color_constancy"], "metrics": metrics, "history": history,
            **common}
    with open(os.path.join(directory, META_FILE), "w") as handle:
        json.dump(meta, handle, indent=2)


def initial_model(config: Config, num_classes: int) -> nn.Module:
    """The model a new run starts from: seeded random init or ImageNet weights (``model.weights``), then a warm
    start's weights (``model.init_checkpoint``). Seeded, so every process that builds it gets the same weights."""
    torch.manual_seed(config.train.seed)
    model = build_model(config.model.backbone, num_classes, config.model.weights)
    if config.model.init_checkpoint:
        model.load_state_dict(read_checkpoint_state(config.model.init_checkpoint)["model"])
    return model


def read_history(checkpoint_uri: str) -> list[dict]:
    """The per-epoch history of the run up to this checkpoint (meta.json; older checkpoints: state.pt)."""
    meta = read_checkpoint_meta(checkpoint_uri)
    if "history" in meta:
        return list(meta["history"])
    return list(read_checkpoint_state(checkpoint_uri).get("history", []))


def read_ray_checkpoint_meta(checkpoint) -> dict:
    """The ``meta.json`` of a ``ray.train.Checkpoint`` (wherever its filesystem is), without fetching the weights."""

    with checkpoint.filesystem.open_input_file(posixpath.join(checkpoint.path, META_FILE)) as handle:
        return json.loads(handle.read())


def warm_start_mismatch(checkpoint_uri: str, backbone: str, classes: list[str]) -> str | None:
    """Why a checkpoint cannot warm-start a ``backbone`` model of ``classes`` (one line), or None when it can."""
    if not storage.exists(storage.join(storage.normalize(checkpoint_uri), META_FILE)):
        return f"no dermray checkpoint at {checkpoint_uri} ({META_FILE} missing)"
    meta = read_checkpoint_meta(checkpoint_uri)
    if meta.get("backbone") != backbone:
        return f"{checkpoint_uri} is a {meta.get('backbone')}, not a {backbone} (set model.backbone to match)"
    if meta.get("classes") != classes:
        return f"{checkpoint_uri} was trained on classes {meta.get('classes')}, the manifest has {classes}"
    return None


def eval_preset_of(config: Config) -> EvalPreset:
    """The deterministic view a model of ``config`` is validated and served on."""
    return EvalPreset(image_size=config.image_size, resize_ratio=config.data.resize_ratio,
                      color_constancy=config.data.color_constancy)


def checkpoint_eval_preset(checkpoint_uri: str, meta: dict | None = None) -> EvalPreset:
    """The eval view (image size, resize ratio, colour constancy) the model was trained with, from meta.json
    (checkpoints older than a field: its default then; older than meta's geometry: state.pt)."""

    meta = meta if meta is not None else read_checkpoint_meta(checkpoint_uri)
    if meta.get("image_size") is not None:
        return EvalPreset(image_size=int(meta["image_size"]), resize_ratio=float(meta.get("resize_ratio", 0.875)),
                          color_constancy=meta.get("color_constancy", "none"))
    return eval_preset_of(Config.model_validate(read_checkpoint_state(checkpoint_uri)["config"]))


def melanoma_class_of(record: dict, classes: list[str]) -> str | None:
    """The melanoma class a checkpoint's state or meta names (older checkpoints: 'mel' or 'melanoma')."""
    if record.get("melanoma_class"):
        return record["melanoma_class"]
    return next((c for c in ("mel", "melanoma") if c in classes), None)


@dataclass
class InferenceModel:
    """A trained model ready for inference, with everything needed to read its outputs."""

    model: nn.Module
    backbone: str
    classes: list[str]
    taxonomy: dict[str, list[str]] | None
    melanoma_class: str | None
    preset: EvalPreset
    config: dict
    uri: str

    @property
    def image_size(self) -> int:
        return self.preset.image_size


def load_for_inference(checkpoint_uri: str, device: torch.device | str = "cpu") -> InferenceModel:
    """The checkpoint's model in eval mode on ``device`` (channels-last on GPU), its classes and taxonomy."""

    state = read_checkpoint_state(checkpoint_uri)
    config = Config.model_validate(state["config"])
    classes = list(state["classes"])
    model = build_model(config.model.backbone, len(classes))
    model.load_state_dict(state["model"])
    device = torch.device(device)
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    melanoma = melanoma_class_of(state, classes)
    return InferenceModel(
        model=model, backbone=config.model.backbone, classes=classes, taxonomy=state.get("taxonomy"),
        melanoma_class=melanoma, preset=eval_preset_of(config),
        config=state["config"], uri=storage.normalize(checkpoint_uri),
    )
