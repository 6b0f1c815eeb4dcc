"""``dermray evaluate``: a checkpoint on one split of a manifest, as a Ray Data inference job, with metrics,
plots and a self-contained HTML report written to ``--out`` (local or s3://)."""

from __future__ import annotations

import io
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from dermray import __version__, storage
from dermray.data.ingest import build_dataset
from dermray.data.manifest import Manifest, manifest_uri, read_manifest, split_names
from dermray.data.transforms import EvalPreset
from dermray.errors import DermrayError
from dermray.evaluation.curves import curves_figure
from dermray.evaluation.inference import Predictor, actor_pool
from dermray.evaluation.metrics import evaluate_predictions, malignant_labels, malignant_scores, reliability
from dermray.evaluation.plots import confusion_figure, reliability_figure, roc_figure
from dermray.evaluation.report import render_report
from dermray.models.checkpoint import (
    checkpoint_eval_preset,
    ensemble_members,
    melanoma_class_of,
    read_checkpoint_meta,
    read_checkpoint_state,
    read_history,
)
from dermray.ops import run_tracking
from dermray.ray_runtime import ensure_ray
from dermray.taxonomy import MALIGNANT, IsicFormat, isic_format

HEADLINE_KEYS = ("images", "accuracy", "balanced_accuracy", "roc_auc_ovr", "melanoma_auc", "malignant_auc",
                 "log_loss", "ece")


@dataclass
class SplitPredictions:
    """What an inference pass over one split returns, in manifest order of arrival."""

    image_uris: list[str]
    labels: np.ndarray
    probs: np.ndarray
    features: np.ndarray | None
    classes: list[str]
    taxonomy: dict | None
    melanoma_class: str | None
    dropped: int  # manifest rows whose image could not be read any more


def predict_split(checkpoint: str, manifest: Manifest, split: str, tta: int = 1, features: bool = False,
                  limit: int | None = None, preset: EvalPreset | None = None) -> SplitPredictions:
    """Run the checkpoint over a split of the manifest as a Ray Data job (decode on CPU tasks, the model in an
    actor pool, one actor per GPU when there are GPUs). ``preset``: another eval view than the one the checkpoint
    was trained with (dev/eval_size_probe.py); by default the checkpoint's own."""


    meta = read_checkpoint_meta(checkpoint)
    if meta["classes"] != manifest.classes:
        raise DermrayError(f"evaluate: the checkpoint was trained on classes {meta['classes']}, the manifest has "
                           f"{manifest.classes} (evaluate on a manifest of the same dataset)")
    if preset is None:
        preset = checkpoint_eval_preset(checkpoint, meta)
    ensure_ray()
    rows = manifest.split(split).num_rows
    source = manifest if limit is None or limit >= rows else Manifest(
        manifest.split(split).slice(0, limit), manifest.classes, manifest.source, manifest.taxonomy)
    dataset = build_dataset(source, split, preset, passthrough=("image_uri",))
    dataset = dataset.map_batches(
        Predictor, fn_constructor_kwargs={"checkpoint": storage.normalize(checkpoint), "tta": tta,
                                          "features": features},
        batch_size=64, batch_format="numpy", **actor_pool(ray.cluster_resources()),
    )
    uris, labels, probs, feats = [], [], [], []
    for batch in dataset.iter_batches(batch_size=256, batch_format="numpy"):
        uris += [str(u) for u in batch["image_uri"]]
        labels.append(batch["label"])
        probs.append(batch["probs"])
        if features:
            feats.append(batch["features"])
    if not uris:
        raise DermrayError(f"evaluate: no readable image in split '{split}'")
    return SplitPredictions(
        image_uris=uris, labels=np.concatenate(labels), probs=np.concatenate(probs),
        features=np.concatenate(feats) if features else None, classes=list(meta["classes"]),
        taxonomy=meta.get("taxonomy"), melanoma_class=melanoma_class_of(meta, meta["classes"]),
        dropped=min(rows, limit or rows) - len(uris),
    )


def ensemble_predictions(members: list[SplitPredictions]) -> SplitPredictions:
    """One prediction per image from several models' passes over the same split: the mean of their probabilities.
    Ray Data hands rows back in no fixed order, so members are matched by image URI; an image that one member
    could not read has no ensemble prediction (it counts as unreadable)."""
    first = members[0]
    if len(members) == 1:
        return first
    positions = [{uri: i for i, uri in enumerate(member.image_uris)} for member in members]
    if any(len(index) != len(member.image_uris) for index, member in zip(positions, members)):
        raise DermrayError("evaluate: the split lists one image twice, so an ensemble cannot match its members' "
                           "predictions image by image (re-stage the collection)")
    uris = [uri for uri in first.image_uris if all(uri in index for index in positions[1:])]
    rows = [np.array([index[uri] for uri in uris], dtype=np.int64) for index in positions]
    labels = first.labels[rows[0]]
    for member, row in zip(members[1:], rows[1:]):
        if not np.array_equal(member.labels[row], labels):  # one manifest, so this would be a bug, never data
            raise DermrayError("evaluate: the ensemble's members disagree on the images' labels")
    probs = np.mean([member.probs[row] for member, row in zip(members, rows)], axis=0)
    return replace(first, image_uris=uris, labels=labels, probs=probs, features=None,
                   dropped=first.dropped + len(first.image_uris) - len(uris))


