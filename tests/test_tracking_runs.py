"""dermray's commands against a real MLflow tracking server on loopback (tests/mlflow_server.py): a training run
(params, tags, per-epoch metrics from the rank-0 worker, artifacts) that survives the server going down mid-run,
its evaluation on the same MLflow run, a sweep as a parent with a child per trial, the nightly champion as a
registered model's alias, and an unreachable server refused before anything trains. Also: curves.png is drawn
from exactly the checkpoint's history."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason="mlflow-skinny is a dev extra: pip install -e '.[dev]'")

from mlflow.tracking import MlflowClient  # noqa: E402
from PIL import Image  # noqa: E402

from dermray import storage  # noqa: E402
from dermray.config import config_from_dict, load_config  # noqa: E402
from dermray.data.sources import SourceOptions  # noqa: E402
from dermray.data.stage import stage  # noqa: E402
from dermray.evaluation.curves import curve_data  # noqa: E402
from dermray.evaluation.evaluate import evaluate  # noqa: E402
from dermray.models.checkpoint import read_checkpoint_state, read_history  # noqa: E402
from dermray.ops import tracking  # noqa: E402
from dermray.ops.nightly import nightly  # noqa: E402
from dermray.train.trainer import train  # noqa: E402
from dermray.tune.sweep import sweep  # noqa: E402
from tests.mlflow_server import free_port, serving  # noqa: E402

EXPERIMENT = "dermray-runs-test"
SMALL = ["model.backbone=small_cnn", "model.image_size=32", "train.batch_size=16", "train.schedule=constant",
         f"run.mlflow_experiment={EXPERIMENT}"]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


@pytest.fixture(scope="module")
def manifest(ray_local, tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    return stage("synthetic", SourceOptions(out=str(out), images_per_class=16, image_size=48))["manifest"]


def _runs(server, **filters) -> list:
    client = MlflowClient(server.uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    return [r for r in runs if all(r.data.tags.get(k) == v for k, v in filters.items())]


def _steps(server, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(server.uri).get_metric_history(run_id, key))


def _stop_after_two_checkpoints(server, run_dir: Path, events: list) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (
            run_dir.is_dir() and len([d for d in os.listdir(run_dir) if d.startswith("checkpoint_")]) >= 2):
        time.sleep(0.2)
    server.stop()
    events.append("stopped")


@pytest.mark.slow
def test_a_train_run_is_one_mlflow_run_and_survives_the_server_going_down(mlflow_server, manifest, tmp_path,
                                                                        capfd):
    runs = tmp_path / "runs"
    base = SMALL + [f"data.manifest={manifest}", f"run.storage={runs}", "run.name=tracked",
                    f"run.mlflow_tracking_uri={mlflow_server.uri}"]
    events: list[str] = []
    outage = threading.Thread(target=_stop_after_two_checkpoints, args=(mlflow_server, runs / "tracked", events),
                              daemon=True)
    outage.start()
    first = train(load_config(None, base + ["train.epochs=3"]))
    outage.join(timeout=60)
    # The server went down during epoch 3 and stayed down to the end: training finished regardless.
    assert events == ["stopped"] and first["epochs_completed"] == 3
    assert "[dermray] warning: MLflow" in capfd.readouterr().err  # warnings, not a failure
    mlflow_server.start()

    # Trained further under the same name: the same MLflow run, reopened; epoch 3, which never arrived, is sent
    # from the checkpoint's history at the end, epoch 4 as it happens.
    summary = train(load_config(None, base + ["train.epochs=4"]))
    assert summary["resumed_from"] and summary["mlflow_run_id"] == first["mlflow_run_id"]
    (run,) = _runs(mlflow_server, **{tracking.RUN_URI_TAG: str(runs / "tracked")})
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert run.data.params["train.epochs"] == "3" and run.data.params["model.backbone"] == "small_cnn"
    assert run.data.tags["dermray.manifest"] == manifest
    assert run.data.tags[tracking.CHECKPOINT_TAG] == summary["checkpoint"]
    # Every epoch arrived once, the one trained while the server was down included.
    assert _steps(mlflow_server, run.info.run_id, "train_loss") == [1, 2, 3, 4]
    history = read_history(summary["latest_checkpoint"])
    logged = {m.step: m.value for m in MlflowClient(mlflow_server.uri).get_metric_history(run.info.run_id,
                                                                                          "train_loss")}
    assert logged == pytest.approx({h["epoch"]: h["train_loss"] for h in history})
    artifacts = {a.path for a in MlflowClient(mlflow_server.uri).list_artifacts(run.info.run_id)}
    assert {"config.yaml", "curves.png", "summary.json"} <= artifacts
    assert not any(a.endswith(".pt") for a in artifacts)  # the checkpoint is referenced, never copied

    # curves.png is drawn from the whole history; meta.json's history is state.pt's.
    assert history == read_checkpoint_state(summary["latest_checkpoint"])["history"]
    data = curve_data(history, best_epoch=summary["metrics"]["epoch"])
    assert data["epoch"] == [1, 2, 3, 4] and data["train_loss"] == [h["train_loss"] for h in history]
    assert data["best_epoch"] == summary["metrics"]["epoch"]
    with Image.open(summary["curves"]) as image:
        assert image.format == "PNG" and image.width > 400

    # dermray evaluate logs to the checkpoint's run (the checkpoint's config names the server).
    evaluated = evaluate(summary["checkpoint"], manifest, split="test", bootstrap=10)
    metrics = MlflowClient(mlflow_server.uri).get_run(run.info.run_id).data.metrics
    assert metrics["eval-test/balanced_accuracy"] == pytest.approx(evaluated["metrics"]["balanced_accuracy"])
    artifacts = {a.path for a in MlflowClient(mlflow_server.uri).list_artifacts(run.info.run_id, "eval-test")}
    assert "eval-test/report.html" in artifacts


@pytest.mark.slow
def test_a_sweep_is_a_parent_run_with_a_child_per_trial(mlflow_server, manifest, tmp_path):
    config = config_from_dict({
        "data": {"manifest": manifest}, "model": {"backbone": "small_cnn", "image_size": 32},
        "train": {"epochs": 1, "batch_size": 16}, "scaling": {"cpus_per_worker": 0.45},
        "run": {"storage": str(tmp_path / "runs"), "mlflow_tracking_uri": mlflow_server.uri,
                "mlflow_experiment": EXPERIMENT},
        "tune": {"name": "tracked-sweep", "num_samples": 1, "max_concurrent_trials": 2,
                 "space": {"train.lr": {"type": "grid", "values": [0.003, 0.001]}}},
    })
    summary = sweep(config)
    assert summary["trials"] == 2 and summary["errors"] == 0, summary
    (parent,) = _runs(mlflow_server, **{"dermray.kind": "sweep"})
    assert parent.info.run_id == summary["mlflow_run_id"] and parent.info.status == "FINISHED"
    children = _runs(mlflow_server, **{tracking.PARENT_TAG: parent.info.run_id})
    assert len(children) == 2
    # Tune stops each trial from outside at its last epoch: the sweep closes their runs, as completed.
    assert all(c.info.status == "FINISHED" for c in children), [c.info.status for c in children]
    assert sorted(float(c.data.params["train.lr"]) for c in children) == [0.001, 0.003]
    assert all(_steps(mlflow_server, c.info.run_id, "val_balanced_accuracy") == [1] for c in children)
    artifacts = {a.path for a in MlflowClient(mlflow_server.uri).list_artifacts(parent.info.run_id)}
    assert {"trials.csv", "sweep.png", "best_config.yaml"} <= artifacts


@pytest.mark.slow
def test_the_nightly_champion_is_an_mlflow_alias_moved_only_by_a_promotion(mlflow_server, tmp_path):
    root = tmp_path / "store"
    config = load_config(None, SMALL + [
        "train.epochs=1", "nightly.source=synthetic", "nightly.synthetic_images_per_class=16",
        f"nightly.dataset={root}/dataset", f"nightly.registry={root}/registry", f"run.storage={root}/runs",
        f"run.mlflow_tracking_uri={mlflow_server.uri}", "nightly.mlflow_model_name=dermray-nightly-test"])
    first = nightly(config)
    assert first["promoted"] is True
    assert tracking.champion_version(mlflow_server.uri, "dermray-nightly-test") == "1"
    version = MlflowClient(mlflow_server.uri).get_model_version("dermray-nightly-test", "1")
    assert version.tags[tracking.CHECKPOINT_TAG] == first["champion"]
    second = nightly(config)  # the same data: nothing retrained, nothing promoted, the alias stays
    assert second["promoted"] is False
    versions = MlflowClient(mlflow_server.uri).search_model_versions("name='dermray-nightly-test'")
    assert len(versions) == 1
    assert tracking.champion_version(mlflow_server.uri, "dermray-nightly-test") == "1"


def test_an_unreachable_tracking_server_is_one_line_before_anything_trains(tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "dermray", "train", "--set", f"run.storage={tmp_path / 'runs'}",
         "--set", f"run.mlflow_tracking_uri={closed}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == "", result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("dermray train: error:")]
    assert len(lines) == 1 and closed in lines[0], result.stderr
    assert not storage.exists(str(tmp_path / "runs" / "default"))  # no run folder: refused before Ray started
    assert time.monotonic() - started < 120
