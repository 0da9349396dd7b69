"""The SQS gate and the GLU family, as plain functions.

    sqs(v)      = (v - c*sgn(v)) / (1 + lam*|v|^p)
    glu(w, v)   = w * gate(v)

Gates (`GATES`): `relu`, `gelu`, `swiglu` (w * silu(v)), `bilinear` (w * v) and
`sqs`. The aliases `silu`/`swish` (for `swiglu`) and `identity`/`linear` (for
`bilinear`) are accepted too, case-insensitively; `canonical_gate` maps them.

A thin façade: the formula, checks and vocabulary live in `sqs.core`, the
kernels in `sqs.ops`; this module picks the right one per gate and re-exports
the shared names (`GATES`, `DEFAULT_C`, `sqs_math`, ...) so user code needs one
import.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from sqs.core import (  # noqa: F401  (re-exported)
    DEFAULT_C,
    DEFAULT_LAM,
    DEFAULT_P,
    GATE_ALIASES,
    GATE_LABEL,
    GATES,
    canonical_gate,
    check_pair,
    check_sqs_params,
    sqs_grad_math,
    sqs_math,
    sqs_reference,
)
from sqs.ops import sqs, sqs_glu, sqs_glu_packed

__all__ = ["DEFAULT_C", "DEFAULT_LAM", "DEFAULT_P", "GATES", "GATE_ALIASES", "GATE_LABEL", "canonical_gate",
           "check_sqs_params", "gate_fn", "glu", "glu_packed", "sqs", "sqs_grad_math", "sqs_math", "sqs_reference"]


def gate_fn(gate: str, **gate_kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise gate as a function of v (a name in `GATES` or an alias; only `sqs`
    takes keyword arguments: c, lam, p)."""
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


def glu(w: torch.Tensor, v: torch.Tensor, gate: str = "sqs", **gate_kwargs) -> torch.Tensor:
    """w * gate(v) for a gate name or alias. For `sqs` this is the fused op (one pass, saves only w and v)."""
    check_pair(w, v)
    gate = canonical_gate(gate)
    if gate == "sqs":
        return sqs_glu(w, v, **gate_kwargs)
    return w * gate_fn(gate, **gate_kwargs)(v)


def glu_packed(x: torch.Tensor, gate: str = "sqs", **gate_kwargs) -> torch.Tensor:
    """glu(*x.chunk(2, -1), gate) for x = [w | v] from one fused [W; V] projection.

    For `sqs` the fused op reads x in place and returns its gradient in one piece,
    sparing the copy that joins dw and dv (see `sqs.ops.sqs_glu_packed`).
    """
    gate = canonical_gate(gate)
    if gate == "sqs":
        return sqs_glu_packed(x, **gate_kwargs)
    w, v = x.chunk(2, dim=-1)
    return glu(w, v, gate, **gate_kwargs)
