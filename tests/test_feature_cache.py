"""Phase 1 on cached features (``train.head_on_cached_features``), on real Ray: the cached rows are the frozen
backbone's own features of the images, the head trains on them without the backbone moving, and the epoch's
validation figures are those of the real model on the real images."""

import json

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
import pytest
import torch

from dermray import storage
from dermray.config import load_config
from dermray.data.ingest import DecodeAndTransform, normalize_on_device
from dermray.data.manifest import read_manifest
from dermray.data.sources import SourceOptions
from dermray.data.stage import stage
from dermray.data.transforms import EvalPreset
from dermray.models.backbones import backbone_fingerprint, head_module
from dermray.models.checkpoint import initial_model, read_checkpoint_meta, read_checkpoint_state
from dermray.train.trainer import train

CACHED = ["model.backbone=small_cnn", "model.image_size=32", "train.batch_size=16", "train.epochs=2",
          "train.head_epochs=1", "train.head_lr=0.01", "train.head_on_cached_features=true",
          "run.checkpoints_to_keep=2"]


@pytest.fixture(scope="module")
def manifest(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic-cache")
    return stage("synthetic", SourceOptions(out=str(out), images_per_class=24, image_size=48))["manifest"]


def _penultimate(model, backbone: str, images: np.ndarray) -> torch.Tensor:
    captured = []
    hook = head_module(model, backbone).register_forward_hook(lambda _m, inputs, _o: captured.append(inputs[0]))
    with torch.no_grad():
        logits = model.eval()(normalize_on_device(torch.from_numpy(images), "cpu", channels_last=False))
    hook.remove()
    return captured[0].flatten(1), logits


def test_head_trains_on_the_frozen_backbones_own_features(manifest, tmp_path):
    config = load_config(None, CACHED + [f"data.manifest={manifest}", f"run.storage={tmp_path}", "run.name=cached"])
    summary = train(config)
    assert summary["epochs_completed"] == 2
    run = storage.join(str(tmp_path), "cached")
    table = read_manifest(manifest)
    record = json.loads(storage.read_text(storage.join(run, "features", "features.json")))
    assert record["rows"] == {"train": table.split("train").num_rows, "val": table.split("val").num_rows}

    # The cached val rows are the initial model's penultimate features of the val images (eval preset).
    resolved = load_config(None, [f"data.manifest={manifest}", *CACHED]).with_manifest(manifest, table.source)
    start = initial_model(resolved, len(table.classes))
    cached = pads.dataset(storage.join(run, "features", "val"), format="parquet").to_table().to_pandas()
    val = table.split("val").to_pandas().set_index("image_uri").loc[cached["image_uri"]]
    decoded = DecodeAndTransform(EvalPreset(image_size=32, resize_ratio=resolved.data.resize_ratio))(
        {"image_uri": np.array(val.index), "label": val["label"].to_numpy()})
    features, _ = _penultimate(start, "small_cnn", decoded["image"])
    assert np.allclose(np.stack(cached["feature"]), features.numpy(), atol=1e-4)
    assert (cached["label"].to_numpy() == val["label"].to_numpy()).all()

    # The head phase's checkpoint: the backbone untouched, the head trained, and its reported val loss is that
    # of the checkpoint's model run on the val images themselves.
    checkpoints = [d for d in storage.list_dirs(run) if storage.basename(d).startswith("checkpoint_")]
    head_checkpoint = next(d for d in checkpoints if read_checkpoint_meta(d)["phase"] == "head")
    trained = initial_model(resolved, len(table.classes))
    trained.load_state_dict(read_checkpoint_state(head_checkpoint)["model"])
    assert backbone_fingerprint(trained, "small_cnn") == backbone_fingerprint(start, "small_cnn") \
        == record["key"]["fingerprint"]
    assert not torch.equal(head_module(trained, "small_cnn").weight, head_module(start, "small_cnn").weight)
    _, logits = _penultimate(trained, "small_cnn", decoded["image"])
    loss = torch.nn.functional.cross_entropy(logits, torch.from_numpy(decoded["label"])).item()
    metrics = read_checkpoint_meta(head_checkpoint)["metrics"]
    assert metrics["val_loss"] == pytest.approx(loss, abs=1e-4)

    history = pd.DataFrame(read_checkpoint_meta(summary["latest_checkpoint"])["history"])
    assert history["phase"].tolist() == ["head", "full"]


def test_a_relaunch_inside_the_head_phase_reuses_the_cached_features(manifest, tmp_path):
    base = CACHED + [f"data.manifest={manifest}", f"run.storage={tmp_path}", "run.name=relaunch"]
    train(load_config(None, base + ["train.epochs=1", "train.head_epochs=1"]))
    record_uri = storage.join(str(tmp_path), "relaunch", "features", "features.json")
    first = storage.read_text(record_uri)
    summary = train(load_config(None, base + ["train.epochs=3", "train.head_epochs=2"]))
    assert summary["resumed_from"] and summary["epochs_completed"] == 3
    assert storage.read_text(record_uri) == first  # not recomputed: same record, same seconds