def _figures(result: SplitPredictions, metrics: dict) -> dict[str, bytes]:
    predicted = result.probs.argmax(axis=1)
    curves = []
    for c, name in enumerate(result.classes):
        positive = result.labels == c
        chosen = predicted == c
        point = ((chosen[~positive].mean() if (~positive).any() else 0.0),
                 (chosen[positive].mean() if positive.any() else 0.0))
        curves.append((name, positive, result.probs[:, c], metrics["per_class"][name]["auc"], point))
    figures = {"roc_per_class.png": roc_figure(curves, "one-vs-rest ROC per class")}
    scores = malignant_scores(result.probs, result.classes, result.taxonomy)
    if scores is not None and metrics.get("malignant"):
        positive = malignant_labels(result.labels, result.classes, result.taxonomy)
        m = metrics["malignant"]
        point = (1 - m["specificity"], m["sensitivity"]) if None not in (m["specificity"], m["sensitivity"]) else None
        figures["roc_malignant.png"] = roc_figure(
            [(f"{MALIGNANT} vs benign", positive, scores, m["auc"], point)],
            f"malignant vs benign (P(malignant) = sum of {', '.join(m['classes'])})")
    figures["confusion.png"] = confusion_figure(np.array(metrics["confusion_matrix"]["matrix"]), result.classes)
    figures["reliability.png"] = reliability_figure(reliability(result.probs, result.labels), metrics["ece"])
    return figures


def _learning_curves(checkpoint: str) -> dict[str, bytes]:
    """``curves.png`` of the run up to the evaluated checkpoint (its epoch marked), when the history is there."""

    history = read_history(checkpoint)
    if not history:
        return {}
    meta = read_checkpoint_meta(checkpoint)
    score = ((meta.get("config") or {}).get("run") or {}).get("checkpoint_score", ["val_balanced_accuracy"])[0]
    epoch = meta.get("epoch")
    return {"curves.png": curves_figure(history, best_epoch=epoch + 1 if epoch is not None else None, score=score,
                                        title=f"learning curves up to the evaluated checkpoint (epoch {epoch + 1})"
                                        if epoch is not None else "learning curves")}


def _predictions_table(result: SplitPredictions) -> bytes:
    columns = {"image_uri": result.image_uris, "label": result.labels.astype(np.int32),
               "label_name": [result.classes[i] for i in result.labels],
               "predicted": [result.classes[i] for i in result.probs.argmax(axis=1)]}
    for c, name in enumerate(result.classes):
        columns[f"p_{name}"] = result.probs[:, c].astype(np.float32)
    buffer = io.BytesIO()
    pq.write_table(pa.table(columns), buffer)
    return buffer.getvalue()


def image_id(uri: str) -> str:
    """The ISIC ``image`` identifier of a row: the file name without its extension (ISIC_0034524)."""
    return os.path.splitext(storage.basename(uri))[0]


def isic_submission(result: SplitPredictions, layout: IsicFormat) -> tuple[str, int]:
    """The ISIC challenge submission CSV (``image`` + the official probability columns in the official order)
    and the number of rows left out because they carry no prediction (an image unreadable at inference)."""
    finite = np.isfinite(result.probs).all(axis=1)
    lines = [",".join(("image", *layout.columns))]
    for uri, probs in zip(np.asarray(result.image_uris)[finite], result.probs[finite].astype(np.float64)):
        # A class the model lacks (ISIC 2019's UNK) is 0, so each row still sums to 1; 9 significant digits keep
        # float32 softmax outputs exact enough that the official AUCs equal those computed in memory.
        values = (probs[s] if s is not None else 0.0 for s in layout.sources)
        lines.append(",".join((image_id(uri), *(f"{v:.9g}" for v in values))))
    return "\n".join(lines) + "\n", int((~finite).sum())


def trained_on_split(config: dict, manifest: str, split: str) -> list[str]:
    """The splits of ``split`` that the checkpoint (its resolved ``config``) trained on, when ``manifest`` is the
    one it trained on; else none."""
    data = config.get("data") or {}
    if not data.get("manifest") or manifest_uri(data["manifest"]) != manifest_uri(manifest):
        return []
    trained = set(split_names(data.get("train_split", "train")))
    return [name for name in split_names(split) if name in trained]


def _trained_on_warning(configs: list[dict], manifest: str, split: str) -> list[str]:
    """The evaluated splits any of the checkpoints (their configs) trained on, with a warning when there are any."""
    trained_on = sorted({name for config in configs for name in trained_on_split(config, manifest, split)})
    if trained_on:
        who = "the checkpoint was" if len(configs) == 1 else "a member of the ensemble was"
        print(f"[dermray] warning: {who} trained on the '{', '.join(trained_on)}' images of this manifest: its "
              "figures on them are not a held-out estimate", file=sys.stderr, flush=True)
    return trained_on


