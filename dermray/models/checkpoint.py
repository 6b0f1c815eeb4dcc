"""The checkpoint format, in one place: a folder (local or ``s3://``) written by the train loop holding

* ``state.pt``: weights, optimizer and scheduler state, epoch, phase, class names, taxonomy tree, melanoma class,
  the resolved config and the per-epoch history, as plain tensors and containers;
* ``meta.json``: epoch, phase, backbone, classes, taxonomy and the epoch's validation metrics (cheap to read).

Loading never unpickles code: ``torch.load(weights_only=True)`` accepts tensors and plain containers only.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING

from dermray import storage
from dermray.errors import DermrayError

if TYPE_CHECKING:  # torch is imported where it is used: the command line starts without it
    import torch
    from torch import nn

STATE_FILE = "state.pt"
META_FILE = "meta.json"


def read_checkpoint_state(checkpoint_uri: str) -> dict:
    """The ``state.pt`` of a checkpoint folder (local or s3://), loaded without unpickling code."""
    import torch

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


def input_geometry(checkpoint_uri: str, meta: dict | None = None) -> tuple[int, float]:
    """(image size, eval resize ratio) the model was trained at, from meta.json (older checkpoints: state.pt)."""
    from dermray.config import Config

    meta = meta if meta is not None else read_checkpoint_meta(checkpoint_uri)
    if meta.get("image_size") is not None:
        return int(meta["image_size"]), float(meta.get("resize_ratio", 0.875))
    config = Config.model_validate(read_checkpoint_state(checkpoint_uri)["config"])
    return config.image_size, config.data.resize_ratio


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
    image_size: int
    resize_ratio: float
    config: dict
    uri: str


def load_for_inference(checkpoint_uri: str, device: torch.device | str = "cpu") -> InferenceModel:
    """The checkpoint's model in eval mode on ``device`` (channels-last on GPU), its classes and taxonomy."""
    import torch

    from dermray.config import Config
    from dermray.models.backbones import build_model

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
        melanoma_class=melanoma, image_size=config.image_size, resize_ratio=config.data.resize_ratio,
        config=state["config"], uri=storage.normalize(checkpoint_uri),
    )
