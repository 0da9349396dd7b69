"""Quadratic readings of a gated layer that account for the gate's shrink.

A 1-layer GLU classifier computes, on the embedded input x,

    logit_a(x) = sum_i (H P)_ai (w_i . x) gate(v_i . x).

A *reading* replaces it by one quadratic form per class, x^T B_a x, whose eigenvectors
are then the features (`sqs.interp.spectra.decompose`). Three readings, each still one
symmetric B_a per class:

- first-order (the paper's): the gate treated as the identity, B_a = sym sum_i (HP)_ai w_i v_i^T.
- gain: over the range a hidden unit actually sees, sqs(v) is closer to a unit-wise
  rescaling g_i * v, so w_i(x) * sqs(v_i(x)) ~ g_i * w_i(x) * v_i(x) and

      B_a = sym sum_i (HP)_ai g_i w_i v_i^T,   g_i = sum_n pre_ni post_ni / sum_n pre_ni^2

  with pre = V x, post = gate(V x) over the *training* images (`unit_gains`).
- fit: B_a fitted by least squares to the model's own logits on training images
  (`fit_quadratic_forms`), ridge-regularised toward a prior reading (the gain reading):

      min_B  sum_n sum_a (x_n^T B_a x_n - z_na)^2 + rho * sum_a ||B_a - B0_a||_F^2.

  No intercept and no linear term: the reading must stay a pure quadratic form, so that
  the eigen-surrogate sum_k lam_k (q_k . x)^2 *is* the fitted function (an intercept or a
  linear term would be a part of the logit the eigenvectors do not show), and so that an
  exactly quadratic model (bilinear gate, or sqs with c = lam = 0) is reproduced exactly.
  The model has no bias; what the shift c*sgn(v) adds, -c (w.x) sgn(v.x), is even and
  1-homogeneous in x, so a linear term could not represent it either.

For the identity gate every reading is the exact bilinear decomposition: all gains are 1,
and the fit's residual under the gain prior is zero, so the prior is the solution.
"""

from __future__ import annotations

import torch

#: Reading names, in the order reports list them.
READINGS = ("first-order", "gain", "fit")
#: Relative ridge of the fit: rho = ridge * mean diagonal of the features' Gram matrix.
DEFAULT_RIDGE = 1e-4


def check_reading(reading: str) -> str:
    """Validate a reading name (one-line error naming the valid ones)."""
    if reading not in READINGS:
        raise ValueError(f"unknown reading {reading!r}; choose one of: {', '.join(READINGS)}")
    return reading


