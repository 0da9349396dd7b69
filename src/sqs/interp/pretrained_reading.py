"""A pretrained decoder's gated MLPs read as quadratic forms over tokens (Llama-style models, any gate).

Layer l adds y = P[(W n) * g(V n)] to the residual stream, n = its pre-MLP RMSNorm's output. Its
*direct* contribution to a token t's logit (the path that goes straight from this MLP to the head,
skipping every later layer) is u_t . y with u_t the token's output direction
(`lm_quadratic.token_directions`: the unembedding row times the final norm's weight times s, where s
stands in for the final norm's per-position 1/rms(h) by its mean over the text, `mean_inv_rms`; s sets
only the unit, not R^2, signs or eigenvectors). With a per-unit reading of the gate, g(v) ~ a_i + b_i v
(`sqs.interp.readings`), u_t . y is one quadratic form in z = [n; 1]:

    u_t . y ~ z^T B~_t z,     B~_t = [[sum_i (u_t . P_i) b_i sym(w_i v_i^T),  c_t], [c_t^T, 0]]

`read_layer_tokens` builds B~_t for a few tokens at once by composing the output projection with the
directions first (P -> U P: K forms of (d+1)^2, never the d_out forms of the whole layer) and hands
them to `lm_quadratic.lm_reading_fidelity`, which fits each reading on training-text inputs and scores
it on held-out-text inputs (R^2 of the forms against the layer's true u . y, also with the eigen-
expansion truncated to the top-k |eigenvalues|). The readings (first-order, gain, affine) are ranked
by held-out R^2 and the best one is eigendecomposed (`eigen_readout`): the tokens at both ends of its
top eigenvectors of each sign, read two ways:

* through the embedding ("in"): the tokens whose normalised embedding, as the layer's norm would
  present it (`lm_quadratic.token_inputs`), projects most on the eigenvector's n-part: what in the
  input excites it. Exact for layer 0's token part only; deeper, a vocabulary probe.
* through the unembedding ("out", a logit lens): the eigenvector mapped back to the residual stream
  (q.n = (w_norm * q).x / rms(x), so its residual direction is w_norm * q) and read by the head,
  unembedding * final-norm weight: which tokens' logits a residual move along it would raise.

The "fit" reading (least squares over all (d+1)(d+2)/2 quadratic features) is not used: for d = 576
that is 167 k features per form. Everything here is pure tensors in, JSON-ready dicts out; loading
models and collecting the layer inputs is `sqs.integrations.pretrained`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from sqs.interp.agreement import ZERO_TOL
from sqs.interp.layer_readings import GLUWeights
from sqs.interp.lm_quadratic import (
    Spectrum,
    glu_weights,
    lm_reading_fidelity,
    mean_inv_rms,
    orientation,
    token_directions,
    token_inputs,
    top_promoted,
    top_tokens,
)

F64 = torch.float64
#: The per-unit readings tried on every layer, simplest first (see the module docstring for "fit").
LAYER_READINGS = ("first-order", "gain", "affine")
#: Top-k truncations of the eigen-expansion whose fidelity is reported (None: all eigenvalues).
TRUNCATIONS = (1, 4, 16, 64, None)
SIDES = ("positive", "negative")
PROMOTED = "promoted"


@dataclass
class DecoderLayer:
    """One gated MLP of a decoder in the coordinates of its own input n (float64 weights), and the norm that
    makes n: its weight and eps give the token read-outs (`token_inputs`, the logit lens)."""

    path: str
    glu: GLUWeights
    norm_weight: torch.Tensor  # (d,)
    norm_eps: float | None

    @classmethod
    def of(cls, path: str, mlp, norm) -> "DecoderLayer":
        """From a Llama-style MLP module (gate_proj, up_proj, down_proj, act_fn; biases refused) and its
        pre-MLP RMSNorm module (weight, and eps as ``eps`` or ``variance_epsilon``)."""
        W, V, P, gate, kw = glu_weights(mlp)
        eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
        return cls(path, GLUWeights(W, V, P, gate, kw), norm.weight.detach().to(F64).cpu(),
                   None if eps is None else float(eps))


@dataclass
class TokenReader:
    """Every token as a vector of one layer's n, row t = base[t] * weight, kept factored: the (V, d) base is
    shared by all layers (only the (d,) weight is the layer's), and projections are base @ (weight * q), so
    reading a layer costs no (V, d) copy and one pass over the base for all its eigenvectors."""

    base: torch.Tensor  # (V, d) float64
    weight: torch.Tensor  # (d,) float64

    @classmethod
    def plain(cls, X: torch.Tensor) -> "TokenReader":
        """The reader whose rows are X (V, d) itself."""
        X = X.to(F64)
        return cls(X, torch.ones(X.shape[1], dtype=F64))

    def project(self, Q: torch.Tensor) -> torch.Tensor:
        """(M, V): each row of Q (M, d) projected on every token."""
        return (Q.to(F64) * self.weight) @ self.base.T


@dataclass
class Head:
    """What turns the last residual stream h into logits: logit_t = unembed[t] . (w_f * h / rms(h)),
    the embedding that makes the first one, and s, the stand-in for 1/rms(h) (`mean_inv_rms`)."""

    embed: torch.Tensor  # (V, d)
    unembed: torch.Tensor  # (V, d); the same tensor when the model ties them
    final_weight: torch.Tensor  # (d,)
    scale: float
    _bases: dict = field(default_factory=dict, repr=False)  # the readers' shared (V, d) bases

    @classmethod
    def of(cls, embed: torch.Tensor, unembed: torch.Tensor, final_weight: torch.Tensor, final_residual: torch.Tensor,
           final_eps: float | None = None) -> "Head":
        """s = mean 1/rms of `final_residual` (rows of the last residual stream on the text, before the norm)."""
        return cls(embed.detach().to(F64).cpu(), unembed.detach().to(F64).cpu(), final_weight.detach().to(F64).cpu(),
                   mean_inv_rms(final_residual, final_eps))

    @property
    def vocab(self) -> int:
        return self.unembed.shape[0]

    def directions(self, ids) -> torch.Tensor:
        """u_t (K, d) for token ids: unembed[t] * w_f * s."""
        return token_directions(self.unembed, self.final_weight, ids, self.scale)

    def all_directions(self) -> torch.Tensor:
        return self.directions(range(self.vocab))

    def readers(self, layer: DecoderLayer) -> tuple[TokenReader, TokenReader]:
        """(in, out): the tokens as layer `layer`'s n would hold them (`token_inputs`: rmsnorm(E[t]) * w_norm), and
        the logit lens in n coordinates, unembed * w_f * w_norm (a direction q of n is w_norm * q in the
        residual). Both bases are computed once per eps and shared by every layer (`TokenReader`)."""
        key = ("in", layer.norm_eps)
        if key not in self._bases:
            self._bases[key] = token_inputs(self.embed, torch.ones(self.embed.shape[1], dtype=F64), layer.norm_eps)
        if "out" not in self._bases:
            self._bases["out"] = token_directions(self.unembed, self.final_weight, range(self.vocab))
        return TokenReader(self._bases[key], layer.norm_weight), TokenReader(self._bases["out"], layer.norm_weight)


def promoted_tokens(glu: GLUWeights, U_all: torch.Tensor, n: torch.Tensor, k: int, exclude=()) -> list[int]:
    """The k tokens whose direction the layer's output raises most on average over inputs n (training text),
    skipping `exclude`: `lm_quadratic.top_promoted(by="mean")`."""
    if k <= 0:
        return []
    ids, _ = top_promoted(glu.W, glu.V, glu.P, U_all, k=k + len(exclude), by="mean", n=n, gate=glu.gate,
                          gate_kwargs=glu.gate_kwargs)
    skip = {int(i) for i in exclude}
    return [int(i) for i in ids if int(i) not in skip][:k]


def read_layer_tokens(glu: GLUWeights, U: torch.Tensor, n_fit: torch.Tensor, n_eval: torch.Tensor,
                      readings=LAYER_READINGS, ks=TRUNCATIONS) -> dict:
    """Every reading of the layer's direct contribution to directions U (K, d_out), fitted on n_fit and scored
    on n_eval (`lm_reading_fidelity`, with P composed with U first, so the cost is K forms, not d_out).

    Returns lm_reading_fidelity's dict: per reading R^2 (pooled and per direction), sign agreement, the
    truncations, plus "best", "order" and "forms" {reading: (K, d+1, d+1)}.
    """
    U = U.to(F64).reshape(-1, glu.P.shape[0])
    eye = torch.eye(U.shape[0], dtype=F64)
    return lm_reading_fidelity(glu.W, glu.V, U @ glu.P, glu.gate, glu.gate_kwargs, eye, n_fit, n_eval,
                               readings=readings, ks=ks)


def eigen_readout(B: torch.Tensor, X_in: torch.Tensor | TokenReader, X_out: torch.Tensor | TokenReader, k: int = 3,
                  n_tokens: int = 8, decode=None, n_eigenvalues: int = 16) -> dict:
    """The signed spectrum of one form B ((r, r): r = d, or d + 1 for a form in [n; 1]) and its top-k eigenvectors
    of each sign read as tokens at both ends, through the embedding (X_in) and the unembedding (X_out), each (V, d)
    or a `TokenReader`.

    An eigenvector q of a form in [n; 1] is [q_n; q_1]: its term is lambda (q_n . n + q_1)^2, so the tokens are
    read from q_n and q_1 is reported as "constant". Eigenvectors are oriented so that their largest
    |projection| on X_in is positive (`orient`). Returns counts of positive / negative eigenvalues, sum |lambda|,
    the `n_eigenvalues` largest |lambda| (signed) and per side the rows {rank, eigenvalue, share of sum |lambda|,
    constant, "in": {"plus", "minus"}, "out": {"plus", "minus"}} with token texts and projections. Eigenvalues
    within `agreement.ZERO_TOL` x max |lambda| of 0 count as neither sign.
    """
    return eigen_readouts(B[None], X_in, X_out, k, n_tokens, decode, n_eigenvalues)[0]


def eigen_readouts(forms: torch.Tensor, X_in: torch.Tensor | TokenReader, X_out: torch.Tensor | TokenReader,
                   k: int = 3, n_tokens: int = 8, decode=None, n_eigenvalues: int = 16) -> list[dict]:
    """`eigen_readout` of each of the forms (K, r, r). Why batched: the eigenvectors of all K forms are projected
    on the vocabulary in one pass per reader (a (V, d) matrix, 226 MB in float64 for SmolLM2), which was most of
    a layer's time when done per eigenvector."""
    readers = {name: X if isinstance(X, TokenReader) else TokenReader.plain(X) for name, X in (("in", X_in),
                                                                                                ("out", X_out))}
    d = readers["in"].base.shape[1]
    if forms.shape[-1] not in (d, d + 1):
        raise ValueError(f"eigen_readout: the form is {tuple(forms.shape[1:])}, expected ({d}, {d}) or "
                         f"({d + 1}, {d + 1}) for token readers of width {d}")
    outs, picked = [], []  # picked: (form, side, eigenvalues, eigenvectors) whose rows are still to read
    for B in forms:
        spec = Spectrum.of(B)
        lam = spec.eigenvalues
        by_abs = lam[lam.abs().argsort(descending=True)]
        tol = ZERO_TOL * float(lam.abs().max()) if lam.numel() else 0.0  # rounding noise is not a sign
        outs.append({"n_positive": int((lam > tol).sum()), "n_negative": int((lam < -tol).sum()),
                     "abs_sum": float(lam.abs().sum()), "top_eigenvalues": by_abs[:n_eigenvalues].tolist(),
                     "sides": {side: [] for side in SIDES}})
        for side in SIDES:
            vals, Q = spec.side(side, k)
            if len(vals):
                picked.append((outs[-1], side, vals, Q))
    if not picked:
        return outs
    Q_all = torch.cat([Q[:, :d] for *_, Q in picked])
    proj_all = {name: rd.project(Q_all) for name, rd in readers.items()}  # (M, V): one pass per reader
    sign_all = orientation(proj_all["in"])  # (M, 1), as `orient` flips
    at = 0
    for out, side, vals, Q in picked:
        for r, (v, q) in enumerate(zip(vals.tolist(), Q)):
            sign = sign_all[at]
            row = {"rank": r + 1, "eigenvalue": v, "share": abs(v) / max(out["abs_sum"], 1e-300),
                   "constant": float(q[d] * sign) if q.shape[0] > d else 0.0}
            for name in ("in", "out"):
                toks = top_tokens(proj_all[name][at] * sign, n_tokens, decode)
                row[name] = {"plus": toks["positive"].text, "plus_values": toks["positive"].values,
                             "minus": toks["negative"].text, "minus_values": toks["negative"].values}
            out["sides"][side].append(row)
            at += 1
    return outs


def _compact(fid: dict, reading: str) -> dict:
    """The JSON-sized scores of one reading (the truncations as {k: R^2})."""
    r = fid[reading]
    return {"r2": r["r2"], "r2_scaled": r["r2_scaled"], "best_scale": r["best_scale"],
            "sign_agreement": r["sign_agreement"], "r2_per_direction": r["r2_per_direction"],
            "truncated_r2": {key: t["r2"] for key, t in r["truncated"].items()}}


def read_decoder_layer(layer: DecoderLayer, head: Head, n_fit: torch.Tensor, n_eval: torch.Tensor, fixed_ids,
                       promoted: int = 3, U_all: torch.Tensor | None = None, readings=LAYER_READINGS,
                       ks=TRUNCATIONS, k: int = 3, n_tokens: int = 8, decode=None) -> dict:
    """One layer: the fixed tokens and its `promoted` most promoted tokens (on n_fit), every reading's held-out
    fidelity for them, and the best reading's spectrum and token read-outs per direction. JSON-ready.

    n_fit: the layer's inputs on training text (fits the readings, picks the promoted tokens); n_eval: on
    held-out text (scores only). `U_all`: every token's direction (`Head.all_directions`), passed in so
    that a loop over layers builds it once.
    """
    glu = layer.glu
    fixed_ids = [int(i) for i in fixed_ids]
    if U_all is None and promoted:
        U_all = head.all_directions()
    prom = promoted_tokens(glu, U_all, n_fit.to(F64).reshape(-1, glu.d), promoted, exclude=fixed_ids)
    ids = fixed_ids + prom
    labels = ["token"] * len(fixed_ids) + [PROMOTED] * len(prom)
    dec = (lambda i: decode.decode([int(i)], skip_special_tokens=False)) if hasattr(decode, "decode") else decode
    fid = read_layer_tokens(glu, head.directions(ids), n_fit, n_eval, readings, ks)
    X_in, X_out = head.readers(layer)
    best = fid["best"]
    spectra = eigen_readouts(fid["forms"][best], X_in, X_out, k=k, n_tokens=n_tokens, decode=decode)
    return {
        "path": layer.path, "gate": glu.gate, "gate_kwargs": glu.gate_kwargs, "exact": fid["exact"],
        "n_fit": fid["n_fit"], "n_eval": fid["n_eval"],
        "directions": [{"label": lab, "token_id": i, "token": dec(i) if dec else f"<{i}>",
                        "target_std": s, "spectrum": sp}
                       for lab, i, s, sp in zip(labels, ids, fid["target_std"], spectra)],
        "readings": {r: _compact(fid, r) for r in fid["order"]}, "best": best, "order": fid["order"],
    }


__all__ = ["DecoderLayer", "Head", "LAYER_READINGS", "PROMOTED", "TRUNCATIONS", "TokenReader", "eigen_readout", "eigen_readouts", "promoted_tokens",
           "read_decoder_layer", "read_layer_tokens"]
