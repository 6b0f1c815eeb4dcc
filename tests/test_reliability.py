"""Faults and leaks, with real processes: the whole training job SIGKILLed and relaunched, the S3 endpoint down
in the middle of a run that reads images from it and checkpoints to it, and recognisable fake credentials and
patient identifiers that must not appear in anything dermray prints or writes."""

import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from PIL import Image

from dermray import storage
from dermray.config import load_config
from dermray.data.sources import SourceOptions
from dermray.data.stage import stage
from dermray.train.trainer import train
from tests.cluster_helpers import kill_matching
from tests.conftest import interrupt_s3

SMALL = ["model.backbone=resnet18", "model.image_size=48", "train.batch_size=16"]


def _snapshot_latest(run_dir: str) -> str | None:
    snapshot = storage.join(run_dir, "checkpoint_manager_snapshot.json")
    if not storage.exists(snapshot):
        return None
    latest = json.loads(storage.read_text(snapshot)).get("latest_checkpoint_result") or {}
    return latest.get("checkpoint_dir_name")


def _wait_for_checkpoint(run_dir: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _snapshot_latest(run_dir):
            return
        time.sleep(0.5)
    raise AssertionError(f"no checkpoint appeared under {run_dir} within {timeout}s")


@pytest.fixture(scope="module")
def synthetic_manifest(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic-reliability")
    return stage("synthetic", SourceOptions(out=str(out), images_per_class=24, image_size=48))["manifest"]


def _train_command(manifest: str, storage_dir: Path, epochs: int) -> list[str]:
    sets = SMALL + [f"data.manifest={manifest}", f"run.storage={storage_dir}", "run.name=killed",
                    f"train.epochs={epochs}"]
    return [sys.executable, "-m", "dermray", "train", *[arg for s in sets for arg in ("--set", s)]]


@pytest.mark.slow
def test_whole_job_sigkilled_then_relaunched_resumes(synthetic_manifest, tmp_path):
    """The driver and its local Ray instance die together (a lost node, an OOM kill); the same command resumes."""
    temp_dir = f"/tmp/drk-{os.getpid()}"
    env = dict(os.environ, RAY_TMPDIR=temp_dir)
    env.pop("RAY_ADDRESS", None)
    command = _train_command(synthetic_manifest, tmp_path / "runs", epochs=4)
    job = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)
    try:
        _wait_for_checkpoint(str(tmp_path / "runs" / "killed"))
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        kill_matching([temp_dir])  # whatever of that Ray instance outlived its driver
    assert job.returncode == -signal.SIGKILL
    first_latest = _snapshot_latest(str(tmp_path / "runs" / "killed"))

    try:
        rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    finally:
        kill_matching([temp_dir])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads(rerun.stdout.strip().splitlines()[-1])
    assert summary["resumed_from"] == str(tmp_path / "runs" / "killed" / first_latest)
    assert summary["epochs_completed"] == 4
    assert "resuming from" in rerun.stderr


@pytest.mark.slow
def test_training_survives_an_s3_outage(s3_server, isic2018_manifest_s3, bucket):
    """Images are read from S3 and checkpoints written to it; the endpoint goes down for 10 s after the first
    checkpoint. Storage reads retry, a failed checkpoint upload restarts the workers from the last complete
    checkpoint (run.max_failures), and the run finishes with every epoch accounted for."""
    run_dir = f"s3://{bucket}/runs/outage"
    outage: list[threading.Thread] = []

    def take_s3_down_after_first_checkpoint():
        _wait_for_checkpoint(run_dir)
        outage.append(interrupt_s3(s3_server, seconds=10))

    watcher = threading.Thread(target=take_s3_down_after_first_checkpoint, daemon=True)
    watcher.start()
    try:
        summary = train(load_config(None, SMALL + [
            f"data.manifest={isic2018_manifest_s3}", f"run.storage=s3://{bucket}/runs", "run.name=outage",
            "train.epochs=4", "run.max_failures=3",
        ]))
    finally:
        watcher.join(timeout=60)
        for thread in outage:
            thread.join()
    assert outage, "the endpoint was never taken down"
    assert summary["epochs_completed"] == 4
    state = torch.load(io.BytesIO(storage.read_bytes(storage.join(summary["latest_checkpoint"], "state.pt"))),
                       map_location="cpu", weights_only=True)
    assert [h["epoch"] for h in state["history"]] == [1, 2, 3, 4]


FAKE_KEY_ID = "AKIDLEAKCANARY0000042"
FAKE_SECRET = "leak-canary-secret-f00dfeed"
FAKE_TOKEN = "leak-canary-session-token-c0ffee"
PATIENT_PREFIX = "PATIENT-CANARY-"


@pytest.mark.slow
def test_no_credentials_or_patient_ids_in_any_output(s3_endpoint, s3_client, tmp_path):
    """stage and train through the CLI with recognisable fake credentials and patient ids; grep stdout, stderr,
    every object they wrote (S3 and local) and the Ray session logs for them."""
    bucket = "dermray-leak-test"
    s3_client.create_bucket(Bucket=bucket)
    rows = ["file,dx,patient"]
    for i in range(32):
        path = tmp_path / f"img{i}.jpg"
        Image.new("RGB", (64, 48), ((i * 37) % 255, 80 + i, 120)).save(path)
        s3_client.upload_file(str(path), bucket, f"images/img{i}.jpg")
        rows.append(f"img{i}.jpg,{'mel' if i % 2 else 'nv'},{PATIENT_PREFIX}{i // 2:04d}")
    s3_client.put_object(Bucket=bucket, Key="labels.csv", Body="\n".join(rows).encode())

    temp_dir = f"/tmp/drl-{os.getpid()}"
    env = dict(os.environ, AWS_ACCESS_KEY_ID=FAKE_KEY_ID, AWS_SECRET_ACCESS_KEY=FAKE_SECRET,
               AWS_SESSION_TOKEN=FAKE_TOKEN, RAY_TMPDIR=temp_dir)
    env.pop("RAY_ADDRESS", None)
    outputs = []
    try:
        for args in (
            ["stage", "csv", "--images", f"s3://{bucket}/images", "--labels", f"s3://{bucket}/labels.csv",
             "--image-col", "file", "--label-col", "dx", "--group-col", "patient", "--out", f"s3://{bucket}/staged"],
            ["train", "--set", f"data.manifest=s3://{bucket}/staged", "--set", f"run.storage=s3://{bucket}/runs",
             "--set", "train.epochs=1", *[a for s in SMALL for a in ("--set", s)]],
            ["train", "--set", "data.manifest=s3://no-such-bucket-xyz/m"],  # an error path prints too
        ):
            result = subprocess.run([sys.executable, "-m", "dermray", *args], env=env, capture_output=True,
                                    text=True, timeout=600)
            outputs += [result.stdout, result.stderr]
        assert json.loads(outputs[2].strip().splitlines()[-1])["epochs_completed"] == 1
        for key in [o["Key"] for o in s3_client.list_objects_v2(Bucket=bucket)["Contents"]]:
            if not key.startswith("images/") and key != "labels.csv":
                outputs.append(s3_client.get_object(Bucket=bucket, Key=key)["Body"].read().decode("latin-1"))
        for log in Path(temp_dir).glob("session_*/logs/**/*"):
            if log.is_file():
                outputs.append(log.read_bytes().decode("latin-1"))
    finally:
        kill_matching([temp_dir])
    assert len(outputs) > 10
    text = "\n".join(outputs)
    for canary in (FAKE_KEY_ID, FAKE_SECRET, FAKE_TOKEN, PATIENT_PREFIX):
        assert canary not in text, f"{canary} leaked into an output"
