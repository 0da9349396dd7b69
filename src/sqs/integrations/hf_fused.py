"""The fused SQS forward of a gated MLP, bound on one module instance (or, when asked, on a class).

``down(act(gate(x)) * up(x))`` with ``act`` an `sqs.nn.SQS` becomes ``down(sqs_glu(up(x), gate(x)))``:
the gate and the product in one pass, and in training (at least as many tokens as input
features) up and gate in one matmul feeding the packed op, `sqs.ops.sqs_glu_packed`, which
returns the gradient of that matmul's output in one piece. An MoE expert bank keeps transformers'
expert dispatch; only its ``_apply_gate`` (called on each expert's packed ``[gate | up]`` output
by the ``grouped_mm`` and ``batched_mm`` implementations) becomes the fused op.

When the library's own forward runs instead (same numbers, unfused):

* the activation is not SQS (e.g. a SwiGLU model: the patch changes nothing for it);
* someone watches the activation or a projection: forward/backward hooks, or a forward set on
  the instance (nnsight's tracer, accelerate's offload hooks). The fused op never materialises
  ``act(gate(x))``, so an observer would otherwise see nothing, or edit nothing. A watched
  projection is called as a module (not read as a weight) and the gate stays fused;
* an expert bank with ``experts_implementation="eager"``: its forward computes ``act(gate) * up``
  inline, so it runs SQS unfused.
"""

from __future__ import annotations

import types
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.integrations import moe as _hf_moe

from sqs.integrations.hf_mlps import EXPERTS, PACKED, SPLIT, GatedMLP, Layout, library_forward
from sqs.nn import SQS
from sqs.ops import sqs_glu, sqs_glu_packed

#: Attribute on a patched module holding its layout (the bound forward reads it).
LAYOUT_ATTR = "_sqs_layout"
#: Instance flag: False makes even a class-patched module run the library's forward (apply_sqs(fused=False)).
FUSED_ATTR = "_sqs_fused"


def watched(m: nn.Module) -> bool:
    """True when a hook or an instance-level forward would see (or change) this module's call."""
    from torch.nn.modules import module as _m

    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks
                or "forward" in m.__dict__ or _m._global_forward_hooks or _m._global_forward_pre_hooks)


def _plain_linear(*mods: nn.Module) -> bool:
    # Exactly nn.Linear and unobserved: a LoRA, quantised, hooked or offloaded layer runs its own forward.
    return all(type(m) is nn.Linear and not watched(m) for m in mods)


def _pack_rows(x: torch.Tensor, w_first: torch.Tensor, w_second: torch.Tensor,
               b_first: torch.Tensor | None, b_second: torch.Tensor | None) -> torch.Tensor:
    """x @ [W1; W2].T (+ [b1; b2]): both branches from one matmul, output laid out [first | second]."""
    bias = None if b_first is None else torch.cat([b_first, b_second])
    return F.linear(x, torch.cat([w_first, w_second]), bias)


def _split_halves(t: torch.Tensor, gate_first: bool, dim: int = -1) -> tuple[torch.Tensor, torch.Tensor]:
    """(gate, up) from a packed tensor."""
    a, b = t.chunk(2, dim=dim)
    return (a, b) if gate_first else (b, a)


def fused_mlp(mod: nn.Module, lay: Layout, x: torch.Tensor, act: SQS) -> torch.Tensor:
    """down(sqs_glu(up(x), gate(x))), with up and gate in one matmul when that is cheaper.

    Why pack: one matmul yields [up | gate] = [w | v], the packed op reads it in place and
    returns its gradient in one piece, and backward then needs one matmul for x's gradient
    instead of two and a sum. The price is a copy of the two weight matrices per call,
    small against the activations once there are at least as many tokens as input
    features (training); with fewer (decoding one token) the two matmuls run as they are.
    """
    rows = x.numel() // max(x.shape[-1], 1)
    down = getattr(mod, lay.down)
    c, lam, p = act.c, act.lam, act.p
    if lay.kind == SPLIT:
        up, gate = getattr(mod, lay.up), getattr(mod, lay.gate)
        if rows >= x.shape[-1] and _plain_linear(up, gate):
            return down(sqs_glu_packed(_pack_rows(x, up.weight, gate.weight, up.bias, gate.bias), c, lam, p))
        return down(sqs_glu(up(x), gate(x), c, lam, p))
    proj = getattr(mod, lay.packed)
    if rows >= x.shape[-1] and _plain_linear(proj):  # reorder the rows to [up | gate] = [w | v]
        g_w, u_w = _split_halves(proj.weight, lay.gate_first, dim=0)
        b = proj.bias
        g_b, u_b = (None, None) if b is None else _split_halves(b, lay.gate_first, dim=0)
        return down(sqs_glu_packed(_pack_rows(x, u_w, g_w, u_b, g_b), c, lam, p))
    gate_out, up_out = _split_halves(proj(x), lay.gate_first)
    return down(sqs_glu(up_out, gate_out, c, lam, p))


