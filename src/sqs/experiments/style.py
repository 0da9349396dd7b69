"""How the reports show gates, datasets and numbers (labels, colours, orders, formats), and how
experiments talk to the user while they work (`say`): one place."""

from __future__ import annotations

import math
import sys

from sqs.core import GATE_LABEL, canonical_gate

GATE_COLOR = {"relu": "tab:blue", "gelu": "tab:orange", "swiglu": "tab:green", "bilinear": "tab:purple",
              "sqs": "tab:red"}
DATASET_ORDER = ("mnist", "fashion-mnist")
DATASET_LABEL = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
DATASET_SHORT = {"mnist": "MNIST", "fashion-mnist": "F-MNIST"}
#: The words every table caption uses for its ± (the std of `sqs.stats.mean_std`).
STD_NOTE = "mean ± sample std (n − 1)"


def fmt(x: float | None, nd: int = 4) -> str:
    """A number with `nd` decimals, or an em dash for a missing (None / NaN) value."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def pm(stat: dict | None, nd: int = 4) -> str:
    """A `sqs.stats.mean_std` result as `mean ± std` (`mean` alone for one value, — for none)."""
    if not stat or stat.get("mean") is None:
        return "—"
    if stat.get("std") is None:
        return f"{stat['mean']:.{nd}f}"
    return f"{stat['mean']:.{nd}f} ± {stat['std']:.{nd}f}"


def gate_label(gate: str) -> str:
    """The paper's label of a gate given by any accepted name (`identity` -> `Bilinear`)."""
    try:
        return GATE_LABEL[canonical_gate(gate)]
    except ValueError:
        return gate


def say(msg: str) -> None:
    """A progress line of an experiment, on stderr (stdout keeps what the command prints as its result)."""
    print(msg, file=sys.stderr, flush=True)

