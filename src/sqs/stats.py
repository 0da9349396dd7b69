"""Mean ± std: the one way every table summarises repeated measurements (seeds, pairs, classes).

The std is the sample standard deviation (n − 1 in the denominator): the tables estimate the
spread of a gate's result over seeds from a handful of seeds, and the population form
(n in the denominator) understates it, by a factor sqrt((n − 1) / n), 0.82 for n = 3 and 0.71
for n = 2. Every table caption says "sample std".
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable

import numpy as np


def mean_std(values: Iterable[Any] | np.ndarray) -> dict:
    """{"mean", "std", "n"} of `values`, skipping None and NaN; `std` is the sample std (n − 1),
    None for fewer than two values; `mean` is None for none.

    A 2-D array (one row per repetition) is summarised per column: "mean", "std" and "n" are
    then lists (None where a column has too few values)."""
    if isinstance(values, np.ndarray) and values.ndim == 2:
        v = values.astype(np.float64)
    else:
        v = np.array([np.nan if x is None else float(x) for x in values], dtype=np.float64)
    n = (~np.isnan(v)).sum(0)
    with warnings.catch_warnings():  # empty or single-value columns: NaN -> None below
        warnings.simplefilter("ignore", RuntimeWarning)
        if np.isnan(v).any():
            mean, std = np.nanmean(v, 0), np.nanstd(v, 0, ddof=1)
        else:
            mean, std = np.mean(v, 0), np.std(v, 0, ddof=1)

    def plain(x, count) -> float | None:
        return None if count == 0 or np.isnan(x) else float(x)

    if v.ndim == 1:
        return {"mean": plain(mean, n), "std": plain(std, n - 1), "n": int(n)}
    return {"mean": [plain(x, c) for x, c in zip(mean, n)], "std": [plain(x, c - 1) for x, c in zip(std, n)],
            "n": n.tolist()}
