"""Readings of a gated unit: the gate replaced by something that keeps the layer a quadratic form.

A GLU unit i computes (w_i . x) * g(v_i . x). A *reading* replaces the gate g by a per-unit
affine function g(v) ~ a_i + b_i v, so the unit becomes

    (w_i . x)(a_i + b_i v_i . x) = (w~_i . z)(v~_i . z),   z = [x; 1],  w~_i = [w_i; 0],  v~_i = [b_i v_i; a_i]

a product of two linear functions of the homogeneous input z. An output k of the layer,
sum_i P_ki h_i, is then one quadratic form in z (`homogeneous_forms`):

    y_k ~ z^T B~_k z,   B~_k = sym sum_i P_ki w~_i v~_i^T = [[B_k, c_k], [c_k^T, 0]]
    B_k = sym sum_i P_ki b_i w_i v_i^T   (the quadratic part),   c_k = 1/2 sum_i P_ki a_i w_i   (half the linear part)

one symmetric (d+1) x (d+1) matrix per output, eigendecomposable as any quadratic form. The
readings differ only in (a, b), simplest first (`READINGS`):

- first-order: a = 0, b = the gate's slope where it is ~ linear (`FIRST_ORDER_SLOPE`): 1 for
  bilinear (exact) and SQS (the paper's reading: sqs(v) ~ v for c << |v| << 1/lam); 1/2 for
  GELU and SwiGLU (their derivative at 0: g(v) = v/2 + O(v^2)). Not applicable to ReLU, which
  is linear on no interval around 0 (its odd part is v/2, its even part |v|/2 is as large).
- gain: a = 0, b_i = sum_n v_ni g(v_ni) / sum_n v_ni^2 (`unit_gains`), least squares on training data.
- affine: a_i, b_i by least squares of g(v_ni) ~ a_i + b_i v_ni on training data (`unit_affine`).
  With a = 0 it is the gain reading's form padded with zeros; for the identity gate a = 0, b = 1
  and it is the exact bilinear decomposition.

  Both fits may weight sample n of unit i by (w_i . x_n)^2 (`unit_weights`): they then minimise the
  error of the unit's output (w_i . x)(g - a - b v), not of its gate. The reading protocol
  (`sqs.interp.layer_readings`) does; `spectra.decompose` keeps the unweighted fits by default.
- fit: the forms fitted directly by least squares to the layer's outputs on training inputs
  (`fit_quadratic_forms`), ridge-regularised toward a prior reading. In homogeneous coordinates
  (z = [x; 1]) it is the most general quadratic (with linear and constant terms), started
  from the affine reading; in plain coordinates (the 1-layer `spectra.decompose` default) a
  pure quadratic form started from the gain reading:

      min_B  sum_n sum_k (z_n^T B_k z_n - y_nk)^2 + rho * sum_k ||B_k - B0_k||_F^2.

Every fitted reading is fitted on training data only; fidelity is measured elsewhere on held-out
data. For the identity gate every reading is the exact bilinear decomposition.
"""

from __future__ import annotations

import torch

from sqs.functional import canonical_gate

#: Reading names, simplest first: reports list them in this order, and a tie in fidelity goes to the earlier one.
READINGS = ("first-order", "gain", "affine", "fit")
#: The first-order reading's slope per gate, g(v) ~ s * v (ReLU has none; see the module docstring).
FIRST_ORDER_SLOPE = {"bilinear": 1.0, "sqs": 1.0, "gelu": 0.5, "swiglu": 0.5}
#: Relative ridge of the fit: rho = ridge * mean diagonal of the features' Gram matrix.
DEFAULT_RIDGE = 1e-4
F64 = torch.float64


def check_reading(reading: str) -> str:
    """Validate a reading name (one-line error naming the valid ones)."""
    if reading not in READINGS:
        raise ValueError(f"unknown reading {reading!r}; choose one of: {', '.join(READINGS)}")
    return reading


def first_order_slope(gate: str) -> float | None:
    """The slope s of the first-order reading g(v) ~ s v, or None where the gate has none (ReLU)."""
    return FIRST_ORDER_SLOPE.get(canonical_gate(gate))


# --------------------------------------------------------------------------- the forms


