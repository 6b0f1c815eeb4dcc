"""A short S3 outage while Ray Train uploads a checkpoint costs no failure slot: with run.max_failures=0 the run
still finishes (Ray Train writes through dermray.storage.train_storage's retrying filesystem). With a plain
``storage_path="s3://..."`` the upload (or the run snapshot after it) fails at once and so does the run."""

import threading
import time

import pytest

from dermray.config import load_config
from dermray.data.sources import SourceOptions
from dermray.data.stage import stage
from dermray.train.trainer import train
from tests.conftest import interrupt_s3
from tests.test_reliability import _wait_for_checkpoint


@pytest.fixture(scope="module")
def tiny_manifest(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic-upload")
    return stage("synthetic", SourceOptions(out=str(out), images_per_class=12, image_size=32))["manifest"]


def test_s3_outage_during_checkpoint_upload_costs_no_failure_slot(tiny_manifest, s3_server, bucket):
    run_dir = f"s3://{bucket}/runs/upload-outage"
    outage: list[tuple[float, threading.Thread]] = []

    def take_s3_down_after_first_checkpoint():
        _wait_for_checkpoint(run_dir)
        outage.append((time.monotonic(), interrupt_s3(s3_server, seconds=8)))

    watcher = threading.Thread(target=take_s3_down_after_first_checkpoint, daemon=True)
    watcher.start()
    try:
        summary = train(load_config(None, [
            "model.backbone=small_cnn", "model.image_size=32", "train.batch_size=16", "train.epochs=4",
            f"data.manifest={tiny_manifest}", f"run.storage=s3://{bucket}/runs", "run.name=upload-outage",
            "run.max_failures=0",
        ]))
        finished = time.monotonic()
    finally:
        watcher.join(timeout=60)
        for _, thread in outage:
            thread.join()
    assert outage, "the endpoint was never taken down"
    assert finished > outage[0][0] + 1, "the run ended before the outage: it tested nothing"
    assert summary["epochs_completed"] == 4
