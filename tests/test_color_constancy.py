"""data.color_constancy: Shades of Gray removes an image's colour cast, runs inside both presets, and travels
with the checkpoint so that evaluate and predict see images as training did (an older checkpoint reads as none)."""

import json
import os
import shutil

import numpy as np
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from dermray.config import load_config
from dermray.data.ingest import DecodeAndTransform, train_preset
from dermray.data.manifest import read_manifest
from dermray.data.transforms import SHADES_OF_GRAY_P, EvalPreset, TrainPreset, shades_of_gray
from dermray.evaluation.evaluate import evaluate
from dermray.evaluation.inference import predict_probabilities
from dermray.evaluation.predict import predict
from dermray.models.checkpoint import (
    ModelIdentity,
    checkpoint_eval_preset,
    initial_model,
    load_for_inference,
    write_checkpoint,
)
from dermray.train.feature_cache import cache_key

HAM = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
NO_JITTER = {"brightness": 0.0, "contrast": 0.0, "saturation": 0.0, "hue": 0.0}


def minkowski_means(pixels: np.ndarray) -> np.ndarray:
    x = pixels.astype(np.float64) / 255.0
    return np.power(np.mean(np.power(x, SHADES_OF_GRAY_P), axis=(0, 1)), 1.0 / SHADES_OF_GRAY_P)


def test_a_flat_colour_cast_becomes_the_grey_of_the_same_brightness():
    flat = np.empty((8, 6, 3), np.uint8)
    flat[...] = (100, 120, 200)
    # The illuminant of a flat image is its colour; each channel is scaled to |(100,120,200)| / sqrt(3) = 146.5.
    out = shades_of_gray(flat)
    assert out.dtype == np.uint8 and out.shape == flat.shape
    assert (out == 147).all()


def test_a_cast_real_image_gets_equal_channel_norms_and_keeps_its_structure():
    rng = np.random.default_rng(0)
    grey = rng.integers(20, 200, (64, 48, 1)).astype(np.float32)
    cast = np.clip(grey * np.array([1.2, 0.9, 0.6]), 0, 255).astype(np.uint8)  # a warm light on a grey scene
    means = minkowski_means(shades_of_gray(cast))
    assert means.max() - means.min() < 0.01 * means.mean()  # the illuminant estimate is now grey
    assert np.ptp(minkowski_means(cast)) > 0.2  # it was not before
    corrected = shades_of_gray(cast).astype(np.float32)
    # A per-channel gain: every channel stays a scaled copy of the scene (correlation ~1 with the grey original).
    for c in range(3):
        assert np.corrcoef(corrected[..., c].ravel(), grey.ravel())[0, 1] > 0.99


def test_an_image_with_a_black_channel_is_left_as_it_is():
    image = np.zeros((10, 10, 3), np.uint8)
    image[..., 0] = 180
    image[..., 1] = np.arange(10, dtype=np.uint8)[:, None] * 20
    assert np.array_equal(shades_of_gray(image), image)  # no blue light to estimate: not divided by zero


def test_both_presets_apply_it_and_refuse_an_unknown_method():
    rng = np.random.default_rng(3)
    image = Image.fromarray(np.clip(rng.normal(120, 40, (90, 120, 3)) * [1.3, 1.0, 0.7], 0, 255).astype(np.uint8))
    plain = TrainPreset(32, **NO_JITTER)(image, np.random.default_rng(7))
    normalised = TrainPreset(32, color_constancy="shades_of_gray", **NO_JITTER)(image, np.random.default_rng(7))
    assert np.array_equal(normalised, shades_of_gray(plain))  # same crop and flips, then the correction
    evaluated = EvalPreset(32, color_constancy="shades_of_gray")(image)
    assert np.array_equal(evaluated, shades_of_gray(EvalPreset(32)(image)))
    config = load_config(None, ["data.color_constancy=shades_of_gray"])
    assert train_preset(32, config.data.augment, config.data.color_constancy).color_constancy == "shades_of_gray"
    with pytest.raises(ValueError, match="color_constancy must be one of"):
        EvalPreset(32, color_constancy="gray_world")
    with pytest.raises(ValueError, match="color_constancy must be one of"):
        TrainPreset(32, color_constancy="grey")


