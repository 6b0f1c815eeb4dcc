"""Arguments shared by the commands driven by the experiment config."""

from __future__ import annotations

import argparse


def add_config_arguments(parser: argparse.ArgumentParser, example: str) -> None:
    """--config FILE.yaml and repeatable --set key=value, for every command driven by the experiment config."""
    parser.add_argument("--config", help="experiment YAML (see jobs/configs/); defaults to the embedded default")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override one config value, e.g. --set {example} (repeatable)")
