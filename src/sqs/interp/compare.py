"""Two image models compared fairly: each through its own most faithful reading.

    res = compare_models(model_a, model_b, train_images, test_images, test_labels, k=10)
    res["a"]["reading"], res["b"]["reading"]      # e.g. "affine", "first-order": named, never assumed
    res["positive"]["per_rank"], res["positive"]["best_match"], res["positive"]["overlap"], res["form_cosine"]

Each model is read with every reading of the protocol (`image_stack.read_model`: fitted on the
training images, measured on the held-out ones) and compared through the one that reproduces it
best. Both readings are forms in z = [x; 1] (a plain quadratic form is padded with zeros, which
changes nothing), so two models whose best readings differ still share one space.

- 1-layer models: per class in pixel space ([pixels; 1]), the measures of
  `sqs.interp.agreement.agreement` (signed sides, per rank, best one-to-one match, subspace
  overlap, form cosine), and the form cosine of the quadratic parts alone (an affine reading of a
  saturating gate carries a linear part a Bilinear model has not);
- deeper models: the last layer's per-class forms (through the head) live in each model's own
  hidden space, so their eigenvectors are compared by their activation profiles over the same
  probe images (`agreement.profiles`: |correlation|); the form cosine is not defined there (None).

Everything is reported in the order the models were given: "a" is the first, "b" the second.
"""

from __future__ import annotations

import torch

from sqs.interp.agreement import DEFAULT_K, SIDES, agreement, form_cosine, profiles, summarise, vector_agreement
from sqs.interp.image_stack import class_forms, decomposition, read_model, trace
from sqs.interp.readings import READINGS
from sqs.interp.spectra import Decomposition, eig_sorted

def _model_brief(model, read: dict) -> dict:
    layer = model.layers[-1]
    fid = read["fidelity"][read["best"]]
    return {"gate": layer.gate, "gate_kwargs": dict(layer.gate_kwargs), "layers": len(model.layers),
            "reading": read["best"], "order": read["order"], "logit_r2": fid["logit_r2"],
            "surrogate_acc": fid["surrogate_acc"], "agreement": fid["agreement"], "model_acc": fid["model_acc"],
            "fidelity": {r: {k: f[k] for k in ("logit_r2", "logit_r2_scaled", "surrogate_acc", "agreement")}
                         for r, f in read["fidelity"].items()}}


def summary_brief(summary: dict) -> dict:
    """The means of an `agreement.summarise` result, the shape tables print: per side "per_rank" and
    "best_match" (lists over ranks 1..k, None where no class has the rank) and "overlap", plus
    "form_cosine", "form_cosine_centered" and "form_cosine_quadratic" (None where not defined) and
    "n_pairs", "k"."""
    out = {"n_pairs": summary["n_pairs"], "k": summary["k"]}
    for side in SIDES:
        out[side] = {m: summary[side][m]["mean"] for m in ("per_rank", "best_match", "overlap")}
    for m in ("form_cosine", "form_cosine_centered", "form_cosine_quadratic"):
        out[m] = summary[m]["mean"] if m in summary else None
    return out


def stack_agreement(model_a, readings_a: list, model_b, readings_b: list, probe_images: torch.Tensor,
                    k: int = DEFAULT_K) -> dict:
    """Per class, the last layer's eigenvectors of two models of any depth compared through their activation
    profiles over the same probe images (held-out images: the u_{L-1} the true models compute on them).

    readings_*: one LayerReading per layer (a reading from `image_stack.read_stack`). Returns the
    `agreement.vector_agreement` arrays (per side "per_rank", "best_match", "match", "overlap", ...) in
    |correlation| of profiles."""
    out = []
    for model, readings in ((model_a, readings_a), (model_b, readings_b)):
        eigvals, Q = eig_sorted(class_forms(model, readings))
        out.append((eigvals, profiles(Q, trace(model, probe_images).inputs[-1])))
    (ea, pa), (eb, pb) = out
    return vector_agreement(ea, pa, eb, pb, k=k)


@torch.no_grad()
def compare_models(model_a, model_b, fit_images: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                   k: int = DEFAULT_K, readings=READINGS, key: str = "logit_r2", **fit_kwargs) -> dict:
    """Fair metrics between the most faithful readings of two image models, in the order given.

    Both models are read on `fit_images` (training) and measured on (images, labels) (held out) with
    `image_stack.read_model`; each is compared through its best reading (`compare_read`, which takes
    `read_model` results you already have). Returns

        {"a": {"gate", "gate_kwargs", "layers", "reading" (the best reading's name), "order", "logit_r2",
               "surrogate_acc", "agreement", "model_acc", "fidelity": {reading: {...}}},
         "b": {...},
         "space": "pixel" (1-layer models) or "probe profiles" (deeper),
         "k", "n_pairs" (1),
         "positive" | "negative" | "abs": {"per_rank": [k], "best_match": [k], "overlap"}  (means over classes),
         "form_cosine", "form_cosine_centered"  (None unless both models have 1 layer; forms in [x; 1],
             linear part included), "form_cosine_quadratic" (the same without the linear parts),
         "per_class": the full per-class arrays (numpy) of the agreement,
         "decompositions": (dec_a, dec_b) in pixel space for figures (None for deeper models)}
    """
    read_a, read_b = (read_model(m, fit_images, images, labels, readings=readings, key=key, **fit_kwargs)
                      for m in (model_a, model_b))
    return compare_read(model_a, read_a, model_b, read_b, images, k=k)


@torch.no_grad()
def compare_read(model_a, read_a: dict, model_b, read_b: dict, probe_images: torch.Tensor, k: int = DEFAULT_K) -> dict:
    """`compare_models` from `image_stack.read_model` results of the two models (each compared through its
    "best" reading); `probe_images` (held-out) serve the profiles of models deeper than one layer."""
    best = [r["readings"][r["best"]] for r in (read_a, read_b)]
    decs: tuple[Decomposition, Decomposition] | None = None
    one_layer = all(len(m.layers) == 1 and not m.residual for m in (model_a, model_b))
    if one_layer:
        decs = (decomposition(model_a, best[0]), decomposition(model_b, best[1]))
        per_class = agreement(decs[0], decs[1], k=k)
        per_class["form_cosine_quadratic"] = form_cosine(decs[0], decs[1], quadratic_only=True)
        summary = summarise([per_class], extra=("form_cosine", "form_cosine_centered", "form_cosine_quadratic"))
    else:
        per_class = stack_agreement(model_a, best[0], model_b, best[1], probe_images, k=k)
        summary = summarise([per_class])
    return {"a": _model_brief(model_a, read_a), "b": _model_brief(model_b, read_b),
            "space": "pixel" if one_layer else "probe profiles", **summary_brief(summary), "per_class": per_class,
            "decompositions": decs}
