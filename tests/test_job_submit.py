"""`ray job submit` against a real Ray head on loopback (started with `ray start --head`, token authentication on,
as Ray's default): jobs/train.py runs unchanged, connects to the cluster it was submitted to, and ends with the
JSON summary line; the job's logs hold it and the checkpoint it names exists."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dermray.data.sources import SourceOptions
from dermray.data.stage import stage
from tests.cluster_helpers import RAY, LocalCluster

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def head_node(s3_endpoint):
    # The job's `python` is the one on the cluster's PATH: this virtualenv's, as on a node built from the image.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    cluster = LocalCluster(cpus_per_node=2, workers=0, env_overrides={"PATH": path}).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_ray_job_submit_runs_jobs_train(head_node, ray_local, tmp_path):
    manifest = stage("synthetic", SourceOptions(out=str(tmp_path / "data"), images_per_class=12,
                                                image_size=48))["manifest"]
    env = head_node.client_env(**head_node.env_overrides)
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", head_node.dashboard, "--working-dir", str(REPO), "--",
         "python", "jobs/train.py", "--set", f"data.manifest={manifest}", "--set", f"run.storage={tmp_path}/runs",
         "--set", "run.name=submitted", "--set", "train.epochs=1", "--set", "model.image_size=48",
         "--set", "train.batch_size=16"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-2000:]
    assert "succeeded" in submit.stdout.lower()
    summary = json.loads([line for line in submit.stdout.splitlines() if line.startswith('{"checkpoint"')][-1])
    assert summary["epochs_completed"] == 1
    assert Path(summary["checkpoint"], "state.pt").is_file()
    # The job connected to the submitted-to cluster (its runs hold the checkpoint), not a private instance.
    jobs = subprocess.run([RAY, "job", "list", "--address", head_node.dashboard], capture_output=True, text=True,
                          env=env, timeout=120)
    assert "SUCCEEDED" in jobs.stdout and "jobs/train.py" in jobs.stdout
