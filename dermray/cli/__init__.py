"""The ``dermray`` command line. Every command ends with one JSON line on stdout summarising what it produced;
bad input exits non-zero with one line on stderr (set DERMRAY_DEBUG=1 for the traceback)."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time

from dermray.cli import bench, evaluate, explain, nightly, predict, stage, train, tune
from dermray.errors import DermrayError

# One module per command under dermray/cli/: its add_parser builds the sub-parser from argparse alone, and its
# run imports the library code (torch, Ray) only when that command runs, so `dermray --help` stays light.
COMMANDS = {
    "stage": stage,
    "train": train,
    "evaluate": evaluate,
    "predict": predict,
    "explain": explain,
    "tune": tune,
    "nightly": nightly,
    "bench": bench,
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
    for command in COMMANDS.values():
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.time()
    try:
        # stdout is the summary's alone: whatever else prints there meanwhile (Ray Tune's trial tables, Ray's
        # forwarding of workers' output) goes to stderr with the rest of the progress output.
        with contextlib.redirect_stdout(sys.stderr):
            summary = COMMANDS[args.command].run(args)
        aborts = _native_aborts(args.command, started)
        if aborts:
            summary["native_worker_aborts"] = aborts
    except DermrayError as error:
        _native_aborts(args.command, started)
        print(f"dermray {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"dermray {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the contract is one line, never a traceback
        _native_aborts(args.command, started)
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


def _native_aborts(command: str, started: float) -> dict | None:
    """Keep the evidence of any Ray worker that aborted natively during the command (see
    dermray.ray_diagnostics); never the reason a command fails."""
    if "ray" not in sys.modules:  # the command never started Ray
        return None
    from dermray.ray_diagnostics import report_native_aborts

    try:
        return report_native_aborts(command, started)
    except Exception as error:  # noqa: BLE001 - a diagnostic must not turn a result into an error
        print(f"dermray {command}: warning: could not check Ray's worker logs for native aborts: {error}",
              file=sys.stderr)
        return None


if __name__ == "__main__":
    sys.exit(main())
