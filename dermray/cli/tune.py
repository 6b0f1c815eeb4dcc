"""``dermray tune``: its arguments, and the call they make."""

from __future__ import annotations

import argparse
import textwrap

from dermray.cli.options import add_config_arguments

EPILOG = textwrap.dedent(
    """\
    with no arguments: sweeps the embedded default (synthetic data, resnet18 at 64 px) over learning rate,
    weight decay and augmentation strengths. The space lives in the YAML's tune: section, e.g.

      tune:
        name: isic-r50-sweep
        num_samples: 16
        metric: val_balanced_accuracy
        mode: max
        space:
          train.lr: {type: loguniform, low: 0.0001, high: 0.01}
          data.augment.rotation_degrees: {type: uniform, low: 0, high: 180}
          data.augment.hflip_p: {type: choice, values: [0.0, 0.5]}

    population-based training instead of ASHA: every 2 epochs the bottom quarter of the trials continue from
    checkpoints of the top quarter with their hyperparameters perturbed (lr, augmentation become schedules):
      dermray tune --set tune.scheduler=pbt --set tune.num_samples=4 --set tune.perturbation_interval=2

    launching the same tune.name again resumes an interrupted sweep. Then train the winner:
      dermray train --config <run.storage>/<tune.name>/best_config.yaml
    """
)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "tune", help="hyperparameter sweep (Ray Tune + ASHA or PBT), each trial a full training run",
        description="A Ray Tune sweep over the YAML's tune.space; every trial is a Ray Train run (itself "
        "multi-worker/multi-GPU as configured), ASHA stops trailing trials (or PBT has them take over leaders' "
        "checkpoints), results go to "
        "<run.storage>/<tune.name>/ (trials.csv, sweep.png, best_config.yaml).",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_arguments(p, "tune.num_samples=16")


def run(args: argparse.Namespace) -> dict:
    from dermray.config import load_config
    from dermray.tune.sweep import sweep

    return sweep(load_config(args.config, args.overrides))
