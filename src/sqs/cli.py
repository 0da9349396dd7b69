"""The `sqs` command: one entry point, subcommands grouped by what they act on.

    sqs data fetch mnist|fashion-mnist|tinystories
    sqs train image|lm ...
    sqs experiment table1|spectra|tinystories
    sqs spectra ...
    sqs generate RUN_DIR --prompt ...
    sqs bench ops|glu
    sqs demo

Each area registers its own commands (a `register(sub, groups)` function in the
modules listed below), so this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import sys

GROUPS = {
    "data": "obtain and prepare datasets",
    "train": "train one run (a run directory)",
    "experiment": "run a paper experiment end to end and write results/",
    "spectra": "eigendecompose trained models and plot their features",
    "bench": "benchmarks that print ratios measured side by side",
}

COMMAND_MODULES = [
    "sqs.data.commands",
    "sqs.bench.commands",
    "sqs.experiments.image_commands",
    "sqs.experiments.lm_commands",
    "sqs.interp.commands",
    "sqs.experiments.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqs", description="Signed Quadratic Shrink GLU toolkit")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}
    for name, help_ in GROUPS.items():
        gp = sub.add_parser(name, help=help_, description=help_)
        groups[name] = gp.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for mod in COMMAND_MODULES:
        try:
            module = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name == mod:  # the area is not installed in this build
                continue
            raise
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


if __name__ == "__main__":
    sys.exit(main())
