"""A small real sweep on the local Ray instance: the sweep is killed mid-way (the whole `dermray tune` process
group), launched again with the same name, resumes, and runs to completion with ASHA stopping the trials that
trail; the results table, plot, best checkpoint and best config are checked."""

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest
import torch
import yaml

from dermray import storage
from dermray.config import config_from_dict, load_config
from dermray.data.sources import SourceOptions
from dermray.data.stage import stage
from dermray.errors import DermrayError
from dermray.tune.checkpoints import KeepRecentAndPendingCheckpoints
from dermray.tune.sweep import _trial_runs, check_space, clip_to_space, concurrency, sweep
from tests.cluster_helpers import kill_matching


def _sweep_yaml(path, manifest: str, runs: str) -> str:
    # Three trials from a grid, one at a time: a learning rate that learns, then two far too small to, so that
    # ASHA has trials to stop at its first rung whatever the noise of a 3-epoch run (ROC AUC separates them from
    # epoch 1: about 0.7 against 0.4-0.5 for a model that has not moved).
    path.write_text(yaml.safe_dump({
        "data": {"manifest": manifest},
        "model": {"backbone": "small_cnn", "image_size": 32},
        "train": {"epochs": 3, "batch_size": 16, "schedule": "constant"},
        "run": {"storage": runs},
        "tune": {"name": "small-sweep", "num_samples": 1, "metric": "val_roc_auc", "mode": "max",
                 "grace_period": 1, "reduction_factor": 2, "max_concurrent_trials": 1,
                 "space": {"train.lr": {"type": "grid", "values": [0.003, 1e-7, 1e-7]},
                           "data.augment.rotation_degrees": {"type": "uniform", "low": 0, "high": 90}}},
    }))
    return str(path)


@pytest.mark.slow
def test_sweep_interrupted_resumed_with_asha(ray_local, tmp_path, monkeypatch):
    manifest = stage("synthetic", SourceOptions(out=str(tmp_path / "data"), images_per_class=40,
                                                image_size=48))["manifest"]
    # Relative paths, as in the shipped configs: each trial runs in a working directory of its own, so the
    # driver must resolve them (a trial that resolved them itself would find no manifest).
    monkeypatch.chdir(tmp_path)
    config_path = _sweep_yaml(tmp_path / "sweep.yaml", os.path.relpath(manifest, tmp_path), "runs")
    sweep_dir = tmp_path / "runs" / "small-sweep"

    temp_dir = f"/tmp/drt-{os.getpid()}"
    env = dict(os.environ, RAY_TMPDIR=temp_dir)
    env.pop("RAY_ADDRESS", None)
    job = subprocess.Popen([sys.executable, "-m", "dermray", "tune", "--config", config_path], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline:  # until the first trial has checkpointed an epoch
            if any(sweep_dir.glob("*/checkpoint_manager_snapshot.json")) and any(sweep_dir.glob("experiment_state*")):
                break
            assert job.poll() is None, "the sweep ended before it could be interrupted"
            time.sleep(0.5)
        os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=30)
    finally:
        # The interrupted job's whole Ray instance goes too, as when a machine dies: its orphaned Train workers
        # would otherwise keep their CPUs, and the resumed sweep's Ray Data would wait for one forever.
        kill_matching([temp_dir])
    try:
        # The same command again resumes; its stdout is the one JSON line (Tune's trial tables go to stderr).
        resumed = subprocess.run([sys.executable, "-m", "dermray", "tune", "--config", config_path], env=env,
                                 capture_output=True, text=True, timeout=900)
    finally:
        kill_matching([temp_dir])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert len(resumed.stdout.splitlines()) == 1, resumed.stdout[-3000:]
    assert "Trial status" in resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["resumed"] is True
    assert summary["trials"] == 3
    assert summary["stopped_early"] >= 1, summary
    assert summary["completed"] >= 1 and summary["errors"] == 0
    table = pd.read_csv(summary["results"])
    assert len(table) == 3 and set(table["status"]) <= {"completed", "stopped early"}
    assert sorted(table["train.lr"]) == sorted([0.003, 1e-7, 1e-7])
    stopped = table[table["status"] == "stopped early"]
    assert (stopped["epochs"] < 3).all()
    assert summary["best_metric"] == pytest.approx(table["val_roc_auc"].max())
    assert table.loc[table["train.lr"] < 1e-6, "val_roc_auc"].max() < summary["best_metric"]
    assert summary["best_hyperparameters"]["train.lr"] == 0.003
    assert storage.exists(storage.join(summary["best_checkpoint"], "state.pt"))
    assert storage.is_file(summary["plot"])
    best = load_config(summary["best_config"])  # `dermray train --config` accepts it as is
    assert best.train.lr == summary["best_hyperparameters"]["train.lr"]
    assert best.run.name == "small-sweep-best" and best.data.manifest == manifest


