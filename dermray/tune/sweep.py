"""``dermray tune``: a Ray Tune sweep in which every trial is a full ``dermray train`` run.

The Ray Train V2 pattern (Ray 2.60): each Tune trial runs a small driver function that builds its own
``TorchTrainer`` (so a trial can itself be multi-worker and multi-GPU) with a callback that forwards every epoch's
validation metrics to Tune (``dermray.tune.bridge``); ASHA stops the trials that trail at each rung. The trial's
Train run is named after the trial id under ``<run.storage>/<tune.name>/``, so an interrupted sweep, launched again
with the same name, restores the Tuner and each unfinished trial resumes from its own latest checkpoint.
Population-based training (``tune.scheduler: pbt``) also hands each epoch's checkpoint to Tune; a trial that Tune
starts from a checkpoint (a leader's, after an exploit step) trains a new Train run continuing it.

Outputs under ``<run.storage>/<tune.name>/``: ``trials.csv`` (one row per trial: hyperparameters, metric,
epochs, status, checkpoint), ``sweep.png`` (the metric against each searched hyperparameter) and
``best_config.yaml`` (the best trial's full config, which ``dermray train --config`` accepts as is).
"""

from __future__ import annotations

import functools
import io
import json
import math
import re
import sys
import time
import uuid
import warnings

import pandas as pd
import ray
import ray.tune
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.tune.search import BasicVariantGenerator

from dermray import storage
from dermray.config import Config, SearchDimension, TuneSection, config_from_dict, set_dotted, to_yaml
from dermray.data.manifest import read_manifest
from dermray.errors import DermrayError
from dermray.models.checkpoint import read_ray_checkpoint_meta
from dermray.ops import run_tracking
from dermray.ops.run_tracking import TrackedRun
from dermray.ray_runtime import ensure_ray
from dermray.train.sizing import cpus_per_worker, free_cpus
from dermray.train.trainer import embedded_manifest, train
from dermray.tune.bridge import train_reporting_to_tune
from dermray.tune.checkpoints import KeepRecentAndPendingCheckpoints
from dermray.tune.pbt import PopulationBasedTrainingBeforeLastEpoch

RESULTS = "trials.csv"
TRIAL_CPU = 0.01  # the trial's driver only waits on its TorchTrainer, whose workers hold the real resources
PLOT = "sweep.png"
BEST_CONFIG = "best_config.yaml"


def _sampler(dimension: SearchDimension):
    if dimension.type == "loguniform":
        return tune.loguniform(dimension.low, dimension.high)
    if dimension.type == "uniform":
        return tune.uniform(dimension.low, dimension.high)
    if dimension.type == "randint":
        return tune.randint(int(dimension.low), int(dimension.high))
    if dimension.type == "choice":
        return tune.choice(dimension.values)
    return tune.grid_search(dimension.values)


def _probe_value(dimension: SearchDimension):
    if dimension.values:
        return dimension.values[0]
    if dimension.type == "randint":
        return int(dimension.low)
    return dimension.low


def _mutation(dimension: SearchDimension):
    """What PBT's explore step draws from: a list moves to a neighbouring value; a range is resampled or scaled."""
    return list(dimension.values) if dimension.values else _sampler(dimension)


def clip_to_space(config: dict, bounds: dict[str, tuple[float, float]]) -> dict:
    """PBT scales a value by 0.8 or 1.2 without looking at its range: bring it back inside (a flip probability of
    1.1 would fail the trial's config check)."""
    overrides = config["overrides"]
    for key, (low, high) in bounds.items():
        value = min(max(overrides[key], low), high)
        overrides[key] = int(round(value)) if isinstance(overrides[key], int) else value
    return config


def _scheduler(settings: TuneSection, epochs: int):
    if settings.scheduler == "asha":
        return ASHAScheduler(time_attr="training_iteration", max_t=epochs, grace_period=min(settings.grace_period,
                             epochs), reduction_factor=settings.reduction_factor)
    if settings.scheduler == "pbt":
        bounds = {key: (d.low, d.high - 1 if d.type == "randint" else d.high)
                  for key, d in settings.space.items() if not d.values}
        # time_attr "epoch" is the model's own epoch counter, which a trial takes over with a checkpoint.
        return PopulationBasedTrainingBeforeLastEpoch(
            last_time=epochs, time_attr="epoch", perturbation_interval=settings.perturbation_interval,
            hyperparam_mutations={"overrides": {key: _mutation(d) for key, d in settings.space.items()}},
            quantile_fraction=settings.quantile_fraction, resample_probability=settings.resample_probability,
            custom_explore_fn=functools.partial(clip_to_space, bounds=bounds),
        )
    return None


