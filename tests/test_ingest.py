"""Ray Data ingest from a manifest on S3: real JPEGs read from the loopback endpoint, decoded, augmented, and
handed over as uint8 NHWC batches with their labels."""

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image

from dermray import storage
from dermray.config import AugmentConfig
from dermray.data.ingest import (
    IMAGENET_MEAN,
    DecodeAndTransform,
    balanced_rows,
    build_dataset,
    normalize_on_device,
    train_preset,
)
from dermray.data.manifest import read_manifest
from dermray.data.transforms import EvalPreset


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


@pytest.mark.parametrize("store", ["local", "s3"])
def test_files_gone_or_damaged_since_staging_are_dropped_with_their_labels(store, tmp_path, request):
    """The map function of both read paths (local files read in line, object storage through the fetch threads):
    a file deleted and a file truncated since staging are dropped from the batch (or, for prediction, kept blank
    with the reason), and every kept image still carries its own label."""
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (40, 220, 220)]
    names = [f"lesion_{i}.jpg" for i in range(len(colours))]
    payloads = []
    for colour in colours:
        buffer = io.BytesIO()
        Image.new("RGB", (80, 60), colour).save(buffer, "JPEG", quality=95)
        payloads.append(buffer.getvalue())
    payloads[3] = payloads[3][: len(payloads[3]) // 3]  # damaged since staging
    if store == "local":
        uris = [str(tmp_path / name) for name in names]
    else:
        bucket = request.getfixturevalue("bucket")
        uris = [f"s3://{bucket}/images/{name}" for name in names]
    for uri, payload in zip(uris, payloads):
        storage.write_bytes(uri, payload)
    storage.delete(uris[1])  # deleted since staging
    batch = {"image_uri": np.array(uris, dtype=object), "label": np.arange(len(uris), dtype=np.int64)}

    out = DecodeAndTransform(EvalPreset(image_size=32, resize_ratio=1.0))(batch)
    assert out["label"].tolist() == [0, 2, 4]
    for image, label in zip(out["image"], out["label"]):
        assert np.abs(image.reshape(-1, 3).mean(0) - colours[label]).max() < 8  # its own pixels

    reported = DecodeAndTransform(EvalPreset(image_size=32, resize_ratio=1.0), keep_failures=True)(batch)
    assert reported["label"].tolist() == [0, 1, 2, 3, 4]
    assert [bool(e) for e in reported["error"]] == [False, True, False, True, False]
    assert reported["error"][1].startswith("FileNotFoundError") and reported["error"][3].startswith("UnreadableImage")
    assert reported["image"][1].max() == 0 and reported["image"][3].max() == 0
