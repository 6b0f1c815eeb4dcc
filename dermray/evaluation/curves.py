"""Learning curves, as PNG bytes: a run's per-epoch history (``state.pt``'s "history") and a sweep's trials.

``curve_data`` and ``trial_curve_data`` are pure (no matplotlib): the figures are drawn from exactly what they
return, so a test can hold the drawing's data against the checkpoint's history. matplotlib is imported inside the
drawing functions only: the CLI starts without it.

A history is a list of dicts, one per epoch, in order (see ``dermray.train.worker``: "epoch" counts from 1,
"phase" is "head" or "full", "run" names the Train run that trained the epoch). Older checkpoints lack some keys,
a resumed run's history continues the earlier epochs, and a population-based trial's history may begin with the
epochs of the trial whose checkpoint it took over (their "run" differs from the last item's).
"""

from __future__ import annotations

import io
import math
from typing import Any

# The series drawn, by panel.
LOSS_KEYS = ("train_loss", "val_loss")
METRIC_KEYS = ("val_balanced_accuracy", "val_roc_auc")
SERIES_KEYS = (*LOSS_KEYS, *METRIC_KEYS, "val_accuracy", "lr")
LABELS = {"train_loss": "train loss", "val_loss": "val loss", "val_balanced_accuracy": "val balanced accuracy",
          "val_roc_auc": "val ROC AUC", "val_accuracy": "val accuracy", "lr": "learning rate"}


def _number(value: Any) -> float | None:
    """A finite float, or None for a missing, non-numeric or NaN value (pandas rows carry NaN for gaps)."""
    if value is None or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def score_mode(score: str) -> str:
    """The order in which ``score`` is best: "min" for a loss, "max" otherwise (as ``run.checkpoint_score``)."""
    return "min" if score.endswith("loss") else "max"


def _best(epochs: list[int], values: list[float | None], mode: str) -> int | None:
    """The epoch of the best value (the first one on a tie, as the earliest checkpoint reaching it)."""
    scored = [(v, e) for e, v in zip(epochs, values) if v is not None]
    if not scored:
        return None
    best = min(v for v, _ in scored) if mode == "min" else max(v for v, _ in scored)
    return next(e for v, e in scored if v == best)


def _segments(epochs: list[int], flags: list[bool], names: list[str | None]) -> list[dict]:
    """Runs of flagged epochs, adjacent in the history and of one name: [{"run", "first", "last"}]."""
    segments: list[dict] = []
    for i, (epoch, flag, name) in enumerate(zip(epochs, flags, names)):
        if not flag:
            continue
        if segments and i > 0 and flags[i - 1] and segments[-1]["run"] == name:
            segments[-1]["last"] = epoch
        else:
            segments.append({"run": name, "first": epoch, "last": epoch})
    return segments


def curve_data(history: list[dict], score: str = "val_balanced_accuracy", best_epoch: int | None = None) -> dict:
    """What ``curves_figure`` draws, from a checkpoint's history.

    Returns ``epoch`` (ints, ascending) and, aligned with it, one list per series (``train_loss``, ``val_loss``,
    ``val_balanced_accuracy``, ``val_roc_auc``, ``val_accuracy``, ``lr``: floats, None where the epoch lacks the
    key), ``phase`` and ``run`` (None where absent), ``inherited`` (bools: trained by another run than the last
    epoch's, a PBT lineage); ``phase_boundaries`` (the first epoch of each head->full switch), ``inherited_runs``
    ([{"run", "first", "last"}] segments of inherited epochs), ``best_epoch`` (``best_epoch`` when given, else the
    epoch with the best ``score``; None when no epoch has it), ``score`` and ``mode``.

    An item without "epoch" follows the previous one; a repeated epoch keeps its last item (a later report of the
    same epoch supersedes an earlier one).
    """
    by_epoch: dict[int, dict] = {}
    previous = 0
    for item in history:
        epoch = _number(item.get("epoch"))
        epoch = int(epoch) if epoch is not None else previous + 1
        by_epoch[epoch] = item
        previous = epoch
    epochs = sorted(by_epoch)
    items = [by_epoch[e] for e in epochs]
    data: dict[str, Any] = {"epoch": epochs}
    for key in SERIES_KEYS:
        data[key] = [_number(item.get(key)) for item in items]
    data["phase"] = [item.get("phase") for item in items]
    data["run"] = [item.get("run") for item in items]
    last_run = data["run"][-1] if items else None
    data["inherited"] = [last_run is not None and run is not None and run != last_run for run in data["run"]]
    data["inherited_runs"] = _segments(epochs, data["inherited"], data["run"])
    data["phase_boundaries"] = [epochs[i] for i in range(1, len(epochs))
                                if data["phase"][i - 1] == "head" and data["phase"][i] == "full"]
    mode = score_mode(score)
    values = data.get(score) or [_number(item.get(score)) for item in items]
    data["score"], data["mode"] = score, mode
    data["best_epoch"] = best_epoch if best_epoch is not None else _best(epochs, values, mode)
    return data


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure) -> bytes:
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _series(values: list[float | None]) -> list[float]:
    # NaN breaks the line at a gap instead of joining its neighbours over it.
    return [math.nan if v is None else v for v in values]


