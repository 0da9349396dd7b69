"""One GLU layer, any gate, read as one quadratic form per output (`sqs.interp.readings` has the math).

A layer y = P[(W u) * g(V u)] (`GLUWeights`, float64) is read in terms of its own input u:
for an image classifier's stack that is x / rms(x) with the RMSNorm's learned weight folded into
W and V (`GLUWeights.of(glu, norm)`), for a decoder the pre-MLP norm's output n. A reading
(`read_layer`) gives, per output k of the layer, one symmetric (d+1) x (d+1) matrix B~_k in
homogeneous coordinates z = [u; 1]:

    y_k ~ z^T B~_k z                                  (LayerReading.__call__)

Outputs read through directions U (the classifier's head, a token's unembedding) are linear
combinations of the outputs, so their forms are the same combinations of the B~_k:

    U y ~ z^T (sum_k U_jk B~_k) z                     (LayerReading.through(U))

Every fitted reading (gain, affine, fit) is fitted on training inputs `u_fit` only;
`read_layers` fits them all at once and skips the readings a gate has not (ReLU has no
first-order reading). `output_scores` and `best_reading` measure and rank them on held-out
inputs, preferring the simpler reading on a tie.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from sqs.functional import canonical_gate, gate_fn
from sqs.interp.readings import (
    DEFAULT_RIDGE,
    READINGS,
    check_reading,
    first_order_slope,
    fit_quadratic_forms,
    homogeneous,
    homogeneous_forms,
    quadratic_form,
    r2,
    unit_reading,
    unit_weights,
)

F64 = torch.float64
#: What each reading assumes about the gate, for tables and titles.
READING_DESCRIPTIONS = {
    "first-order": "g(v) ~ s v, s = the gate's slope where it is ~ linear (1 bilinear/SQS, 1/2 GELU/SwiGLU)",
    "gain": "g(v) ~ b_i v, b_i by least squares per unit (weighted by (w_i.u)^2) on training data",
    "affine": "g(v) ~ a_i + b_i v, by least squares per unit (weighted by (w_i.u)^2) on training data; one form "
              "in [u; 1]",
    "fit": "forms in [u; 1] fitted by least squares to the layer's outputs on training data",
}
#: Two fidelities closer than this are a tie (the simpler reading wins).
TIE = 1e-9


@dataclass
class GLUWeights:
    """One GLU layer y = P[(W u) * g(V u)] as float64 tensors, in its own input coordinates u."""

    W: torch.Tensor  # (h, d) linear branch
    V: torch.Tensor  # (h, d) gated branch
    P: torch.Tensor  # (d_out, h) output projection (or the head composed with it)
    gate: str
    gate_kwargs: dict = field(default_factory=dict)

    def __post_init__(self):
        self.W, self.V, self.P = (t.detach().to(F64).cpu() for t in (self.W, self.V, self.P))
        self.gate = canonical_gate(self.gate)
        self.gate_kwargs = dict(self.gate_kwargs or {})
        if self.W.shape != self.V.shape or self.P.shape[1] != self.W.shape[0]:
            raise ValueError(f"GLUWeights: W {tuple(self.W.shape)}, V {tuple(self.V.shape)} and P {tuple(self.P.shape)} "
                             "do not form a GLU (W, V: (h, d); P: (d_out, h))")

    @classmethod
    def of(cls, glu, norm=None) -> "GLUWeights":
        """The weights of an `sqs.nn.GLU` (bias-free, with an output projection), read in u = x / rms(x)
        when `norm` is an `nn.RMSNorm`: its learned weight w is folded in, W diag(w) and V diag(w),
        so that W n = (W diag(w)) u for the norm's output n = w * u. Any other `norm` (None,
        nn.Identity) leaves u = x."""
        if getattr(glu, "P", None) is None:
            raise ValueError("GLUWeights.of: the GLU has no output projection P (d_out=None)")
        if any(getattr(getattr(glu, name, None), "bias", None) is not None for name in ("proj", "out")):
            raise ValueError("GLUWeights.of: the GLU has biases; the readings need bias-free projections")
        W, V = glu.W.to(F64), glu.V.to(F64)
        w = norm_weight(norm)
        if w is not None:
            W, V = W * w, V * w
        return cls(W, V, glu.P, glu.gate, dict(getattr(glu, "gate_kwargs", {})))

    @property
    def d(self) -> int:
        return self.W.shape[1]

    @property
    def h(self) -> int:
        return self.W.shape[0]

    def through(self, U: torch.Tensor) -> "GLUWeights":
        """The same layer with its outputs read through directions U (K, d_out): P -> U P."""
        return replace(self, P=U.detach().to(F64).cpu() @ self.P)

    def pre(self, u: torch.Tensor) -> torch.Tensor:
        """The gate's inputs V u: (N, d) -> (N, h)."""
        return u.to(F64).reshape(-1, self.d) @ self.V.T

    def hidden(self, u: torch.Tensor) -> torch.Tensor:
        """The units' outputs (W u) * g(V u): (N, d) -> (N, h)."""
        u = u.to(F64).reshape(-1, self.d)
        return (u @ self.W.T) * gate_fn(self.gate, **self.gate_kwargs)(u @ self.V.T)

    def output(self, u: torch.Tensor) -> torch.Tensor:
        """The layer's output P[(W u) * g(V u)]: (N, d) -> (N, d_out)."""
        return self.hidden(u) @ self.P.T


