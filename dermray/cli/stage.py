"""``dermray stage``: its arguments, and the call they make."""

from __future__ import annotations

import argparse
import textwrap

from dermray.data.sources import SOURCES
from dermray.errors import DermrayError

EPILOG = textwrap.dedent(
    """\
    sources and what they read:
      ham10000   --labels HAM10000_metadata.csv --images DIR   (grouped by lesion_id)
      isic2018   --labels ISIC2018_Task3_..._GroundTruth.csv --images DIR   (one-hot MEL..VASC)
      isic2019   --labels ISIC_2019_Training_GroundTruth.csv --images DIR   (one-hot MEL..UNK)
      isic2020   --labels train.csv --images DIR   (target 0/1, grouped by patient_id)
      medmnist   --npz dermamnist.npz   (keeps the npz's splits; images written to OUT/images)
      folder     --images DIR   (one sub-folder per class)
      csv        --labels FILE --images DIR --image-col C --label-col C [--group-col C]
      synthetic  [--images-per-class N --image-size PX]   (procedural lesions, written to OUT/images)

    every --images/--labels/--npz/--out accepts a local path or s3://bucket/prefix (endpoint and credentials
    from the standard AWS_* environment variables, AWS_ENDPOINT_URL included).

    example:
      dermray stage ham10000 --labels data/HAM10000_metadata.csv --images data/ham/ --out s3://bucket/ham10000
    """
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stage",
        help="turn a dataset into a validated, split manifest",
        description="Turn a dataset into <out>/manifest.parquet: every image opened (a Ray Data job), unreadable "
        "files skipped and counted (reasons in <out>/skipped.csv), grouped stratified stable splits.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("source", choices=sorted(SOURCES), help="dataset layout")
    p.add_argument("--out", required=True, help="folder or prefix for manifest.parquet (local or s3://)")
    p.add_argument("--images", help="image folder or prefix")
    p.add_argument("--labels", help="labels / metadata CSV")
    p.add_argument("--npz", help="MedMNIST .npz file (medmnist source)")
    p.add_argument("--image-col", default="image", help="csv source: column naming the image file (default: image)")
    p.add_argument("--label-col", default="label", help="csv source: column holding the class (default: label)")
    p.add_argument("--group-col", help="csv source: lesion/patient column; images of one group share a split")
    p.add_argument("--classes", help="comma-separated class order (default: the source's own, or sorted)")
    p.add_argument("--images-per-class", type=int, default=150, help="synthetic source (default: 150)")
    p.add_argument("--image-size", type=int, help="synthetic source: side in pixels (default 96); with --pack: the "
                   "longest side of the packed images (default 256)")
    p.add_argument("--pack", action="store_true", help="also write the images resized into Parquet shards "
                   "(a few large objects instead of one per image; training reads them transparently)")
    p.add_argument("--rows-per-shard", type=int, default=2000, help="with --pack: images per shard (default 2000)")
    p.add_argument("--val-fraction", type=float, default=0.15, help="when the source has no splits (default 0.15)")
    p.add_argument("--test-fraction", type=float, default=0.15, help="when the source has no splits (default 0.15)")
    p.add_argument("--seed", type=int, default=0, help="split and generator seed (default: 0)")


def run(args: argparse.Namespace) -> dict:
    from dermray.data.progress import show_data_progress
    from dermray.data.sources import SourceOptions
    from dermray.data.splits import SplitFractions
    from dermray.data.stage import stage

    show_data_progress()  # Ray Data's own progress bars, on stderr

    try:
        fractions = SplitFractions(1.0 - args.val_fraction - args.test_fraction, args.val_fraction, args.test_fraction)
    except ValueError as error:
        raise DermrayError(f"--val-fraction/--test-fraction: {error}") from None
    options = SourceOptions(
        out=args.out,
        images=args.images,
        labels=args.labels,
        npz=args.npz,
        image_col=args.image_col,
        label_col=args.label_col,
        group_col=args.group_col,
        classes=tuple(c.strip() for c in args.classes.split(",")) if args.classes else None,
        images_per_class=args.images_per_class,
        image_size=args.image_size or 96,
        seed=args.seed,
    )
    if args.pack and (args.rows_per_shard < 1 or (args.image_size is not None and args.image_size < 16)):
        raise DermrayError("--pack: --rows-per-shard must be >= 1 and --image-size >= 16")
    pack_size = (args.image_size or 256) if args.pack else None
    return stage(args.source, options, fractions, seed=args.seed, pack_size=pack_size,
                 rows_per_shard=args.rows_per_shard)
