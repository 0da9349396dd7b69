"""Image classifiers of any depth read layer by layer, every gate with every reading.

The model (`sqs.models.image.ImageClassifier`, no biases):

    x_0     = E img
    u_l     = x_l / rms(x_l)          RMSNorm before each GLU (cfg.norm = "rms"; its weight folded into
                                      layer l, `GLUWeights.of`), or u_l = x_l without a norm
    y_l     = P_l[(W_l u_l) * g(V_l u_l)]
    x_{l+1} = x_l + y_l (residual) or y_l
    logits  = H x_L

Each layer is read in terms of its own input u_l (`layer_readings.read_layer`): one form in
z_l = [u_l; 1] per output coordinate of y_l, fitted on the u_l the *true* model computes on
training images. Two fidelities, both on held-out images:

- per layer: the reading's y_l against the true y_l, both from the true u_l (`output_scores`:
  R^2 pooled over the d coordinates, scaled R^2, sign agreement);
- end to end: every GLU replaced by its reading, embedding, norms, residual and head kept
  (`surrogate_trace`), against the model's logits: logit R^2, scaled R^2, accuracy and
  agreement of the argmax, as `spectra.fidelity` measures a 1-layer decomposition.

For a 1-layer model (no norm, no residual) the end-to-end surrogate is the per-class reading
z^T (H B) z (`class_forms`), whose eigendecomposition `decomposition` returns in pixel space.

Everything is computed in float64 from the weights (the "model" here is its own weights
evaluated in float64; `model_logits` gives the model's forward in its dtype).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sqs.interp.layer_readings import (
    GLUWeights,
    LayerReading,
    best_reading,
    output_scores,
    read_layers,
    rms_normalise,
)
from sqs.interp.readings import DEFAULT_RIDGE, READINGS, check_reading, first_order_slope, r2
from sqs.interp.spectra import Decomposition, NotQuadratic, forms_decomposition, reading_label, shared_row_fraction

F64 = torch.float64
#: Keys `read_model` can rank readings by (end-to-end measures).
RANK_KEYS = ("logit_r2", "logit_r2_scaled", "agreement", "surrogate_acc")


def _check_model(model) -> None:
    if not all(hasattr(model, a) for a in ("embed", "layers", "norms", "head")):
        raise TypeError("image_stack: expected an sqs.models.image.ImageClassifier (embed, norms, layers, head)")
    if model.embed.bias is not None or model.head.bias is not None:
        raise NotQuadratic("image_stack: the embedding or head has a bias; the readings need bias-free models")
    bad = [type(n).__name__ for n in model.norms if not isinstance(n, (torch.nn.Identity, torch.nn.RMSNorm))]
    if bad:
        raise NotQuadratic(f"image_stack: unsupported norm(s) {bad}; only nn.RMSNorm (folded) or none")


def stack_layers(model) -> list[GLUWeights]:
    """Every GLU of the model as `GLUWeights` in its own input u_l (RMSNorm weight folded in), float64."""
    _check_model(model)
    return [GLUWeights.of(layer, norm) for norm, layer in zip(model.norms, model.layers)]


@dataclass
class StackTrace:
    """What every layer of the model sees and returns on a batch of images (float64)."""

    inputs: list[torch.Tensor]  # per layer u_l (N, d): the GLU's input, normalised without the norm's weight
    outputs: list[torch.Tensor]  # per layer y_l (N, d): the GLU's output
    logits: torch.Tensor  # (N, C)


def _embed(model, images: torch.Tensor) -> torch.Tensor:
    E = model.embed.weight.detach().to(F64).cpu()
    return torch.as_tensor(images).detach().cpu().to(F64).reshape(-1, E.shape[1]) @ E.T


def _forward(model, images: torch.Tensor, layer_fns) -> StackTrace:
    """The stack with GLU l computed by layer_fns[l](u_l) (the true GLU or its reading)."""
    x = _embed(model, images)
    ins, outs = [], []
    for norm, fn in zip(model.norms, layer_fns):
        u = rms_normalise(x, norm)
        y = fn(u)
        ins.append(u)
        outs.append(y)
        x = x + y if model.residual else y
    return StackTrace(ins, outs, x @ model.head.weight.detach().to(F64).cpu().T)


@torch.no_grad()
def trace(model, images: torch.Tensor) -> StackTrace:
    """The true model on images (N, n_pixels), float64: every layer's input u_l and output y_l, and the logits."""
    return _forward(model, images, [glu.output for glu in stack_layers(model)])


@torch.no_grad()
def surrogate_trace(model, readings: list[LayerReading], images: torch.Tensor) -> StackTrace:
    """The end-to-end surrogate: every GLU replaced by its reading (norms, residual, head kept), on images."""
    layers = stack_layers(model)
    if len(readings) != len(layers):
        raise ValueError(f"surrogate: {len(readings)} layer readings for a model with {len(layers)} layers")
    return _forward(model, images, readings)