def trial_config(base: dict, overrides: dict) -> Config:
    """The base config with one trial's sampled values set (keys are dotted config keys)."""
    data = json.loads(json.dumps(base))
    for key, value in overrides.items():
        set_dotted(data, key, value)
    return config_from_dict(data)


def check_space(base: dict, space: dict[str, SearchDimension]) -> None:
    """Refuse, in one line, a space naming a key the config does not have or a value it would reject."""
    for key, dimension in space.items():
        try:
            trial_config(base, {key: _probe_value(dimension)})
        except DermrayError as error:
            raise DermrayError(f"tune.space.{key}: {error}") from None


def concurrency(config: Config, cluster: dict) -> tuple[int, float]:
    """(trials at once, CPUs per Train worker): GPU clusters fit trials by GPUs; CPU clusters share the CPUs
    beyond scaling.data_cpus (which Ray Data keeps for decoding) among the trials' workers."""
    workers = config.scaling.num_workers
    if config.scaling.use_gpu:
        fit = int(cluster.get("GPU", 0) // (workers * config.scaling.gpus_per_worker))
        if fit < 1:
            raise DermrayError(f"tune: a trial needs {workers * config.scaling.gpus_per_worker:g} GPU(s); the "
                               f"cluster has {cluster.get('GPU', 0):g}")
        trials = min(fit, config.tune.max_concurrent_trials or fit)
        return trials, config.scaling.cpus_per_worker
    cluster_cpus = cluster.get("CPU", 1.0)
    fit = max(1, math.floor(free_cpus(cluster_cpus, config.scaling) / (workers * config.scaling.cpus_per_worker)))
    trials = min(fit, config.tune.max_concurrent_trials or fit)
    # Each trial's driver holds TRIAL_CPU too: leave it out, or Ray Data is left 0.99 CPU and never schedules.
    return trials, cpus_per_worker(cluster_cpus, config.scaling, trials, reserved=trials * TRIAL_CPU)


def _run_trial(sampled: dict, base: dict, sweep_storage: str, share_checkpoints: bool,
               tracking_parent: TrackedRun | None = None) -> None:
    """The Tune trainable: one `dermray train` run, named after the trial, reporting every epoch to Tune.

    With ``share_checkpoints`` (PBT) every epoch's checkpoint goes to Tune too, and a trial that Tune starts from
    a checkpoint (another trial's, after an exploit step; its own, after a pause or an interrupted sweep) trains a
    new Train run continuing that checkpoint with this trial's current hyperparameters. Without it (ASHA), a
    relaunched trial resumes its own Train run from that run's latest checkpoint."""
    trial_id = ray.tune.get_context().get_trial_id()
    config = trial_config(base, sampled["overrides"])
    start = ray.tune.get_checkpoint() if share_checkpoints else None
    run_name = trial_id
    if start is not None:
        source, epoch = _lineage(start)
        if epoch >= config.train.epochs:
            return  # paused (PBT gives others their turn) right after its last epoch: nothing left to train
        # A fresh name per start: a trial may continue several checkpoints in its life, and a Train run named
        # twice would resume its own latest checkpoint instead of the one Tune gave.
        run_name = f"{trial_id}-from-{source}-e{epoch}-{uuid.uuid4().hex[:6]}"
    config = config.model_copy(update={"run": config.run.model_copy(update={"name": run_name,
                                                                           "storage": sweep_storage})})
    train_reporting_to_tune(lambda callbacks: train(config, callbacks=callbacks, continue_from=start,
                                                    tracking_parent=tracking_parent), share_checkpoints)


def _lineage(checkpoint) -> tuple[str, int]:
    """(trial, epochs done) of the model in a Tune checkpoint: the trial whose Train run saved it, read from its
    meta.json without fetching the weights."""
    meta = read_ray_checkpoint_meta(checkpoint)
    return meta["config"]["run"]["name"].split("-")[0], meta["epoch"] + 1


CONTINUATION_RUN = re.compile(r"^(?P<trial>[^-]+)-from-(?P<source>[^-]+)-e(?P<epoch>\d+)-[0-9a-f]+$")


def _trial_runs(run_names: list[str], trial_id: str) -> tuple[list[str], list[str]]:
    """A trial's Train runs (the first one is named after the trial; PBT adds one per checkpoint it continued,
    ``<trial>-from-<source trial>-e<epoch>-<id>``) and the other trials' checkpoints it took over
    (``<source>@<epoch>``, by epoch). Read from the runs in storage: Tune's per-trial logs lose rows when a
    trial restarts."""
    runs, taken = [], []
    for name in run_names:
        match = CONTINUATION_RUN.match(name)
        if name == trial_id or (match and match["trial"] == trial_id):
            runs.append(name)
            if match and match["source"] != trial_id:
                taken.append((int(match["epoch"]), f"{match['source']}@{match['epoch']}"))
    return runs, [label for _, label in sorted(taken)]


TUNE_TRIAL_DIR = "tune-"


def _trial_dirname(trial) -> str:
    """Tune's folder for a trial (its result log and the checkpoints PBT clones), beside the trial's Train runs."""
    return f"{TUNE_TRIAL_DIR}{trial.trial_id}"


def _trial_id(trial_path: str) -> str | None:
    """The trial a Tune trial folder belongs to (None for a sweep started before folders were named so)."""
    name = storage.basename(trial_path)
    return name.removeprefix(TUNE_TRIAL_DIR) if name.startswith(TUNE_TRIAL_DIR) else None


def _best_checkpoint(run_uris: list[str], metric: str, mode: str) -> tuple[float, str] | None:
    """(value, URI) of the retained checkpoint with the best ``metric`` among a trial's Train runs (Ray Train's
    snapshots; a PBT trial has one run per checkpoint it continued)."""
    scored = []
    for run_uri in run_uris:
        snapshot = storage.join(run_uri, "checkpoint_manager_snapshot.json")
        if not storage.exists(snapshot):
            continue
        results = json.loads(storage.read_text(snapshot)).get("checkpoint_results", [])
        scored += [(r["metrics"][metric], storage.join(run_uri, r["checkpoint_dir_name"]))
                   for r in results if metric in r.get("metrics", {})]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored)