def unit_gains(pre: torch.Tensor, post: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Per-unit least-squares gain g with post[:, i] ~ g_i * pre[:, i].

    `pre` (N, h) are the gate's inputs v = V x, `post` (N, h) its outputs gate(v). A unit
    that never fires (sum pre^2 = 0) gets gain 1 (it contributes nothing either way). For the
    identity gate post == pre and every gain is exactly 1.
    """
    if pre.shape != post.shape or pre.dim() != 2:
        raise ValueError(f"unit_gains: `pre` and `post` must both be (N, h), got {tuple(pre.shape)} and {tuple(post.shape)}")
    pre64, post64 = pre.double(), post.double()
    num = torch.einsum("nh,nh->h", pre64, post64)
    den = torch.einsum("nh,nh->h", pre64, pre64)
    return torch.where(den > eps, num / den.clamp_min(eps), torch.ones_like(den))


# --------------------------------------------------------------------------- least-squares fit


def _triu(d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Upper-triangular indices (j <= k) and the scale that makes the basis orthonormal.

    With features phi_jk(x) = s_jk x_j x_k, s = 1 on the diagonal and sqrt(2) off it, and
    coefficients beta_jk = s_jk B_jk, x^T B x = phi . beta and ||beta||^2 = ||B||_F^2, so the
    ridge penalises the Frobenius distance to the prior.
    """
    j, k = torch.triu_indices(d, d)
    s = torch.full(j.shape, 2.0, dtype=torch.float64).sqrt()
    s[j == k] = 1.0
    return j, k, s


def quadratic_features(x: torch.Tensor) -> torch.Tensor:
    """phi(x) (N, d(d+1)/2): x^T B x = phi(x) . sym_to_vec(B) for every symmetric B."""
    j, k, s = _triu(x.shape[-1])
    x = x.to(torch.float64)
    return x[:, j] * x[:, k] * s


def sym_to_vec(B: torch.Tensor) -> torch.Tensor:
    """(..., d, d) symmetric -> (..., d(d+1)/2) coefficients of `quadratic_features`."""
    j, k, s = _triu(B.shape[-1])
    return B[..., j, k] * s


def vec_to_sym(beta: torch.Tensor, d: int) -> torch.Tensor:
    """Inverse of `sym_to_vec`: (..., d(d+1)/2) -> (..., d, d) symmetric."""
    j, k, s = _triu(d)
    B = beta.new_zeros(*beta.shape[:-1], d, d)
    B[..., j, k] = beta / s
    B[..., k, j] = beta / s
    return B


def fit_quadratic_forms(x: torch.Tensor, z: torch.Tensor, prior: torch.Tensor | None = None,
                        ridge: float = DEFAULT_RIDGE, chunk_size: int = 2048) -> torch.Tensor:
    """Least-squares symmetric B (C, d, d) with x_n^T B_a x_n ~ z_na, ridge toward `prior`.

    x (N, d) embedded *training* inputs, z (N, C) the model's logits on them, prior (C, d, d)
    symmetric (zeros when None). Solves the normal equations in float64,

        (Phi^T Phi + rho I) beta = Phi^T (z - Phi beta0) + (Phi^T Phi + rho I) beta0,

    i.e. fits the residual of the prior, with rho = ridge * mean diag(Phi^T Phi). Phi^T Phi
    (F x F, F = d(d+1)/2: 8,256 for d = 128, 0.5 GB) is accumulated over chunks of
    `chunk_size` rows, so N is bounded by time, not memory (60k images, d = 128: a few
    minutes on one core). One Gram matrix serves all classes.
    """
    if x.dim() != 2 or z.dim() != 2 or x.shape[0] != z.shape[0]:
        raise ValueError(f"fit_quadratic_forms: expected x (N, d) and z (N, C) with equal N, "
                         f"got {tuple(x.shape)} and {tuple(z.shape)}")
    if ridge < 0:
        raise ValueError(f"fit_quadratic_forms: `ridge` must be >= 0, got {ridge}")
    n, d = x.shape
    C = z.shape[1]
    if n == 0:
        raise ValueError("fit_quadratic_forms: no fit inputs (N = 0); pass the training images")
    f64 = torch.float64
    x, z = x.to(f64).cpu(), z.to(f64).cpu()
    if prior is None:
        prior = torch.zeros(C, d, d, dtype=f64)
    if prior.shape != (C, d, d):
        raise ValueError(f"fit_quadratic_forms: `prior` must be ({C}, {d}, {d}), got {tuple(prior.shape)}")
    beta0 = sym_to_vec(prior.to(f64).cpu())  # (C, F)
    F = beta0.shape[-1]
    gram = torch.zeros(F, F, dtype=f64)
    rhs = torch.zeros(F, C, dtype=f64)
    for i in range(0, n, chunk_size):
        phi = quadratic_features(x[i:i + chunk_size])  # (n_chunk, F)
        gram.addmm_(phi.T, phi)
        rhs.addmm_(phi.T, z[i:i + chunk_size] - phi @ beta0.T)  # fit what the prior leaves
    gram.diagonal().add_(ridge * float(gram.diagonal().mean()))
    delta = torch.linalg.solve(gram, rhs)  # (F, C)
    return vec_to_sym(beta0 + delta.T, d)
