"""The SQS gate and the GLU family, as plain functions.

    sqs(v)      = (v - c*sgn(v)) / (1 + lam*|v|^p)
    sqs'(v)     = [1 + lam*(1-p)*|v|^p + lam*p*c*|v|^(p-1)] / (1 + lam*|v|^p)^2
    glu(w, v)   = w * gate(v)

The formulas live once, in `sqs_math` and `sqs_grad_math`; the eager autograd
Function below, the fused GLU op (`sqs.ops`) and the benchmarks all call them, so
a reader checks the math in one place.

Conventions (SPEC §1): sgn(0) = 0, so sqs is odd and sqs(0) = 0. The jump of
size 2c at 0 carries no gradient (as ReLU's kink); the derivative at v = 0 is the
p = 1 limit 1 + lam*c for p = 1 and 1 otherwise (for p < 1 the one-sided
derivative diverges; we take the finite value rather than return inf).
"""

from __future__ import annotations

import math
from typing import Callable, Union

import torch
import torch.nn.functional as F

DEFAULT_C = 0.01
DEFAULT_LAM = 0.5
DEFAULT_P = 1.0

#: The paper's gate names, used everywhere a user sees a gate (flags, run directories, JSON keys,
#: tables, plots, benchmark rows).
GATES = ("relu", "gelu", "swiglu", "bilinear", "sqs")
#: How a gate is written in tables and plot legends.
GATE_LABEL = {"relu": "ReLU", "gelu": "GELU", "swiglu": "SwiGLU", "bilinear": "Bilinear", "sqs": "SQS"}
#: Accepted by the Python API and the CLI, mapped to the names above.
GATE_ALIASES = {"silu": "swiglu", "swish": "swiglu", "identity": "bilinear", "linear": "bilinear"}


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


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision inputs are evaluated in float32 and rounded once at the end."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


Scalar = Union[float, torch.Tensor]


def _is_one(p) -> bool:
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


class _SQSFunction(torch.autograd.Function):
    """Elementwise gate; saves only its input and recomputes in backward."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, c: float, lam: float, p: float) -> torch.Tensor:
        ctx.save_for_backward(v)
        ctx.params = (c, lam, p)
        vc = v.to(_compute_dtype(v.dtype))
        return sqs_math(vc, c, lam, p).to(v.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (v,) = ctx.saved_tensors
        cd = _compute_dtype(v.dtype)
        dv = g.to(cd) * sqs_grad_math(v.to(cd), *ctx.params)
        return dv.to(v.dtype), None, None, None


def sqs(x: torch.Tensor, c: float = DEFAULT_C, lam: float = DEFAULT_LAM, p: float = DEFAULT_P) -> torch.Tensor:
    """The SQS gate, elementwise, for any shape and float16/bfloat16/float32/float64."""
    check_sqs_params(c, lam, p)
    if not x.is_floating_point():
        raise TypeError(f"sqs: `x` must be a floating-point tensor, got {x.dtype}")
    return _SQSFunction.apply(x, float(c), float(lam), float(p))


def sqs_reference(x: torch.Tensor, c: float = DEFAULT_C, lam: float = DEFAULT_LAM, p: float = DEFAULT_P) -> torch.Tensor:
    """The formula written naively with autograd through every op: the baseline the
    fused paths are checked and benchmarked against ("naive eager")."""
    return (x - c * torch.sign(x)) / (1 + lam * x.abs() ** p)


def canonical_gate(name: str) -> str:
    """Map a gate name or alias to its canonical name; raise naming the valid ones."""
    if not isinstance(name, str):
        raise TypeError(f"glu: `gate` must be a string, got {type(name).__name__}")
    key = name.lower()
    key = GATE_ALIASES.get(key, key)
    if key not in GATES:
        valid = ", ".join(GATES + tuple(GATE_ALIASES))
        raise ValueError(f"glu: unknown `gate` {name!r}; choose one of: {valid}")
    return key


def gate_fn(gate: str, **gate_kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise gate as a function of v (only `sqs` takes keyword arguments)."""
    gate = canonical_gate(gate)
    if gate != "sqs" and gate_kwargs:
        raise ValueError(f"glu: gate {gate!r} takes no parameters, got {sorted(gate_kwargs)}")
    if gate == "sqs":
        unknown = set(gate_kwargs) - {"c", "lam", "p"}
        if unknown:
            raise ValueError(f"glu: unknown sqs parameter(s) {sorted(unknown)}; valid: c, lam, p")
        kw = {"c": DEFAULT_C, "lam": DEFAULT_LAM, "p": DEFAULT_P, **gate_kwargs}
        check_sqs_params(**kw)
        return lambda v: sqs(v, **kw)
    return {
        "relu": F.relu,
        "gelu": lambda v: F.gelu(v, approximate="none"),
        "swiglu": F.silu,
        "bilinear": lambda v: v,
    }[gate]


def _check_pair(w: torch.Tensor, v: torch.Tensor) -> None:
    if w.shape != v.shape:
        raise ValueError(f"glu: `w` and `v` must have the same shape, got w {tuple(w.shape)} and v {tuple(v.shape)}")
    if w.dtype != v.dtype:
        raise ValueError(f"glu: `w` and `v` must have the same dtype, got {w.dtype} and {v.dtype}")
    if w.device != v.device:
        raise ValueError(f"glu: `w` and `v` must be on the same device, got {w.device} and {v.device}")


def glu(w: torch.Tensor, v: torch.Tensor, gate: str = "sqs", **gate_kwargs) -> torch.Tensor:
    """w * gate(v). For `sqs` this is the fused op (one pass, saves only w and v)."""
    _check_pair(w, v)
    gate = canonical_gate(gate)
    if gate == "sqs":
        from sqs.ops import sqs_glu

        return sqs_glu(w, v, **gate_kwargs)
    return w * gate_fn(gate, **gate_kwargs)(v)


def glu_packed(x: torch.Tensor, gate: str = "sqs", **gate_kwargs) -> torch.Tensor:
    """glu(*x.chunk(2, -1), gate) for x = [w | v] from one fused [W; V] projection.

    For `sqs` the fused op reads x in place and returns its gradient in one piece,
    sparing the copy that joins dw and dv (see `sqs.ops.sqs_glu_packed`).
    """
    gate = canonical_gate(gate)
    if gate == "sqs":
        from sqs.ops import sqs_glu_packed

        return sqs_glu_packed(x, **gate_kwargs)
    w, v = x.chunk(2, dim=-1)
    return glu(w, v, gate, **gate_kwargs)
