"""Ray Data ingest from a manifest on S3: real JPEGs read from the loopback endpoint, decoded, augmented, and
handed over as uint8 NHWC batches with their labels."""

import numpy as np
import pyarrow as pa
import torch

from dermray.config import AugmentConfig
from dermray.ingest import IMAGENET_MEAN, balanced_rows, build_dataset, normalize_on_device, train_preset
from dermray.manifest import read_manifest
from dermray.transforms import EvalPreset


def test_train_batches_from_s3_manifest(isic2018_manifest_s3):
    manifest = read_manifest(isic2018_manifest_s3)
    preset = train_preset(64, AugmentConfig(crop="esteva", rotation_degrees=180))
    ds = build_dataset(manifest, "train", preset, shuffle=True)
    batches = list(ds.iter_batches(batch_size=16, batch_format="numpy"))
    images = np.concatenate([b["image"] for b in batches])
    labels = np.concatenate([b["label"] for b in batches])
    assert images.dtype == np.uint8 and images.shape[1:] == (64, 64, 3)
    assert labels.dtype == np.int64
    # Every train image arrives exactly once per epoch, with its own label.
    expected = manifest.split("train")["label"].to_numpy()
    assert len(labels) == len(expected)
    assert np.bincount(labels, minlength=7).tolist() == np.bincount(expected, minlength=7).tolist()
    assert images.std() > 10  # real pixels, not a blank fill


def test_eval_batches_are_deterministic(isic2018_manifest_s3):
    manifest = read_manifest(isic2018_manifest_s3)
    ds = build_dataset(manifest, "val", EvalPreset(image_size=48))
    first = np.concatenate([b["image"] for b in ds.iter_batches(batch_size=64, batch_format="numpy")])
    second = np.concatenate([b["image"] for b in ds.iter_batches(batch_size=64, batch_format="numpy")])
    assert first.shape == (manifest.split("val").num_rows, 48, 48, 3)
    assert np.array_equal(first, second)


def test_train_augmentation_differs_between_epochs(isic2018_manifest_s3):
    manifest = read_manifest(isic2018_manifest_s3)
    ds = build_dataset(manifest, "test", train_preset(32, AugmentConfig(rotation_degrees=90)))
    one = np.concatenate([b["image"] for b in ds.iter_batches(batch_size=64, batch_format="numpy")])
    two = np.concatenate([b["image"] for b in ds.iter_batches(batch_size=64, batch_format="numpy")])
    assert not np.array_equal(one.mean(axis=(1, 2, 3)), two.mean(axis=(1, 2, 3)))


def test_balanced_rows_equalise_classes_and_keep_length():
    labels = [0] * 90 + [1] * 9 + [2] * 1
    table = pa.table({"image_uri": [f"u{i}" for i in range(100)], "label": labels})
    balanced = balanced_rows(table, 4, seed=0)
    counts = np.bincount(balanced["label"].to_numpy(), minlength=4)
    assert counts.tolist() == [33, 33, 33, 0]


def test_normalize_on_device_gives_channels_last_imagenet_normalised():
    batch = torch.full((2, 8, 8, 3), 255, dtype=torch.uint8)
    x = normalize_on_device(batch, torch.device("cpu"))
    assert x.shape == (2, 3, 8, 8) and x.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(x[0, 0, 0, 0], torch.tensor((1 - IMAGENET_MEAN[0]) / 0.229))