def _bound_mlp_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Forward of a patched split/packed MLP: fused when its activation is an unwatched SQS.

    Bound on an instance (`bind`), or called from a class patch (`class_forward`, with the
    layout set on the class).
    """
    lay = getattr(self, LAYOUT_ATTR)
    act = getattr(self, lay.act)
    if not isinstance(act, SQS) or watched(act) or not self.__dict__.get(FUSED_ATTR, True):
        return library_forward(self)(self, x)
    return fused_mlp(self, lay, x, act)


def fused_apply_gate(self: nn.Module, gate_up_out: torch.Tensor) -> torch.Tensor:
    """An expert bank's gate on its packed [gate | up] output: sqs_glu(up, gate) when act_fn is an unwatched SQS,
    else transformers' act(gate) * up. Bound on an instance, or set on a class by `apply_sqs_to_class` (only
    classes whose own gate is that default are accepted, see hf_mlps)."""
    act = self.act_fn
    if not isinstance(act, SQS) or watched(act) or not self.__dict__.get(FUSED_ATTR, True):
        return _hf_moe._default_apply_gate(self, gate_up_out)
    gate, up = gate_up_out.chunk(2, dim=-1)
    return sqs_glu(up, gate, act.c, act.lam, act.p)


fused_apply_gate._sqs_replaces = _hf_moe._default_apply_gate  # what it stands in for


def is_bound(mod: nn.Module) -> bool:
    """True when sqs's fused forward (or expert gate) is bound on this instance."""
    fwd, gate = mod.__dict__.get("forward"), mod.__dict__.get("_apply_gate")
    return (getattr(fwd, "__func__", None) is _bound_mlp_forward
            or getattr(gate, "__func__", None) is fused_apply_gate)


def foreign_forward(mod: nn.Module) -> str | None:
    """Who replaced this instance's forward, when it is not sqs (e.g. a tracer wrapped the model first)."""
    fwd = mod.__dict__.get("forward")
    if fwd is None or getattr(fwd, "__func__", None) is _bound_mlp_forward:
        return None
    return getattr(fwd, "__qualname__", type(fwd).__name__)


def bind(g: GatedMLP) -> None:
    """Bind the fused forward (or the fused expert gate) on this one module."""
    mod = g.module
    setattr(mod, LAYOUT_ATTR, g.layout)
    mod.__dict__[FUSED_ATTR] = True
    if g.layout.kind == EXPERTS:
        mod._apply_gate = types.MethodType(fused_apply_gate, mod)
    else:
        mod.forward = types.MethodType(_bound_mlp_forward, mod)


def unbind(mod: nn.Module) -> None:
    """Remove what `bind` set: the module runs the library's forward (even under a class patch)."""
    mod.__dict__[FUSED_ATTR] = False
    if getattr(mod.__dict__.get("forward"), "__func__", None) is _bound_mlp_forward:
        del mod.__dict__["forward"]
    if getattr(mod.__dict__.get("_apply_gate"), "__func__", None) is fused_apply_gate:
        del mod.__dict__["_apply_gate"]


def class_forward(lay: Layout, original: Callable) -> Callable:
    """A class-level forward for `apply_sqs_to_class`: the bound forward's logic, `original` as the library's."""
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _bound_mlp_forward(self, x)

    forward._sqs_replaces = original
    forward.__doc__ = f"down(sqs_glu(up(x), gate(x))) when `{lay.act}` is SQS, else the class's own forward."
    return forward


__all__ = ["EXPERTS", "LAYOUT_ATTR", "PACKED", "SPLIT", "bind", "class_forward", "foreign_forward",
           "fused_apply_gate", "fused_mlp", "is_bound", "library_forward", "unbind", "watched"]
