"""dermray.ops.tracking against a real MLflow tracking server on loopback (tests/mlflow_server.py): runs with
params, tags, per-epoch metrics from another process and artifacts; sweeps as parent and child runs; evaluation
on a finished run; the registry's champion alias; a closed port, a stopped server and a hung one."""

from __future__ import annotations

import ast
import base64
import json
import pickle
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("mlflow", reason="mlflow is a dev extra: pip install -e '.[dev]'")

from mlflow.tracking import MlflowClient  # noqa: E402

from dermray.config import Config  # noqa: E402
from dermray.errors import DermrayError  # noqa: E402
from dermray.ops import tracking  # noqa: E402
from tests.mlflow_server import free_port, serving  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """One real MLflow server for the module (startup is most of this file's time)."""
    with serving(tmp_path_factory.mktemp("mlflow")) as server:
        yield server

# What a Ray Train worker does with the logger it is handed: unpickle it, log epochs. Run in a fresh interpreter.
_WORKER = """
import base64, pickle, sys
logger = pickle.loads(base64.b64decode(sys.argv[1]))
for epoch in (1, 2, 3):
    ok = logger.log({"val_balanced_accuracy": 0.5 + epoch / 10, "train_loss": 1.0 / epoch, "epoch": epoch,
                     "phase": "full", "stopped": False}, step=epoch)
    assert ok, "epoch not logged"
"""


def _client(server) -> MlflowClient:
    return MlflowClient(server.uri)


def _history(server, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in _client(server).get_metric_history(run_id, key))


def _new_run(server, name: str, **kwargs) -> str:
    return tracking.start_run(server.uri, "dermray-test", name, params={"train": {"lr": 0.001}}, tags={}, **kwargs)


def test_a_run_gets_params_tags_epochs_from_a_worker_process_and_artifacts(mlflow_server, tmp_path, capfd):
    config = Config().model_dump(mode="json")
    config["data"]["manifest"] = "https://AKIDUSER:hunter2@store.example/m.parquet?X-Amz-Signature=abcdef"
    config["run"]["name"] = "x" * 7000  # beyond MLflow's 6000 characters: cut, not refused
    run_uri = str(tmp_path / "runs" / "r1")
    run_id = tracking.start_run(mlflow_server.uri, "dermray-test", "r1", params=config,
                                tags={"dermray.manifest": "s3://bucket/ds/manifest.parquet",
                                      tracking.GIT_COMMIT_TAG: "0" * 40, "aws_secret_access_key": "nope"},
                                run_uri=run_uri)

    logger = tracking.EpochLogger(mlflow_server.uri, run_id)
    blob = base64.b64encode(pickle.dumps(logger)).decode()
    subprocess.run([sys.executable, "-c", _WORKER, blob], check=True, cwd=REPO, timeout=120)

    curves = tmp_path / "curves.png"
    curves.write_bytes(b"\x89PNG\r\n\x1a\nnot-really")
    assert tracking.log_artifacts(mlflow_server.uri, run_id, {
        "config.yaml": b"run:\n  name: r1\n", "curves.png": curves, "train_summary.json": b'{"checkpoint": "x"}'})
    assert tracking.set_tags(mlflow_server.uri, run_id, {tracking.CHECKPOINT_TAG: "s3://bucket/runs/r1/ck_3"})
    assert tracking.set_terminated(mlflow_server.uri, run_id, "FINISHED")

    run = _client(mlflow_server).get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "r1"
    params = run.data.params
    assert len(params) == len(tracking.flatten_params(config)) > 100  # more than one batch
    assert params["train.lr"] == str(Config().train.lr) and len(params["run.name"]) == 6000
    assert params["data.manifest"] == "https://store.example/m.parquet?<redacted>"
    tags = run.data.tags
    assert tags["dermray.manifest"] == "s3://bucket/ds/manifest.parquet" and tags[tracking.GIT_COMMIT_TAG] == "0" * 40
    assert tags[tracking.RUN_URI_TAG] == run_uri and tags[tracking.CHECKPOINT_TAG] == "s3://bucket/runs/r1/ck_3"
    assert "aws_secret_access_key" not in tags
    assert "hunter2" not in json.dumps([params, tags])
    assert _history(mlflow_server, run_id, "val_balanced_accuracy") == [(1, 0.6), (2, 0.7), (3, 0.8)]
    assert [s for s, _ in _history(mlflow_server, run_id, "epoch")] == [1, 2, 3]
    assert "phase" not in run.data.metrics and "stopped" not in run.data.metrics  # numbers only
    names = {a.path for a in _client(mlflow_server).list_artifacts(run_id)}
    assert names == {"config.yaml", "curves.png", "train_summary.json"}

    # A relaunch that resumes (dermray found a checkpoint) continues the same MLflow run; a changed value stays.
    config["train"]["lr"] = 0.5
    again = tracking.start_run(mlflow_server.uri, "dermray-test", "r1", params=config, tags={}, run_uri=run_uri,
                               resume=True)
    assert again == run_id and _client(mlflow_server).get_run(run_id).info.status == "RUNNING"
    fresh = tracking.start_run(mlflow_server.uri, "dermray-test", "r1", params=config, tags={}, run_uri=run_uri)
    assert fresh != run_id  # not resuming (the run folder was new): a new run
    assert tracking.find_run(mlflow_server.uri, "dermray-test", run_uri) == fresh  # the latest
    out, err = capfd.readouterr()
    assert out == ""  # MLflow prints run URLs on stdout unless told not to: stdout is the JSON summary's
    assert "keeps its logged values of train.lr" in err


