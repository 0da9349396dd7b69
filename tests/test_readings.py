"""Quadratic readings of 1-layer GLU classifiers (sqs.interp.readings and decompose(reading=...))."""

from __future__ import annotations

import json

import pytest
import torch

from sqs.interp.readings import (
    READINGS,
    fit_quadratic_forms,
    quadratic_features,
    quadratic_form,
    sym_to_vec,
    unit_gains,
    vec_to_sym,
)
from sqs.interp.spectra import (
    AFFINE_READING,
    EXACT_READING,
    FIT_READING,
    GAIN_READING,
    UnsupportedGate,
    decompose,
    fidelity,
    rank_readings,
    to_homogeneous,
)
from sqs.models.image import ImageClassifier, ImageModelConfig

D, H, C, PIX = 16, 24, 10, 784
F64 = torch.float64


@pytest.fixture(autouse=True)
def eager_sqs():
    """SQS forwards on the eager backend (no torch.compile start-up in tests)."""
    from sqs import ops

    old = ops.get_backend()
    ops.set_backend("eager")
    yield
    ops.set_backend(old)


def make_model(gate="sqs", seed=0, v_scale=1.0, **gate_kwargs):
    """A random 1-layer classifier; v_scale multiplies V, pushing |Vx| into the shrink regime."""
    torch.manual_seed(seed)
    model = ImageClassifier(ImageModelConfig(d_model=D, d_hidden=H, gate=gate, gate_kwargs=gate_kwargs)).double()
    with torch.no_grad():
        model.layers[0].proj.weight[H:] *= v_scale
    return model.eval()


