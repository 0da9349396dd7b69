"""The SQS gate alone, sqs(x), as an autograd Function (the GLU product is fused in `fused_glu`)."""

from __future__ import annotations

import torch

from sqs.core import (DEFAULT_C, DEFAULT_LAM, DEFAULT_P, check_tensor, compute_dtype, gate_constants, gate_value,
                      gate_value_and_grad)


class SQSFunction(torch.autograd.Function):
    """Elementwise gate; saves only its input and recomputes in backward.

    `kind` and `k` are the kernel form and constants from `sqs.core.gate_constants`.
    """

    @staticmethod
    def forward(ctx, v: torch.Tensor, kind: str, k: tuple) -> torch.Tensor:
        ctx.save_for_backward(v)
        ctx.gate = (kind, k)
        vc = v.to(compute_dtype(v.dtype))
        return gate_value(vc, kind, k, v.dtype).to(v.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (v,) = ctx.saved_tensors
        cd = compute_dtype(v.dtype)
        dv = g.to(cd) * gate_value_and_grad(v.to(cd), *ctx.gate, v.dtype)[1]
        return dv.to(v.dtype), None, None


def sqs(x: torch.Tensor, c: float = DEFAULT_C, lam: float = DEFAULT_LAM, p: float = DEFAULT_P) -> torch.Tensor:
    """The SQS gate, elementwise, for any shape and float16/bfloat16/float32/float64.

    Finite for finite x (values beyond the dtype's range saturate), its limits at +-inf
    (1/lam for p = 1, 0 for p > 1, inf for p < 1 or lam = 0), NaN only where x is NaN;
    the same for its gradient (docs/gate.md).
    """
    check_tensor("x", x, "sqs")
    kind, k = gate_constants(c, lam, p, x.dtype)
    return SQSFunction.apply(x, kind, k)