@torch.no_grad()
def read_stack(model, fit_images: torch.Tensor, readings=READINGS, *, fit_rows: int | None = None,
               weighted: bool = True, ridge: float = DEFAULT_RIDGE, chunk_size: int = 2048,
               fit_trace: StackTrace | None = None) -> dict[str, list[LayerReading]]:
    """Every applicable reading of every layer, fitted on *training* images: {reading: [LayerReading per layer]}.

    Layer l is fitted on the u_l the true model computes on fit_images (`trace`; pass `fit_trace` to
    reuse one). "fit" uses the first `fit_rows` training images (None: all; its cost is N * F^2 per
    layer, see `layer_readings.read_layer`). `weighted`: per-unit fits weighted by (w_i . u)^2, the
    unit's output error (`readings.unit_weights`). A reading the gate has not (ReLU's first-order) is absent.
    """
    readings = tuple(check_reading(r) for r in readings)
    layers = stack_layers(model)
    tr = trace(model, fit_images) if fit_trace is None else fit_trace
    per_layer = [read_layers(glu, u, readings, fit_rows=fit_rows, weighted=weighted, ridge=ridge,
                             chunk_size=chunk_size)
                 for glu, u in zip(layers, tr.inputs)]
    return {r: [pl[r] for pl in per_layer] for r in readings if all(r in pl for pl in per_layer)}


@torch.no_grad()
def stack_fidelity(model, readings: list[LayerReading], images: torch.Tensor, labels: torch.Tensor,
                   true_trace: StackTrace | None = None) -> dict:
    """How faithfully one reading (one LayerReading per layer) reproduces the model on held-out (images, labels).

    Returns {"layers": [output_scores of y_l per layer, from the true u_l], "logit_r2", "logit_r2_scaled",
    "best_scale", "surrogate_acc", "agreement" (argmax equal to the model's), "model_acc", "n"}.
    """
    labels = torch.as_tensor(labels).cpu()
    tr = trace(model, images) if true_trace is None else true_trace
    layer_scores = [output_scores(rd(u), y) for rd, u, y in zip(readings, tr.inputs, tr.outputs)]
    s, z = surrogate_trace(model, readings, images).logits, tr.logits
    alpha = float((s * z).sum() / (s * s).sum().clamp_min(1e-300))
    model_pred, pred = z.argmax(-1), s.argmax(-1)
    return {"n": int(labels.shape[0]), "layers": layer_scores,
            "model_acc": float((model_pred == labels).double().mean()),
            "surrogate_acc": float((pred == labels).double().mean()),
            "agreement": float((pred == model_pred).double().mean()),
            "logit_r2": r2(s, z), "logit_r2_scaled": r2(alpha * s, z), "best_scale": alpha}


@torch.no_grad()
def read_model(model, fit_images: torch.Tensor, images: torch.Tensor, labels: torch.Tensor, readings=READINGS,
               key: str = "logit_r2", **fit_kwargs) -> dict:
    """The reading protocol for one image model of any depth and gate: fit every reading on `fit_images`
    (training), measure `stack_fidelity` on held-out (images, labels), name the most faithful.

    Returns {"best": name, "key": key, "order": names best first, "fidelity": {name: stack_fidelity},
    "readings": {name: [LayerReading per layer]}}. Ranked by the end-to-end `key` (logit R^2 by default);
    within 1e-9 the simpler reading wins (so an exact model is read first-order). Refuses held-out images
    that are mostly fit images. fit_kwargs go to `read_stack` (fit_rows, weighted, ridge, chunk_size).
    """
    if key not in RANK_KEYS:
        raise ValueError(f"read_model: key must be one of {', '.join(RANK_KEYS)}, got {key!r}")
    if shared_row_fraction(fit_images, images) > 0.5:
        raise ValueError("read_model: most evaluation images are also fit images; fit on the training split "
                         "and evaluate on the test split")
    stack = read_stack(model, fit_images, readings, **fit_kwargs)
    tr = trace(model, images)
    fid = {r: stack_fidelity(model, rds, images, labels, true_trace=tr) for r, rds in stack.items()}
    best, order = best_reading(fid, key)
    return {"best": best, "key": key, "order": order, "fidelity": fid, "readings": stack}


# --------------------------------------------------------------------------- per-class forms


def class_forms(model, readings: list[LayerReading]) -> torch.Tensor:
    """(C, d+1, d+1): the last layer's reading through the head, z^T (sum_k H_ak B_k) z per class a.

    For a 1-layer model (no residual) this is the whole model's reading of logit a; with a residual
    the logits also hold H x_{L-1}, which these forms do not show.
    """
    return readings[-1].through(model.head.weight).B


def decomposition(model, readings: list[LayerReading], force: bool = False) -> Decomposition:
    """The pixel-space `Decomposition` (homogeneous: forms in [x; 1]) of a 1-layer model's reading, for the
    eigenvector figures and the agreement measures (`sqs.interp.agreement.agreement`)."""
    if len(model.layers) != 1 or model.residual or not isinstance(model.norms[0], torch.nn.Identity):
        raise NotQuadratic(f"decomposition: pixel-space eigenvectors need a 1-layer model without norm or residual "
                           f"(this one has {len(model.layers)} layers); compare deeper models by their per-layer "
                           "readings")
    layer = model.layers[0]
    name = readings[0].name
    exact, label = reading_label(layer.gate, layer.gate_kwargs, name, force=True)
    slope = first_order_slope(layer.gate)
    if name == "first-order" and not exact and slope != 1.0:
        label = f"first-order (g(v) ~ {slope:g} v: the gate's slope at 0)"
    return forms_decomposition(class_forms(model, readings), model.embed.weight, layer.gate, exact, label,
                               layer.gate_kwargs, method=name, homogeneous=True)
