"""The SQS gate alone, sqs(x), as an autograd Function (the GLU product is fused in `fused_glu`)."""

from __future__ import annotations

import torch

from sqs.core import DEFAULT_C, DEFAULT_LAM, DEFAULT_P, check_sqs_params, compute_dtype, sqs_grad_math, sqs_math


class SQSFunction(torch.autograd.Function):
    """Elementwise gate; saves only its input and recomputes in backward."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, c: float, lam: float, p: float) -> torch.Tensor:
        ctx.save_for_backward(v)
        ctx.params = (c, lam, p)
        vc = v.to(compute_dtype(v.dtype))
        return sqs_math(vc, c, lam, p).to(v.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (v,) = ctx.saved_tensors
        cd = compute_dtype(v.dtype)
        dv = g.to(cd) * sqs_grad_math(v.to(cd), *ctx.params)
        return dv.to(v.dtype), None, None, None


def sqs(x: torch.Tensor, c: float = DEFAULT_C, lam: float = DEFAULT_LAM, p: float = DEFAULT_P) -> torch.Tensor:
    """The SQS gate, elementwise, for any shape and float16/bfloat16/float32/float64."""
    check_sqs_params(c, lam, p)
    if not x.is_floating_point():
        raise TypeError(f"sqs: `x` must be a floating-point tensor, got {x.dtype}")
    return SQSFunction.apply(x, float(c), float(lam), float(p))