def interaction_matrices(W: torch.Tensor, V: torch.Tensor, P_eff: torch.Tensor) -> torch.Tensor:
    """B (K, d, d), symmetrised: B_k = sym(sum_i P_eff[k, i] w_i v_i^T).

    W, V: (h, d) rows w_i, v_i; P_eff: (K, h), the output projection composed with whatever
    reads the layer's output (the head, token directions, or the identity).
    """
    B = torch.einsum("ki,ij,il->kjl", P_eff, W, V)
    return 0.5 * (B + B.transpose(-1, -2))


def quadratic_form(B: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x^T B_k x for every form: x (N, d), B (K, d, d) -> (N, K)."""
    return torch.einsum("nj,kjl,nl->nk", x, B, x)


def homogeneous(x: torch.Tensor) -> torch.Tensor:
    """z = [x; 1]: (..., d) -> (..., d + 1). A quadratic form in z is a general quadratic in x."""
    return torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)


def homogeneous_forms(W: torch.Tensor, V: torch.Tensor, P_out: torch.Tensor, a: torch.Tensor,
                      b: torch.Tensor) -> torch.Tensor:
    """B~ (K, d+1, d+1): output k of sum_i P_out[k, i] (w_i . x)(a_i + b_i v_i . x) as z^T B~_k z, z = [x; 1].

    W, V (h, d); P_out (K, h); a, b (h,) the per-unit reading of the gate. float64.
    """
    W, V, P_out, a, b = (t.to(F64) for t in (W, V, P_out, a, b))
    K, d = P_out.shape[0], W.shape[1]
    quad = interaction_matrices(W, V, P_out * b)  # B_k = sym sum_i P_ki b_i w_i v_i^T
    half_lin = 0.5 * (P_out * a) @ W  # c_k = 1/2 sum_i P_ki a_i w_i
    B = quad.new_zeros(K, d + 1, d + 1)
    B[:, :d, :d] = quad
    B[:, :d, d] = half_lin
    B[:, d, :d] = half_lin
    return B


def r2(pred: torch.Tensor, target: torch.Tensor) -> float:
    """1 - SS_res / SS_tot over all (input, output) values, SS_tot about each output's mean: how much
    of the outputs' variation a reading reproduces (the fidelity measure every reading reports)."""
    pred, target = pred.to(F64), target.to(F64)
    ss_res = ((target - pred) ** 2).sum()
    ss_tot = ((target - target.mean(0, keepdim=True)) ** 2).sum()
    return float(1.0 - ss_res / ss_tot.clamp_min(1e-300))


# --------------------------------------------------------------------------- per-unit fits


def _check_pre_post(pre: torch.Tensor, post: torch.Tensor, who: str) -> None:
    if pre.shape != post.shape or pre.dim() != 2:
        raise ValueError(f"{who}: `pre` and `post` must both be (N, h), got {tuple(pre.shape)} and {tuple(post.shape)}")
    if pre.shape[0] == 0:
        raise ValueError(f"{who}: no fit inputs (N = 0); pass the gate inputs on the training data")


def _check_weights(weights: torch.Tensor | None, pre: torch.Tensor, who: str) -> torch.Tensor | None:
    if weights is None:
        return None
    if weights.shape != pre.shape:
        raise ValueError(f"{who}: `weights` must be (N, h) like `pre`, got {tuple(weights.shape)} and {tuple(pre.shape)}")
    if bool((weights < 0).any()):
        raise ValueError(f"{who}: `weights` must be >= 0")
    return weights.to(F64)


def unit_gains(pre: torch.Tensor, post: torch.Tensor, eps: float = 1e-12,
               weights: torch.Tensor | None = None) -> torch.Tensor:
    """Per-unit least-squares gain g with post[:, i] ~ g_i * pre[:, i].

    `pre` (N, h) are the gate's inputs v = V x, `post` (N, h) its outputs gate(v). A unit
    that never fires (sum pre^2 = 0) gets gain 1 (it contributes nothing either way). For the
    identity gate post == pre and every gain is exactly 1. `weights` (N, h) >= 0 weight each
    sample per unit (`unit_weights`: the squared linear branch, so the fit minimises the error of
    the unit's output rather than of its gate); None: unweighted.
    """
    _check_pre_post(pre, post, "unit_gains")
    w = _check_weights(weights, pre, "unit_gains")
    pre64, post64 = pre.double(), post.double()
    wpre = pre64 if w is None else w * pre64
    num = torch.einsum("nh,nh->h", wpre, post64)
    den = torch.einsum("nh,nh->h", wpre, pre64)
    return torch.where(den > (eps if w is None else 0.0), num / den.clamp_min(eps if w is None else 1e-300),
                       torch.ones_like(den))


def unit_affine(pre: torch.Tensor, post: torch.Tensor, rel_eps: float = 1e-12,
                weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-unit least squares post[:, i] ~ a_i + b_i pre[:, i]: (a, b), each (h,), float64.

    Closed form, all units at once: b = cov(v, g) / var(v), a = mean(g) - b mean(v), with means,
    covariance and variance weighted by `weights` (N, h) >= 0 when given (see `unit_gains`; a unit
    whose weights are all 0 is fitted unweighted). A unit whose input is constant on the data
    (var(v) <= rel_eps * sum v^2) gets b = 0, a = mean(g): exact there. For the identity gate
    a = 0 and b = 1 (to rounding), whatever the weights.
    """
    _check_pre_post(pre, post, "unit_affine")
    w = _check_weights(weights, pre, "unit_affine")
    v, g = pre.to(F64), post.to(F64)
    if w is None:
        w = torch.ones_like(v)
    else:  # a unit whose weights are all 0 contributes nothing: fit it unweighted
        w = torch.where(w.sum(0) > 0, w, torch.ones_like(w))
    total = w.sum(0)
    mean_v, mean_g = (w * v).sum(0) / total, (w * g).sum(0) / total
    dv, dg = v - mean_v, g - mean_g
    var = torch.einsum("nh,nh->h", w * dv, dv)
    cov = torch.einsum("nh,nh->h", w * dv, dg)
    varies = var > rel_eps * torch.einsum("nh,nh->h", w * v, v)
    b = torch.where(varies, cov / var.clamp_min(1e-300), torch.zeros_like(var))
    return mean_g - b * mean_v, b


def unit_weights(linear: torch.Tensor) -> torch.Tensor:
    """(w_i . u)^2 per sample and unit from the linear branch W u (N, h): with these weights the per-unit
    fit of the gate minimises sum_n ((w_i . u_n)(g(v_ni) - a_i - b_i v_ni))^2, the error of the unit's
    own output, which is what the layer's output adds up (the gate matters little where w_i . u ~ 0)."""
    return linear.to(F64) ** 2


def unit_reading(reading: str, gate: str, pre: torch.Tensor | None = None, post: torch.Tensor | None = None,
                 h: int | None = None, weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b) (h,) of a per-unit reading ("first-order", "gain" or "affine") of the gate.

    first-order needs only `h` (or `pre`); gain and affine are fitted on `pre` (N, h) = V x and
    `post` = gate(pre) over *training* inputs, optionally `weights` (see `unit_weights`). Raises
    ValueError for a first-order reading of ReLU (none exists) and for "fit" (not a per-unit reading).
    """
    check_reading(reading)
    if reading == "fit":
        raise ValueError("unit_reading: 'fit' is fitted to the layer's outputs, not per unit; use fit_quadratic_forms")
    if reading == "first-order":
        s = first_order_slope(gate)
        if s is None:
            raise ValueError(f"unit_reading: the {canonical_gate(gate)!r} gate has no first-order reading "
                             "(it is linear on no interval around 0); use the gain or affine reading")
        n = h if h is not None else (pre.shape[-1] if pre is not None else None)
        if n is None:
            raise ValueError("unit_reading: the first-order reading needs the number of units `h`")
        return torch.zeros(n, dtype=F64), torch.full((n,), s, dtype=F64)
    if pre is None or post is None:
        raise ValueError(f"unit_reading: the {reading!r} reading is fitted; pass the gate's inputs `pre` and outputs "
                         "`post` on training data")
    if reading == "gain":
        return torch.zeros(pre.shape[-1], dtype=F64), unit_gains(pre, post, weights=weights)
    return unit_affine(pre, post, weights=weights)


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
