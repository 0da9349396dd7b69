"""How the reports show gates, datasets and numbers (labels, colours, orders, formats), and how
experiments talk to the user while they work (`say`): one place."""

from __future__ import annotations

import math
import sys
import time
from pathlib import Path
from typing import Any

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


class ProgressLog:
    """One line per finished run (appended to a text file), with the rate and the ETA."""

    def __init__(self, path: str | Path | None, total: int, skipped: int, workers: int):
        self.path = Path(path) if path else None
        self.total, self.skipped, self.done, self.failed = total, skipped, 0, 0
        self.t0 = time.perf_counter()
        self.write(f"start: {total} runs, {skipped} finished already, {total - skipped} to train "
                   f"({workers} worker(s))")

    def write(self, line: str) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:  # append-only log: one whole line per write
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")

    def __call__(self, name: str, ok: bool, info: Any) -> None:
        self.done += 1
        self.failed += not ok
        elapsed = time.perf_counter() - self.t0
        left = self.total - self.skipped - self.done
        rate = self.done / elapsed * 60 if elapsed > 0 else 0.0
        eta = left / (self.done / elapsed) if self.done and elapsed > 0 else float("nan")
        if ok and info.get("test_acc") is not None:
            what = f"acc {info['test_acc']:.4f} loss {info['test_loss']:.4f} in {info['wall_s']:.0f} s"
        elif ok and info.get("val_loss") is not None:
            what = f"val loss {info['val_loss']:.4f} in {info['wall_s']:.0f} s"
        else:
            what = "ok" if ok else "FAILED (re-run to retry)"
        self.write(f"[{self.skipped + self.done}/{self.total}] {name}: {what} | {rate:.2f} runs/min, "
                   f"{left} left, ETA {hms(eta)}")


def hms(s: float) -> str:
    """Seconds as h:mm:ss (`?` for NaN: an ETA not known yet)."""
    if s != s:  # NaN
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
