"""Phase 1 on cached features (``train.head_on_cached_features``), as the VGG16 transfer-learning source does it.

A frozen backbone computes the same features for an image every epoch when nothing augments it, so the head phase
need not run it more than once: a Ray Data batch-inference pass (the eval preset, no augmentation, as in the
source) writes the penultimate features of the train and val images to ``<run>/features/``, each image once, and the
workers train the head on those rows (with balanced sampling, drawn per epoch as the images would be). Phase 2
fine-tunes the whole network on the images, as without the cache.

The features belong to one backbone's weights: ``features.json`` records their fingerprint (with the manifest, the
geometry and the splits), a relaunch reuses features whose record matches and recomputes any other, and each
worker checks the fingerprint against its own model before the head trains on them.

Inception v3's auxiliary head reads an intermediate map, not the penultimate features: in a cached phase only the
main head trains (phase 2 trains both).
"""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import torch

from dermray import storage
from dermray.config import Config
from dermray.data.ingest import BalancedDraw, balanced_copies, build_dataset, normalize_on_device
from dermray.data.manifest import Manifest
from dermray.evaluation.inference import actor_pool
from dermray.models.backbones import backbone_fingerprint, captured_head_inputs
from dermray.models.checkpoint import eval_preset_of, initial_model
from dermray.train.engine import autocast_for

FEATURES_DIR = "features"
RECORD_FILE = "features.json"
# The worker's dataset names for the cached phase (beside "train" and "val", the images of phase 2).
HEAD_DATASETS = {"train": "head_train", "val": "head_val"}


class FeatureExtractor:
    """The Ray Data actor: the run's initial model in eval mode, returning the input of its final classifier
    Linear (the penultimate features) for each uint8 image batch, with each row's label and image URI."""

    def __init__(self, config: dict, num_classes: int):
        config = Config.model_validate(config)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = initial_model(config, num_classes).to(self.device).eval()
        if self.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.model = model
        self.backbone = config.model.backbone

    @torch.no_grad()
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = normalize_on_device(torch.from_numpy(batch["image"]), self.device, channels_last=self.device.type == "cuda")
        with captured_head_inputs(self.model, self.backbone) as captured, autocast_for(self.device, "auto"):
            self.model(x)
        return {"feature": captured[0].float().flatten(1).cpu().numpy(), "label": batch["label"],
                "image_uri": batch["image_uri"]}


def cache_key(config: Config, fingerprint: str) -> dict:
    """What the cached features depend on: the frozen backbone, the images and the eval view they were seen
    through. A relaunch whose key differs recomputes them rather than training the head on stale features."""
    return {
        "fingerprint": fingerprint, "manifest": config.data.manifest, "image_size": config.image_size,
        "resize_ratio": config.data.resize_ratio, "color_constancy": config.data.color_constancy,
        "splits": [config.data.train_split, config.data.val_split], "seed": config.train.seed,
    }


def head_datasets(config: Config, manifest: Manifest, run_uri: str) -> tuple[dict, str]:
    """({"head_train": ..., "head_val": ...} datasets of cached features, the backbone fingerprint they belong to),
    computing the features unless the run already holds ones that match."""

    fingerprint = backbone_fingerprint(initial_model(config, len(manifest.classes)), config.model.backbone)
    root = storage.join(run_uri, FEATURES_DIR)
    record_uri = storage.join(root, RECORD_FILE)
    key = cache_key(config, fingerprint)
    record = json.loads(storage.read_text(record_uri)) if storage.exists(record_uri) else None
    if record is not None and record.get("key") == key:
        _log(f"[dermray] head phase: reusing the cached features under {root}")
    else:
        record = _compute(config, manifest, root, key)
        storage.write_text(record_uri, json.dumps(record, indent=2))
    copies = (balanced_copies(manifest.split(config.data.train_split)["label"].to_numpy(), len(manifest.classes))
              if config.train.imbalance == "balanced_sampling" else None)
    return {HEAD_DATASETS["train"]: _read(storage.join(root, "train"), training=True, copies=copies),
            HEAD_DATASETS["val"]: _read(storage.join(root, "val"))}, fingerprint


def _compute(config: Config, manifest: Manifest, root: str, key: dict) -> dict:
    started = time.perf_counter()
    preset = eval_preset_of(config)
    rows = {}
    for role, split in (("train", config.data.train_split), ("val", config.data.val_split)):
        # Every image once: balanced sampling draws from these rows per epoch, as it draws from the images.
        dataset = build_dataset(manifest, split, preset, config.data.read_threads,
                                passthrough=("image_uri",)).map_batches(
            FeatureExtractor, fn_constructor_kwargs={"config": config.model_dump(mode="json"),
                                                     "num_classes": len(manifest.classes)},
            batch_size=64, batch_format="numpy", **actor_pool(ray.cluster_resources()))
        target = storage.join(root, role)
        if storage.exists(target):
            storage.delete(target)  # features of other weights: never mixed with the new ones
        dataset.write_parquet(target if storage.is_s3(target) else storage.normalize(target))
        rows[role] = sum(_row_counts(target))
    seconds = round(time.perf_counter() - started, 1)
    _log(f"[dermray] head phase: cached the frozen backbone's features of {rows['train']} train and {rows['val']} "
         f"val images in {seconds:.0f} s under {root}")
    return {"key": key, "rows": rows, "seconds": seconds}


def _parquet_files(uri: str) -> list[str]:
    return sorted(f for f in storage.list_files(uri) if f.endswith(".parquet"))


def _row_counts(uri: str) -> list[int]:
    counts = []
    for file in _parquet_files(uri):
        fs, path = storage.resolve(file)
        with fs.open_input_file(path) as handle:
            counts.append(pq.ParquetFile(handle).metadata.num_rows)
    return counts


def _read(uri: str, training: bool = False, copies: tuple[float, ...] | None = None):
    # The workers take tensors only: the image URIs stay in the files (which image a feature row is).
    dataset = ray.data.read_parquet(_parquet_files(uri)).select_columns(["feature", "label"])
    if not training:
        return dataset
    if copies is not None:  # balanced sampling: the same fresh draw per epoch as the images get
        dataset = dataset.map_batches(BalancedDraw(copies), batch_format="numpy")
    # The features of a whole split are small (512 floats an image for resnet18): shuffled anew every epoch.
    return dataset.random_shuffle()


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
