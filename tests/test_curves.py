"""Learning-curve figures (dermray.evaluation.curves): the drawn data is the checkpoint's history, and the PNGs
are valid pictures of a sensible size. Pure: no Ray, no torch."""

from __future__ import annotations

import io
import math

import pytest
from PIL import Image

from dermray.evaluation.curves import (
    add_trial_curves,
    curve_data,
    curves_figure,
    trial_curve_data,
    trial_curves_figure,
)


def epoch_metrics(epoch: int, phase: str = "full", run: str = "r1", auc: bool = True) -> dict:
    """One history item as dermray.train.worker writes it."""
    item = {"epoch": epoch, "phase": phase, "run": run, "train_loss": round(1.5 / epoch, 5),
            "images_per_s": 80.0 + epoch, "lr": 1e-3 * 0.5 ** epoch, "val_images": 88, "worker_nodes": 1,
            "val_loss": round(1.6 / epoch + 0.05, 5), "val_accuracy": round(0.3 + 0.05 * epoch, 5),
            "val_balanced_accuracy": round(0.25 + 0.06 * epoch, 5)}
    if auc:
        item["val_roc_auc"] = round(0.6 + 0.03 * epoch, 5)
    return item


def assert_png(data: bytes, min_side: int = 300) -> Image.Image:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.format == "PNG"
    assert min_side <= image.width <= 3000 and min_side <= image.height <= 3000, image.size
    return image


def test_curve_data_is_the_history():
    history = [epoch_metrics(e, phase="head" if e <= 2 else "full") for e in range(1, 6)]
    data = curve_data(history)
    assert data["epoch"] == [1, 2, 3, 4, 5]
    for key in ("train_loss", "val_loss", "val_balanced_accuracy", "val_roc_auc", "val_accuracy", "lr"):
        assert data[key] == [item[key] for item in history], key
    assert data["phase"] == ["head", "head", "full", "full", "full"]
    assert data["phase_boundaries"] == [3]
    assert data["best_epoch"] == 5  # balanced accuracy rises every epoch
    assert data["inherited"] == [False] * 5 and data["inherited_runs"] == []


def test_resumed_history_continues_and_a_repeated_epoch_keeps_its_last_report():
    first = [epoch_metrics(e) for e in range(1, 4)]
    # A relaunch resumed after epoch 3: its history continues the checkpoint's; epoch 3 reported again supersedes.
    again = dict(epoch_metrics(3), val_balanced_accuracy=0.9)
    resumed = first + [again] + [epoch_metrics(e) for e in range(4, 7)]
    data = curve_data(resumed)
    assert data["epoch"] == [1, 2, 3, 4, 5, 6]
    assert data["val_balanced_accuracy"][2] == 0.9
    assert data["train_loss"] == [epoch_metrics(e)["train_loss"] for e in range(1, 7)]
    assert data["best_epoch"] == 3  # 0.9 beats every later epoch
    assert data["phase_boundaries"] == []


def test_missing_auc_and_older_checkpoints_lacking_keys():
    history = [epoch_metrics(1, auc=False), epoch_metrics(2), epoch_metrics(3, auc=False)]
    del history[0]["lr"], history[0]["run"], history[0]["phase"]  # an older checkpoint's item
    history[1]["val_loss"] = float("nan")  # pandas' way of saying "absent"
    data = curve_data(history)
    assert data["val_roc_auc"] == [None, history[1]["val_roc_auc"], None]
    assert data["lr"][0] is None and data["val_loss"][1] is None
    assert data["run"] == [None, "r1", "r1"] and data["inherited"] == [False] * 3
    assert_png(curves_figure(history))
    # No AUC anywhere: the validation panel has balanced accuracy alone.
    assert_png(curves_figure([epoch_metrics(e, auc=False) for e in (1, 2)]))


def test_gaps_in_epochs_and_items_without_epoch():
    history = [epoch_metrics(1), epoch_metrics(2), epoch_metrics(5)]
    history.append({k: v for k, v in epoch_metrics(6).items() if k != "epoch"})  # follows epoch 5
    data = curve_data(history)
    assert data["epoch"] == [1, 2, 5, 6]
    assert data["val_loss"] == [epoch_metrics(e)["val_loss"] for e in (1, 2, 5, 6)]
    assert_png(curves_figure(history))


