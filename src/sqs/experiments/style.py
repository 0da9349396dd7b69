"""How the reports show gates and datasets: labels, colours, orders, number formats (one place)."""

from __future__ import annotations

import math

from sqs.functional import GATE_LABEL, GATES, canonical_gate  # noqa: F401 - re-exported for the reports

GATE_COLOR = {"relu": "tab:blue", "gelu": "tab:orange", "swiglu": "tab:green", "bilinear": "tab:purple",
              "sqs": "tab:red"}
DATASET_ORDER = ("mnist", "fashion-mnist")
DATASET_LABEL = {"mnist": "MNIST", "fashion-mnist": "Fashion-MNIST"}
DATASET_SHORT = {"mnist": "MNIST", "fashion-mnist": "F-MNIST"}


def fmt(x: float | None, nd: int = 4) -> str:
    """A number with `nd` decimals, or an em dash for a missing (None / NaN) value."""
    return "—" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def gate_label(gate: str) -> str:
    """The paper's label of a gate given by any accepted name (`identity` -> `Bilinear`)."""
    try:
        return GATE_LABEL[canonical_gate(gate)]
    except ValueError:
        return gate