def test_pbt_keeps_explored_values_inside_the_space():
    config = {"overrides": {"train.lr": 1.2e-2, "data.augment.hflip_p": -0.1, "train.batch_size": 70, "x": "a"}}
    bounds = {"train.lr": (1e-4, 1e-2), "data.augment.hflip_p": (0.0, 0.5), "train.batch_size": (8, 64)}
    assert clip_to_space(config, bounds)["overrides"] == {"train.lr": 1e-2, "data.augment.hflip_p": 0.0,
                                                          "train.batch_size": 64, "x": "a"}


def test_a_trials_runs_and_the_checkpoints_it_took_over_come_from_the_run_names():
    names = ["a1b2c_00000", "a1b2c_00000-from-a1b2c_00001-e4-0f0f0f", "a1b2c_00000-from-a1b2c_00001-e2-1a2b3c",
             "a1b2c_00000-from-a1b2c_00000-e6-ffffff", "a1b2c_00001", "a1b2c_00001-from-a1b2c_00000-e8-abcdef",
             "a1b2c_000001", "pbt_global.txt"]
    runs, taken = _trial_runs(names, "a1b2c_00000")
    assert runs == names[:4]
    # In epoch order; a trial resuming its own checkpoint (after a pause) took nothing over.
    assert taken == ["a1b2c_00001@2", "a1b2c_00001@4"]


def test_pbt_checkpoint_retention_counts_a_checkpoint_once_and_keeps_the_ones_trials_will_start_from(tmp_path):
    """The sequence Tune produces under PBT: the leader reports a checkpoint, PBT saves it again (it leads) and
    pausing saves it a third time; the follower exploits it and waits for a slot while the leader trains on. Ray's
    num_to_keep counted the three registrations apart and deleted the folder under the waiting follower (CI, PBT
    test: "No such file or directory ... checkpoint_000001/state.pt")."""
    from types import SimpleNamespace

    from ray.tune import Checkpoint

    def saved(name: str) -> Checkpoint:
        (tmp_path / name).mkdir()
        (tmp_path / name / "state.pt").write_bytes(b"weights")
        return Checkpoint.from_directory(str(tmp_path / name))

    # Tune's Trial as the callback reads it: its id and its latest checkpoint (what its next start loads).
    leader, follower = SimpleNamespace(trial_id="a_00000", checkpoint=None), SimpleNamespace(trial_id="a_00001",
                                                                                             checkpoint=None)
    trials = [leader, follower]
    retention = KeepRecentAndPendingCheckpoints(keep=2)

    def register(trial, checkpoint):  # what Tune does: callbacks first, then the trial records its latest
        retention.on_checkpoint(iteration=0, trials=trials, trial=trial, checkpoint=checkpoint)
        trial.checkpoint = checkpoint

    leader_epochs = [saved(f"leader_{epoch}") for epoch in range(6)]
    register(leader, leader_epochs[0])
    for _ in range(3):  # reported, saved by PBT, saved on pause
        register(leader, leader_epochs[1])
    follower.checkpoint = leader_epochs[1]  # the exploit step: the follower will start from it
    for checkpoint in leader_epochs[2:]:
        register(leader, checkpoint)
        register(leader, checkpoint)  # every checkpoint saved twice over
    assert (tmp_path / "leader_1" / "state.pt").exists()  # the follower has not started from it yet
    assert not (tmp_path / "leader_0").exists() and not (tmp_path / "leader_2").exists()
    assert not (tmp_path / "leader_3").exists()
    assert (tmp_path / "leader_4").exists() and (tmp_path / "leader_5").exists()  # the last `keep`
    # Once the follower has moved on (its own first checkpoint), the leader's next one lets it go.
    register(follower, saved("follower_2"))
    register(leader, saved("leader_6"))
    assert not (tmp_path / "leader_1").exists() and not (tmp_path / "leader_4").exists()
    assert (tmp_path / "leader_5").exists() and (tmp_path / "follower_2").exists()


def test_a_space_key_the_config_lacks_is_one_line():
    config = config_from_dict({"tune": {"space": {"train.lrr": {"type": "uniform", "low": 0, "high": 1}}}})
    with pytest.raises(DermrayError, match="tune.space.train.lrr: config: train.lrr: unknown key"):
        check_space(config.model_dump(mode="json"), config.tune.space)


