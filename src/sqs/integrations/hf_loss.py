"""A causal LM's head and loss with `sqs.ops.linear_cross_entropy`: the loss without the full logits.

A Hugging Face ``*ForCausalLM`` computes ``logits = lm_head(h)`` for every token, then
cross-entropy over the shifted labels. At vocabulary 49,152 and 4,096 tokens the float32
logits are 805 MB, and the loss's log-softmax and the logits' gradient as much again, more
than a small model's whole activations. `bind_fused_loss` makes the model, in training with
labels, run its own forward with an ``lm_head`` that only records its input ``h`` and returns
an empty tensor, then compute the same loss chunk by chunk from ``h`` and the head's weight.

Everything else of the model's forward stays its own (the MoE auxiliary loss included: it is
added as the model adds it). The output's ``logits`` is None on that path (Liger-Kernel's
convention). In eval mode, or without labels, the model runs as before and returns logits.

Models that transform the logits after the head are checked once, when the loss is fused: a
probe compares the model's logits with ``lm_head(h)`` (divided by ``config.logits_scaling``,
Granite's, which the fused loss applies to ``h``). A mismatch (Gemma-2's final logit
soft-capping, Cohere's logit scale) refuses the fused loss by name.
"""

from __future__ import annotations

import functools
import inspect
import types
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from sqs.ops import linear_cross_entropy

IGNORE_INDEX = -100


class FusedLossRefused(ValueError):
    """The model's head or loss is not one the fused loss reproduces exactly."""


def causal_lm_loss(h: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor | None = None, *,
                   shift_labels: torch.Tensor | None = None, num_items_in_batch: Any = None,
                   ignore_index: int = IGNORE_INDEX, h_scale: float | None = None) -> torch.Tensor:
    """transformers' causal-LM loss (``ForCausalLMLoss``) of ``logits = (h * h_scale) @ weight.T``, without the logits.

    Labels shift left by one (or `shift_labels` is used as given); positions labelled
    `ignore_index` drop out; the sum is divided by `num_items_in_batch` when given (gradient
    accumulation), else by the number of counted positions.
    """
    if shift_labels is None:
        if labels is None:
            raise ValueError("causal_lm_loss: pass labels or shift_labels")
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    t = shift_labels.reshape(-1).to(h.device)
    rows = h.reshape(-1, h.shape[-1])
    if rows.shape[0] != t.shape[0]:
        raise ValueError(f"causal_lm_loss: {rows.shape[0]} hidden states for {t.shape[0]} labels")
    keep = t != ignore_index
    if not bool(keep.all()):  # a copy of the kept rows: tokens x d, small next to tokens x vocab
        rows, t = rows[keep], t[keep]
    if h_scale is not None:
        rows = rows * h_scale
    total = linear_cross_entropy(rows, weight, t, reduction="sum")
    if num_items_in_batch is None:
        return total / keep.sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def _capturing_head_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """lm_head's instance forward: the plain projection; while the fused loss runs (a list is set), record x and
    return an empty (..., 0) view in place of the logits; while the head is probed (a function is set), return
    what that function makes of x."""
    mode = self.__dict__.get("_sqs_capture")
    if mode is None:
        return F.linear(x, self.weight, self.bias)
    if callable(mode):
        return mode(x)
    mode.append(x)
    return x[..., :0]


def _head_scale(model: nn.Module) -> float | None:
    s = getattr(getattr(model, "config", None), "logits_scaling", None)
    return None if s in (None, 1, 1.0) else 1.0 / float(s)


def check_head(model: nn.Module) -> nn.Linear:
    """The model's output layer, when the fused loss can stand in for it (a plain bias-free nn.Linear)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if type(head) is not nn.Linear or head.bias is not None:
        raise FusedLossRefused(
            f"fused_linear_cross_entropy: {type(model).__name__}'s output layer is "
            f"{type(head).__name__ if head is not None else 'missing'}, not a bias-free nn.Linear; the fused loss "
            "needs the plain head (wrapped heads, e.g. LoRA on lm_head, keep the library loss)")
    if "forward" in head.__dict__ and getattr(head.__dict__["forward"], "__func__", None) is not _capturing_head_forward:
        raise FusedLossRefused("fused_linear_cross_entropy: the output layer's forward was replaced by something "
                               "else (a tracer or offload hook); apply sqs before wrapping the model")
    return head


def _fused_loss_forward(self: nn.Module, *args, **kwargs):
    """The model's forward, with the head + loss computed by `causal_lm_loss` in training when labels are given."""
    inner = self._sqs_inner_forward
    sig = _signature(getattr(inner, "__func__", inner))
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return inner(*args, **kwargs)
    arguments = bound.arguments
    extra = dict(arguments.pop(_var_keyword(sig), {}) or {})
    labels = arguments.get("labels")
    keep = arguments.get("logits_to_keep", 0)
    tuples = arguments.get("return_dict", extra.get("return_dict")) is False
    if labels is None or not self.training or tuples or not (isinstance(keep, int) and keep == 0):
        return inner(*args, **kwargs)  # logits wanted (eval, no labels, some kept), or tuple outputs: the library's
    arguments["labels"] = None
    head = self.get_output_embeddings()
    store: list[torch.Tensor] = []
    head.__dict__["_sqs_capture"] = store
    try:
        out = inner(**arguments, **extra)
    finally:
        head.__dict__["_sqs_capture"] = None
    if len(store) != 1:
        raise RuntimeError(f"fused_linear_cross_entropy: the output layer ran {len(store)} times in one forward; "
                           "expected once")
    loss = causal_lm_loss(store[0], head.weight, labels, shift_labels=extra.get("shift_labels"),
                          num_items_in_batch=extra.get("num_items_in_batch"),
                          ignore_index=extra.get("ignore_index", IGNORE_INDEX), h_scale=_head_scale(self))
    aux = out.get("aux_loss") if hasattr(out, "get") else None
    if aux is not None:  # MoE models add the load-balancing loss when labels are given
        coef = getattr(self, "router_aux_loss_coef", None)
        coef = self.config.router_aux_loss_coef if coef is None else coef
        loss = loss + coef * aux.to(loss.device)
    fields = {k: v for k, v in out.items() if k not in ("loss", "logits")}
    return type(out)(loss=loss, logits=None, **fields)