def norm_weight(norm) -> torch.Tensor | None:
    """The learned weight of an `nn.RMSNorm` (float64), None for anything else (no norm, nn.Identity)."""
    if isinstance(norm, torch.nn.RMSNorm):
        return norm.weight.detach().to(F64).cpu() if norm.weight is not None else None
    return None


def rms_normalise(x: torch.Tensor, norm) -> torch.Tensor:
    """u = x / rms(x) as `norm` (an nn.RMSNorm) computes it, without its learned weight (folded into the
    layer by `GLUWeights.of`); x unchanged for any other `norm`. float64, with the norm's eps (None: the
    machine epsilon of the model's dtype, as torch uses at run time)."""
    x = x.to(F64)
    if not isinstance(norm, torch.nn.RMSNorm):
        return x
    eps = norm.eps if norm.eps is not None else torch.finfo(norm.weight.dtype if norm.weight is not None
                                                             else torch.float32).eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@dataclass
class LayerReading:
    """One reading of a layer: y_k ~ z^T B[k] z with z = [u; 1], one symmetric (d+1) x (d+1) form per output.

    A per-unit reading (first-order, gain, affine) also keeps the layer's weights (`glu`) and its
    (a, b), so that its outputs can be computed as sum_i P_ki (w_i . u)(a_i + b_i v_i . u) in O(h d)
    per input instead of O(K d^2): the same numbers as the forms (to rounding; the tests check it).
    """

    name: str  # one of sqs.interp.readings.READINGS
    B: torch.Tensor  # (K, d+1, d+1) float64
    a: torch.Tensor | None = None  # (h,) per-unit reading g(v) ~ a + b v (None for "fit")
    b: torch.Tensor | None = None
    glu: GLUWeights | None = None  # the weights (a, b) read, P composed with any directions read through

    @property
    def d(self) -> int:
        return self.B.shape[-1] - 1

    @property
    def is_quadratic_form(self) -> bool:
        """True when the linear and constant parts are zero: a pure quadratic form in u (B[:, :d, :d])."""
        return bool((self.B[:, -1, :] == 0).all())

    def __call__(self, u: torch.Tensor) -> torch.Tensor:
        """The reading's outputs: (N, d) -> (N, K), float64 (through the units when it has them)."""
        if self.glu is None or self.a is None:
            return self.form_output(u)
        u = u.to(F64).reshape(-1, self.d)
        return ((u @ self.glu.W.T) * (self.a + self.b * (u @ self.glu.V.T))) @ self.glu.P.T

    def form_output(self, u: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
        """z^T B_k z for z = [u; 1]: (N, d) -> (N, K), float64 (about 4 s per 10k inputs for 128 forms of d = 128)."""
        z = homogeneous(u.to(F64).reshape(-1, self.d))
        if not z.shape[0]:
            return z.new_zeros(0, self.B.shape[0])
        return torch.cat([quadratic_form(self.B, z[i:i + chunk_size]) for i in range(0, z.shape[0], chunk_size)])

    def through(self, U: torch.Tensor) -> "LayerReading":
        """The forms of outputs read through directions U (K', K): B'_j = sum_k U_jk B_k (exact: y is linear in B)."""
        U = U.detach().to(F64).cpu()
        return replace(self, B=torch.einsum("jk,kab->jab", U, self.B),
                       glu=None if self.glu is None else self.glu.through(U))


def applicable(reading: str, gate: str) -> bool:
    """Whether the reading exists for the gate (only ReLU lacks one: it has no first-order reading)."""
    return check_reading(reading) != "first-order" or first_order_slope(gate) is not None


def read_layer(glu: GLUWeights, reading: str, u_fit: torch.Tensor | None = None, *, y_fit: torch.Tensor | None = None,
               prior: LayerReading | None = None, homogeneous_fit: bool = True, weighted: bool = True,
               ridge: float = DEFAULT_RIDGE, chunk_size: int = 2048) -> LayerReading:
    """One reading of the layer, fitted on the *training* inputs u_fit (N, d) (first-order needs none).

    first-order / gain / affine: per-unit (a_i, b_i) of the gate (`readings.unit_reading`, fitted
    on V u_fit, each sample weighted by (w_i . u)^2 when `weighted`: the unit's output error, see
    `readings.unit_weights`), then B~ = `homogeneous_forms`. fit: least squares of the layer's outputs y_fit
    (default `glu.output(u_fit)`) on the quadratic features of [u; 1] (`homogeneous_fit`, a general
    quadratic) or of u alone (a pure quadratic form: the 1-layer `spectra.decompose` default), ridge
    toward `prior` (default: the affine reading, or the gain reading when not homogeneous_fit).
    Cost of fit: N * F^2 with F = (d+1)(d+2)/2 (8,385 for d = 128): measured 2 minutes per 10k rows
    and layer on one (shared) core; the per-unit readings take seconds for 60k rows.
    """
    check_reading(reading)
    if reading != "first-order" and u_fit is None:
        raise ValueError(f"read_layer: the {reading!r} reading is fitted; pass u_fit=<the layer's inputs on "
                         "training data> (never the data you evaluate on)")
    if reading != "fit":
        if reading == "first-order":
            a, b = unit_reading(reading, glu.gate, h=glu.h)
        else:
            u = u_fit.to(F64).reshape(-1, glu.d)
            pre = glu.pre(u)
            weights = unit_weights(u @ glu.W.T) if weighted else None
            a, b = unit_reading(reading, glu.gate, pre, gate_fn(glu.gate, **glu.gate_kwargs)(pre), weights=weights)
        return LayerReading(reading, homogeneous_forms(glu.W, glu.V, glu.P, a, b), a, b, glu)
    u = u_fit.to(F64).reshape(-1, glu.d)
    y = glu.output(u) if y_fit is None else y_fit.to(F64).reshape(u.shape[0], -1)
    if prior is None:
        prior = read_layer(glu, "affine" if homogeneous_fit else "gain", u, weighted=weighted)
    if homogeneous_fit:
        B = fit_quadratic_forms(homogeneous(u), y, prior=prior.B, ridge=ridge, chunk_size=chunk_size)
    else:
        if not prior.is_quadratic_form:
            raise ValueError("read_layer: a plain quadratic-form fit needs a prior without linear part (not affine)")
        d = glu.d
        B = prior.B.new_zeros(prior.B.shape)
        B[:, :d, :d] = fit_quadratic_forms(u, y, prior=prior.B[:, :d, :d], ridge=ridge, chunk_size=chunk_size)
    return LayerReading("fit", B)


def read_layers(glu: GLUWeights, u_fit: torch.Tensor, readings=READINGS, *, fit_rows: int | None = None,
                weighted: bool = True, **fit_kwargs) -> dict[str, LayerReading]:
    """Every applicable reading of the layer, fitted on training inputs u_fit: {name: LayerReading}.

    The fit reading (if asked for) starts from the affine reading computed here and uses only the
    first `fit_rows` rows of u_fit (None: all) to bound its N * F^2 cost.
    """
    out: dict[str, LayerReading] = {}
    u_fit = u_fit.to(F64).reshape(-1, glu.d)
    for r in readings:
        if not applicable(r, glu.gate):
            continue
        if r == "fit":
            rows = u_fit if fit_rows is None else u_fit[:fit_rows]
            prior = out.get("affine") if fit_kwargs.get("homogeneous_fit", True) else out.get("gain")
            out[r] = read_layer(glu, r, rows, prior=prior, weighted=weighted, **fit_kwargs)
        else:
            out[r] = read_layer(glu, r, u_fit, weighted=weighted)
    return out


# --------------------------------------------------------------------------- measuring and ranking


def output_scores(pred: torch.Tensor, target: torch.Tensor) -> dict:
    """How well `pred` (N, K) reproduces `target` (N, K): R^2 (pooled over outputs, about each output's
    mean), R^2 after the best single scale (a reading may be right up to scale, which argmax and
    eigenvectors ignore), that scale, and the share of entries with the right sign."""
    pred, target = pred.to(F64), target.to(F64)
    alpha = float((pred * target).sum() / (pred * pred).sum().clamp_min(1e-300))
    return {"r2": r2(pred, target), "r2_scaled": r2(alpha * pred, target), "best_scale": alpha,
            "sign_agreement": float((torch.sign(pred) == torch.sign(target)).double().mean())}


def best_reading(scores: dict[str, dict], key: str = "r2") -> tuple[str, list[str]]:
    """(best reading, all readings best first) by scores[name][key], higher is better; within `TIE` the
    simpler reading (earlier in `READINGS`) wins, so an exact model is read with its simplest reading."""
    if not scores:
        raise ValueError("best_reading: no readings to rank")
    names = sorted(scores, key=READINGS.index)
    if any(key not in scores[n] for n in names):
        raise ValueError(f"best_reading: not every reading has the score {key!r}")
    top = max(float(scores[n][key]) for n in names)
    best = next(n for n in names if float(scores[n][key]) >= top - TIE)
    order = [best] + sorted((n for n in names if n != best), key=lambda n: -float(scores[n][key]))
    return best, order


def layer_fidelity(glu: GLUWeights, readings: dict[str, LayerReading], u_eval: torch.Tensor,
                   U: torch.Tensor | None = None) -> dict:
    """`output_scores` of each reading against the layer's true output on held-out inputs u_eval,
    optionally read through directions U (K, d_out); plus "best" and "order" by R^2."""
    u_eval = u_eval.to(F64).reshape(-1, glu.d)
    target = glu.output(u_eval) if U is None else glu.output(u_eval) @ U.to(F64).T
    out = {r: output_scores(rd(u_eval) if U is None else rd.through(U)(u_eval), target) for r, rd in readings.items()}
    best, order = best_reading(out)
    return {"readings": out, "best": best, "order": order, "n_eval": int(u_eval.shape[0])}
