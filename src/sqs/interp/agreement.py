"""Fair agreement between two models' features (eigenvectors of their quadratic forms).

Comparing eigenvectors rank by rank after sorting by |eigval| mixes the two signs (the
largest |eigval| of a class may be negative in one model and positive in the other) and
lets near-equal eigenvalues swap ranks. So, per class, in pixel space (u = E^T q: two
models have different embeddings E, only pixel-space pictures are comparable), float64:

- sides: "positive" (eigval > 0, largest first), "negative" (eigval < 0, most negative
  first), and "abs" (the |eigval| order of `Decomposition`, kept as a secondary view);
- per_rank: |cos| between the eigenvectors of equal rank within a side;
- best_match: |cos| of the optimal one-to-one assignment between the two top-k sets
  (`scipy.optimize.linear_sum_assignment`, maximising the summed |cos|), per rank of A;
- overlap: mean squared canonical cosine between the two top-k subspaces,
  ||Qa^T Qb||_F^2 / min(ka, kb) with Qa, Qb orthonormal bases (QR) of the pixel vectors;
  1 iff one subspace contains the other, whatever the order and signs inside;
- form_cosine: cosine between the whole pixel-space quadratic forms M_a = E^T B_a E of
  the two models (Frobenius inner product, signed: B vs -B gives -1), computed with
  d x d traces, never forming 784 x 784; form_cosine_centered does the same after
  subtracting each model's mean form over classes (the part softmax ignores).

A side with fewer than k eigenvalues of its sign (|eigval| <= tol * max|eigval| counts as
zero, i.e. numerically null directions belong to no side) reports only the ranks that
exist: per_rank entries beyond min(ka, kb) and best_match entries of A's ranks beyond
min(ka, kb) (or beyond ka) are NaN, the overlap averages over min(ka, kb) canonical
angles and is NaN when a side is empty. Summaries skip NaN and report how many
(pair, class) values each rank rests on.

The matching itself (`vector_agreement`, `summarise`) takes any per-side unit vectors in a
space both models share; `profiles` gives eigenvectors that live in different input spaces
(two decoders' residual streams, two deep image models' hidden layers) as centred projection
profiles over shared probe inputs (tokens, test images), so the same code compares them by the
correlation of those profiles.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sqs.interp.spectra import Decomposition, to_homogeneous

SIDES = ("positive", "negative", "abs")
DEFAULT_K = 10
ZERO_TOL = 1e-10


def _check_k(k: int) -> int:
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"agreement: k must be a positive int (ranks per side), got {k!r}")
    return k


def side_indices(eigenvalues: torch.Tensor, side: str, k: int, tol: float = ZERO_TOL) -> list[torch.Tensor]:
    """Per class, indices (into the |eigval|-sorted eigenvalues) of the top-k of a side.

    positive: eigval > tol * max|eigval|, largest first; negative: eigval < -tol * max|eigval|,
    most negative first; abs: the first k of the |eigval| order. Lists may be shorter than k.
    """
    if side not in SIDES:
        raise ValueError(f"agreement: side must be one of {', '.join(SIDES)}, got {side!r}")
    out = []
    for eigvals in eigenvalues.to(torch.float64):
        if side == "abs":
            out.append(torch.arange(min(k, eigvals.shape[0])))
            continue
        s = eigvals if side == "positive" else -eigvals
        thresh = tol * float(eigvals.abs().max()) if eigvals.numel() else 0.0
        idx = torch.nonzero(s > thresh).flatten()
        out.append(idx[s[idx].argsort(descending=True)][:k])
    return out


def profiles(Q: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """Each eigenvector's projection on every row of X, centred over the rows and of unit norm.

    Q (..., k, r) eigenvectors as rows, X (M, d) shared probe inputs (tokens, images) in the model's own
    input space, r = d, or r = d + 1 for forms in [x; 1] (X then gets its constant 1 here) -> (..., k, M).
    Two models' input bases differ, so their eigenvectors are compared through these profiles over the
    same probes: the cosine of two centred unit profiles is their Pearson correlation.
    """
    X = X.to(torch.float64)
    if Q.shape[-1] == X.shape[-1] + 1:
        X = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=-1)
    if Q.shape[-1] != X.shape[-1]:
        raise ValueError(f"profiles: eigenvectors of length {Q.shape[-1]} but probe inputs of width {X.shape[-1]}")
    prof = Q.to(torch.float64) @ X.T
    prof = prof - prof.mean(-1, keepdim=True)
    return prof / prof.norm(dim=-1, keepdim=True).clamp_min(1e-300)


def _side_pair(ua: torch.Tensor, ub: torch.Tensor, k: int) -> dict:
    """Agreement of two sets of unit vectors (ka, P) and (kb, P) in one shared space, ka, kb <= k."""
    ka, kb = ua.shape[0], ub.shape[0]
    m = min(ka, kb)
    per_rank = np.full(k, np.nan)
    best = np.full(k, np.nan)
    match = np.full(k, -1, dtype=np.int64)
    overlap = math.nan
    if m:
        cos = (ua @ ub.T).abs().numpy()  # (ka, kb)
        per_rank[:m] = np.diagonal(cos)[:m]
        rows, cols = linear_sum_assignment(cos, maximize=True)
        best[rows], match[rows] = cos[rows, cols], cols
        qa, qb = torch.linalg.qr(ua.T).Q, torch.linalg.qr(ub.T).Q  # (P, ka), (P, kb) orthonormal
        overlap = float((qa.T @ qb).pow(2).sum()) / m
    return {"per_rank": per_rank, "best_match": best, "match": match, "overlap": overlap, "n_a": ka, "n_b": kb}


def same_space(dec_a: Decomposition, dec_b: Decomposition) -> tuple[Decomposition, Decomposition]:
    """Both decompositions in one space: a plain one is lifted to [x; 1] (`spectra.to_homogeneous`, which
    changes no form) when the other is homogeneous."""
    if dec_a.homogeneous == dec_b.homogeneous:
        return dec_a, dec_b
    return to_homogeneous(dec_a), to_homogeneous(dec_b)


def form_cosine(dec_a: Decomposition, dec_b: Decomposition, centered: bool = False,
                quadratic_only: bool = False) -> np.ndarray:
    """(C,) signed cosine between the pixel-space forms M_a = E_A^T B_a E_A and E_B^T B'_a E_B.

    <M, M'>_F = tr(B G B' G^T) with G = E_A E_B^T (d_A x d_B); no 784 x 784 matrix is formed.
    centered: subtract each model's mean form over classes first. Forms in [x; 1] (homogeneous)
    compare with their linear part; quadratic_only drops it (the last row and column), comparing
    the pure quadratic parts: a reading with a large linear part (a saturating gate read as
    a_i + b_i v) can share its quadratic features with a model that has none.
    """
    if dec_a.n_classes != dec_b.n_classes:
        raise ValueError(f"form_cosine: {dec_a.n_classes} vs {dec_b.n_classes} classes")
    dec_a, dec_b = same_space(dec_a, dec_b)
    if dec_a.embed.shape[1] != dec_b.embed.shape[1]:
        raise ValueError(f"form_cosine: {dec_a.embed.shape[1]} vs {dec_b.embed.shape[1]} pixels")
    Ea, Eb = dec_a.embed.to(torch.float64), dec_b.embed.to(torch.float64)
    Ba, Bb = dec_a.B.to(torch.float64), dec_b.B.to(torch.float64)
    if quadratic_only:
        Ba, Bb = (_quadratic_part(B) if d.homogeneous else B for B, d in ((Ba, dec_a), (Bb, dec_b)))
    if centered:
        Ba, Bb = Ba - Ba.mean(0, keepdim=True), Bb - Bb.mean(0, keepdim=True)

    def inner(B1, E1, B2, E2):  # <E1^T B1 E1, E2^T B2 E2>_F per class
        G = E1 @ E2.T
        return torch.einsum("ajk,kl,alm,jm->a", B1, G, B2, G)

    num = inner(Ba, Ea, Bb, Eb)
    den = (inner(Ba, Ea, Ba, Ea) * inner(Bb, Eb, Bb, Eb)).sqrt()
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, math.nan)).numpy()


def _quadratic_part(B: torch.Tensor) -> torch.Tensor:
    """A form in [x; 1] without its linear and constant part (last row and column set to 0)."""
    B = B.clone()
    B[..., -1, :] = 0.0
    B[..., :, -1] = 0.0
    return B


def vector_agreement(eig_a: torch.Tensor, vec_a: torch.Tensor, eig_b: torch.Tensor, vec_b: torch.Tensor,
                     k: int = DEFAULT_K, tol: float = ZERO_TOL) -> dict:
    """The per-side agreement of two models' features given as unit vectors in one shared space.

    eig_a (C, d) eigenvalues in |eigval| order per group (class, token direction, ...); vec_a
    (C, d, P) the matching features as unit vectors in a space both models share (pixel space
    for image classifiers; centred, unit token-projection profiles for language models, so
    that |cos| is |correlation|). Same for B. Returns {"k", "n_classes", "positive" |
    "negative" | "abs": {"per_rank" (C, k), "best_match" (C, k), "match" (C, k), "overlap" (C,),
    "n_a" (C,), "n_b" (C,)}} as numpy arrays, NaN where a rank does not exist.
    """
    k = _check_k(k)
    if eig_a.shape[0] != eig_b.shape[0]:
        raise ValueError(f"agreement: {eig_a.shape[0]} vs {eig_b.shape[0]} classes")
    if vec_a.shape[-1] != vec_b.shape[-1]:
        raise ValueError(f"agreement: feature vectors of length {vec_a.shape[-1]} vs {vec_b.shape[-1]}; "
                         "both models must be read in the same space")
    out = {"k": k, "n_classes": int(eig_a.shape[0])}
    for side in SIDES:
        ia, ib = side_indices(eig_a, side, k, tol), side_indices(eig_b, side, k, tol)
        per = [_side_pair(vec_a[c, ia[c]].to(torch.float64), vec_b[c, ib[c]].to(torch.float64), k)
               for c in range(eig_a.shape[0])]
        out[side] = {key: np.stack([np.asarray(p[key]) for p in per]) for key in per[0]}
    return out


def agreement(dec_a: Decomposition, dec_b: Decomposition, k: int = DEFAULT_K, tol: float = ZERO_TOL) -> dict:
    """Agreement of two models' features, per class (see the module docstring).

    Returns {"k", "n_classes", "positive" | "negative" | "abs": {"per_rank" (C, k),
    "best_match" (C, k), "match" (C, k) rank in B's side matched to A's rank (-1: none),
    "overlap" (C,), "n_a" (C,), "n_b" (C,)}, "form_cosine" (C,), "form_cosine_centered" (C,)}
    as numpy arrays, NaN where a rank does not exist.
    """
    k = _check_k(k)
    if dec_a.n_classes != dec_b.n_classes:
        raise ValueError(f"agreement: {dec_a.n_classes} vs {dec_b.n_classes} classes")
    dec_a, dec_b = same_space(dec_a, dec_b)
    out = vector_agreement(dec_a.eigenvalues, dec_a.pixel, dec_b.eigenvalues, dec_b.pixel, k=k, tol=tol)
    out["form_cosine"] = form_cosine(dec_a, dec_b)
    out["form_cosine_centered"] = form_cosine(dec_a, dec_b, centered=True)
    return out


def pairings(decs_a: list, decs_b: list | None = None, paired: bool = True) -> list[tuple]:
    """Model pairs to compare: all unordered pairs within decs_a (decs_b None); decs_a[i] vs
    decs_b[i] (paired); or every cross pair i != j (paired=False)."""
    if decs_b is None:
        pairs = [(decs_a[i], decs_a[j]) for i in range(len(decs_a)) for j in range(i + 1, len(decs_a))]
    elif paired:
        if len(decs_a) != len(decs_b):
            raise ValueError(f"pairings: paired lists must have equal length, got {len(decs_a)} and {len(decs_b)}")
        pairs = list(zip(decs_a, decs_b))
    else:
        pairs = [(a, b) for i, a in enumerate(decs_a) for j, b in enumerate(decs_b) if i != j]
    if not pairs:
        raise ValueError("pairings: no pairs to compare (need at least two models)")
    return pairs


def _stats(values: np.ndarray) -> dict:
    """mean / std (population) / n over axis 0, NaN skipped; None where nothing is left."""
    v = np.asarray(values, dtype=np.float64)
    n = (~np.isnan(v)).sum(0)
    with warnings.catch_warnings():  # all-NaN ranks: mean/std are NaN -> None below
        warnings.simplefilter("ignore", RuntimeWarning)
        mean, std = np.nanmean(v, 0), np.nanstd(v, 0)

    def plain(x) -> float | None:
        return None if np.isnan(x) else float(x)

    if v.ndim == 1:
        return {"mean": plain(mean), "std": plain(std), "n": int(n)}
    return {"mean": [plain(x) for x in mean], "std": [plain(x) for x in std], "n": n.tolist()}


def agreement_summary(pairs: list[tuple], k: int = DEFAULT_K, tol: float = ZERO_TOL) -> dict:
    """Mean ± std over (pair, class) of every agreement measure, JSON-ready.

    pairs: [(dec_a, dec_b), ...] (see `pairings`). Returns {"n_pairs", "k", side: {"per_rank",
    "best_match": {"mean": [k], "std": [k], "n": [k]}, "overlap": {"mean", "std", "n"}},
    "form_cosine", "form_cosine_centered": {"mean", "std", "n"}}; a rank no pair has is None.
    """
    k = _check_k(k)
    if not pairs:
        raise ValueError("agreement_summary: no pairs to compare")
    res = [agreement(a, b, k=k, tol=tol) for a, b in pairs]
    return summarise(res, extra=("form_cosine", "form_cosine_centered"))


def summarise(results: list[dict], extra: tuple[str, ...] = ()) -> dict:
    """Mean ± std over every (pair, group) of a list of `vector_agreement` / `agreement` results,
    JSON-ready: {"n_pairs", "k", side: {"per_rank", "best_match": {"mean": [k], "std": [k], "n": [k]},
    "overlap": {"mean", "std", "n"}}, and each key of `extra` (per-group arrays) as {"mean", "std", "n"}}."""
    if not results:
        raise ValueError("agreement: no results to summarise")
    out = {"n_pairs": len(results), "k": results[0]["k"]}
    for side in SIDES:
        out[side] = {m: _stats(np.concatenate([r[side][m] for r in results])) for m in ("per_rank", "best_match")}
        out[side]["overlap"] = _stats(np.concatenate([r[side]["overlap"] for r in results]))
    for m in extra:
        out[m] = _stats(np.concatenate([r[m] for r in results]))
    return out