def test_a_sweep_is_a_parent_run_with_a_child_run_per_trial(mlflow_server):
    parent = _new_run(mlflow_server, "sweep", run_uri="s3://b/runs/sweep")
    children = [_new_run(mlflow_server, f"trial_{i}", parent_run_id=parent, run_uri=f"s3://b/runs/sweep/t{i}")
                for i in range(2)]
    experiment = _client(mlflow_server).get_experiment_by_name("dermray-test").experiment_id
    found = _client(mlflow_server).search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")
    assert sorted(r.info.run_id for r in found) == sorted(children)
    assert {r.info.run_name for r in found} == {"trial_0", "trial_1"}
    # A trial that closed its own run keeps its status; one stopped from outside (ASHA) is closed by the sweep.
    tracking.set_terminated(mlflow_server.uri, children[0], "FINISHED")
    assert tracking.end_open_children(mlflow_server.uri, parent, lambda name: "KILLED") == 1
    statuses = {c: _client(mlflow_server).get_run(c).info.status for c in children}
    assert statuses == {children[0]: "FINISHED", children[1]: "KILLED"}
    assert _client(mlflow_server).get_run(parent).info.status == "RUNNING"  # the parent is closed by its own end


def test_an_evaluation_is_logged_to_the_checkpoints_finished_run(mlflow_server):
    run_id = _new_run(mlflow_server, "evaluated", run_uri="s3://b/runs/evaluated")
    tracking.set_terminated(mlflow_server.uri, run_id)
    metrics = {"balanced_accuracy": 0.71, "per_class": {"mel": {"auc": 0.9}, "nv": {"auc": 0.8}}, "split": "test"}
    assert tracking.log_evaluation(mlflow_server.uri, run_id, metrics, report_html=b"<html>report</html>",
                                   prefix="eval_test")
    run = _client(mlflow_server).get_run(run_id)
    assert run.data.metrics == {"eval_test/balanced_accuracy": 0.71, "eval_test/per_class/mel/auc": 0.9,
                                "eval_test/per_class/nv/auc": 0.8}
    assert [a.path for a in _client(mlflow_server).list_artifacts(run_id, "eval_test")] == ["eval_test/report.html"]


def test_register_champion_moves_the_alias_and_a_repeat_is_harmless(mlflow_server, tmp_path):
    uri, model = mlflow_server.uri, "dermray-champion-test"
    assert tracking.champion_version(uri, model) is None
    first = _new_run(mlflow_server, "night1")
    assert tracking.register_champion(uri, model, first, "s3://bucket/runs/night1/checkpoint_000004") == "1"
    assert tracking.register_champion(uri, model, first, "s3://bucket/runs/night1/checkpoint_000004") == "1"
    assert tracking.champion_version(uri, model) == "1"

    second = _new_run(mlflow_server, "night2")
    local = str(tmp_path / "runs" / "night2" / "checkpoint_000007")  # a local store: refused as a source
    assert tracking.register_champion(uri, model, second, local, tags={"dermray.holdout_metric": "0.8"}) == "2"
    assert tracking.champion_version(uri, model) == "2"
    versions = {v.version: v for v in _client(mlflow_server).search_model_versions(f"name='{model}'")}
    assert sorted(versions) == ["1", "2"]  # the repeat made no third version
    assert versions["1"].source == "s3://bucket/runs/night1/checkpoint_000004"
    assert versions["2"].source == f"runs:/{second}" and versions["2"].tags[tracking.CHECKPOINT_TAG] == local
    assert versions["2"].tags["dermray.holdout_metric"] == "0.8"


