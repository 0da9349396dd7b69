"""The `sqs` command: one entry point, subcommands grouped by what they act on.

    sqs data fetch mnist|fashion-mnist|tinystories
    sqs train image|lm ...
    sqs experiment table1|spectra|tinystories
    sqs spectra decompose|compare|explain ...
    sqs generate RUN_DIR --prompt ...
    sqs bench ops|glu|head|lm
    sqs demo

Each module of this package registers its commands (`register(sub, groups)`), parses
arguments and calls a library function; none computes anything itself.
"""

from __future__ import annotations

import argparse
import sys

from sqs.cli import bench, data, demo, experiment, generate, spectra, train

GROUPS = {
    "data": "obtain and prepare datasets",
    "train": "train one run (a run directory)",
    "experiment": "run a paper experiment end to end and write results/",
    "spectra": "eigendecompose trained models and plot their features",
    "bench": "benchmarks that print ratios measured side by side",
}
MODULES = (data, bench, train, experiment, spectra, generate, demo)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqs", description="Signed Quadratic Shrink GLU toolkit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}
    for name, help_ in GROUPS.items():
        gp = sub.add_parser(name, help=help_, description=help_)
        groups[name] = gp.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for module in MODULES:
        module.register(sub, groups)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        out = args.func(args)
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs and checkpoints are kept; re-run the same command to resume",
              file=sys.stderr)
        return 130
    return int(out or 0)
