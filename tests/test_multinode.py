"""Multi-node training, proven on one machine: a Ray head and a second Ray node started with `ray start`
(separate raylets, separate object stores), train workers placed on different nodes (STRICT_SPREAD), DDP over
gloo, data read from the S3 endpoint on loopback, and the same final JSON summary from `dermray train`."""

import json
import subprocess
import sys

import pytest

from tests.cluster_helpers import LocalCluster


@pytest.fixture
def two_node_cluster(s3_endpoint):
    """A head and one worker node (2 CPUs each) on loopback; stopped (only them) afterwards."""
    cluster = LocalCluster(cpus_per_node=2, workers=1).start()
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.mark.slow
def test_train_on_two_nodes_with_spread_workers(two_node_cluster, isic2018_manifest_s3, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "dermray", "train",
         "--set", f"data.manifest={isic2018_manifest_s3}", "--set", f"run.storage={tmp_path}/runs",
         "--set", "run.name=multinode", "--set", "model.backbone=resnet18", "--set", "model.image_size=64",
         "--set", "train.epochs=1", "--set", "train.batch_size=16",
         "--set", "scaling.num_workers=2", "--set", "scaling.placement_strategy=STRICT_SPREAD"],
        capture_output=True, text=True, env=two_node_cluster.client_env(), timeout=480,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["worker_nodes"] == 2
    assert summary["epochs_completed"] == 1
    assert summary["checkpoint"].startswith(f"{tmp_path}/runs/multinode/checkpoint_")
    assert "2 worker(s) on 2 node(s)" in result.stderr