@functools.lru_cache(maxsize=64)
def _signature(fn: Callable) -> inspect.Signature:
    """The forward's signature without `self` (cached: binding the arguments runs every step)."""
    sig = inspect.signature(fn)
    params = list(sig.parameters.values())
    return sig.replace(parameters=params[1:]) if params and params[0].name == "self" else sig


def _var_keyword(sig: inspect.Signature) -> str:
    return next((n for n, p in sig.parameters.items() if p.kind is p.VAR_KEYWORD), "kwargs")


def probe_head(model: nn.Module) -> str | None:
    """None when the model returns its head's output as the logits (divided by ``config.logits_scaling`` where
    set), else what differs.

    Runs the model once on four tokens in eval mode without gradients, with the head returning large
    random values: any transformation after the head (soft-capping, a scale) shows, whatever the weights.
    """
    head = model.get_output_embeddings()
    device = head.weight.device
    x = torch.arange(4, device=device).remainder(head.out_features)[None]
    gen = torch.Generator(device="cpu").manual_seed(0)
    made: list[torch.Tensor] = []

    def substitute(h: torch.Tensor) -> torch.Tensor:
        r = torch.randn(*h.shape[:-1], head.out_features, generator=gen) * 50
        made.append(r.to(device=h.device, dtype=h.dtype))
        return made[-1]

    was_training = model.training
    model.eval()
    head.__dict__["_sqs_capture"] = substitute
    try:
        with torch.no_grad():
            got = model(input_ids=x).logits
    except Exception as e:  # noqa: BLE001 - any failure means the loss cannot be checked
        return f"a check forward failed: {type(e).__name__}: {e}"
    finally:
        head.__dict__["_sqs_capture"] = None
        model.train(was_training)
    if len(made) != 1:
        return f"the output layer ran {len(made)} times in one forward"
    scale = _head_scale(model)
    want = made[0] if scale is None else made[0] * scale
    if got is None or got.shape != want.shape:
        return "the logits do not have the output layer's shape"
    if not torch.allclose(got.float(), want.float(), rtol=1e-4, atol=1e-4):
        cfg = getattr(model, "config", None)
        hint = next((f" ({k}={getattr(cfg, k)})" for k in ("final_logit_softcapping", "logit_scale")
                     if getattr(cfg, k, None) is not None), "")
        return f"the model transforms its logits after the output layer{hint}"
    return None


def bind_fused_loss(model: nn.Module) -> None:
    """Make `model` (a causal LM) compute its training loss with `causal_lm_loss`; refuse what it cannot reproduce."""
    head = check_head(model)
    if "forward" not in head.__dict__:
        head.forward = types.MethodType(_capturing_head_forward, head)
    head.__dict__["_sqs_capture"] = None
    problem = probe_head(model)
    if problem is not None:
        unbind_fused_loss(model)
        raise FusedLossRefused(f"fused_linear_cross_entropy: {type(model).__name__}: {problem}, so the fused loss "
                               "would compute a different loss; leave fused_linear_cross_entropy off for this model")
    fwd = model.__dict__.get("forward")
    if getattr(fwd, "__func__", None) is _fused_loss_forward:
        return
    model._sqs_inner_forward = model.forward  # the class's, or whatever wrapped this instance before (kept)
    model.forward = types.MethodType(_fused_loss_forward, model)


def unbind_fused_loss(model: nn.Module) -> None:
    """Undo `bind_fused_loss` (no-op when it was not bound)."""
    if getattr(model.__dict__.get("forward"), "__func__", None) is _fused_loss_forward:
        inner = model.__dict__.pop("_sqs_inner_forward")
        if getattr(inner, "__self__", None) is model and inner.__func__ is getattr(type(model), "forward", None):
            del model.__dict__["forward"]
        else:
            model.forward = inner
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head.__dict__.get("forward"), "__func__", None) is _capturing_head_forward:
        del head.__dict__["forward"]
        head.__dict__.pop("_sqs_capture", None)


def has_fused_loss(model: nn.Module) -> bool:
    return getattr(model.__dict__.get("forward"), "__func__", None) is _fused_loss_forward


__all__ = ["FusedLossRefused", "bind_fused_loss", "causal_lm_loss", "check_head", "has_fused_loss", "probe_head",
           "unbind_fused_loss"]
