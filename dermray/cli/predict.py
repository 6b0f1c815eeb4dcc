"""``dermray predict``: its arguments, and the call they make."""

from __future__ import annotations

import argparse
import textwrap

EPILOG = textwrap.dedent(
    """\
    --input is a manifest (folder holding manifest.parquet, or the .parquet) or any folder/prefix of images.
    The Parquet files under <out>/predictions/ hold: image_uri, predicted, confidence, p_<class> for every
    class, p_malignant/p_benign (with a taxonomy), error (the reason an image could not be read, else empty).

    example:
      dermray predict --checkpoint s3://bucket/runs/isic/checkpoint_... --input s3://bucket/new-photos/ \\
                      --out s3://bucket/predictions/2026-11-22
    """
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict", help="distributed batch inference over a manifest or a folder of images",
        description="Batch inference with Ray Data: decode on CPU tasks, the model in an actor pool (GPU actors "
        "when the cluster has GPUs); unreadable images are reported, not fatal.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, action="append",
                   help="a checkpoint_* folder of a run (local or s3://); more than once: the runs' ensemble (the "
                   "mean of their probabilities; the members must share image size and colour handling)")
    p.add_argument("--input", required=True, help="a manifest, or a folder/prefix of images (local or s3://)")
    p.add_argument("--out", required=True, help="output folder or prefix; Parquet goes to <out>/predictions/")
    p.add_argument("--tta", type=int, default=1, choices=range(1, 9), metavar="{1..8}",
                   help="test-time augmentation views (default: 1, off)")
    p.add_argument("--overwrite", action="store_true", help="replace predictions already under --out")


def run(args: argparse.Namespace) -> dict:
    from dermray.data.progress import show_data_progress
    from dermray.evaluation.predict import predict

    show_data_progress()  # Ray Data's own progress bars, on stderr

    return predict(args.checkpoint, args.input, args.out, args.tta, args.overwrite)