def test_a_sweep_over_a_missing_manifest_is_refused_before_any_trial(tmp_path):
    """One line, exit 2, nothing written: before, Ray started and every trial failed on it in turn (53 s)."""
    result = subprocess.run(
        [sys.executable, "-m", "dermray", "tune", "--set", f"data.manifest={tmp_path}/nothing/manifest.parquet",
         "--set", f"run.storage={tmp_path}/runs"], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("dermray tune: error: manifest not found:")
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert not (tmp_path / "runs").exists()


def test_bad_dimensions_are_refused():
    with pytest.raises(DermrayError, match="loguniform dimension needs 'low' > 0"):
        config_from_dict({"tune": {"space": {"train.lr": {"type": "loguniform", "low": 0, "high": 1}}}})
    with pytest.raises(DermrayError, match="needs a non-empty 'values'"):
        config_from_dict({"tune": {"space": {"train.lr": {"type": "choice"}}}})


def test_concurrency_follows_the_cluster():
    cpu = load_config(None, ["scaling.num_workers=1", "scaling.data_cpus=1"])
    # One trial on 2 CPUs: its worker takes what is left after Ray Data's CPU and the trial driver's 0.01.
    assert concurrency(cpu, {"CPU": 2}) == (1, 0.99)
    assert concurrency(cpu, {"CPU": 9}) == (8, 0.99)
    capped = load_config(None, ["tune.max_concurrent_trials=3"])
    assert concurrency(capped, {"CPU": 9}) == (3, 1.0)
    gpu = load_config(None, ["scaling.use_gpu=true", "scaling.num_workers=2"])
    assert concurrency(gpu, {"CPU": 64, "GPU": 8})[0] == 4
    with pytest.raises(DermrayError, match="needs 2 GPU"):
        concurrency(gpu, {"CPU": 64, "GPU": 1})


@pytest.mark.slow
def test_population_based_training_continues_the_leading_trials_checkpoint(ray_local, tmp_path):
    """Two trials at once under PBT: one learns (lr 5e-3), one cannot (lr 1e-7). At a perturbation step (which one
    depends on how far apart the two trials run) the trailing trial takes over the leader's checkpoint (weights,
    optimizer, epoch counter) and goes on with the leader's hyperparameters, explored; ranges stay inside the space.
    No trial takes over a checkpoint of a finished run: the last epoch is not a perturbation step."""
    manifest = stage("synthetic", SourceOptions(out=str(tmp_path / "data"), images_per_class=40,
                                                image_size=48))["manifest"]
    config = config_from_dict({
        "data": {"manifest": manifest},
        "model": {"backbone": "small_cnn", "image_size": 32},
        # Five epochs, four perturbation steps: trials run at their own pace (asynchronous PBT), and the follower
        # can only take over a checkpoint the leader saved at a step the follower had already reported at.
        "train": {"epochs": 5, "batch_size": 16, "schedule": "constant"},
        # Two trials side by side on the 2-CPU test instance: 0.45 CPU per trial's worker, 1 for Ray Data.
        "scaling": {"cpus_per_worker": 0.45},
        "run": {"storage": str(tmp_path / "runs")},
        # Ranked by training loss: on 24 validation images a few epochs' val metrics are too noisy to say
        # which trial leads after one epoch; the training loss separates them (about 1.2 against 1.39).
        "tune": {"name": "pbt-sweep", "num_samples": 1, "metric": "train_loss", "mode": "min", "scheduler": "pbt",
                 "perturbation_interval": 1, "quantile_fraction": 0.5, "resample_probability": 0.0,
                 "max_concurrent_trials": 2,
                 "space": {"train.lr": {"type": "grid", "values": [0.005, 1e-7]},
                           "data.augment.hflip_p": {"type": "uniform", "low": 0.3, "high": 0.5}}},
    })
    summary = sweep(config)
    assert summary["scheduler"] == "pbt" and summary["trials"] == 2
    assert summary["completed"] == 2 and summary["errors"] == 0, summary
    assert summary["continued_checkpoints"] >= 1, summary
    table = pd.read_csv(summary["results"], dtype={"trial": str}).fillna({"continued": ""})
    assert table["trial"].is_unique, table.to_string()
    assert table["data.augment.hflip_p"].between(0.3, 0.5).all()  # perturbed by 0.8/1.2, clipped to the space
    taken_epochs = [int(label.split("@")[1]) for labels in table["continued"] if labels for label in labels.split("; ")]
    assert max(taken_epochs) < 5, table.to_string()
    # Which trial began at 1e-7: its first Train run (named after the trial) saved the config it started with.
    initial_lr = {trial: load_config(str(tmp_path / "runs" / "pbt-sweep" / trial / "config.yaml")).train.lr
                  for trial in table["trial"]}
    follower = table[table["trial"].map(initial_lr) == 1e-7].iloc[0]
    leader_id = table.loc[table["trial"] != follower["trial"], "trial"].iloc[0]
    # Its first exploit took the leader's checkpoint (later ones may go either way: once both descend from the
    # leader, either can lead).
    assert follower["continued"].split("; ")[0].startswith(f"{leader_id}@"), table.to_string()
    # Its final model descends from the leader: the epoch history begins with epochs the leader's own run trained
    # at lr 5e-3 (the follower itself started at 1e-7), it ends in a continuation run of the follower, and the
    # epoch counter ran on to 5 without restarting.
    state = torch.load(storage.join(follower["checkpoint"], "state.pt"), weights_only=True)
    assert state["history"][0]["run"] == leader_id and state["history"][0]["lr"] == pytest.approx(0.005)
    assert state["config"]["run"]["name"].startswith(f"{follower['trial']}-from-")
    assert state["history"][-1]["run"] == state["config"]["run"]["name"]
    assert [entry["epoch"] for entry in state["history"]] == list(range(1, state["epoch"] + 2))
    assert follower["epochs"] == 5 and follower["train_loss"] < 1.3
