"""``dermray train``: its arguments, and the call they make."""

from __future__ import annotations

import argparse
import textwrap

from dermray.cli.options import add_config_arguments

EPILOG = textwrap.dedent(
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="fine-tune a backbone on a manifest with Ray Train (resumable)",
        description="Fine-tune a torchvision backbone on a staged manifest with Ray Train: Ray Data streams and "
        "augments the images, workers train with DDP, checkpoints go to run.storage (local or s3://).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, "train.epochs=5")


def run(args: argparse.Namespace) -> dict:
    from dermray.config import load_config
    from dermray.train.trainer import train

    return train(load_config(args.config, args.overrides))
