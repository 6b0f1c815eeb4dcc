"""The ``dermray`` command line. Every command ends with one JSON line on stdout summarising what it produced;
bad input exits non-zero with one line on stderr (set DERMRAY_DEBUG=1 for the traceback)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import textwrap

from dermray import bench, evaluate, explain, predict, tune
from dermray.errors import DermrayError
from dermray.sources import SOURCES

STAGE_EPILOG = textwrap.dedent(
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


def _add_stage(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "stage",
        help="turn a dataset into a validated, split manifest",
        description="Turn a dataset into <out>/manifest.parquet: every image opened (a Ray Data job), unreadable "
        "files skipped and counted (reasons in <out>/skipped.csv), grouped stratified stable splits.",
        epilog=STAGE_EPILOG,
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


def _run_stage(args: argparse.Namespace) -> dict:
    from dermray.sources import SourceOptions
    from dermray.splits import SplitFractions
    from dermray.stage import stage

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


TRAIN_EPILOG = textwrap.dedent(
    """\
    with no arguments: the embedded default (synthetic lesions staged once into ./dermray-store, a local Ray
    instance, resnet18 at 64 px for a few epochs; a few minutes on a 2-core CPU).

    examples:
      dermray train
      dermray train --config jobs/configs/isic2018_resnet50.yaml --set train.epochs=20
      dermray train --set data.manifest=s3://bucket/ham10000 --set run.storage=s3://bucket/runs \\
                    --set run.name=ham-r50 --set model.backbone=resnet50 --set scaling.num_workers=4 \\
                    --set scaling.use_gpu=true

    launching again with the same run.name and run.storage resumes from the latest checkpoint.
    every config key, its default and what it does: docs/config.md.
    """
)


def add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """--config FILE.yaml and repeatable --set key=value, for every command driven by the experiment config."""
    parser.add_argument("--config", help="experiment YAML (see jobs/configs/); defaults to the embedded default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config value, e.g. --set {example} (repeatable)")


def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a backbone on a manifest with Ray Train (resumable)",
        description="Fine-tune a torchvision backbone on a staged manifest with Ray Train: Ray Data streams and "
        "augments the images, workers train with DDP, checkpoints go to run.storage (local or s3://).",
        epilog=TRAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, "train.epochs=5")


def _run_train(args: argparse.Namespace) -> dict:
    from dermray.config import load_config
    from dermray.trainer import train

    return train(load_config(args.config, args.overrides))


NIGHTLY_EPILOG = textwrap.dedent(
    """\
    with no arguments: the embedded default (the synthetic dataset as the source, the registry in
    ./dermray-store/registry). Point nightly.source/images/labels at where new data arrives:

      dermray nightly --config jobs/configs/nightly.yaml
      dermray nightly --set nightly.source=csv --set nightly.images=s3://bucket/incoming/images \\
                      --set nightly.labels=s3://bucket/incoming/labels.csv --set nightly.registry=s3://bucket/registry

    running it again with no new or changed images does nothing (and says so); a run killed midway leaves the
    champion untouched, and the next run (after nightly.lock_ttl_hours) retrains.
    """
)


def _add_nightly(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nightly",
        help="retrain on new data and promote the challenger only when it beats the champion",
        description="One nightly cycle: detect new or changed images, re-stage with stable splits, train a "
        "challenger (warm start from the champion), evaluate both on the same holdout, promote atomically when "
        "better by nightly.margin without the malignant sensitivity falling below its floor; every decision is "
        "recorded in the registry.",
        epilog=NIGHTLY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, "nightly.margin=0.01")


def _run_nightly(args: argparse.Namespace) -> dict:
    from dermray.config import load_config
    from dermray.nightly import nightly

    return nightly(load_config(args.config, args.overrides))


# One entry per command: (add its sub-parser, run it and return the JSON summary). A command's own module may
# hold both functions; the CLI only wires them.
COMMANDS = {
    "stage": (_add_stage, _run_stage),
    "train": (_add_train, _run_train),
    "evaluate": (evaluate.add_parser, evaluate.run),
    "predict": (predict.add_parser, predict.run),
    "explain": (explain.add_parser, explain.run),
    "tune": (tune.add_parser, tune.run),
    "nightly": (_add_nightly, _run_nightly),
    "bench": (bench.add_parser, bench.run),
}


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (the contract of every dermray command), not the
    usage block followed by the error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineErrorParser(
        prog="dermray",
        description="Train dermatology image classifiers on Ray: stage a dataset into a manifest, then train.",
        epilog="Run `dermray COMMAND --help` for each command's options and examples.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=OneLineErrorParser)
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        # stdout is the summary's alone: whatever else prints there meanwhile (Ray Tune's trial tables, Ray's
        # forwarding of workers' output) goes to stderr with the rest of the progress output.
        with contextlib.redirect_stdout(sys.stderr):
            summary = COMMANDS[args.command][1](args)
    except DermrayError as error:
        print(f"dermray {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dermray {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the contract is one line, never a traceback
        if os.environ.get("DERMRAY_DEBUG"):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        print(
            f"dermray {args.command}: error: {type(error).__name__}: {first} (DERMRAY_DEBUG=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1
    print(json.dumps(summary, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
