"""``dermray predict``: distributed batch inference over a manifest or a plain folder/prefix of images.

A Ray Data job: list the images, read and decode them on CPU tasks, run the model in an actor pool (one actor per
GPU when the cluster has GPUs), and write Parquet files under ``<out>/predictions/`` with, per image, its URI, the
predicted class and confidence, every class probability (``p_<class>``) and the coarse probabilities through the
taxonomy (``p_malignant``, ``p_benign``). An unreadable image is a row with its reason in ``error`` and no
prediction: reported, never fatal, never silently dropped.
"""

from __future__ import annotations

import os
import sys
import time
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import ray

from dermray import storage
from dermray.data.ingest import DecodeAndTransform
from dermray.data.listing import list_data_files
from dermray.data.manifest import MANIFEST_NAME, read_manifest
from dermray.data.sources import IMAGE_EXTENSIONS
from dermray.data.transforms import EvalPreset
from dermray.errors import DermrayError
from dermray.evaluation.inference import Predictor, actor_pool
from dermray.models.checkpoint import checkpoint_eval_preset, ensemble_members, read_checkpoint_meta
from dermray.ray_runtime import ensure_ray
from dermray.taxonomy import coarse_probabilities

PREDICTIONS = "predictions"


def input_rows(input_uri: str) -> tuple[pa.Table, str]:
    """The images to predict: every row of a manifest, or every image file under a folder or prefix."""
    uri = storage.normalize(input_uri)
    manifest_file = uri if uri.endswith(".parquet") else storage.join(uri, MANIFEST_NAME)
    if storage.is_file(manifest_file):
        manifest = read_manifest(manifest_file)
        return manifest.table.select(["image_uri", "label_name", "split"]), "manifest"
    if not storage.is_dir(uri):
        raise DermrayError(f"predict: --input {input_uri} is neither a manifest nor a folder of images")
    # The same listing as staging: system files and folders (__MACOSX, .ipynb_checkpoints...) are not inputs,
    # and a file reached twice through links is predicted once.
    images = [u for u in list_data_files(uri).files if os.path.splitext(u)[1].lower() in IMAGE_EXTENSIONS]
    if not images:
        raise DermrayError(f"predict: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {input_uri}")
    return pa.table({"image_uri": images}), "folder"


def prediction_columns(batch: dict[str, np.ndarray], classes: list[str], tree: dict | None) -> dict[str, np.ndarray]:
    """Predictor output -> the Parquet columns (probabilities per class, coarse probabilities, decision)."""
    probs = batch.pop("probs")
    good = ~np.isnan(probs).any(axis=1)
    out = dict(batch)
    out["predicted"] = np.array([classes[i] if ok else None for i, ok in zip(probs.argmax(axis=1), good)],
                                dtype=object)
    out["confidence"] = np.where(good, np.nan_to_num(probs).max(axis=1), np.nan).astype(np.float32)
    for c, name in enumerate(classes):
        out[f"p_{name}"] = probs[:, c].astype(np.float32)
    if tree:
        for coarse, values in coarse_probabilities(probs, classes, tree).items():
            out[f"p_{coarse}"] = values.astype(np.float32)
    return out


def ensemble_view(checkpoints: list[str]) -> tuple[dict, EvalPreset]:
    """The first member's meta and the eval view every member shares; an ensemble whose members differ in classes
    or in how they see an image (size, crop, colour handling) is refused in one line, since predict decodes each
    image once for all of them (``evaluate`` runs each member on its own view)."""
    metas = [read_checkpoint_meta(c) for c in checkpoints]
    presets = [checkpoint_eval_preset(c, m) for c, m in zip(checkpoints, metas)]
    for checkpoint, meta, preset in zip(checkpoints[1:], metas[1:], presets[1:]):
        if list(meta["classes"]) != list(metas[0]["classes"]):
            raise DermrayError(f"predict: {checkpoint} has classes {meta['classes']}, {checkpoints[0]} has "
                               f"{metas[0]['classes']}: an ensemble's members predict the same classes")
        if preset != presets[0]:
            raise DermrayError(f"predict: {checkpoint} sees images as {preset}, {checkpoints[0]} as {presets[0]}: "
                               "predict's ensemble members must share one view (evaluate takes mixed ones)")
    return metas[0], presets[0]


def predict(checkpoint: str | Sequence[str], input_uri: str, out: str, tta: int = 1,
            overwrite: bool = False) -> dict:
    """Predictions of a checkpoint, or of an ensemble of checkpoints (the mean of their probabilities)."""
    started = time.monotonic()
    checkpoints = ensemble_members(checkpoint, "predict")
    meta, preset = ensemble_view(checkpoints)
    classes, tree = list(meta["classes"]), meta.get("taxonomy")
    target = storage.join(storage.normalize(out), PREDICTIONS)
    if storage.is_dir(target) and not overwrite:
        raise DermrayError(f"predict: {target} already holds predictions (choose another --out or --overwrite)")
    if storage.is_dir(target):
        storage.delete(target)
    rows, kind = input_rows(input_uri)
    ensure_ray()
    passthrough = tuple(c for c in rows.column_names)
    blocks = max(1, min(rows.num_rows // 32, 200))
    dataset = (
        ray.data.from_arrow(rows).repartition(blocks)
        .map_batches(DecodeAndTransform(preset, keep_failures=True, passthrough=passthrough), batch_size=32,
                     batch_format="numpy")
        .map_batches(Predictor, fn_constructor_kwargs={"checkpoint": checkpoints, "tta": tta},
                     batch_size=64, batch_format="numpy", **actor_pool(ray.cluster_resources()))
        .map_batches(prediction_columns, fn_kwargs={"classes": classes, "tree": tree}, batch_format="numpy")
    )
    dataset.write_parquet(target if storage.is_s3(target) else storage.normalize(target))
    fs, path = storage.resolve(target)
    written = pads.dataset(path, filesystem=fs, format="parquet").to_table(columns=["image_uri", "predicted",
                                                                                   "error"])
    errors = [(u, e) for u, e in zip(written["image_uri"].to_pylist(), written["error"].to_pylist()) if e]
    for uri, reason in errors[:20]:
        print(f"[dermray] predict: unreadable {uri}: {reason}", file=sys.stderr, flush=True)
    counts = Counter(p for p in written["predicted"].to_pylist() if p is not None)
    return {
        "predictions": target, "checkpoints": checkpoints, "input": storage.normalize(input_uri), "input_kind": kind,
        "images": written.num_rows, "predicted": written.num_rows - len(errors), "unreadable": len(errors),
        "per_class": {name: counts.get(name, 0) for name in classes}, "tta": tta,
        "seconds": round(time.monotonic() - started, 1),
    }
