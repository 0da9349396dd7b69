"""A decoder's GLU layers read as quadratic forms over tokens.

One GLU layer of a pre-norm decoder (`sqs.models.gpt`, or any Llama-style gated MLP) adds

    y = P [(W n) * gate(V n)],      n = norm2(x)  (the block's pre-MLP RMSNorm output)

to the residual stream. Its *direct* contribution to an output direction u (d_model),
the path that goes straight from this MLP's output to the logits, skipping every later
layer, is c_u(n) = u . y. For the identity gate (the bilinear MLP) that is a quadratic form

    c_u(n) = n^T B_u n,     B_u = sum_i (u . P_i) sym(w_i v_i^T)                     (1)

(P_i is column i of P; only the symmetric part counts), so `eigh` reads it as
sum_k eigval_k (q_k . n)^2, exactly as `sqs.interp.spectra` reads the image classifiers'
logits. For SQS, (1) with the gate taken as the identity is the paper's *first-order*
reading; the *gain* reading scales unit i by its least-squares gain g_i
(`sqs.interp.readings.unit_gains`, fitted on training windows) to account for the shrink:
B_u = sum_i (u . P_i) g_i sym(w_i v_i^T). `lm_fidelity` measures both on held-out text.

A token's output direction (tied or untied head, final RMSNorm with weight w_f):
logit_t = E[t] . (w_f * h / rms(h)), so u_t = E[t] * w_f * s with s = 1/rms(h) of the final
residual stream. s varies per position; we replace it by a constant, its mean over data
(`mean_inv_rms`). Only the scale of u depends on s, so R^2, signs and eigenvectors do not.

Eigenvectors q live in the d_model space of n. `token_inputs` maps every token to the n
it would give *if the residual stream held only its embedding* (rmsnorm(E[t]) * norm2.w):
for layer 0 that leaves out the position embedding and the first attention layer's output,
for deeper layers also every earlier block, so for layers > 0 it is a rough vocabulary
probe, not the input the layer sees. `max_activating` uses the real n instead.

Conventions, mirroring `sqs.interp.spectra`: all analysis in float64 on CPU; eigenvectors as
rows; `eig_signed` orders eigenvalues signed, descending (the positive side from the top,
the negative side read from the end, most negative first); `spectra.eig_sorted` gives the
|eigval| order used for top-k truncations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from sqs.functional import canonical_gate, gate_fn
from sqs.interp.agreement import DEFAULT_K, ZERO_TOL, profiles, side_indices, vector_agreement
from sqs.interp.layer_readings import READING_DESCRIPTIONS, GLUWeights, best_reading, output_scores, read_layers
from sqs.interp.readings import (
    DEFAULT_RIDGE,
    READINGS,
    homogeneous,
    interaction_matrices,
    quadratic_form,
    r2,
    unit_gains,
)
from sqs.interp.spectra import DEFAULT_KS, NotQuadratic, eig_sorted, gate_reading, is_exact_gate

GAIN_READING = "gain (unit i scaled by its least-squares gate gain, fitted on training windows)"
Decoder = Callable[[int], str]
F64 = torch.float64


# --------------------------------------------------------------------------- weights


def act_gate(act) -> tuple[str, dict]:
    """The project's gate name (and kwargs) for a Llama-style `act_fn` (module or function); transformers'
    `LinearActivation` (``hidden_act="linear"``, what a Bilinear conversion saves) is the bilinear gate."""
    if all(hasattr(act, a) for a in ("c", "lam", "p")):  # sqs.nn.SQS
        return "sqs", {"c": float(act.c), "lam": float(act.lam), "p": float(act.p)}
    name = (type(act).__name__ if isinstance(act, torch.nn.Module) else getattr(act, "__name__", "")).lower()
    if isinstance(act, torch.nn.GELU) and act.approximate != "none":
        raise ValueError("glu_weights: the tanh-approximated GELU is not one of the project's gates; "
                         "use nn.GELU(approximate='none')")
    for key, gate in (("identity", "bilinear"), ("linearactivation", "bilinear"), ("silu", "swiglu"), ("swish", "swiglu"), ("gelu", "gelu"),
                      ("relu", "relu")):
        if key in name:
            return gate, {}
    raise ValueError(f"glu_weights: cannot name the gate of act_fn {act!r}; expected nn.Identity, nn.SiLU, nn.GELU, "
                     "nn.ReLU or sqs.nn.SQS")


def _no_bias(*linears) -> None:
    if any(getattr(lin, "bias", None) is not None for lin in linears):
        raise NotQuadratic("glu_weights: the MLP has biases, so its output is a general quadratic, not a quadratic "
                           "form of n; this reading needs bias-free projections")


def glu_weights(mlp) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str, dict]:
    """(W, V, P, gate, gate_kwargs) of a gated MLP y = P[(W n) * gate(V n)], weights detached.

    Duck-typed: the project's `sqs.nn.GLU` (attributes W, V, P, gate, gate_kwargs) or a
    Llama-style MLP y = down_proj(act_fn(gate_proj(n)) * up_proj(n)), where up_proj is the
    linear side W, gate_proj the gated side V and down_proj the output P.
    W, V: (h, d); P: (d_out, h); `gate` is a name from `sqs.functional.GATES`.
    """
    if all(hasattr(mlp, a) for a in ("gate_proj", "up_proj", "down_proj", "act_fn")):
        _no_bias(mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        gate, kw = act_gate(mlp.act_fn)
        return (mlp.up_proj.weight.detach(), mlp.gate_proj.weight.detach(), mlp.down_proj.weight.detach(), gate, kw)
    if all(hasattr(mlp, a) for a in ("W", "V", "P", "gate")):
        if mlp.P is None:
            raise NotQuadratic("glu_weights: the GLU has no output projection P (d_out=None)")
        _no_bias(getattr(mlp, "proj", None), getattr(mlp, "out", None))
        return mlp.W, mlp.V, mlp.P, canonical_gate(mlp.gate), dict(getattr(mlp, "gate_kwargs", {}))
    raise TypeError(f"glu_weights: {type(mlp).__name__} is neither an sqs.nn.GLU (W, V, P, gate) nor a Llama-style MLP "
                    "(gate_proj, up_proj, down_proj, act_fn)")


# --------------------------------------------------------------------------- output directions


def mean_inv_rms(h: torch.Tensor, eps: float | None = None) -> float:
    """Mean of 1/rms(h) over all positions of residual streams h (..., d): the constant that stands in
    for the final RMSNorm's per-position scale in a token's output direction. eps as torch's RMSNorm
    (None: the dtype's machine epsilon)."""
    h = h.to(F64).reshape(-1, h.shape[-1])
    eps = torch.finfo(F64).eps if eps is None else eps
    return float(torch.rsqrt(h.pow(2).mean(-1) + eps).mean())


def token_directions(unembed: torch.Tensor, norm_weight: torch.Tensor, tokens, scale: float = 1.0) -> torch.Tensor:
    """u_t = unembed[t] * norm_weight * scale for each token id: (K, d), float64.

    The final RMSNorm's 1/rms(h) is a per-position number; `scale` approximates it by a
    constant (e.g. `mean_inv_rms` of the final residual stream on validation text). It only
    sets the unit (logits) of B_u; eigenvectors, R^2 and signs do not depend on it.
    """
    ids = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
    if ids.numel() and (ids.min() < 0 or ids.max() >= unembed.shape[0]):
        raise ValueError(f"token_directions: token ids must be in [0, {unembed.shape[0]}), got {ids.tolist()}")
    return unembed.detach().to(F64)[ids] * norm_weight.detach().to(F64) * scale


def token_id(tokenizer, text: str) -> int:
    """The id of `text` if it is one token of `tokenizer` (a `tokenizers.Tokenizer`), e.g. " happy"."""
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if len(ids) != 1:
        raise ValueError(f"token_id: {text!r} is {len(ids)} tokens ({ids}), not one; pick a single token "
                         "(byte-level BPE words usually carry their leading space, e.g. ' happy')")
    return int(ids[0])


# --------------------------------------------------------------------------- interaction matrices


def direction_matrices(W: torch.Tensor, V: torch.Tensor, P: torch.Tensor, U: torch.Tensor,
                       gains: torch.Tensor | None = None) -> torch.Tensor:
    """B_u (K, d, d), symmetrised, for output directions U (K, d_out):
    B_u = sum_i (u . P_i) g_i sym(w_i v_i^T); gains g (h,) default 1 (the exact / first-order reading)."""
    P = P.to(F64) if gains is None else P.to(F64) * gains.to(F64)
    return interaction_matrices(W.to(F64), V.to(F64), U.to(F64).reshape(-1, P.shape[0]) @ P)


def direction_matrix(W: torch.Tensor, V: torch.Tensor, P: torch.Tensor, u: torch.Tensor,
                     gains: torch.Tensor | None = None) -> torch.Tensor:
    """B_u (d, d) for one output direction u (d_out,); see `direction_matrices`."""
    return direction_matrices(W, V, P, u.reshape(1, -1), gains)[0]


def direction_norms(W: torch.Tensor, V: torch.Tensor, P: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """||B_u||_F for many directions U (K, d_out) without forming the K matrices.

    With c = P^T u and S_i = sym(w_i v_i^T), ||B_u||^2 = c^T G c where
    G_ij = tr(S_i S_j) = ((w_i.w_j)(v_i.v_j) + (w_i.v_j)(v_i.w_j)) / 2.
    """
    W, V, P, U = (t.to(F64) for t in (W, V, P, U))
    G = 0.5 * ((W @ W.T) * (V @ V.T) + (W @ V.T) * (V @ W.T))
    C = U @ P
    return torch.einsum("ki,ij,kj->k", C, G, C).clamp_min(0).sqrt()


def direct_contribution(W: torch.Tensor, V: torch.Tensor, P: torch.Tensor, gate: str, gate_kwargs: dict,
                        U: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """The layer's direct contribution u . P[(W n) * gate(V n)] (N, K) for inputs n (..., d), float64.

    "Direct" = this MLP's output projected on u; what later layers make of it is not included.
    """
    n = n.to(F64).reshape(-1, W.shape[1])
    hidden = (n @ W.to(F64).T) * gate_fn(gate, **gate_kwargs)(n @ V.to(F64).T)
    return hidden @ (U.to(F64).reshape(-1, P.shape[0]) @ P.to(F64)).T


def top_promoted(W: torch.Tensor, V: torch.Tensor, P: torch.Tensor, U: torch.Tensor, k: int = 10,
                 by: str = "norm", n: torch.Tensor | None = None, gate: str = "bilinear",
                 gate_kwargs: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The k directions (rows of U, e.g. every token's u) this layer acts on most: (indices, scores).

    by="norm": largest ||B_u||_F (weights only). by="mean": largest mean direct contribution
    u . MLP(n) over inputs n (needs n, gate, gate_kwargs): the tokens the layer promotes on average.
    """
    if by == "norm":
        score = direction_norms(W, V, P, U)
    elif by == "mean":
        if n is None:
            raise ValueError("top_promoted: by='mean' needs the layer inputs `n`")
        n = n.to(F64).reshape(-1, W.shape[1])
        hidden = (n @ W.to(F64).T) * gate_fn(gate, **(gate_kwargs or {}))(n @ V.to(F64).T)
        score = U.to(F64) @ (P.to(F64) @ hidden.mean(0))  # u . mean output: O(V d), not O(V d h), for a vocabulary
    else:
        raise ValueError(f"top_promoted: `by` must be 'norm' or 'mean', got {by!r}")
    top = score.topk(min(k, score.numel()))
    return top.indices, top.values


# --------------------------------------------------------------------------- spectra


def eig_signed(B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (..., d) in signed descending order and eigenvectors as rows (..., d, d).

    The positive side reads from the start (largest first), the negative side from the end
    (most negative first); `spectra.eig_sorted` gives the |eigval| order."""
    eigvals, Q = torch.linalg.eigh(B.to(F64))  # ascending
    return eigvals.flip(-1), Q.transpose(-1, -2).flip(-2)


@dataclass
class Spectrum:
    """The signed spectrum of one B_u; `side("positive"|"negative", k)` gives the top k of a side."""

    eigenvalues: torch.Tensor  # (d,), signed descending
    eigenvectors: torch.Tensor  # (d, d), rows

    @classmethod
    def of(cls, B: torch.Tensor) -> "Spectrum":
        return cls(*eig_signed(B))

    def side(self, side: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigvals (k',), Q (k', d)): the k largest positive, or the k most negative, eigenpairs (k' <= k)."""
        if side not in ("positive", "negative"):
            raise ValueError(f"Spectrum.side: `side` must be 'positive' or 'negative', got {side!r}")
        idx = side_indices(self.eigenvalues[None], side, k, tol=0.0)[0]  # the image analysis' side rule
        return self.eigenvalues[idx], self.eigenvectors[idx]

    def by_abs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(eigvals, Q) in |eigval| descending order, as the image analysis and top-k truncations use."""
        order = self.eigenvalues.abs().argsort(descending=True)
        return self.eigenvalues[order], self.eigenvectors[order]

    def reconstruct(self) -> torch.Tensor:
        return torch.einsum("k,kj,kl->jl", self.eigenvalues, self.eigenvectors, self.eigenvectors)


# --------------------------------------------------------------------------- reading eigenvectors as tokens


def token_inputs(embed: torch.Tensor, norm_weight: torch.Tensor, eps: float | None = None) -> torch.Tensor:
    """rmsnorm(E[t]) * norm_weight for every token (V, d), float64: the n a token would give alone.

    Layer 0's actual n also holds the position embedding (and its attention output); for
    deeper layers the residual stream holds every earlier block's output, so this is only
    a vocabulary probe there (see the module docstring)."""
    E = embed.detach().to(F64)
    return F.rms_norm(E, (E.shape[-1],), norm_weight.detach().to(F64), eps)


def orient(Q: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Flip each eigenvector (rows of Q, (..., d)) so that its largest-|projection| row of X (V, d) is positive.

    As `spectra.decompose` fixes pixel signs: the quadratic form does not depend on the sign, the
    token lists' sides do."""
    return Q * orientation(Q.to(F64) @ X.to(F64).T)


def orientation(proj: torch.Tensor) -> torch.Tensor:
    """The signs (..., 1) `orient` applies, from the projections (..., V) of each vector on every token: the sign
    of its largest-|projection| entry (+1 where that is 0). Taking projections lets a caller compute them once
    for many vectors and reuse them for the token lists (`top_tokens`)."""
    sign = torch.sign(proj.gather(-1, proj.abs().argmax(-1, keepdim=True)))
    sign[sign == 0] = 1.0
    return sign


def _decoder(decode) -> Decoder:
    if decode is None:
        return lambda i: f"<{i}>"
    if hasattr(decode, "decode"):  # tokenizers.Tokenizer
        return lambda i: decode.decode([int(i)], skip_special_tokens=False)
    if callable(decode):
        return decode
    raise TypeError(f"expected a tokenizers.Tokenizer or a callable id -> str, got {type(decode).__name__}")


@dataclass
class TokenList:
    ids: list[int]
    values: list[float]  # q . x_t
    text: list[str]

    def __str__(self) -> str:
        return ", ".join(f"{t!r} {v:+.2f}" for t, v in zip(self.text, self.values))


def read_tokens(q: torch.Tensor, X: torch.Tensor, k: int = 10, decode=None) -> dict[str, TokenList]:
    """The k tokens whose inputs X (V, d) (e.g. `token_inputs`) project most positively and most
    negatively on q (d,): {"positive": TokenList, "negative": TokenList}.

    `decode`: a `tokenizers.Tokenizer` or a callable id -> str (None: "<id>")."""
    return top_tokens(X.to(F64) @ q.to(F64), k, decode)


def top_tokens(proj: torch.Tensor, k: int = 10, decode=None) -> dict[str, TokenList]:
    """`read_tokens` from the projections proj (V,) of one vector on every token, already computed."""
    dec = _decoder(decode)
    out = {}
    for side, vals in (("positive", proj), ("negative", -proj)):
        top = vals.topk(min(k, vals.numel()))
        ids = top.indices.tolist()
        out[side] = TokenList(ids, proj[top.indices].tolist(), [dec(i) for i in ids])
    return out


@dataclass
class Example:
    window: int
    position: int
    value: float  # q . n at that position
    text: str  # context with the token marked «token»


def render(ids, position: int, decode=None, before: int = 12, after: int = 4) -> str:
    """Text around ids[position] with that token marked «...» (newlines shown as ⏎)."""
    dec = _decoder(decode)
    ids = [int(i) for i in ids]
    if hasattr(decode, "decode"):
        piece = lambda seq: decode.decode(seq, skip_special_tokens=False) if seq else ""  # noqa: E731
    else:
        piece = lambda seq: "".join(dec(i) for i in seq)  # noqa: E731
    lo, hi = max(0, position - before), min(len(ids), position + 1 + after)
    text = piece(ids[lo:position]) + "«" + piece([ids[position]]) + "»" + piece(ids[position + 1:hi])
    return text.replace("\n", "⏎")


def max_activating(n: torch.Tensor, q: torch.Tensor, idx: torch.Tensor, k: int = 10, side: str = "positive",
                   decode=None, before: int = 12, after: int = 4) -> list[Example]:
    """The k positions of token windows idx (B, T) whose real layer inputs n (B, T, d) project most on q.

    side="negative": the most negative projections; side="abs": the largest |q . n|, i.e. the largest
    |eigval (q . n)^2| term, since the quadratic form does not see the sign of q . n. Each example carries
    a text rendering with the token marked «token» and `before`/`after` tokens of context."""
    if n.shape[:2] != idx.shape:
        raise ValueError(f"max_activating: n {tuple(n.shape)} and idx {tuple(idx.shape)} disagree on (B, T)")
    if side not in ("positive", "negative", "abs"):
        raise ValueError(f"max_activating: `side` must be 'positive', 'negative' or 'abs', got {side!r}")
    proj = n.to(F64) @ q.to(F64)  # (B, T)
    flat = {"positive": proj, "negative": -proj, "abs": proj.abs()}[side].reshape(-1)
    top = flat.topk(min(k, flat.numel())).indices
    T = idx.shape[1]
    out = []
    for j in top.tolist():
        w, p = divmod(j, T)
        out.append(Example(w, p, float(proj[w, p]), render(idx[w].tolist(), p, decode, before, after)))
    return out


# --------------------------------------------------------------------------- layer inputs


@dataclass
class LayerInputs:
    pre_mlp: list[torch.Tensor]  # per layer, (B, T, d): the MLP's input n = norm2(x)
    final: torch.Tensor  # (B, T, d): the residual stream entering the final norm


@torch.no_grad()
def layer_inputs(model, idx: torch.Tensor, batch_size: int = 8) -> LayerInputs:
    """Every block's pre-MLP input n and the final residual stream for token windows idx (B, T).

    Forward pre-hooks on `model.blocks[l].mlp` and `model.norm` record what the model's own
    forward feeds them, so n is exactly what the MLP sees. float32/64 as the model; on CPU.
    """
    blocks, norm = getattr(model, "blocks", None), getattr(model, "norm", None)
    if blocks is None or norm is None or not all(hasattr(b, "mlp") for b in blocks):
        raise TypeError("layer_inputs: expected a decoder with `blocks[l].mlp` and a final `norm` (sqs.models.gpt.GPT)")
    rec: dict = {i: [] for i in range(len(blocks))}
    rec["final"] = []

    def hook(key):
        return lambda mod, args: rec[key].append(args[0].detach().cpu())

    handles = [b.mlp.register_forward_pre_hook(hook(i)) for i, b in enumerate(blocks)]
    handles.append(norm.register_forward_pre_hook(hook("final")))
    was_training = model.training
    model.eval()
    dev = next(model.parameters()).device
    try:
        for s in range(0, idx.shape[0], batch_size):
            model(idx[s:s + batch_size].to(dev))
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return LayerInputs([torch.cat(rec[i]) for i in range(len(blocks))], torch.cat(rec["final"]))


# --------------------------------------------------------------------------- fidelity


def _scores(pred: torch.Tensor, target: torch.Tensor) -> dict:
    per_dir = [r2(pred[:, j:j + 1], target[:, j:j + 1]) for j in range(target.shape[1])]
    return {**output_scores(pred, target), "r2_per_direction": per_dir}


def _reading(B: torch.Tensor, n: torch.Tensor, target: torch.Tensor, ks) -> dict:
    """Scores of the forms B (K, r, r) on inputs n (N, r) (homogeneous forms: n = [n; 1]), also truncated."""
    eigvals, Q = eig_sorted(B)  # |eigenvalue| order: the top-k truncations keep the largest |eigenvalue|
    d = eigvals.shape[-1]
    top = min(d, max([k for k in ks if k is not None], default=0))  # only these terms are ever summed: for
    # d = 577 and k <= 64 that is a ninth of the projections ("all" is the form itself)
    terms = eigvals[None, :, :top] * torch.einsum("kjd,nd->nkj", Q[:, :top], n) ** 2  # (N, K, top)
    full = quadratic_form(B, n)
    out = _scores(full, target)
    out["truncated"] = {("all" if k is None else str(k)): {"k": d if k is None else min(k, d),
                                                           **_scores(full if k is None or k >= d
                                                                     else terms[..., :k].sum(-1), target)}
                        for k in ks}
    return out


@torch.no_grad()
def lm_fidelity(W: torch.Tensor, V: torch.Tensor, P: torch.Tensor, gate: str, gate_kwargs: dict, U: torch.Tensor,
                n_fit: torch.Tensor, n_eval: torch.Tensor, ks=DEFAULT_KS, force: bool = False) -> dict:
    """How much of the layer's direct contribution u . MLP(n) the quadratic forms n^T B_u n reproduce.

    U (K, d_out) output directions; n_fit / n_eval (..., d) layer inputs from *different* token
    windows: the gain reading's g_i = unit_gains(V n, gate(V n)) is fitted on n_fit only, and
    everything is scored on n_eval. Readings:
      - "first_order": gate treated as identity (exact for bilinear: R^2 = 1 up to float error);
      - "gain": unit i scaled by g_i (all g_i = 1 for the bilinear gate, so it equals first_order).
    Each has R^2 (pooled over directions, SS_tot about each direction's mean), R^2 after the best
    single scale, sign agreement, R^2 per direction, and the same for the top-k truncations
    of the |eigval|-ordered eigen-expansion (k in ks; None = all).
    """
    gate_kwargs = dict(gate_kwargs or {})
    exact, reading = gate_reading(gate, gate_kwargs, force=force)
    W64, V64 = W.to(F64), V.to(F64)
    n_fit = n_fit.to(F64).reshape(-1, W.shape[1])
    n_eval = n_eval.to(F64).reshape(-1, W.shape[1])
    U = U.to(F64).reshape(-1, P.shape[0])
    target = direct_contribution(W, V, P, gate, gate_kwargs, U, n_eval)
    pre = n_fit @ V64.T
    gains = unit_gains(pre, gate_fn(gate, **gate_kwargs)(pre))
    out = {"gate": canonical_gate(gate), "exact": exact, "n_fit": n_fit.shape[0], "n_eval": n_eval.shape[0],
           "target_std": target.std(0).tolist()}
    out["first_order"] = {"reading": reading, **_reading(direction_matrices(W64, V64, P, U), n_eval, target, ks)}
    out["gain"] = {"reading": GAIN_READING, "gains": gains,
                   **_reading(direction_matrices(W64, V64, P, U, gains), n_eval, target, ks)}
    return out


@torch.no_grad()
def lm_reading_fidelity(W: torch.Tensor, V: torch.Tensor, P: torch.Tensor, gate: str, gate_kwargs: dict,
                        U: torch.Tensor, n_fit: torch.Tensor, n_eval: torch.Tensor, readings=READINGS, ks=DEFAULT_KS,
                        fit_rows: int | None = None, weighted: bool = True, ridge: float = DEFAULT_RIDGE) -> dict:
    """The reading protocol on one decoder GLU layer, any gate: how much of its direct contribution
    u . MLP(n) to each output direction u (rows of U (K, d_out)) each reading reproduces.

    Every reading (`sqs.interp.layer_readings.read_layers`: first-order where the gate has one, gain,
    affine, fit) is fitted on the layer inputs n_fit (..., d) from *training* tokens and scored on
    n_eval from held-out tokens, as one form per direction in z = [n; 1]:
    B_u = sum_k u_k B_k (`LayerReading.through`). "fit" is fitted to the layer's d_out outputs on the
    first `fit_rows` rows of n_fit (None: all; N * F^2 work, F = (d+1)(d+2)/2). `weighted`: the
    per-unit fits weighted by (w_i . n)^2 (`readings.unit_weights`).

    Returns {"gate", "exact", "n_fit", "n_eval", "target_std", "best", "order" (by R^2, ties to the
    simpler reading), and per reading name {"reading": description, "r2", "r2_scaled", "best_scale",
    "sign_agreement", "r2_per_direction", "truncated": {k: ...}}, "forms": {reading: B_u (K, d+1, d+1)}}.
    """
    glu = GLUWeights(W, V, P, gate, gate_kwargs or {})
    n_fit = n_fit.to(F64).reshape(-1, glu.d)
    n_eval = n_eval.to(F64).reshape(-1, glu.d)
    U = U.to(F64).reshape(-1, glu.P.shape[0])
    target = glu.output(n_eval) @ U.T
    fitted = read_layers(glu, n_fit, readings, fit_rows=fit_rows, weighted=weighted, ridge=ridge)
    z_eval = homogeneous(n_eval)
    out = {"gate": glu.gate, "exact": is_exact_gate(glu.gate, glu.gate_kwargs), "n_fit": n_fit.shape[0],
           "n_eval": n_eval.shape[0], "target_std": target.std(0).tolist(), "forms": {}}
    for name, rd in fitted.items():
        B = rd.through(U).B
        out["forms"][name] = B
        out[name] = {"reading": READING_DESCRIPTIONS[name], **_reading(B, z_eval, target, ks)}
    out["best"], out["order"] = best_reading({r: out[r] for r in fitted})
    return out


def split_windows(n: torch.Tensor, fit_frac: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer inputs (B, T, d) -> (fit, eval) split by whole windows (first fit_frac of the windows to fit),
    so no window is in both halves."""
    if not 0 < fit_frac < 1 or n.shape[0] < 2:
        raise ValueError(f"split_windows: need 0 < fit_frac < 1 and >= 2 windows, got {fit_frac} and {n.shape[0]}")
    cut = min(max(1, round(n.shape[0] * fit_frac)), n.shape[0] - 1)
    return n[:cut], n[cut:]



# --------------------------------------------------------------------------- agreement in token space


#: An eigenvector's centred, unit projection profile over the vocabulary (`agreement.profiles` with X the
#: token inputs): the name the token-space analysis uses.
token_profiles = profiles


def token_agreement(B_a: torch.Tensor, X_a: torch.Tensor, B_b: torch.Tensor, X_b: torch.Tensor,
                    k: int = DEFAULT_K, tol: float = ZERO_TOL) -> dict:
    """Fair agreement of two models' eigenvectors for the same output directions, in token space.

    B_a (K, d_a, d_a) and B_b (K, d_b, d_b): the matrices of the same K directions (e.g. the same
    tokens) in two models (or (K, d+1, d+1) forms in [n; 1]); X_a (V, d_a), X_b (V, d_b): each model's
    token inputs over one shared vocabulary. The eigenvectors become `token_profiles` and go through the image analysis'
    matching (`sqs.interp.agreement.vector_agreement`: signed sides, per-rank |corr|, best
    one-to-one match, subspace overlap), so per_rank etc. are |correlations| of profiles.
    """
    if B_a.shape[0] != B_b.shape[0]:
        raise ValueError(f"token_agreement: {B_a.shape[0]} vs {B_b.shape[0]} directions")
    if X_a.shape[0] != X_b.shape[0]:
        raise ValueError(f"token_agreement: vocabularies of {X_a.shape[0]} vs {X_b.shape[0]} tokens; "
                         "token-space agreement needs one shared tokenizer")
    eigvals_a, Q_a = eig_sorted(B_a.to(F64))
    eigvals_b, Q_b = eig_sorted(B_b.to(F64))
    return vector_agreement(eigvals_a, profiles(Q_a, X_a), eigvals_b, profiles(Q_b, X_b), k=k, tol=tol)

__all__ = [
    "GAIN_READING", "LayerInputs", "Spectrum", "TokenList", "Example", "act_gate", "direct_contribution", "direction_matrices",
    "direction_matrix", "direction_norms", "eig_signed", "glu_weights", "layer_inputs", "lm_fidelity",
    "lm_reading_fidelity", "max_activating",
    "mean_inv_rms", "orient", "orientation", "read_tokens", "top_tokens", "render", "split_windows", "token_agreement", "token_directions",
    "token_id", "token_inputs", "token_profiles", "top_promoted",
]
