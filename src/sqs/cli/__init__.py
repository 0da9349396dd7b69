"""The `sqs` command: one entry point, subcommands grouped by what they act on.

    sqs data fetch mnist|fashion-mnist|tinystories|smollm2|shakespeare   (sqs.cli.data_commands)
    sqs train image|lm ...                                 (sqs.cli.train_commands)
    sqs experiment table1|spectra|frontier|tinystories|lm-spectra   (sqs.cli.experiment_commands)
    sqs spectra decompose|compare|explain|lm ...           (sqs.cli.spectra_commands)
    sqs generate RUN_DIR --prompt ...                      (sqs.cli.generate_command)
    sqs convert run|report ...                             (sqs.cli.convert_commands)
    sqs read MODEL --out DIR                               (sqs.cli.read_commands)
    sqs bench ops|glu|head|lm|hf                           (sqs.cli.bench_commands)
    sqs demo                                               (sqs.cli.demo_command)

Each module of this package registers its commands (`register(sub, groups)`), parses
arguments and calls a library function; none computes anything itself.

Errors a person can fix are printed as ONE line on stderr, exit status 2, no traceback
(`sqs --debug ...` or SQS_DEBUG=1 shows it): a flag out of range (refused by argparse before
anything runs), every `sqs.io.UserError` (config, run directory, checkpoint, data) and every
OS error that names a file (missing, unreadable, read-only, no space, quota, ...).
`TrainingDiverged` exits with status 1, Ctrl-C with 130, SIGTERM (a stop like Ctrl-C: the save in
progress completes) with 143. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import traceback

from sqs.cli import (
    bench_commands,
    convert_commands,
    data_commands,
    demo_command,
    experiment_commands,
    generate_command,
    read_commands,
    spectra_commands,
    train_commands,
)

GROUPS = {
    "data": "obtain and prepare datasets",
    "train": "train one run (a run directory)",
    "experiment": "run a paper experiment end to end and write results/",
    "spectra": "eigendecompose trained models and plot their features",
    "bench": "benchmarks that print ratios measured side by side",
}
MODULES = (data_commands, bench_commands, train_commands, experiment_commands, spectra_commands, generate_command,
           demo_command, convert_commands, read_commands)


# Errors of the file system that a person fixes (a path that is not there, not readable or
# not writable); their message names the file. Any other OSError that names a file (read-only
# file system, no space, quota, ...) is one too.
FILE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError)

# What to do about an OS error on a file outside a run directory (those inside one are
# RunFileErrors, with their own fix), by errno.
_OS_FIXES = {
    errno.ENOSPC: "free space there, then re-run the same command (finished work is kept)",
    errno.EDQUOT: "free space within your disk quota, then re-run the same command (finished work is kept)",
    errno.EROFS: "choose a writable location (data cache: --cache-dir DIR or $SQS_CACHE_DIR; a run: --run-dir DIR; "
                 "a report: --out DIR)",
}


class Parser(argparse.ArgumentParser):
    """argparse, with a usage error printed as one line (the flag, the problem, where to look)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="sqs", description="Signed Quadratic Shrink GLU toolkit")
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: environment SQS_DEBUG=1)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    groups = {}
    for name, help_ in GROUPS.items():
        gp = sub.add_parser(name, help=help_, description=help_)
        groups[name] = gp.add_subparsers(dest="subcommand", required=True, metavar="SUBCOMMAND")
    for module in MODULES:
        module.register(sub, groups)
    return parser


def one_line(message: str) -> str:
    """A message as one line (a multi-line message's lines joined with '; ')."""
    return "; ".join(part.strip() for part in str(message).splitlines() if part.strip())


def user_message(err: BaseException) -> str | None:
    """The one-line message of an error a person can fix, else None (a bug: keep the traceback)."""
    from sqs.io import UserError

    if isinstance(err, UserError):
        return one_line(str(err))
    if isinstance(err, FILE_ERRORS) or (isinstance(err, OSError) and err.filename is not None and err.errno):
        if err.filename is not None:
            what = (err.strerror or type(err).__name__).lower()
            if isinstance(err, PermissionError):
                what += ("; make it writable or choose another location (data cache: --cache-dir DIR or "
                         "$SQS_CACHE_DIR; a run: --run-dir DIR)")
            elif err.errno in _OS_FIXES:
                what += f"; {_OS_FIXES[err.errno]}"
            return one_line(f"{os.fsdecode(err.filename)}: {what}")
        return one_line(str(err))
    return None


def main(argv: list[str] | None = None) -> int:
    """Run the `sqs` command with `argv` (default sys.argv[1:]); return the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error, already printed as one line (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    debug = args.debug or os.environ.get("SQS_DEBUG", "").strip() not in ("", "0")
    from sqs.training.signals import Terminated, graceful_sigterm

    try:
        with graceful_sigterm():  # SIGTERM (SLURM, Kubernetes, `kill`) stops like Ctrl-C
            out = args.func(args)
    except Terminated:
        print("\nsqs: stopped by SIGTERM: finished runs and checkpoints are kept (a save in progress was completed "
              "or removed); re-run the same command to resume", file=sys.stderr)
        return Terminated.exit_status
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs and checkpoints are kept; re-run the same command to resume",
              file=sys.stderr)
        return 130
    except Exception as e:
        from sqs.training.distributed import is_rank0
        from sqs.training.trainer import TrainingDiverged

        if isinstance(e, TrainingDiverged):
            code, msg = 1, one_line(str(e))
        else:
            code, msg = 2, user_message(e)
            if msg is None:
                raise  # a bug: the traceback is the useful report
        if debug:
            traceback.print_exc()
        if is_rank0():
            print(f"sqs: error: {msg}", file=sys.stderr)
        return code
    return int(out or 0)