def test_best_epoch_follows_the_score_and_its_order():
    history = [epoch_metrics(e) for e in range(1, 5)]
    history[1]["val_balanced_accuracy"] = history[3]["val_balanced_accuracy"]  # a tie: the earlier epoch
    assert curve_data(history)["best_epoch"] == 2
    history[2]["val_loss"] = 0.01
    loss = curve_data(history, score="val_loss")
    assert loss["best_epoch"] == 3 and loss["mode"] == "min"
    assert curve_data(history, score="val_roc_auc")["best_epoch"] == 4
    assert curve_data(history, best_epoch=1)["best_epoch"] == 1  # the run's own choice wins
    assert curve_data([{"epoch": 1, "train_loss": 1.0}])["best_epoch"] is None


def test_pbt_lineage_epochs_of_another_run_are_marked():
    history = ([epoch_metrics(e, run="t1") for e in (1, 2)] + [epoch_metrics(3, run="t0-from-t1-e2-ab")]
               + [epoch_metrics(e, run="t0-from-t2-e4-cd") for e in (4, 5)])
    data = curve_data(history)
    assert data["inherited"] == [True, True, True, False, False]
    assert data["inherited_runs"] == [{"run": "t1", "first": 1, "last": 2},
                                      {"run": "t0-from-t1-e2-ab", "first": 3, "last": 3}]
    assert_png(curves_figure(history, title="trial t0"))


def test_one_epoch_and_an_empty_history_draw():
    image = assert_png(curves_figure([epoch_metrics(1, phase="head")], best_epoch=1, title="one epoch"))
    assert image.height > image.width  # three panels, one above the other
    assert_png(curves_figure([]), min_side=200)


def test_learning_rate_spanning_decades_and_a_loss_score():
    history = [dict(epoch_metrics(e), lr=10.0 ** -e) for e in range(1, 6)]
    assert_png(curves_figure(history, score="val_loss"))


def trials() -> dict[str, list[dict]]:
    return {
        "t0": [epoch_metrics(e, run="t0") for e in range(1, 9)],
        "t1": [dict(epoch_metrics(e, run="t1"), val_balanced_accuracy=0.2 + 0.01 * e) for e in (1, 2)],  # stopped
        "t2": [dict(epoch_metrics(e, run="t2"), val_balanced_accuracy=0.9 - 0.01 * e) for e in range(1, 9)],
        "t3": [],  # failed before its first report
    }


def test_trial_curve_data_marks_stopped_trials_and_the_best():
    data = trial_curve_data(trials(), "val_balanced_accuracy", "max", max_epochs=8)
    assert data["best_trial"] == "t2"
    assert data["trials"]["t1"]["epoch"] == [1, 2] and data["trials"]["t1"]["stopped"] is True
    assert data["trials"]["t0"]["stopped"] is False and data["trials"]["t2"]["best"] == pytest.approx(0.89)
    assert data["trials"]["t0"]["value"] == [epoch_metrics(e)["val_balanced_accuracy"] for e in range(1, 9)]
    assert data["trials"]["t3"]["epoch"] == [] and data["trials"]["t3"]["best"] is None
    assert trial_curve_data(trials(), "val_loss", "min")["best_trial"] == "t0"
    assert trial_curve_data(trials(), "val_loss", "min")["trials"]["t1"]["stopped"] is False  # no max_epochs


def test_trial_figures():
    assert_png(trial_curves_figure(trials(), "val_balanced_accuracy", "max", max_epochs=8, title="sweep"))
    assert_png(trial_curves_figure({}, "val_balanced_accuracy", "max", None), min_side=200)
    # Beside the sweep's existing panels: drawn onto an axis of the caller's figure.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2)
    data = add_trial_curves(axes[1], trials(), "val_balanced_accuracy", "max", max_epochs=8)
    assert data["best_trial"] == "t2"
    drawn = [line for line in axes[1].get_lines() if len(line.get_xdata()) > 1]
    assert any(list(line.get_xdata()) == [1, 2] for line in drawn)  # the stopped trial's line ends early
    assert axes[1].get_xlim()[1] == pytest.approx(8.5)
    plt.close(figure)


def test_pandas_rows_with_nan_are_missing_values():
    rows = [{"epoch": 1.0, "val_balanced_accuracy": math.nan}, {"epoch": 2.0, "val_balanced_accuracy": 0.5}]
    data = trial_curve_data({"t": rows}, "val_balanced_accuracy", "max", max_epochs=4)
    assert data["trials"]["t"]["epoch"] == [2] and data["trials"]["t"]["stopped"] is True