def test_an_unreachable_server_is_one_line_in_seconds_without_credentials(mlflow_server):
    tracking.check_reachable(mlflow_server.uri)
    uri = f"http://dermray:hunter2@127.0.0.1:{free_port()}"
    started = time.monotonic()
    with pytest.raises(DermrayError) as error:
        tracking.check_reachable(uri)
    assert time.monotonic() - started < 10
    message = str(error.value)
    assert "\n" not in message and "hunter2" not in message and "dermray:" not in message
    assert f"http://127.0.0.1:{uri.rsplit(':', 1)[1]} is unreachable (connection refused)" in message
    assert "MLFLOW_TRACKING_URI" in message
    with pytest.raises(DermrayError, match="could not be started"):
        tracking.start_run(uri, "dermray-test", "r", params={}, tags={})


def test_an_outage_mid_run_warns_once_keeps_training_and_backfills(mlflow_server, capfd):
    run_id = _new_run(mlflow_server, "outage")
    logger = tracking.EpochLogger(mlflow_server.uri, run_id)
    assert logger.log({"val_loss": 1.0}, step=1)
    capfd.readouterr()
    mlflow_server.stop()
    try:
        started = time.monotonic()
        assert not logger.log({"val_loss": 0.9}, step=2)
        assert not logger.log({"val_loss": 0.8}, step=3)
        assert time.monotonic() - started < 10
        assert not tracking.set_terminated(mlflow_server.uri, run_id)  # a warning, not an exception
        assert tracking.register_champion(mlflow_server.uri, "m", run_id, "s3://b/c") is None
    finally:
        mlflow_server.start()
    err = capfd.readouterr().err
    assert err.count("[dermray] warning: MLflow tracking at") == 1, err  # once per outage, not per epoch
    assert "failed (connection refused); training continues" in err  # the cause, not urllib3's three layers
    assert "Traceback" not in err
    assert logger.log({"val_loss": 0.7}, step=4)
    assert _history(mlflow_server, run_id, "val_loss") == [(1, 1.0), (2, 0.9), (3, 0.8), (4, 0.7)]
    assert "answers again" in capfd.readouterr().err


def test_a_hung_server_blocks_an_epoch_for_the_timeout_only(mlflow_server):
    run_id = _new_run(mlflow_server, "hung")
    logger = tracking.EpochLogger(mlflow_server.uri, run_id, timeout_s=2)
    mlflow_server.pause()
    try:
        started = time.monotonic()
        assert not logger.log({"val_loss": 1.0}, step=1)
        assert time.monotonic() - started < 6
    finally:
        mlflow_server.resume()
    assert logger.log({"val_loss": 0.5}, step=2)
    assert _history(mlflow_server, run_id, "val_loss") == [(1, 1.0), (2, 0.5)]


def test_the_module_needs_no_mlflow_until_tracking_is_asked_for():
    tree = ast.parse((REPO / "dermray" / "ops" / "tracking.py").read_text())
    top = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    names = [a.name for n in top for a in n.names] + [n.module or "" for n in top if isinstance(n, ast.ImportFrom)]
    assert not [n for n in names if n.split(".")[0] == "mlflow"]
    code = (
        "import sys; sys.modules['mlflow'] = None\n"
        "from dermray.ops import tracking\n"
        "from dermray.errors import DermrayError\n"
        "assert tracking.resolve_tracking_uri(None) is None\n"
        "try:\n"
        "    tracking.check_reachable('http://127.0.0.1:5000')\n"
        "except DermrayError as error:\n"
        "    print(error)\n"
    )
    env = {"PATH": "/usr/bin:/bin"}  # no MLFLOW_TRACKING_URI
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert out.strip() == "run.mlflow_tracking_uri is set but mlflow is not installed: pip install -e '.[mlflow]'"


def test_uri_resolution_and_redaction(monkeypatch):
    monkeypatch.delenv(tracking.ENV_VAR, raising=False)
    assert tracking.resolve_tracking_uri(None) is None and tracking.resolve_tracking_uri("  ") is None
    monkeypatch.setenv(tracking.ENV_VAR, "http://env:5000")
    assert tracking.resolve_tracking_uri(None) == "http://env:5000"
    assert tracking.resolve_tracking_uri("http://config:5000") == "http://config:5000"
    text = ("see https://u:p@h.example/a?X-Amz-Credential=AKIAABCDEFGHIJKLMNOP&X-Amz-Signature=ff and "
            "https://acct.blob.core.windows.net/c/b?sv=2024&sig=xyz and s3://bucket/key?versionId=3 and "
            "key ASIAABCDEFGHIJKLMNOP")
    assert tracking.redact(text) == ("see https://h.example/a?<redacted> and "
                                     "https://acct.blob.core.windows.net/c/b?<redacted> and "
                                     "s3://bucket/key?versionId=3 and key <aws-key-id>")
    flat = tracking.flatten_params({"a": {"b": [1, 2], "api_token": "x"}, "c": None, "d": {}})
    assert flat == {"a.b": "[1, 2]", "c": "null", "d": "{}"}