def _error_line(error: BaseException) -> str:
    """Why a trial failed, in one line: the trial's own exception (a RayTaskError wraps it as ``cause``), whose
    last line names it (``DermrayError: manifest not found: ...``), not Ray's wrapper heading."""
    cause = getattr(error, "cause", None) or error
    lines = [line.strip() for line in str(cause).splitlines() if line.strip()]
    return lines[-1] if lines else type(cause).__name__


def _trial_history(result):
    """Every result a trial reported. Ray 2.60's ``Result.metrics_dataframe`` reads the trial's result.json, which
    lost rows when the trial restarted from a checkpoint (seen with PBT: 2 of 4 epochs left); progress.csv, written
    alongside, kept them all."""
    frame = result.metrics_dataframe
    try:
        with result.filesystem.open_input_stream(f"{result.path}/progress.csv") as handle:
            history = pd.read_csv(io.BytesIO(handle.readall()), dtype={"trial_id": str})
    except (OSError, ValueError):  # no such file, or an empty one
        return frame
    return history if frame is None or len(history) >= len(frame) else frame


def _results_table(results, config: Config, sweep_dir: str) -> tuple[pd.DataFrame, dict[str, list[dict]]]:
    """(one row per trial, each trial's reported epochs as records: its learning curve)."""
    metric, mode = config.tune.metric, config.tune.mode
    pick = max if mode == "max" else min
    run_names = [storage.basename(uri) for uri in storage.list_dirs(sweep_dir)]
    rows, curves = [], {}
    for result in results:
        history = _trial_history(result)
        last = result.metrics or {}
        overrides = (result.config or {}).get("overrides", {})
        trial_id = _trial_id(result.path) or last.get("trial_id") or storage.basename(result.path)
        if last.get("trial_id") not in (None, trial_id):
            # A trial that restarted from another trial's checkpoint and ended before reporting again carries the
            # result that came with that checkpoint: the other trial's figures, not its own.
            last = {}
        if history is not None and "epoch" in history:
            curves[trial_id] = history.to_dict("records")
        runs, taken = _trial_runs(run_names, trial_id)
        best_checkpoint = _best_checkpoint([storage.join(sweep_dir, run) for run in runs], metric, mode)
        values = [float(v) for v in (history[metric].dropna() if history is not None and metric in history else [])]
        if metric in last:
            values.append(float(last[metric]))
        best = pick(values + ([best_checkpoint[0]] if best_checkpoint else []), default=None)
        epochs = max([int(history["epoch"].max())] if history is not None and "epoch" in history else [],
                     default=int(last.get("epoch") or 0))
        if result.error:
            status = "error"
        elif epochs >= trial_config(config.model_dump(mode="json"), overrides).train.epochs:
            status = "completed"
        else:
            status = "stopped early"
        rows.append({"trial": trial_id, **overrides, metric: best,
                     f"last_{metric}": last.get(metric, values[-1] if values else None), "epochs": epochs,
                     "status": status, "error": _error_line(result.error) if result.error else "",
                     # PBT: the checkpoints of other trials this one took over ("<trial>@<epoch>"), in order.
                     "continued": "; ".join(taken),
                     "checkpoint": best_checkpoint[1] if best_checkpoint else None})
    return pd.DataFrame(rows), curves