def _epoch_ticks(axis, first: int, last: int) -> None:
    """Whole epochs on the x axis, at most about ten ticks (matplotlib's own locator puts 0.6, 0.7, ... under a
    single epoch)."""
    from matplotlib.ticker import MultipleLocator

    axis.xaxis.set_major_locator(MultipleLocator(max(1, math.ceil((last - first + 1) / 10))))


def _spans_decades(values: list[float | None]) -> bool:
    positive = [v for v in values if v is not None and v > 0]
    return len(positive) > 1 and max(positive) / min(positive) >= 10


def curves_figure(history: list[dict], best_epoch: int | None = None, score: str = "val_balanced_accuracy",
                  title: str = "") -> bytes:
    """A run's learning curves (PNG): loss (train, val), validation balanced accuracy and ROC AUC (when present),
    learning rate (log scale when it spans a decade or more), against epoch; a dashed line where the head phase
    gives way to the full one, a dotted line and a star at the best epoch (by ``score``, unless ``best_epoch`` is
    given), grey shading over epochs trained by another run (a PBT trial's lineage)."""
    plt = _pyplot()
    data = curve_data(history, score=score, best_epoch=best_epoch)
    figure, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True, layout="constrained")
    _draw_series(axes, data, score)
    _draw_marks(axes, data, score)
    for axis in axes:
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8, loc="best")
    figure.suptitle(title or "learning curves", fontsize=10)
    return _png(figure)


def _draw_series(axes, data: dict, score: str) -> None:
    """Loss, validation metrics and learning rate, one panel each."""
    loss_axis, metric_axis, lr_axis = axes
    epochs = data["epoch"]
    metric_keys = [k for k in METRIC_KEYS if any(v is not None for v in data[k])]
    if score not in (*LOSS_KEYS, *metric_keys) and score in data and any(v is not None for v in data[score]):
        metric_keys.append(score)
    style = {"marker": "o", "ms": 3.5, "lw": 1.6}
    for key, colour in zip(LOSS_KEYS, ("tab:blue", "tab:orange")):
        if any(v is not None for v in data[key]):
            loss_axis.plot(epochs, _series(data[key]), color=colour, label=LABELS[key], **style)
    loss_axis.set(ylabel="loss")
    for key, colour in zip(metric_keys, ("tab:green", "tab:purple", "tab:brown")):
        metric_axis.plot(epochs, _series(data[key]), color=colour, label=LABELS.get(key, key), **style)
    metric_axis.set(ylabel="validation")
    if not metric_keys:
        metric_axis.text(0.5, 0.5, "no validation metrics in this history", transform=metric_axis.transAxes,
                         ha="center", va="center", color="grey")
    if any(v is not None for v in data["lr"]):
        lr_axis.plot(epochs, _series(data["lr"]), color="tab:red", label=LABELS["lr"], **style)
        if _spans_decades(data["lr"]):
            lr_axis.set_yscale("log")
    lr_axis.set(ylabel="learning rate", xlabel="epoch")
    if epochs:
        lr_axis.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        _epoch_ticks(lr_axis, epochs[0], epochs[-1])


def _draw_marks(axes, data: dict, score: str) -> None:
    """Another run's epochs shaded, the head -> full boundary dashed, the best epoch dotted with a star."""
    loss_axis, metric_axis, lr_axis = axes
    for segment in data["inherited_runs"]:
        for axis in axes:
            axis.axvspan(segment["first"] - 0.5, segment["last"] + 0.5, color="grey", alpha=0.15, lw=0)
        loss_axis.text((segment["first"] + segment["last"]) / 2, 1.0, f"from {segment['run']}",
                       transform=loss_axis.get_xaxis_transform(), ha="center", va="bottom", fontsize=7,
                       color="dimgrey")
    for boundary in data["phase_boundaries"]:
        for axis in axes:
            axis.axvline(boundary - 0.5, color="black", ls="--", lw=1)
        lr_axis.text(boundary - 0.5, 0.97, " head → full", transform=lr_axis.get_xaxis_transform(), ha="left",
                     va="top", fontsize=8)
    best, epochs = data["best_epoch"], data["epoch"]
    if best is None:
        return
    for axis in axes:
        axis.axvline(best, color="goldenrod", ls=":", lw=1.4)
    value = data[score][epochs.index(best)] if best in epochs and score in data else None
    if value is not None:
        target = loss_axis if score in LOSS_KEYS else metric_axis
        target.plot([best], [value], "*", color="goldenrod", ms=13, mec="black", zorder=5,
                    label=f"best {LABELS.get(score, score)} (epoch {best}: {value:.3f})")


