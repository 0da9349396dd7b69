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
    DTYPES,
    ConfigError,
    DEFAULT_C,
    DEFAULT_LAM,
    DEFAULT_P,
    GATE_ALIASES,
    GATE_LABEL,
    GATES,
    canonical_gate,
    check_pair,
    check_sqs_params,
    check_tensor,
    sqs_grad_math,
    sqs_math,
    sqs_reference,
)
from sqs.ops import sqs, sqs_glu, sqs_glu_packed

__all__ = ["DEFAULT_C", "DEFAULT_LAM", "DEFAULT_P", "DTYPES", "GATES", "GATE_ALIASES", "GATE_LABEL", "canonical_gate",
           "check_sqs_params", "gate_fn", "glu", "glu_packed", "sqs", "sqs_grad_math", "sqs_math", "sqs_reference"]


def _gate_kwargs(gate: str, gate_kwargs: dict) -> dict:
    """The gate's keyword arguments, complete and checked: only `sqs` takes any (c, lam, p)."""
    if gate != "sqs":
        if gate_kwargs:
            raise ConfigError(f"glu: gate {gate!r} takes no parameters, got {sorted(gate_kwargs)}")
        return {}
    unknown = set(gate_kwargs) - {"c", "lam", "p"}
    if unknown:
        raise ConfigError(f"glu: unknown sqs parameter(s) {sorted(unknown)}; valid: c, lam, p")
    kw = {"c": DEFAULT_C, "lam": DEFAULT_LAM, "p": DEFAULT_P, **gate_kwargs}
    check_sqs_params(**kw)
    return kw


def gate_fn(gate: str, **gate_kwargs) -> Callable[[torch.Tensor], torch.Tensor]:
    """The elementwise gate as a function of v (a name in `GATES` or an alias; only `sqs`
    takes keyword arguments: c, lam, p)."""
    gate = canonical_gate(gate)
    kw = _gate_kwargs(gate, gate_kwargs)
    if gate == "sqs":
        return lambda v: sqs(v, **kw)
    return {
        "relu": F.relu,
        "gelu": lambda v: F.gelu(v, approximate="none"),
        "swiglu": F.silu,
        "bilinear": lambda v: v,
    }[gate]


def glu(w: torch.Tensor, v: torch.Tensor, gate: str = "sqs", **gate_kwargs) -> torch.Tensor:
    """w * gate(v) for a gate name or alias. For `sqs` this is the fused op (one pass, saves only w and v).

    w and v: float16/bfloat16/float32/float64 tensors of one shape, dtype and device; they and
    the gate's parameters are checked, and a bad one is named."""
    check_pair(w, v)
    gate = canonical_gate(gate)
    if gate == "sqs":
        return sqs_glu(w, v, **_gate_kwargs(gate, gate_kwargs))
    return w * gate_fn(gate, **gate_kwargs)(v)


def glu_packed(x: torch.Tensor, gate: str = "sqs", **gate_kwargs) -> torch.Tensor:
    """glu(*x.chunk(2, -1), gate) for x = [w | v] from one fused [W; V] projection.

    For `sqs` the fused op reads x in place and returns its gradient in one piece,
    sparing the copy that joins dw and dv (see `sqs.ops.sqs_glu_packed`).
    """
    gate = canonical_gate(gate)
    if gate == "sqs":
        return sqs_glu_packed(x, **_gate_kwargs(gate, gate_kwargs))
    check_tensor("x", x, "glu_packed")
    if x.dim() == 0 or x.shape[-1] % 2:
        raise ConfigError(f"glu_packed: the last dim of `x` holds [w | v] and must be even, got shape "
                          f"{tuple(x.shape)}; pass w and v separately to glu instead")
    w, v = x.chunk(2, dim=-1)
    return glu(w, v, gate, **gate_kwargs)