def _plot(table, space: dict[str, SearchDimension], metric: str, curves: dict[str, list[dict]], mode: str,
          epochs: int) -> bytes:
    """The best metric of every trial against each searched hyperparameter, and beside them every trial's
    metric per epoch (a trial ASHA stopped ends early)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    from dermray.evaluation.curves import add_trial_curves

    keys = list(space)
    figure, axes = plt.subplots(1, len(keys) + 1, figsize=(3.4 * len(keys) + 4.8, 3.4), squeeze=False,
                                width_ratios=[1] * len(keys) + [1.5])
    add_trial_curves(axes[0][-1], curves, metric, mode, max_epochs=epochs)
    axes = [axes[0][:-1]]
    colours = {"completed": "tab:blue", "stopped early": "tab:orange", "error": "tab:red"}
    for axis, key in zip(axes[0], keys):
        for status, group in table.groupby("status"):
            axis.scatter(group[key], group[metric], label=status, color=colours.get(status, "grey"), s=28)
        if space[key].type == "loguniform":
            axis.set_xscale("log")
            # A range within one decade gets labelled minor ticks (2x10^-3, 3x10^-3, ...) that run into each other.
            axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.set(xlabel=key, ylabel=metric if axis is axes[0][0] else None)
        axis.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"sweep: best {metric} per trial against each searched hyperparameter, and per epoch",
                    fontsize=10)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def sweep(config: Config) -> dict:
    """Run (or resume) the sweep of ``config.tune``; returns the JSON summary."""
    started = time.monotonic()
    run_tracking.check_server(config)  # an unreachable tracking server: one line, before anything else
    config = config.with_absolute_paths()  # trials run in working directories of their own
    settings: TuneSection = config.tune
    # A bad space or a missing manifest is refused before Ray starts (and before every trial fails on it).
    check_space(config.model_dump(mode="json"), settings.space)
    # Stage the embedded data once here, not in every trial at the same time.
    manifest = config.data.manifest or embedded_manifest(config)
    read_manifest(manifest)
    ensure_ray()
    trials_at_once, worker_cpus = concurrency(config, ray.cluster_resources())
    # Each trial's trainer sizes the images from this manifest's source (64 px for the embedded synthetic set).
    base = config.model_copy(update={
        "data": config.data.model_copy(update={"manifest": manifest}),
        "scaling": config.scaling.model_copy(update={"cpus_per_worker": worker_cpus}),
    }).model_dump(mode="json")
    sweep_dir = storage.join(storage.normalize(config.run.storage), settings.name)
    tracked = run_tracking.open_sweep_run(config, sweep_dir)  # the trials' MLflow runs nest under it
    summary = None
    try:
        tuner, resumed = _tuner(settings, base, sweep_dir, trials_at_once, tracked)
        _announce(settings, trials_at_once)
        with warnings.catch_warnings():
            # Tune suggests reuse_actors under PBT. A trial's start-up cost is its Train run's worker group, which
            # a reused trial actor would not save; a reused one would carry a trial's training thread into the next.
            warnings.filterwarnings("ignore", message="Consider boosting PBT performance", category=UserWarning)
            results = tuner.fit()
        table, curves = _results_table(results, config, sweep_dir)
        summary = _write_outputs(table, curves, config, base, sweep_dir)
        summary.update(resumed=resumed, seconds=round(time.monotonic() - started, 1))
        if tracked:
            summary["mlflow_run_id"] = tracked.run_id
        return summary
    finally:
        run_tracking.close_sweep_run(tracked, summary)


def _tuner(settings: TuneSection, base: dict, sweep_dir: str, trials_at_once: int, tracked: TrackedRun | None
           ) -> tuple[tune.Tuner, bool]:
    """(the Tuner, whether it resumes an interrupted sweep of the same name)."""
    pbt = settings.scheduler == "pbt"
    trainable = tune.with_resources(
        functools.partial(_run_trial, base=base, sweep_storage=sweep_dir, share_checkpoints=pbt,
                          tracking_parent=tracked),
        {"CPU": TRIAL_CPU},
    )
    tune_path = storage.storage_path_for_ray(sweep_dir)
    if tune.Tuner.can_restore(tune_path):
        print(f"[dermray] tune: resuming the sweep in {sweep_dir}", file=sys.stderr, flush=True)
        return tune.Tuner.restore(tune_path, trainable=trainable, resume_errored=True), True
    return tune.Tuner(
        trainable,
        param_space={"overrides": {key: _sampler(d) for key, d in settings.space.items()}},
        tune_config=tune.TuneConfig(
            metric=settings.metric, mode=settings.mode, num_samples=settings.num_samples,
            scheduler=_scheduler(settings, base["train"]["epochs"]), reuse_actors=False,
            trial_dirname_creator=_trial_dirname,
            # The concurrency cap goes on the generator: Tune ignores max_concurrent_trials next to one.
            search_alg=BasicVariantGenerator(random_state=settings.seed, max_concurrent=trials_at_once),
        ),
        run_config=tune.RunConfig(
            name=settings.name, storage_path=storage.storage_path_for_ray(storage.parent(sweep_dir)), verbose=1,
            # Under PBT every epoch's checkpoint is copied into the trial's folder. The callback keeps the last
            # few (including the one PBT clones, taken at the trial's last perturbation step) and every one a
            # trial will restart from. Tune's own num_to_keep deletes those too (see tune.checkpoints). Train
            # keeps its own best checkpoints in the trial's runs.
            callbacks=[KeepRecentAndPendingCheckpoints(keep=settings.perturbation_interval + 2)] if pbt else None,
        ),
    ), False


def _announce(settings: TuneSection, trials_at_once: int) -> None:
    print(f"[dermray] tune: {settings.num_samples} sample(s), {trials_at_once} trial(s) at a time, "
          f"metric {settings.metric} ({settings.mode}), scheduler {settings.scheduler}", file=sys.stderr, flush=True)
    population = settings.num_samples * math.prod(len(d.values) for d in settings.space.values() if d.type == "grid")
    if settings.scheduler == "pbt" and population > trials_at_once:
        # Tune creates a trial only when the generator's concurrency cap lets it, so no trial is pending and PBT
        # never pauses a running one to give it a turn; a finished trial drops out of PBT's ranking.
        print(f"[dermray] tune: PBT with {population} trials and room for {trials_at_once} at a time: they run in "
              f"waves of {trials_at_once}, and a trial can only take over checkpoints of trials running beside it "
              "(set num_samples so that the population runs at once)", file=sys.stderr, flush=True)


def _write_outputs(table, curves: dict[str, list[dict]], config: Config, base: dict, sweep_dir: str) -> dict:
    """trials.csv, sweep.png and best_config.yaml under the sweep's folder; the summary's figures."""
    settings = config.tune
    scored = table.dropna(subset=[settings.metric])
    if scored.empty:
        first_error = next((e for e in table["error"] if e), "no trial reported a metric")
        raise DermrayError(f"tune: no trial produced {settings.metric} ({first_error})")
    best = scored.sort_values(settings.metric, ascending=settings.mode == "min").iloc[0]
    best_config = trial_config(base, {k: best[k] for k in settings.space}).model_copy(deep=True)
    best_config = best_config.model_copy(update={"run": best_config.run.model_copy(update={
        "name": f"{settings.name}-best", "storage": config.run.storage})})
    buffer = io.StringIO()
    table.to_csv(buffer, index=False)
    results_uri = storage.write_text(storage.join(sweep_dir, RESULTS), buffer.getvalue())
    plot_uri = storage.write_bytes(storage.join(sweep_dir, PLOT), _plot(
        table, settings.space, settings.metric, curves, settings.mode, base["train"]["epochs"]))
    best_config_uri = storage.write_text(storage.join(sweep_dir, BEST_CONFIG), to_yaml(best_config))
    return {
        "trials": int(len(table)), "completed": int((table["status"] == "completed").sum()),
        "stopped_early": int((table["status"] == "stopped early").sum()),
        "errors": int((table["status"] == "error").sum()), "metric": settings.metric,
        "scheduler": settings.scheduler,
        # PBT exploit steps: a trial continuing another trial's checkpoint.
        "continued_checkpoints": int(sum(len(c.split("; ")) for c in table["continued"] if c)),
        "best_metric": float(best[settings.metric]), "best_trial": best["trial"],
        "best_checkpoint": best["checkpoint"], "best_config": best_config_uri,
        "best_hyperparameters": {k: (v.item() if hasattr(v, "item") else v) for k, v in best.items()
                                 if k in settings.space},
        "results": results_uri, "plot": plot_uri,
    }
