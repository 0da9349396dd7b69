"""Fair agreement between two models' eigenvectors (sqs.interp.agreement) on hand-built models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sqs.interp.agreement import SIDES, agreement, agreement_summary, form_cosine, pairings, side_indices
from sqs.interp.spectra import cosine_per_rank, decompose, forms_decomposition, to_homogeneous
from sqs.models.image import ImageClassifier, ImageModelConfig

D, C, PIX = 16, 10, 784
F64 = torch.float64


def planted_model(Q: torch.Tensor, eigvals: torch.Tensor, E: torch.Tensor) -> ImageClassifier:
    """Bilinear model with B_a = sum_i eigvals[a, i] q_i q_i^T (rows q_i of Q) and embedding E."""
    d = Q.shape[0]
    model = ImageClassifier(ImageModelConfig(d_model=d, d_hidden=d, gate="bilinear")).double().eval()
    with torch.no_grad():
        model.embed.weight.copy_(E)
        model.layers[0].proj.weight.copy_(torch.cat([Q, Q]))  # W = V = Q
        model.layers[0].out.weight.copy_(torch.eye(d, dtype=F64))  # P = I
        model.head.weight.copy_(eigvals)  # (H P)_ai = eigval_ai
    return model


def random_orthogonal(d: int, g: torch.Generator) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64)).Q


@pytest.fixture(scope="module")
def planted_pair():
    """Two models with the same pixel-space eigenvectors, seen through different embeddings,
    with eigenvector signs flipped and eigenvalues swapped between neighbouring ranks.

    Per class: 8 positive eigenvalues (8..1 times a class scale) on q_0..q_7 and 8 negative
    (-7.5..-0.5) on q_8..q_15, so the |eigval| order interleaves the signs. Model B gives
    q_0 the eigenvalue of q_1 and vice versa, q_2 <-> q_3, ..., on both sides.
    """
    g = torch.Generator().manual_seed(0)
    E_a = torch.zeros(D, PIX, dtype=F64)
    E_a[torch.arange(D), torch.arange(D) * 13] = 1.0  # orthonormal rows: pixel vectors stay orthonormal
    R = random_orthogonal(D, g)
    E_b = R @ E_a  # another embedding of the same pixels
    Q = random_orthogonal(D, g)  # rows q_i (embedding space of A)
    base = torch.cat([torch.arange(8, 0, -1, dtype=F64), -torch.arange(7.5, 0, -1, dtype=F64)])
    eigvals_a = torch.stack([base * (1 + 0.1 * a) for a in range(C)])
    swap = torch.arange(D).view(-1, 2).flip(-1).flatten()  # 1, 0, 3, 2, ...
    eigvals_b = eigvals_a[:, swap]
    signs = torch.where(torch.rand(D, generator=g) < 0.5, -1.0, 1.0).to(F64)
    Q_b = (Q @ R.T) * signs[:, None]  # q_b = s R q: the same pixel vector E_b^T q_b = s E_a^T q
    return decompose(planted_model(Q, eigvals_a, E_a)), decompose(planted_model(Q_b, eigvals_b, E_b))


def test_swapped_ranks_and_flipped_signs_agree_by_match_and_subspace_not_by_rank(planted_pair):
    da, db = planted_pair
    ag = agreement(da, db, k=4)
    for side in ("positive", "negative"):
        s = ag[side]
        assert s["per_rank"].shape == (C, 4) and s["best_match"].shape == (C, 4)
        np.testing.assert_allclose(s["per_rank"], 0.0, atol=1e-10)  # rank r of A is rank r +- 1 of B
        np.testing.assert_allclose(s["best_match"], 1.0, atol=1e-10)
        np.testing.assert_array_equal(s["match"], np.tile([1, 0, 3, 2], (C, 1)))
        np.testing.assert_allclose(s["overlap"], 1.0, atol=1e-10)
        np.testing.assert_array_equal(s["n_a"], 4)
    # the old |eigval| view: ranks alternate sign, so the top-4 sets differ (8, -7.5, 7, -6.5 vs 7, -6.5, 8, -7.5 ...)
    assert np.all(ag["abs"]["per_rank"] < 1e-10)
    np.testing.assert_allclose(ag["abs"]["overlap"], 1.0, atol=1e-10)
    # a top-3 cut splits a swapped pair: the subspaces share 2 of 3 directions, best match finds them
    ag3 = agreement(da, db, k=3)["positive"]
    np.testing.assert_allclose(ag3["overlap"], 2 / 3, atol=1e-10)
    np.testing.assert_allclose(ag3["best_match"][:, :2], 1.0, atol=1e-10)
    np.testing.assert_allclose(ag3["best_match"][:, 2], 0.0, atol=1e-10)


def test_a_side_with_fewer_than_k_eigenvalues_reports_only_existing_ranks(planted_pair):
    da, db = planted_pair
    ag = agreement(da, db, k=10)  # 8 of each sign
    pos = ag["positive"]
    assert np.all(np.isnan(pos["per_rank"][:, 8:])) and not np.any(np.isnan(pos["per_rank"][:, :8]))
    np.testing.assert_allclose(pos["best_match"][:, :8], 1.0, atol=1e-10)
    np.testing.assert_array_equal(pos["match"][:, 8:], -1)
    np.testing.assert_allclose(pos["overlap"], 1.0, atol=1e-10)  # over min(ka, kb) = 8 canonical angles
    np.testing.assert_array_equal(pos["n_a"], 8)
    assert ag["abs"]["per_rank"].shape == (C, 10) and not np.any(np.isnan(ag["abs"]["per_rank"]))
    # numerically null directions belong to no side: h = 2 units give B_a of rank <= 4
    torch.manual_seed(1)
    low = ImageClassifier(ImageModelConfig(d_model=D, d_hidden=2, gate="bilinear")).double()
    dl = decompose(low)
    n_signed = [len(p) + len(n) for p, n in zip(side_indices(dl.eigenvalues, "positive", D),
                                                  side_indices(dl.eigenvalues, "negative", D))]
    assert all(1 <= n <= 4 for n in n_signed)


def test_form_cosine_self_negation_and_reparametrisation():
    torch.manual_seed(2)
    model = ImageClassifier(ImageModelConfig(d_model=D, d_hidden=24, gate="bilinear")).double().eval()
    da = decompose(model)
    np.testing.assert_allclose(form_cosine(da, da), 1.0, atol=1e-12)
    neg = ImageClassifier(ImageModelConfig(d_model=D, d_hidden=24, gate="bilinear")).double().eval()
    neg.load_state_dict(model.state_dict())
    with torch.no_grad():
        neg.head.weight.neg_()
    np.testing.assert_allclose(form_cosine(da, decompose(neg)), -1.0, atol=1e-12)
    # the same function through a rotated embedding (E' = R E, W' = W R^T, V' = V R^T): every measure is 1
    rot = ImageClassifier(ImageModelConfig(d_model=D, d_hidden=24, gate="bilinear")).double().eval()
    rot.load_state_dict(model.state_dict())
    R = random_orthogonal(D, torch.Generator().manual_seed(3))
    with torch.no_grad():
        rot.embed.weight.copy_(R @ model.embed.weight)
        rot.layers[0].proj.weight.copy_(model.layers[0].proj.weight @ R.T)
    img = torch.rand(8, PIX, dtype=F64)
    torch.testing.assert_close(rot(img), model(img))
    dr = decompose(rot)
    ag = agreement(da, dr, k=5)
    for key in ("form_cosine", "form_cosine_centered"):
        np.testing.assert_allclose(ag[key], 1.0, atol=1e-10)
    for side in SIDES:
        np.testing.assert_allclose(ag[side]["per_rank"], 1.0, atol=1e-8)
        np.testing.assert_allclose(ag[side]["overlap"], 1.0, atol=1e-10)
    # the traces equal the explicit 784 x 784 Frobenius cosine
    other = decompose(ImageClassifier(ImageModelConfig(d_model=D, d_hidden=24, gate="bilinear")).double())
    Ma = torch.einsum("dp,ade,eq->apq", da.embed, da.B, da.embed)
    Mb = torch.einsum("dp,ade,eq->apq", other.embed, other.B, other.embed)
    ref = (Ma * Mb).sum((1, 2)) / (Ma.norm(dim=(1, 2)) * Mb.norm(dim=(1, 2)))
    np.testing.assert_allclose(form_cosine(da, other), ref.numpy(), atol=1e-12)
    assert np.all(np.abs(form_cosine(da, other)) < 0.9)


def test_agreement_summary_aggregates_pairs(planted_pair):
    da, db = planted_pair
    summ = agreement_summary([(da, db), (da, da)], k=10)
    json.dumps(summ)  # plain JSON-ready values
    assert summ["n_pairs"] == 2 and summ["k"] == 10
    pos = summ["positive"]
    assert len(pos["per_rank"]["mean"]) == 10
    assert pos["per_rank"]["mean"][0] == pytest.approx(0.5) and pos["per_rank"]["std"][0] == pytest.approx(0.5)
    assert pos["per_rank"]["n"][:8] == [2 * C] * 8 and pos["per_rank"]["n"][8:] == [0, 0]
    assert pos["per_rank"]["mean"][8] is None and pos["best_match"]["mean"][9] is None
    assert pos["best_match"]["mean"][:8] == pytest.approx([1.0] * 8)
    assert pos["overlap"]["mean"] == pytest.approx(1.0) and pos["overlap"]["n"] == 2 * C
    # the permuted model's form differs from A's; with itself it is 1
    fc = [float(x) for x in form_cosine(da, db)]
    assert summ["form_cosine"]["mean"] == pytest.approx((np.mean(fc) + 1.0) / 2)
    assert math.isfinite(summ["form_cosine_centered"]["mean"])


def test_pairings_and_abs_view_match_cosine_per_rank():
    decs = [decompose(ImageClassifier(ImageModelConfig(d_model=D, d_hidden=24, gate="bilinear")).double())
            for _ in range(3)]
    assert len(pairings(decs)) == 3 and len(pairings(decs, decs)) == 3 and len(pairings(decs, decs, paired=False)) == 6
    with pytest.raises(ValueError, match="equal length"):
        pairings(decs, decs[:2])
    with pytest.raises(ValueError, match="no pairs"):
        pairings(decs[:1])
    ag = agreement(decs[0], decs[1], k=6)
    np.testing.assert_allclose(ag["abs"]["per_rank"], cosine_per_rank(decs[0], decs[1])[:, :6].numpy(), atol=1e-12)
    for side in SIDES:  # the optimal assignment beats the identity one (rank r with rank r)
        s = ag[side]
        assert np.all(np.nansum(s["best_match"], 1) >= np.nansum(s["per_rank"], 1) - 1e-12)
        assert np.all((s["overlap"] > 0) & (s["overlap"] <= 1 + 1e-12))
    with pytest.raises(ValueError, match="k must be"):
        agreement(decs[0], decs[1], k=0)


def test_form_cosine_of_the_quadratic_part_ignores_a_linear_part(planted_pair):
    da, _ = planted_pair
    lifted = to_homogeneous(da)
    B = lifted.B.clone()
    B[:, :-1, -1] = B[:, -1, :-1] = 0.3  # the same quadratic part plus a linear part
    with_linear = forms_decomposition(B, da.embed, da.gate, False, "affine", method="affine", homogeneous=True)
    full = form_cosine(with_linear, lifted)
    assert np.all(full < 0.999) and np.all(full > 0)
    np.testing.assert_allclose(form_cosine(with_linear, lifted, quadratic_only=True), 1.0, atol=1e-12)
    np.testing.assert_allclose(form_cosine(lifted, da), 1.0, atol=1e-12)  # padding changes nothing
