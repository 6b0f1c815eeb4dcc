"""Training on Ray Train, end to end: real local Ray, real S3 on loopback, real ISIC JPEGs.

Proves checkpoints land in S3 and load without unpickling code, a relaunch with the same run name resumes, a
SIGKILLed worker is replaced and the run finishes, and bad configs are one-line errors.
"""

import io
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from dermray import storage
from dermray.config import load_config
from dermray.data.manifest import read_manifest
from dermray.data.sources import SourceOptions
from dermray.data.stage import stage
from dermray.errors import DermrayError
from dermray.evaluation.evaluate import predict_split
from dermray.models.checkpoint import STATE_FILE
from dermray.train.trainer import train

SMALL = ["model.backbone=resnet18", "model.image_size=64", "train.batch_size=16", "train.lr=0.003"]


def _load_state(checkpoint_uri: str) -> dict:
    data = storage.read_bytes(storage.join(checkpoint_uri, STATE_FILE))
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


@pytest.mark.slow
def test_real_isic_from_s3_checkpoints_to_s3_and_resumes(isic2018_manifest_s3, bucket):
    base = SMALL + [f"data.manifest={isic2018_manifest_s3}", f"run.storage=s3://{bucket}/runs", "run.name=isic"]
    first = train(load_config(None, base + ["train.epochs=2"]))
    assert first["checkpoint"].startswith(f"s3://{bucket}/runs/isic/checkpoint_")
    assert first["epochs_completed"] == 2 and first["resumed_from"] is None
    assert {"accuracy", "balanced_accuracy", "loss"} <= set(first["metrics"])
    assert storage.exists(f"s3://{bucket}/runs/isic/config.yaml")

    state = _load_state(first["latest_checkpoint"])
    manifest = read_manifest(isic2018_manifest_s3)
    assert state["classes"] == manifest.classes and state["epoch"] == 1
    assert set(state["taxonomy"]) == {"malignant", "benign"}
    assert {"model", "optimizer", "scheduler", "config"} <= set(state)

    second = train(load_config(None, base + ["train.epochs=3"]))
    assert second["resumed_from"] == first["latest_checkpoint"]
    assert second["epochs_completed"] == 3
    history = _load_state(second["latest_checkpoint"])["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3]  # epochs continued, not restarted


@pytest.fixture(scope="module")
def synthetic_manifest(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    return stage("synthetic", SourceOptions(out=str(out), images_per_class=40, image_size=64))["manifest"]


def _kill_one_worker_after_first_checkpoint(run_dir: str, killed: list) -> None:
    import ray
    from ray.util.state import list_actors

    # This test's own cluster by address: another Ray instance on the machine (a second test run) would make
    # the default address lookup ambiguous.
    address = ray.get_runtime_context().gcs_address
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if os.path.isdir(run_dir) and any(d.startswith("checkpoint_") for d in os.listdir(run_dir)):
            workers = list_actors(address=address,
                                  filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
            if workers:
                pid = workers[-1].pid
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
        time.sleep(0.5)


@pytest.mark.slow
def test_sigkilled_worker_is_replaced_and_training_finishes(synthetic_manifest, tmp_path):
    storage_dir = tmp_path / "runs"
    killed: list[int] = []
    killer = threading.Thread(
        target=_kill_one_worker_after_first_checkpoint, args=(str(storage_dir / "kill"), killed), daemon=True
    )
    killer.start()
    summary = train(load_config(None, SMALL + [
        f"data.manifest={synthetic_manifest}", f"run.storage={storage_dir}", "run.name=kill",
        "train.epochs=4", "scaling.num_workers=2", "run.max_failures=2",
    ]))
    killer.join(timeout=5)
    assert killed, "the test never managed to kill a worker"
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)
    assert summary["epochs_completed"] == 4
    history = _load_state(summary["latest_checkpoint"])["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


def test_cli_train_bad_config_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dermray", "train", "--set", "train.epochs=zero"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "dermray train: error: config: train.epochs: Input should be a valid integer, "
        "unable to parse string as an integer (got 'zero')"
    )
    assert result.stdout == ""


def test_cli_train_missing_manifest_is_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dermray", "train", "--set", f"data.manifest={tmp_path}/nothing"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "manifest not found" in result.stderr and "Traceback" not in result.stderr
    assert result.stdout == ""  # no JSON summary on failure


@pytest.fixture(scope="module")
def manifest_sized_run(synthetic_manifest, tmp_path_factory) -> dict:
    """One epoch of small_cnn with data.manifest filled in and no model.image_size (what tune and nightly hand the
    trainer); two tests read it."""
    return train(load_config(None, ["model.backbone=small_cnn", "train.batch_size=16", "train.epochs=1",
                                    f"data.manifest={synthetic_manifest}",
                                    f"run.storage={tmp_path_factory.mktemp('sized-runs')}", "run.name=sized"]))


@pytest.mark.slow
def test_warm_start_from_a_checkpoint(synthetic_manifest, manifest_sized_run, tmp_path):
    """A new run with model.init_checkpoint starts from that model, head included (the nightly challenger)."""
    champion = manifest_sized_run["latest_checkpoint"]
    warm = train(load_config(None, [
        "model.backbone=small_cnn", "train.batch_size=16", "train.epochs=1", f"data.manifest={synthetic_manifest}",
        f"run.storage={tmp_path}", "run.name=challenger", "train.lr=1e-9", "train.schedule=constant",
        f"model.init_checkpoint={champion}"]))
    assert warm["resumed_from"] is None
    before, after = _load_state(champion)["model"], _load_state(warm["latest_checkpoint"])["model"]
    for name in ("features.0.0.weight", "features.6.3.weight", "fc.weight", "fc.bias"):  # backbone and head
        assert torch.allclose(before[name], after[name], atol=1e-6), name


def test_warm_start_from_another_class_list_is_refused(synthetic_manifest, tmp_path):
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "meta.json").write_text('{"backbone": "resnet18", "classes": ["a", "b"]}')
    with pytest.raises(DermrayError, match="was trained on classes"):
        train(load_config(None, SMALL + [f"data.manifest={synthetic_manifest}", f"run.storage={tmp_path}",
                                         f"model.init_checkpoint={checkpoint}"]))


@pytest.mark.slow
def test_checkpoints_are_ranked_by_the_configured_metric(synthetic_manifest, tmp_path):
    """run.checkpoint_metric=loss: the summary's best checkpoint is the epoch with the lowest validation loss of
    the run's own per-epoch history, and its metrics are that epoch's."""
    summary = train(load_config(None, [
        "model.backbone=small_cnn", "model.image_size=32", "train.batch_size=16", "train.lr=0.003",
        "train.epochs=4", "run.checkpoints_to_keep=1", "run.checkpoint_metric=loss",
        f"data.manifest={synthetic_manifest}", f"run.storage={tmp_path}", "run.name=by-loss"]))
    history = _load_state(summary["latest_checkpoint"])["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]
    lowest = min(history, key=lambda h: h["val_loss"])
    assert summary["metrics"]["epoch"] == lowest["epoch"]
    assert summary["metrics"]["loss"] == pytest.approx(lowest["val_loss"])
    assert _load_state(summary["checkpoint"])["epoch"] == lowest["epoch"] - 1  # state.pt counts from 0


@pytest.mark.slow
def test_a_weight_averaged_run_scores_and_serves_the_average_and_resumes_it(synthetic_manifest, tmp_path):
    """train.ema_decay: the checkpoint's served weights ("model") are the average, and they are what validation
    scored (inference with them reproduces the epoch's val loss); the raw weights ride along for a resume, which
    continues the average's update count instead of restarting it."""
    base = ["model.backbone=small_cnn", "model.image_size=32", "train.batch_size=16", "train.lr=0.003",
            "train.ema_decay=0.9", f"data.manifest={synthetic_manifest}", f"run.storage={tmp_path}", "run.name=ema"]
    first = train(load_config(None, base + ["train.epochs=2", "run.checkpoints_to_keep=2"]))
    state = _load_state(first["latest_checkpoint"])
    updates = state["average_updates"]
    assert updates > 0 and updates % 2 == 0  # two epochs of equal step counts
    served, raw = state["model"], state["training_model"]
    assert served.keys() == raw.keys()
    assert any(not torch.equal(served[k], raw[k]) for k in served if served[k].is_floating_point())

    manifest = read_manifest(synthetic_manifest)
    result = predict_split(first["latest_checkpoint"], manifest, "val")
    order = np.argsort(result.image_uris)  # any order: the loss is a mean
    loss = log_loss(result.labels[order], np.clip(result.probs[order], 1e-7, 1.0),
                    labels=list(range(len(manifest.classes))))
    assert loss == pytest.approx(state["history"][-1]["val_loss"], abs=2e-3)

    second = train(load_config(None, base + ["train.epochs=3"]))
    assert second["resumed_from"] == first["latest_checkpoint"]
    assert _load_state(second["latest_checkpoint"])["average_updates"] == updates * 3 // 2


@pytest.mark.slow
def test_a_run_sizes_its_images_from_the_manifest_it_reads(manifest_sized_run):
    """With data.manifest filled in and no model.image_size (what tune and nightly hand the trainer), synthetic
    data trains at the embedded 64 px, not at the backbone's 224, and the saved config says so."""
    summary = manifest_sized_run
    saved = load_config(storage.join(summary["run"], "config.yaml"))
    assert saved.model.image_size == 64
    assert _load_state(summary["checkpoint"])["config"]["model"]["image_size"] == 64
