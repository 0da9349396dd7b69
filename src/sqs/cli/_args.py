"""Argument helpers shared by the command modules."""

from __future__ import annotations

import argparse

from sqs.functional import GATE_ALIASES, GATES, canonical_gate


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
