"""Ray Data ingest from a manifest on S3: real JPEGs read from the loopback endpoint, decoded, augmented, and
handed over as uint8 NHWC batches with their labels."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from dermray import storage
from dermray.config import AugmentConfig
from dermray.data.ingest import (
    IMAGENET_MEAN,
    BalancedDraw,
    DecodeAndTransform,
    balanced_copies,
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


def test_balanced_sampling_draws_every_class_equally_and_afresh_every_epoch():
    labels = np.array([0] * 90 + [1] * 9 + [2] * 1)
    copies = balanced_copies(labels, 4)  # class 3 has no images
    assert copies == pytest.approx((33 / 90, 33 / 9, 33.0, 0.0))
    batch = {"image_uri": np.array([f"u{i}" for i in range(100)]), "label": labels}
    draw = BalancedDraw(copies)
    epochs = [draw(batch) for _ in range(40)]
    for epoch in epochs:
        counts = np.bincount(epoch["label"], minlength=4)
        assert counts[2] == 33 and counts[3] == 0  # the single image 33 times, the absent class never
        assert 27 <= counts[1] <= 36  # each of the 9 images 3 or 4 times
        assert 10 <= counts[0] <= 60  # about 33 of the 90
        rows = np.array([int(uri[1:]) for uri in epoch["image_uri"]])
        assert (labels[rows] == epoch["label"]).all()  # every copy keeps its own image's label
    majority_seen = {u for epoch in epochs for u, label in zip(epoch["image_uri"], epoch["label"]) if label == 0}
    assert len(majority_seen) == 90  # a fresh draw each epoch: every majority image takes its turn
    assert np.mean([np.bincount(e["label"], minlength=4)[0] for e in epochs]) == pytest.approx(33, abs=3)
    assert epochs[0]["image_uri"].tolist() != epochs[1]["image_uri"].tolist()


def test_a_balanced_training_dataset_draws_anew_each_epoch(isic2018_manifest_s3):
    manifest = read_manifest(isic2018_manifest_s3)
    ds = build_dataset(manifest, "train", train_preset(32, AugmentConfig()), shuffle=True, balanced=True,
                       passthrough=("image_uri",))
    labels = manifest.split("train")["label"].to_numpy()
    present = np.flatnonzero(np.bincount(labels, minlength=len(manifest.classes)))
    epochs = []
    for _ in range(2):
        rows = [b for b in ds.iter_batches(batch_size=64, batch_format="numpy")]
        epochs.append((np.concatenate([b["label"] for b in rows]), np.concatenate([b["image_uri"] for b in rows])))
    for drawn, _ in epochs:
        counts = np.bincount(drawn, minlength=len(manifest.classes))[present]
        per_class = len(labels) // len(present)
        assert abs(len(drawn) - per_class * len(present)) <= 3 * np.sqrt(len(labels))  # the epoch keeps its length
        assert counts.min() >= 0.5 * per_class and counts.max() <= 1.5 * per_class, counts  # the classes even out
    majority = np.bincount(labels).argmax()
    first, second = ({u for u, label in zip(uris, drawn) if label == majority} for drawn, uris in epochs)
    assert first != second  # another subset of the majority class in the second epoch


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