def images(n, seed):
    return torch.rand(n, PIX, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_unit_gains():
    g = torch.Generator().manual_seed(0)
    pre = torch.randn(500, 6, generator=g, dtype=F64)
    torch.testing.assert_close(unit_gains(pre, pre), torch.ones(6, dtype=F64))
    scale = torch.tensor([0.5, 1.0, 2.0, -1.0, 0.0, 3.0], dtype=F64)
    torch.testing.assert_close(unit_gains(pre, pre * scale), scale)
    dead = pre.clone()
    dead[:, 0] = 0
    assert unit_gains(dead, dead * 7)[0] == 1.0  # a unit that never fires keeps gain 1
    with pytest.raises(ValueError, match="must both be"):
        unit_gains(pre, pre[:, :3])


def test_quadratic_features_represent_every_symmetric_form():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(3, 5, 5, generator=g, dtype=F64)
    B = A + A.transpose(-1, -2)
    x = torch.randn(40, 5, generator=g, dtype=F64)
    phi = quadratic_features(x)
    assert phi.shape == (40, 15)
    torch.testing.assert_close(phi @ sym_to_vec(B).T, quadratic_form(B, x))
    torch.testing.assert_close(vec_to_sym(sym_to_vec(B), 5), B)
    torch.testing.assert_close(sym_to_vec(B).norm(dim=-1), B.norm(dim=(-2, -1)))  # ridge = Frobenius distance


def test_fit_recovers_a_planted_form():
    g = torch.Generator().manual_seed(2)
    A = torch.randn(C, 6, 6, generator=g, dtype=F64)
    B = A + A.transpose(-1, -2)
    x = torch.randn(300, 6, generator=g, dtype=F64)  # N = 300 > 21 features
    z = quadratic_form(B, x)
    torch.testing.assert_close(fit_quadratic_forms(x, z, ridge=1e-12, chunk_size=64), B, rtol=1e-7, atol=1e-7)
    # fewer inputs than features: the prior fills what the data cannot determine, and a true prior stays exact
    torch.testing.assert_close(fit_quadratic_forms(x[:5], z[:5], prior=B), B)
    with pytest.raises(ValueError, match="no fit inputs"):
        fit_quadratic_forms(x[:0], z[:0])
    with pytest.raises(ValueError, match="prior"):
        fit_quadratic_forms(x, z, prior=B[:2])


@pytest.mark.parametrize("gate,kw", [("bilinear", {}), ("sqs", {"c": 0.0, "lam": 0.0})])
def test_every_reading_reduces_to_the_exact_bilinear_decomposition(gate, kw):
    model = make_model(gate, seed=3, v_scale=10.0, **kw)
    exact = decompose(model)
    assert exact.exact and exact.reading == EXACT_READING
    train = images(300, 4)  # 300 inputs > 136 features of d = 16
    for reading in READINGS:
        dec = decompose(model, reading=reading, fit_images=train)
        assert dec.exact and dec.reading == EXACT_READING and dec.method == reading and dec.label.endswith("(exact)")
        ref = to_homogeneous(exact) if dec.homogeneous else exact  # affine: the same form padded in [x; 1]
        scale = exact.B.abs().max()
        torch.testing.assert_close(dec.B, ref.B, rtol=0, atol=1e-10 * scale)
        torch.testing.assert_close(dec.eigenvalues, ref.eigenvalues, rtol=0, atol=1e-9 * scale)
    # even without the gain prior the least-squares fit finds the exact form (noiseless quadratic data)
    free = decompose(model, reading="fit", fit_images=train, fit_prior="none", ridge=1e-12)
    torch.testing.assert_close(free.B, exact.B, rtol=0, atol=1e-6 * exact.B.abs().max())


def test_readings_are_fitted_on_training_images_only():
    model = make_model("sqs", seed=5, v_scale=10.0)
    train, test1, test2 = images(400, 6), images(200, 7), images(200, 8)
    labels = torch.randint(0, C, (200,), generator=torch.Generator().manual_seed(9))
    with pytest.raises(ValueError, match="fit_images"):
        decompose(model, reading="gain")
    with pytest.raises(ValueError, match="unknown reading"):
        decompose(model, reading="second-order", fit_images=train)
    r1 = rank_readings(model, train, test1, labels)
    r2 = rank_readings(model, train, test2, labels)
    for reading in READINGS:  # other test data: the same fitted readings
        torch.testing.assert_close(r1["decompositions"][reading].B, r2["decompositions"][reading].B, rtol=0, atol=0)
        assert r1["fidelity"][reading]["n"] == 200
    assert r1["fidelity"]["gain"]["logit_r2"] != r2["fidelity"]["gain"]["logit_r2"]  # evaluated on the test set given
    other = rank_readings(model, images(400, 10), test1, labels, readings=("gain", "fit"))
    for reading in ("gain", "fit"):  # other training data: other fitted readings
        assert not torch.allclose(other["decompositions"][reading].B, r1["decompositions"][reading].B)
    with pytest.raises(ValueError, match="evaluate on the test split"):
        rank_readings(model, train, train[:200], labels)
    with pytest.raises(ValueError, match="key"):
        rank_readings(model, train, test1, labels, key="loss")


def test_gain_and_fit_readings_beat_first_order_in_the_shrink_regime():
    """Random SQS model (c = 0.01, lam = 0.5) with |Vx| mostly in 0.3..5 and a share beyond
    1/lam = 2: measured held-out logit R^2 first-order -8.9, gain 0.89, fit 0.97."""
    model = make_model("sqs", seed=0, v_scale=10.0)
    train, test = images(2000, 10), images(1000, 11)
    labels = torch.randint(0, C, (1000,), generator=torch.Generator().manual_seed(12))
    pre = (test @ model.embed.weight.T) @ model.layers[0].V.T
    assert (pre.abs() > 2.0).double().mean() > 0.3  # the regime the issue is about
    ranked = rank_readings(model, train, test, labels)
    fid = ranked["fidelity"]
    r2 = {r: fid[r]["logit_r2"] for r in READINGS}
    assert r2["first-order"] < 0.0
    assert r2["gain"] > 0.8 and r2["fit"] > r2["gain"] + 0.03
    assert fid["fit"]["agreement"] > fid["first-order"]["agreement"] + 0.03
    assert ranked["best"] == "fit" and ranked["order"] == ["fit", "affine", "gain", "first-order"]
    assert r2["affine"] > r2["gain"]
    decs = ranked["decompositions"]
    assert decs["gain"].reading == GAIN_READING and decs["gain"].label == "SQS (gain reading)"
    assert decs["fit"].reading == FIT_READING and decs["fit"].label == "SQS (least-squares reading)"
    assert decs["first-order"].label == "SQS (first-order reading)"
    assert json.loads(json.dumps(decs["fit"].to_dict()))["method"] == "fit"
    assert "method" not in decs["first-order"].to_dict()  # the default output is unchanged
    json.dumps({r: f for r, f in fid.items()})


def test_exact_models_rank_the_simplest_reading_first_and_fitted_readings_read_every_gate():
    model = make_model("bilinear", seed=13)
    train, test = images(300, 14), images(100, 15)
    labels = torch.zeros(100, dtype=torch.long)
    ranked = rank_readings(model, train, test, labels)
    assert ranked["best"] == "first-order"  # all exact (R^2 = 1 within float error): the simplest wins
    assert all(f["logit_r2"] == pytest.approx(1.0, abs=1e-9) for f in ranked["fidelity"].values())
    relu = make_model("relu", seed=13)
    with pytest.raises(UnsupportedGate, match="fitted reading"):  # ReLU has no first-order reading
        decompose(relu)
    fitted = decompose(relu, reading="affine", fit_images=train)  # the fitted readings need no force
    assert fitted.reading == AFFINE_READING and fitted.label == "ReLU (affine reading)" and fitted.homogeneous
    forced = decompose(relu, force=True)
    assert "forced" in forced.reading
    assert fidelity(relu, fitted, test, labels)["logit_r2"] > fidelity(relu, forced, test, labels)["logit_r2"]
