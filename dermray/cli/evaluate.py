"""``dermray evaluate``: its arguments, and the call they make."""

from __future__ import annotations

import argparse
import sys
import textwrap

EPILOG = textwrap.dedent(
    """\
    writes to --out (default <checkpoint>/eval-<split>): metrics.json, report.html, roc_per_class.png,
    roc_malignant.png (with a taxonomy), confusion.png, reliability.png, predictions.parquet, and
    isic_submission.csv when the classes are an ISIC challenge's (ISIC 2018 Task 3: the 7 HAM10000 codes; ISIC
    2019: mel nv bcc ak bkl df vasc scc [unk]): image + the official probability columns, unreadable images left out.

    example:
      dermray evaluate --checkpoint ./dermray-store/runs/default/checkpoint_2026-... \\
                       --manifest ./dermray-store/datasets/synthetic --split test --tta 8
      dermray evaluate --checkpoint RUN_A/checkpoint_... --checkpoint RUN_B/checkpoint_... \\
                       --manifest ./dermray-store/datasets/ham10000 --split val     # an ensemble of two runs
    """
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics, plots and an HTML report of a checkpoint on a split",
        description="Evaluate a checkpoint on one split of a manifest (a Ray Data inference job): accuracy, "
        "balanced accuracy, one-vs-rest and melanoma/malignant ROC AUC, per-class sensitivity/specificity/"
        "precision, calibration, bootstrap 95% intervals, ROC/confusion/reliability plots and report.html.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, action="append",
                   help="a checkpoint_* folder of a run (local or s3://); give it more than once to evaluate the "
                   "ensemble of several runs (the mean of their probabilities, each model at its own image size)")
    p.add_argument("--manifest", required=True, help="manifest from `dermray stage` (folder or .parquet)")
    p.add_argument("--split", default="test", help="split to evaluate (default: test)")
    p.add_argument("--out", help="output folder or prefix (default: <checkpoint>/eval-<split>)")
    p.add_argument("--tta", type=int, default=1, help="test-time augmentation views, 1 (off) to 8 (default: 1)")
    p.add_argument("--bootstrap", type=int, default=200, help="bootstrap resamples for the intervals (default 200)")


def run(args: argparse.Namespace) -> dict:
    from dermray.data.progress import show_data_progress
    from dermray.evaluation.evaluate import evaluate

    show_data_progress()  # Ray Data's own progress bars, on stderr

    summary = evaluate(args.checkpoint, args.manifest, args.split, args.out, args.tta, args.bootstrap)
    print(f"[dermray] evaluate: report at {summary['report']}", file=sys.stderr, flush=True)
    return summary