def test_the_feature_cache_key_changes_with_it():
    none = load_config(None, ["data.manifest=s3://b/m"])
    sog = load_config(None, ["data.manifest=s3://b/m", "data.color_constancy=shades_of_gray"])
    assert cache_key(none, "f") == cache_key(load_config(None, ["data.manifest=s3://b/m"]), "f")
    assert cache_key(none, "f") != cache_key(sog, "f")


@pytest.fixture(scope="module")
def sog_checkpoint(isic2018_manifest_local, tmp_path_factory):
    """A checkpoint written as training writes it, of a seeded random ResNet-18 configured for Shades of Gray
    (random weights suffice: the tests compare evaluate's and predict's outputs with the model's own)."""
    table = read_manifest(isic2018_manifest_local)
    config = load_config(None, [f"data.manifest={isic2018_manifest_local}", "model.backbone=resnet18",
                                "model.image_size=32", "data.color_constancy=shades_of_gray"]
                         ).with_manifest(isic2018_manifest_local, table.source)
    model = initial_model(config, len(table.classes)).eval()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0)
    directory = str(tmp_path_factory.mktemp("sog") / "checkpoint_000000")
    os.makedirs(directory)
    identity = ModelIdentity.of(config, table.classes, table.taxonomy)
    write_checkpoint(directory, identity, model, optimizer, scheduler, epoch=1, phase="full", metrics={}, history=[])
    return directory


def test_the_checkpoint_carries_it_and_an_older_one_reads_as_none(sog_checkpoint, tmp_path):
    meta = json.loads(open(os.path.join(sog_checkpoint, "meta.json")).read())
    assert meta["color_constancy"] == "shades_of_gray"
    assert checkpoint_eval_preset(sog_checkpoint) == EvalPreset(32, 0.875, "shades_of_gray")
    assert load_for_inference(sog_checkpoint).preset.color_constancy == "shades_of_gray"
    older = str(tmp_path / "older")
    shutil.copytree(sog_checkpoint, older)
    del meta["color_constancy"]  # as written before the setting existed
    with open(os.path.join(older, "meta.json"), "w") as handle:
        json.dump(meta, handle)
    assert checkpoint_eval_preset(older).color_constancy == "none"


def _model_probabilities(checkpoint: str, uris: list[str], color_constancy: str) -> np.ndarray:
    decoded = DecodeAndTransform(EvalPreset(32, color_constancy=color_constancy))(
        {"image_uri": np.array(uris), "label": np.zeros(len(uris), np.int64)})
    probabilities, _ = predict_probabilities(load_for_inference(checkpoint), torch.from_numpy(decoded["image"]))
    return probabilities


@pytest.mark.slow
def test_evaluate_and_predict_see_images_as_the_checkpoint_was_trained(sog_checkpoint, isic2018_manifest_local,
                                                                        tmp_path):
    out = str(tmp_path / "eval")
    evaluate(sog_checkpoint, isic2018_manifest_local, "val", out, bootstrap=0)
    evaluated = pq.read_table(f"{out}/predictions.parquet").to_pandas().sort_values("image_uri")
    uris = evaluated["image_uri"].tolist()
    columns = [f"p_{c}" for c in HAM]
    with_cc = _model_probabilities(sog_checkpoint, uris, "shades_of_gray")
    without = _model_probabilities(sog_checkpoint, uris, "none")
    assert np.abs(with_cc - without).max() > 1e-3  # the correction changes what the model says
    assert np.allclose(evaluated[columns].to_numpy(), with_cc, atol=1e-5)

    folder = tmp_path / "incoming"
    folder.mkdir()
    for uri in uris[:12]:
        shutil.copy(uri.removeprefix("file://"), folder)
    summary = predict(sog_checkpoint, str(folder), str(tmp_path / "predicted"))
    predicted = pads.dataset(summary["predictions"], format="parquet").to_table().to_pandas()
    predicted["name"] = predicted["image_uri"].map(os.path.basename)
    predicted = predicted.set_index("name").loc[[os.path.basename(u) for u in uris[:12]]]
    assert np.allclose(predicted[columns].to_numpy(), with_cc[:12], atol=1e-5)
