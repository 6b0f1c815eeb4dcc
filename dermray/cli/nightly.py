"""``dermray nightly``: its arguments, and the call they make."""

from __future__ import annotations

import argparse
import textwrap

from dermray.cli.options import add_config_arguments

EPILOG = textwrap.dedent(
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "nightly",
        help="retrain on new data and promote the challenger only when it beats the champion",
        description="One nightly cycle: detect new or changed images, re-stage with stable splits, train a "
        "challenger (warm start from the champion), evaluate both on the same holdout, promote atomically when "
        "better by nightly.margin without the malignant sensitivity falling below its floor; every decision is "
        "recorded in the registry.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, "nightly.margin=0.01")


def run(args: argparse.Namespace) -> dict:
    from dermray.config import load_config
    from dermray.ops.nightly import nightly

    return nightly(load_config(args.config, args.overrides))
