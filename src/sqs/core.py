"""The SQS gate's definition and the rules every layer above shares.

    sqs(v)  = (v - c*sgn(v)) / (1 + lam*|v|^p)
    sqs'(v) = [1 + lam*(1-p)*|v|^p + lam*p*c*|v|^(p-1)] / (1 + lam*|v|^p)^2

This module is the bottom floor of the package (it imports only torch and the
standard library): the formula (`sqs_math`, `sqs_grad_math`, `sqs_reference`),
the parameter and argument checks, the dtype rule, the gate vocabulary and a
TOML loader that works on every supported Python. The kernels in `sqs.ops`, the
functions in `sqs.functional` and the modules in `sqs.nn` all take them from
here, so a reader checks the maths and the names in one place.

Conventions (see docs/ for the choices the paper leaves open): sgn(0) = 0, so sqs
is odd and sqs(0) = 0. The jump of size 2c at 0 carries no gradient (as ReLU's
kink); the derivative at v = 0 is the p = 1 limit 1 + lam*c for p = 1 and 1
otherwise (for p < 1 the one-sided derivative diverges; we take the finite value
rather than return inf).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, Union

import torch

if sys.version_info >= (3, 11):
    import tomllib as _toml
else:  # Python 3.10: the same parser, packaged as `tomli` (a dependency there)
    import tomli as _toml

DEFAULT_C = 0.01
DEFAULT_LAM = 0.5
DEFAULT_P = 1.0

#: The paper's gate names, used everywhere a user sees a gate (flags, run directories, JSON keys,
#: tables, plots, benchmark rows).
GATES = ("relu", "gelu", "swiglu", "bilinear", "sqs")
#: How a gate is written in tables and plot legends.
GATE_LABEL = {"relu": "ReLU", "gelu": "GELU", "swiglu": "SwiGLU", "bilinear": "Bilinear", "sqs": "SQS"}
#: Also accepted by the Python API and the CLI, mapped to the names above: `silu` (and `swish`) is
#: SwiGLU's gate, `identity` (and `linear`) the bilinear GLU's.
GATE_ALIASES = {"silu": "swiglu", "swish": "swiglu", "identity": "bilinear", "linear": "bilinear"}

Scalar = Union[float, torch.Tensor]  # c, lam, p: numbers, or 0-d tensors in compiled kernels


def canonical_gate(name: str) -> str:
    """Map a gate name or alias (case-insensitive) to its name in `GATES`; raise naming the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"glu: `gate` must be a string, got {type(name).__name__}")
    key = name.lower()
    key = GATE_ALIASES.get(key, key)
    if key not in GATES:
        valid = ", ".join(GATES + tuple(GATE_ALIASES))
        raise ValueError(f"glu: unknown `gate` {name!r}; choose one of: {valid}")
    return key


def check_sqs_params(c: float, lam: float, p: float) -> None:
    """Reject hyperparameters the formula does not define, naming the argument."""
    for name, val in (("c", c), ("lam", lam), ("p", p)):
        if isinstance(val, torch.Tensor):
            raise TypeError(f"sqs: `{name}` must be a Python number, got a tensor")
        if not math.isfinite(float(val)):
            raise ValueError(f"sqs: `{name}` must be finite, got {val}")
    if p <= 0:
        raise ValueError(f"sqs: `p` must be > 0 (|v|^p shrinks the gate), got p={p}")
    if lam < 0:
        raise ValueError(f"sqs: `lam` must be >= 0 (a negative lam makes 1 + lam|v|^p cross zero), got lam={lam}")


def check_pair(w: torch.Tensor, v: torch.Tensor) -> None:
    """The two GLU branches must agree in shape, dtype and device; raise naming the mismatch."""
    if w.shape != v.shape:
        raise ValueError(f"glu: `w` and `v` must have the same shape, got w {tuple(w.shape)} and v {tuple(v.shape)}")
    if w.dtype != v.dtype:
        raise ValueError(f"glu: `w` and `v` must have the same dtype, got {w.dtype} and {v.dtype}")
    if w.device != v.device:
        raise ValueError(f"glu: `w` and `v` must be on the same device, got {w.device} and {v.device}")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are evaluated in float32 and rounded once at the end."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _is_one(p: Scalar) -> bool:
    return not isinstance(p, torch.Tensor) and p == 1.0


def sqs_math(v: torch.Tensor, c: Scalar, lam: Scalar, p: Scalar) -> torch.Tensor:
    """sqs(v) in v's dtype (no upcast; callers handle half precision).

    c, lam, p may be Python floats or 0-d tensors (the compiled op passes tensors so
    that new values do not trigger recompilation). With c = lam = 0 this is exactly v.
    """
    a = v.abs()
    den = 1.0 + lam * (a if _is_one(p) else a.pow(p))
    return (v - c * torch.sign(v)) / den


def sqs_grad_math(v: torch.Tensor, c: Scalar, lam: Scalar, p: Scalar) -> torch.Tensor:
    """sqs'(v), with the value at v = 0 defined as in the module docstring."""
    a = v.abs()
    if _is_one(p):
        den = 1.0 + lam * a
        return (1.0 + lam * c) / (den * den)
    ap = a.pow(p)
    den = 1.0 + lam * ap
    # |v|^(p-1) at v = 0: 0 for p > 1 (true limit), and 0 for p < 1 by convention.
    a_pm1 = torch.where(a > 0, a.pow(p - 1.0), torch.zeros_like(a))
    return (1.0 + lam * (1.0 - p) * ap + lam * p * c * a_pm1) / (den * den)


def sqs_reference(x: torch.Tensor, c: float = DEFAULT_C, lam: float = DEFAULT_LAM, p: float = DEFAULT_P) -> torch.Tensor:
    """The formula written naively with autograd through every op: the baseline the
    fused paths are checked against and the `naive` row of the benchmarks."""
    return (x - c * torch.sign(x)) / (1 + lam * x.abs() ** p)


def load_toml(path: str | Path | Any) -> dict[str, Any]:
    """Parse a TOML file (`tomllib` on Python >= 3.11, `tomli` before); errors name the file.

    `path` is a filesystem path or anything with `.open("rb")`, e.g. an
    `importlib.resources.files(...)` entry for a config shipped in the package.
    """
    if isinstance(path, str):
        path = Path(path)
    with path.open("rb") as f:
        try:
            return _toml.load(f)
        except _toml.TOMLDecodeError as e:
            raise ValueError(f"{path}: not valid TOML ({e}); fix the file's syntax") from e