def _write_outputs(out: str, result: SplitPredictions, metrics: dict, figures: dict[str, bytes]) -> dict:
    """The plots, ``predictions.parquet``, ``metrics.json`` and, for ISIC classes, the submission CSV under
    ``out``; returns the optional outputs written."""
    for name, png in figures.items():
        storage.write_bytes(storage.join(out, name), png)
    storage.write_bytes(storage.join(out, "predictions.parquet"), _predictions_table(result))
    storage.write_text(storage.join(out, "metrics.json"), json.dumps(metrics, indent=2))
    outputs = {}
    layout = isic_format(result.classes)
    if layout is not None:
        csv, no_prediction = isic_submission(result, layout)
        outputs["isic_submission"] = {
            "file": storage.write_text(storage.join(out, "isic_submission.csv"), csv), "challenge": layout.challenge,
            "rows": csv.count("\n") - 1, "unreadable_left_out": result.dropped + no_prediction}
    return outputs


def evaluate(checkpoint: str | Sequence[str], manifest: str, split: str = "test", out: str | None = None,
             tta: int = 1, bootstrap: int = 200) -> dict:
    """Evaluate and write ``metrics.json``, the PNG plots, ``predictions.parquet``, ``report.html`` and, for the
    classes of an ISIC challenge, ``isic_submission.csv`` to ``out`` (default: ``<checkpoint>/eval-<split>``);
    returns the JSON summary with the headline metrics and ``outputs`` (the optional files written).

    Several checkpoints evaluate their ensemble: each runs over the split at its own image size and colour
    handling, and an image's prediction is the mean of their probabilities (default ``out``:
    ``<first checkpoint>/eval-<split>-ensemble-<n>``)."""

    started = time.monotonic()
    if tta < 1 or tta > 8:
        raise DermrayError(f"evaluate: --tta must be between 1 (off) and 8 views, got {tta}")
    checkpoints = ensemble_members(checkpoint, "evaluate")
    loaded_manifest = read_manifest(manifest)
    # meta.json carries the config; older checkpoints have it only in the (large) state.pt.
    configs = [read_checkpoint_meta(c).get("config") or read_checkpoint_state(c)["config"] for c in checkpoints]
    trained_on = _trained_on_warning(configs, manifest, split)
    result = ensemble_predictions([predict_split(c, loaded_manifest, split, tta=tta) for c in checkpoints])
    metrics = evaluate_predictions(result.probs, result.labels, result.classes, result.taxonomy,
                                   result.melanoma_class, bootstrap=bootstrap)
    metrics.update({"split": split, "tta": tta, "unreadable_images": result.dropped,
                    "trained_on": trained_on, "checkpoints": checkpoints})
    ensemble = len(checkpoints) > 1
    default_out = f"eval-{split}-ensemble-{len(checkpoints)}" if ensemble else f"eval-{split}"
    out = storage.normalize(out or storage.join(checkpoints[0], default_out))
    figures = _figures(result, metrics)
    if not ensemble:  # one run's curves; an ensemble has several
        figures.update(_learning_curves(checkpoints[0]))
    outputs = _write_outputs(out, result, metrics, figures)
    provenance = {
        ("checkpoints (ensemble: the mean of their probabilities)" if ensemble else "checkpoint"):
            ", ".join(checkpoints), "manifest": manifest_uri(manifest), "split": split,
        "images evaluated": metrics["images"], "unreadable images (left out)": result.dropped,
        "test-time augmentation views": tta, "dermray": __version__, "evaluated at (UTC)":
        time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
    }
    title = f"dermray evaluation: {split} split" + (f", an ensemble of {len(checkpoints)}" if ensemble else "")
    shown_config = {f"member {i + 1}": config for i, config in enumerate(configs)} if ensemble else configs[0]
    report_uri = storage.write_text(storage.join(out, "report.html"), render_report(
        title, metrics, figures, shown_config, provenance))
    if not ensemble:  # an ensemble's figures belong to no one member's MLflow run
        run_tracking.log_evaluation(checkpoints[0], configs[0], split, metrics, report_uri)
    malignant = metrics.get("malignant") or {}
    headline = {key: metrics.get(key) for key in HEADLINE_KEYS} | {
        "malignant_sensitivity": malignant.get("sensitivity"), "malignant_specificity": malignant.get("specificity")}
    return {"report": report_uri, "metrics_file": storage.join(out, "metrics.json"), "out": out, "split": split,
            "checkpoints": checkpoints, "tta": tta, "outputs": outputs, "metrics": headline,
            "confidence_intervals": metrics["confidence_intervals"], "seconds": round(time.monotonic() - started, 1)}


# ------------------------------------------------------------------------------------------------------ CLI
