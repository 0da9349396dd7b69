"""Argument helpers shared by the command modules: gate names, `--set`, `--runs-dir`, range-checked numbers,
and where a grid's runs execute and log (`add_grid_launch`, `grid_launch`; `add_logger` for one run).

Every numeric flag goes through one of the `type=` checkers below, so a value out of range
(`--epochs 0`, `--top-k -3`, `--temperature nan`) is refused at parse time with one line that
names the flag and the valid range, before anything runs or is written. Folder flags
(`--run-dir`, `--runs-dir`, a RUN_DIR argument) go through `folder`: an empty path, which
would mean the current folder, is refused the same way.
"""

from __future__ import annotations

import argparse
import math
from typing import Callable

from sqs.core import GATE_ALIASES, GATES, canonical_gate
from sqs.training.rundir import ALLOWED_CHANGES

RUNS_HELP = ("runs folder: each run goes to RUNS_DIR/<config>/<dataset>/<gate>[-<params>]-s<seed>, named by its "
             "config (default: %(default)s)")


def folder(text: str) -> str:
    """argparse type: a folder path that is not empty (`--run-dir ""` would be the current folder)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder, got an empty path")
    return text


def gate(name: str) -> str:
    """argparse type: a gate by its paper name or an alias (`silu`, `identity`), as the paper's name."""
    try:
        return canonical_gate(name)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


GATE_HELP = f"one of {', '.join(GATES)} (aliases: {', '.join(GATE_ALIASES)})"


def add_gate(p: argparse.ArgumentParser, *flags: str, **kw) -> None:
    """A gate option: choices listed as the paper's names, aliases accepted."""
    kw.setdefault("metavar", "GATE")
    kw["help"] = (kw.get("help", "GLU gate") + f"; {GATE_HELP}")
    p.add_argument(*flags, type=gate, choices=list(GATES), **kw)


def add_set(p: argparse.ArgumentParser, example: str) -> None:
    """The one override syntax: --set dotted.key=TOML value (repeatable)."""
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a config key, dotted for tables, value in TOML syntax (repeatable), e.g. {example}")


def add_allow_change(p: argparse.ArgumentParser) -> None:
    """`--allow-change KEY` (repeatable): a setting that may differ from the run's config on resume."""
    p.add_argument("--allow-change", action="append", default=[], choices=ALLOWED_CHANGES, metavar="KEY",
                   help=f"on resume, accept a changed setting (repeatable; one of {', '.join(ALLOWED_CHANGES)}), "
                        "e.g. a lower --set train.lr after a NaN; each change is recorded in history.jsonl")


# ----------------------------------------------------------------------------- numbers


def _number(kind: type, text: str) -> int | float:
    try:
        val = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{'an integer' if kind is int else 'a number'} expected, "
                                         f"got {text!r}") from None
    if kind is float and not math.isfinite(val):
        raise argparse.ArgumentTypeError(f"a finite number expected, got {text!r}")
    return val


def bounded(kind: type, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
            name: str | None = None) -> Callable[[str], int | float]:
    """argparse type: an int or finite float in [lo, hi] ((lo, hi] with `lo_open`)."""
    if name is None:
        rule = []
        if lo is not None:
            rule.append(f"{'>' if lo_open else '>='} {lo:g}")
        if hi is not None:
            rule.append(f"<= {hi:g}")
        name = ("an integer" if kind is int else "a number") + (" " + " and ".join(rule) if rule else "")

    def check(text: str) -> int | float:
        val = _number(kind, text)
        if (lo is not None and (val < lo or (lo_open and val == lo))) or (hi is not None and val > hi):
            raise argparse.ArgumentTypeError(f"must be {name}, got {text}")
        return val

    check.__name__ = name  # argparse names the type in some messages
    return check


positive_int = bounded(int, 1)
nonneg_int = bounded(int, 0)
positive_float = bounded(float, 0, lo_open=True)
nonneg_float = bounded(float, 0)


# ----------------------------------------------------------------------------- where runs execute, where they log


def loggers(text: str) -> tuple[str, ...]:
    """argparse type: a comma list of loggers (`jsonl,tensorboard,wandb`); jsonl is always kept."""
    from sqs.training.loggers import parse_loggers

    try:
        return parse_loggers(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from e


def add_logger(p: argparse.ArgumentParser) -> None:
    """`--logger jsonl|tensorboard|wandb` (a comma list): where training curves go."""
    from sqs.training.loggers import LOGGERS

    p.add_argument("--logger", type=loggers, default=("jsonl",), metavar="NAMES",
                   help=f"where training curves go, a comma list of {', '.join(LOGGERS)} (default: jsonl, the "
                        "run's metrics.jsonl, always written); tensorboard: event files in RUN/tensorboard "
                        "(pip install 'sqs[tensorboard]'); wandb: a W&B run per run directory, WANDB_MODE=offline "
                        "works without an account (pip install 'sqs[wandb]')")


def add_grid_launch(p: argparse.ArgumentParser) -> None:
    """The flags of every grid command for where its runs execute and where they log:
    `--launcher local|ray`, `--cpus-per-run`, `--gpus-per-run`, `--ray-address`, `--logger`.
    Read them back with `grid_launch(args)`."""
    g = p.add_argument_group("where the runs execute (docs/scale-out.md)")
    g.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="local: this machine's process pool (default); ray: each run a Ray task, on a local Ray "
                        "or the cluster at --ray-address / $RAY_ADDRESS (pip install 'sqs[ray]')")
    g.add_argument("--cpus-per-run", type=positive_float, default=None, metavar="N",
                   help="with --launcher ray: CPUs each run reserves, also its torch threads (default 1)")
    g.add_argument("--gpus-per-run", type=nonneg_float, default=None, metavar="N",
                   help="with --launcher ray: GPUs each run reserves (default 0; fractions share a GPU)")
    g.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="with --launcher ray: the cluster to join (default $RAY_ADDRESS, else a local Ray of "
                        "--workers x --cpus-per-run CPUs)")
    add_logger(g)


def grid_launch(args: argparse.Namespace) -> dict:
    """The keywords `launcher`, `launcher_options` and `loggers` that the grid functions take
    (`run_grid`, `run_table1`, `run_frontier`, the TinyStories experiment), from the flags of
    `add_grid_launch`. What they need is imported now, so a missing package (Ray, tensorboardX,
    wandb) is one line naming its pip extra before any run starts."""
    from sqs.io import ConfigError
    from sqs.training.loggers import check_loggers

    names = tuple(getattr(args, "logger", None) or ("jsonl",))
    check_loggers(names)
    ray_only = {"--cpus-per-run": args.cpus_per_run, "--gpus-per-run": args.gpus_per_run,
                "--ray-address": args.ray_address}
    if args.launcher != "ray":
        given = [flag for flag, val in ray_only.items() if val is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} only apply to --launcher ray; add --launcher ray or drop them")
        return {"launcher": None, "launcher_options": None, "loggers": names}
    from sqs.runs.ray_launcher import require_ray

    require_ray()
    return {"launcher": "ray", "loggers": names,
            "launcher_options": {"address": args.ray_address, "cpus_per_run": args.cpus_per_run or 1.0,
                                 "gpus_per_run": args.gpus_per_run or 0.0}}


def grid_threads(args: argparse.Namespace, launch: dict) -> int:
    """Torch threads per run: --threads if given, else the CPUs a Ray run reserves, else 1."""
    if getattr(args, "threads", None):
        return args.threads
    opts = launch.get("launcher_options") or {}
    return max(1, int(opts.get("cpus_per_run", 1)))