def trial_curve_data(trials: dict[str, list[dict]], metric: str, mode: str, max_epochs: int | None = None) -> dict:
    """What ``add_trial_curves`` draws: ``trials`` ({trial: {"epoch", "value", "stopped", "best"}}: the epochs
    that have ``metric`` and its values, whether the trial ended before ``max_epochs``, its best value),
    ``best_trial`` (the trial with the best value by ``mode``; None when none has one), ``metric``, ``mode`` and
    ``max_epochs``."""
    out: dict[str, dict] = {}
    for name, history in trials.items():
        data = curve_data(history, score=metric)
        pairs = [(e, v) for e, v in zip(data["epoch"], data.get(metric) or [_number(h.get(metric)) for h in
                 (history or [])]) if v is not None]
        epochs, values = [e for e, _ in pairs], [v for _, v in pairs]
        last = data["epoch"][-1] if data["epoch"] else 0
        best = (min if mode == "min" else max)(values, default=None)
        out[name] = {"epoch": epochs, "value": values, "best": best,
                     "stopped": max_epochs is not None and last < max_epochs}
    scored = [(v["best"], name) for name, v in out.items() if v["best"] is not None]
    best_trial = None
    if scored:
        target = (min if mode == "min" else max)(value for value, _ in scored)
        best_trial = next(name for value, name in scored if value == target)
    return {"trials": out, "best_trial": best_trial, "metric": metric, "mode": mode, "max_epochs": max_epochs}


def add_trial_curves(axis, trials: dict[str, list[dict]], metric: str, mode: str,
                     max_epochs: int | None = None, legend_limit: int = 12) -> dict:
    """Draw one line per trial of ``metric`` against epoch on a matplotlib ``axis``: the best trial thick and
    labelled, a trial that ended before ``max_epochs`` (stopped by ASHA, or failed) ends in a cross, and the
    x axis runs to ``max_epochs`` so that short trials look short. Returns ``trial_curve_data``'s dict."""
    plt = _pyplot()
    data = trial_curve_data(trials, metric, mode, max_epochs)
    colours = plt.get_cmap("tab10" if len(trials) <= 10 else "tab20")
    labelled = len(trials) <= legend_limit
    stopped_drawn = False
    for i, (name, trial) in enumerate(data["trials"].items()):
        if not trial["epoch"]:
            continue
        best = name == data["best_trial"]
        colour = "black" if best else colours(i % colours.N)
        label = f"{name} (best: {trial['best']:.3f})" if best else (name if labelled else None)
        axis.plot(trial["epoch"], trial["value"], color=colour, lw=2.6 if best else 1.2, alpha=1 if best else 0.75,
                  marker="o", ms=3, label=label, zorder=4 if best else 2)
        if trial["stopped"]:
            axis.plot(trial["epoch"][-1], trial["value"][-1], "x", color=colour, ms=8, mew=2, zorder=5,
                      label=None if stopped_drawn else "stopped early")
            stopped_drawn = True
    last = max([max_epochs or 0] + [t["epoch"][-1] for t in data["trials"].values() if t["epoch"]])
    if max_epochs:
        axis.set_xlim(0.5, max_epochs + 0.5)
    if last:
        _epoch_ticks(axis, 1, last)
    axis.set(xlabel="epoch", ylabel=metric, title=f"{metric} per epoch, one line per trial ({mode} is best)")
    axis.grid(alpha=0.3)
    if axis.get_legend_handles_labels()[0]:
        axis.legend(fontsize=7, loc="best")
    return data


def trial_curves_figure(trials: dict[str, list[dict]], metric: str, mode: str, max_epochs: int | None = None,
                        title: str = "") -> bytes:
    """A sweep's per-trial curves on their own (PNG); see ``add_trial_curves``."""
    plt = _pyplot()
    figure, axis = plt.subplots(figsize=(7, 4.2), layout="constrained")
    add_trial_curves(axis, trials, metric, mode, max_epochs)
    if title:
        figure.suptitle(title, fontsize=10)
    return _png(figure)
