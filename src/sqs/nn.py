"""Thin nn.Module wrappers over `sqs.functional` and `sqs.ops`.

`gate` takes a name in `sqs.functional.GATES` (`relu`, `gelu`, `swiglu`, `bilinear`,
`sqs`) or an alias (`silu`, `identity`); the module stores the canonical name.
"""

from __future__ import annotations

import torch
from torch import nn

from sqs.core import (DEFAULT_C, DEFAULT_LAM, DEFAULT_P, ArgumentTypeError, ConfigError, canonical_gate, check_tensor,
                      sqs_params)
from sqs.functional import gate_fn, glu_packed, sqs


class SQS(nn.Module):
    """The SQS gate as an activation module.

    Drop-in wherever a library takes an activation module, e.g. the `act_fn` of a
    Llama-style gated MLP `down(act(gate(x)) * up(x))`. (There the product with
    `up(x)` happens outside the module, so the fused op is not used; `GLU` below
    fuses it.)
    """

    def __init__(self, c: float = DEFAULT_C, lam: float = DEFAULT_LAM, p: float = DEFAULT_P):
        super().__init__()
        self.c, self.lam, self.p = sqs_params(c, lam, p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sqs(x, self.c, self.lam, self.p)

    def extra_repr(self) -> str:
        return f"c={self.c}, lam={self.lam}, p={self.p}"


class GLU(nn.Module):
    """y = P[(W x) * gate(V x)] with W and V in one fused input projection.

    `d_out=None` means no output projection (the layer returns the d_hidden gated
    product; `P` is then None). W and V are stacked as rows [W; V] of `proj.weight`,
    so one matmul produces both; the fused SQS op reads that output as it is and
    returns its gradient in one piece (`sqs.ops.sqs_glu_packed`).
    """

    def __init__(self, d_in: int, d_hidden: int, d_out: int | None = None, gate: str = "sqs",
                 bias: bool = False, **gate_kwargs):
        super().__init__()
        for name, val in (("d_in", d_in), ("d_hidden", d_hidden), ("d_out", d_out)):
            if val is None and name == "d_out":
                continue
            if isinstance(val, bool) or not isinstance(val, int) or val <= 0:
                extra = " or None" if name == "d_out" else ""
                raise ConfigError(f"GLU: `{name}` must be a positive int{extra}, got {val!r}")
        if not isinstance(bias, bool):
            raise ArgumentTypeError(f"GLU: `bias` must be True or False, got {bias!r}")
        self.gate = canonical_gate(gate)
        gate_fn(self.gate, **gate_kwargs)  # validates the kwargs now, not at first forward
        self.gate_kwargs = dict(gate_kwargs)
        self.d_in, self.d_hidden, self.d_out = d_in, d_hidden, d_out
        self.proj = nn.Linear(d_in, 2 * d_hidden, bias=bias)
        self.out = nn.Linear(d_hidden, d_out, bias=bias) if d_out is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_tensor("x", x, "GLU")
        if x.dim() == 0 or x.shape[-1] != self.d_in:
            raise ConfigError(f"GLU: `x` must have {self.d_in} features in its last dim, got shape {tuple(x.shape)}")
        h = glu_packed(self.proj(x), self.gate, **self.gate_kwargs)
        return self.out(h) if self.out is not None else h

    # Weights as plain tensors for analysis (detached; no autograd graph).
    @property
    def W(self) -> torch.Tensor:
        """(d_hidden, d_in): the linear branch."""
        return self.proj.weight[: self.d_hidden].detach()

    @property
    def V(self) -> torch.Tensor:
        """(d_hidden, d_in): the gated branch."""
        return self.proj.weight[self.d_hidden :].detach()

    @property
    def P(self) -> torch.Tensor | None:
        """(d_out, d_hidden): the output projection, or None."""
        return self.out.weight.detach() if self.out is not None else None

    def extra_repr(self) -> str:
        kw = "".join(f", {k}={v}" for k, v in self.gate_kwargs.items())
        return f"gate={self.gate!r}{kw}"
