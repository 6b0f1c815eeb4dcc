"""Packed shards: staging with --pack writes resized JPEGs into Parquet shards (real ISIC images, local and on the
S3 endpoint on loopback), every row keeps its source URI and label, training reads them transparently, and the
benchmarks run in a tiny mode so they cannot rot."""

import io
import json
import subprocess
import sys

import numpy as np
import pyarrow.dataset as pads
import pytest
from PIL import Image

from dermray import storage
from dermray.config import AugmentConfig
from dermray.data.ingest import build_dataset, train_preset
from dermray.data.manifest import read_manifest
from dermray.data.pack import resized_jpeg
from dermray.data.sources import SourceOptions
from dermray.data.stage import stage
from tests.conftest import data_path, upload_folder


def test_resized_jpeg_keeps_the_aspect_and_only_shrinks():
    big, small = io.BytesIO(), io.BytesIO()
    Image.new("RGB", (600, 450), (200, 120, 90)).save(big, format="JPEG")
    Image.new("RGB", (100, 40), (200, 120, 90)).save(small, format="PNG")
    assert Image.open(io.BytesIO(resized_jpeg(big.getvalue(), 256))).size == (256, 192)
    assert Image.open(io.BytesIO(resized_jpeg(small.getvalue(), 256))).size == (100, 40)


def _packed_rows(manifest) -> dict[str, dict]:
    fs, path = storage.resolve(manifest.packed)
    table = pads.dataset(path, filesystem=fs, format="parquet", partitioning=None).to_table()
    return {row["image_uri"]: row for row in table.to_pylist()}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_stage_pack_writes_shards_that_training_reads(where, ray_local, tmp_path, request):
    images = data_path("isic2018-sample")
    out = str(tmp_path / "staged") if where == "local" else f"s3://{request.getfixturevalue('bucket')}/staged"
    summary = stage("csv", SourceOptions(out=out, images=str(images / "images"), labels=str(images / "labels.csv"),
                                         image_col="file", label_col="dx"), pack_size=128, rows_per_shard=100)
    manifest = read_manifest(summary["manifest"])
    assert manifest.packed == summary["packed"] and manifest.packed_size == 128
    shard_files = [f for f in storage.list_files(manifest.packed) if f.endswith(".parquet")]
    assert 3 <= len(shard_files) <= 8  # 300 images, at most 100 per shard, split in train/val/test folders
    rows = _packed_rows(manifest)
    assert set(rows) == set(manifest.table["image_uri"].to_pylist())  # nothing lost, nothing added
    for uri, label in zip(manifest.table["image_uri"].to_pylist(), manifest.table["label"].to_pylist()):
        assert rows[uri]["label"] == label  # labels travel with their pixels
    first = Image.open(io.BytesIO(next(iter(rows.values()))["image"]))
    assert first.format == "JPEG" and max(first.size) == 128
    # Training reads the packed layout: every train image once per epoch, with its label.
    batches = list(build_dataset(manifest, "train", train_preset(64, AugmentConfig())).iter_batches(
        batch_size=32, batch_format="numpy"))
    labels = np.concatenate([b["label"] for b in batches])
    expected = manifest.split("train")["label"].to_numpy()
    assert np.bincount(labels, minlength=7).tolist() == np.bincount(expected, minlength=7).tolist()
    assert np.concatenate([b["image"] for b in batches]).shape[1:] == (64, 64, 3)


def test_restaging_without_pack_removes_the_old_shards(ray_local, tmp_path):
    folder = tmp_path / "img"
    for cls in ("a", "b"):
        (folder / cls).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (64, 48), (i * 30, 80, 90 if cls == "a" else 200)).save(folder / cls / f"{i}.jpg")
    packed = stage("folder", SourceOptions(out=str(tmp_path / "out"), images=str(folder)), pack_size=32)["packed"]
    assert storage.is_dir(packed)
    again = stage("folder", SourceOptions(out=str(tmp_path / "out"), images=str(folder)))
    assert again["packed"] is None and not storage.exists(packed)


@pytest.mark.slow
def test_bench_ingest_and_train_in_tiny_mode(tmp_path, attached_env):
    images = data_path("isic2018-sample", "images")
    result = subprocess.run([sys.executable, "-m", "dermray", "bench", "ingest", "--images", str(images),
                             "--limit", "40", "--image-size", "64", "--seconds", "2", "--pack"],
                            capture_output=True, text=True, timeout=600, env=attached_env)
    assert result.returncode == 0, result.stderr[-3000:]
    ingest = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("ray_data_images_per_s", "dataloader_images_per_s", "single_core_images_per_s",
                "packed_images_per_s"):
        assert ingest[key] > 0, key
    assert "dermray bench ingest" in result.stderr and ingest["peak_rss_gib"] > 0
    # The machine-wide peak counts the Ray instance the command ran on (its processes and object store).
    assert ingest["peak_memory_gib"] > 0.1

    manifest = stage("synthetic", SourceOptions(out=str(tmp_path / "syn"), images_per_class=8,
                                                image_size=48))["manifest"]
    result = subprocess.run([sys.executable, "-m", "dermray", "bench", "train", "--backbone", "small_cnn",
                             "--image-size", "32", "--manifest", manifest, "--seconds", "2", "--batch-size", "8",
                             "--amp", "bf16"],
                            capture_output=True, text=True, timeout=600, env=attached_env)
    assert result.returncode == 0, result.stderr[-3000:]
    train = json.loads(result.stdout.strip().splitlines()[-1])
    assert train["synthetic_images_per_s"] > 0 and train["pipeline_images_per_s"] > 0
    assert train["amp"] == "bf16" and train["device"] == "cpu"  # --amp reaches the training step (auto: off here)
    assert train["pipeline_vs_synthetic"] == pytest.approx(
        train["pipeline_images_per_s"] / train["synthetic_images_per_s"], abs=0.01)


@pytest.mark.slow
def test_bench_ingest_from_s3_packs_into_the_same_bucket_and_cleans_up(s3_client, bucket, attached_env):
    keys = upload_folder(s3_client, bucket, "isic2018", data_path("isic2018-sample", "images"), limit=24)
    result = subprocess.run([sys.executable, "-m", "dermray", "bench", "ingest", "--images", f"s3://{bucket}/isic2018",
                             "--image-size", "64", "--seconds", "2", "--pack", "--pack-to", f"s3://{bucket}/scratch"],
                            capture_output=True, text=True, timeout=600, env=attached_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(result.stdout.splitlines()) == 1, result.stdout[-3000:]
    ingest = json.loads(result.stdout)
    assert ingest["images"] == len(keys)
    assert ingest["ray_data_images_per_s"] > 0 and ingest["packed_images_per_s"] > 0
    assert ingest["packed_at"].startswith(f"s3://{bucket}/scratch/dermray-bench-")
    # The shards were read from the bucket, then removed: only the images remain (and the empty folder marker
    # that pyarrow leaves for the parent prefix).
    left = [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert sorted(k for k in left if not k.endswith("/")) == sorted(keys), sorted(set(left) - set(keys))
