"""Does a checkpoint score better when evaluated at another size than it was trained at (FixRes, Touvron et al.
2019)? Random resized crops show the model objects larger than the centre view does, so a larger eval size can
help; this measures it instead of assuming it.

    python dev/eval_size_probe.py --checkpoint CKPT --manifest ./dermray-store/datasets/ham10000 --split val \
        --views 128:0.875 144:0.875 160:0.875 128:1.0

Each view is IMAGE_SIZE:RESIZE_RATIO (the shorter side is resized to IMAGE_SIZE / RESIZE_RATIO, then the central
IMAGE_SIZE square is taken, as in `dermray evaluate`); the checkpoint's colour constancy is kept. Prints one JSON
line per view: balanced accuracy, macro one-vs-rest ROC AUC, accuracy, seconds. Choose on a val split only.
"""

from __future__ import annotations

import argparse
import json
import time

from dermray.data.manifest import read_manifest
from dermray.data.transforms import EvalPreset
from dermray.evaluation.evaluate import predict_split
from dermray.evaluation.metrics import evaluate_predictions
from dermray.models.checkpoint import checkpoint_eval_preset


def _view(text: str) -> tuple[int, float]:
    """IMAGE_SIZE:RESIZE_RATIO, e.g. 144:0.875 (argparse turns a ValueError into a one-line usage error)."""
    size, ratio = text.split(":")
    if int(size) < 1 or not 0 < float(ratio) <= 1:
        raise ValueError(text)
    return int(size), float(ratio)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="val")
    parser.add_argument("--views", nargs="+", type=_view, metavar="SIZE:RATIO",
                        default=[(128, 0.875), (144, 0.875), (160, 0.875), (128, 1.0)])
    args = parser.parse_args()

    manifest = read_manifest(args.manifest)
    trained = checkpoint_eval_preset(args.checkpoint)
    for size, ratio in args.views:
        preset = EvalPreset(image_size=size, resize_ratio=ratio, color_constancy=trained.color_constancy)
        start = time.monotonic()
        result = predict_split(args.checkpoint, manifest, args.split, preset=preset)
        metrics = evaluate_predictions(result.probs, result.labels, result.classes, bootstrap=0)
        print(json.dumps({"image_size": preset.image_size, "resize_ratio": preset.resize_ratio,
                          "balanced_accuracy": round(metrics["balanced_accuracy"], 4),
                          "roc_auc_ovr": round(metrics["roc_auc_ovr"], 4), "accuracy": round(metrics["accuracy"], 4),
                          "seconds": round(time.monotonic() - start)}), flush=True)


if __name__ == "__main__":
    main()
