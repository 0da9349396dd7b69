"""The reading protocol for every gate and depth (sqs.interp.readings, layer_readings, image_stack, compare)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sqs.interp.compare import compare_models
from sqs.interp.image_stack import (
    class_forms,
    decomposition,
    read_model,
    read_stack,
    stack_fidelity,
    stack_layers,
    surrogate_trace,
    trace,
)
from sqs.interp.layer_readings import GLUWeights, LayerReading, best_reading, read_layer, read_layers
from sqs.interp.readings import (
    READINGS,
    first_order_slope,
    homogeneous,
    homogeneous_forms,
    interaction_matrices,
    quadratic_form,
    unit_affine,
    unit_gains,
    unit_reading,
    unit_weights,
)
from sqs.interp.spectra import decompose, fidelity, to_homogeneous
from sqs.models.image import ImageClassifier, ImageModelConfig

D, H, C, PIX = 12, 16, 10, 784
F64 = torch.float64
GATES = ("relu", "gelu", "swiglu", "bilinear", "sqs")

pytestmark = pytest.mark.usefixtures("eager_backend")


def make_model(gate="bilinear", n_layers=1, seed=0, norm="none", residual=True, positive=False, **gate_kwargs):
    """A random float64 image classifier; `positive` makes every weight non-negative (so, on
    non-negative images, every gate input v = V u is > 0)."""
    torch.manual_seed(seed)
    cfg = ImageModelConfig(n_layers=n_layers, d_model=D, d_hidden=H, gate=gate, gate_kwargs=gate_kwargs, norm=norm,
                           residual=residual)
    model = ImageClassifier(cfg).double().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # RMSNorm weights: away from 1, so that folding them is tested
                p.copy_(0.5 + torch.rand_like(p))
            elif positive:
                p.abs_()
            if positive and name.endswith("proj.weight"):
                p[H:] += 0.05  # V entries > 0
    return model


def images(n, seed):
    return torch.rand(n, PIX, generator=torch.Generator().manual_seed(seed), dtype=F64)


def labels_for(n, seed):
    return torch.randint(0, C, (n,), generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the math of one reading


def test_homogeneous_forms_are_the_affine_unit_reading_exactly():
    """sum_i P_ki (w_i.x)(a_i + b_i v_i.x) == [x;1]^T B~_k [x;1] for any a, b: the forms carry the linear part."""
    g = torch.Generator().manual_seed(0)
    W, V, P = (torch.randn(*s, generator=g, dtype=F64) for s in ((H, D), (H, D), (5, H)))
    a, b = torch.randn(H, generator=g, dtype=F64), torch.randn(H, generator=g, dtype=F64)
    x = torch.randn(50, D, generator=g, dtype=F64)
    direct = ((x @ W.T) * (a + b * (x @ V.T))) @ P.T
    B = homogeneous_forms(W, V, P, a, b)
    assert B.shape == (5, D + 1, D + 1) and torch.equal(B, B.transpose(-1, -2))
    torch.testing.assert_close(quadratic_form(B, homogeneous(x)), direct, rtol=0, atol=1e-12)
    # a = 0: the gain reading's form, padded with zeros (no linear part)
    B0 = homogeneous_forms(W, V, P, torch.zeros(H, dtype=F64), b)
    torch.testing.assert_close(B0[:, :D, :D], interaction_matrices(W, V, P * b), rtol=0, atol=0)
    assert not B0[:, D].any() and not B0[:, :, D].any()


def test_unit_fits_closed_form():
    g = torch.Generator().manual_seed(1)
    pre = torch.randn(400, 6, generator=g, dtype=F64) + 0.3
    a_true = torch.tensor([0.0, 1.0, -2.0, 0.5, 3.0, 0.0], dtype=F64)
    b_true = torch.tensor([1.0, 2.0, 0.0, -1.0, 0.25, 0.0], dtype=F64)
    a, b = unit_affine(pre, a_true + b_true * pre)
    torch.testing.assert_close(a, a_true, rtol=0, atol=1e-12)
    torch.testing.assert_close(b, b_true, rtol=0, atol=1e-12)
    const = pre.clone()
    const[:, 0] = 0.7  # a unit whose input never changes: b = 0, a = its (constant) output, exact on the data
    a, b = unit_affine(const, torch.tanh(const))
    assert b[0] == 0 and a[0] == pytest.approx(float(torch.tanh(torch.tensor(0.7))))
    with pytest.raises(ValueError, match="no fit inputs"):
        unit_affine(pre[:0], pre[:0])
    # weighted by the squared linear branch: the least squares of the unit's output (w.u)(g - a - b v)
    lin = torch.randn(400, 6, generator=g, dtype=F64)
    post = torch.nn.functional.silu(3 * pre)
    a, b = unit_affine(pre, post, weights=unit_weights(lin))
    for i in range(6):
        design = torch.stack([lin[:, i], lin[:, i] * pre[:, i]], 1)  # (w.u) * [1, v]
        ref = torch.linalg.lstsq(design, lin[:, i] * post[:, i]).solution
        torch.testing.assert_close(torch.stack([a[i], b[i]]), ref, rtol=0, atol=1e-10)
    a0, b0 = unit_affine(pre, post)
    def unit_err(a_, b_):
        return ((lin * (post - a_ - b_ * pre)) ** 2).sum(0)
    assert bool((unit_err(a, b) < unit_err(a0, b0)).all())
    gains = unit_gains(pre, post, weights=unit_weights(lin))
    torch.testing.assert_close(gains, ((lin**2 * pre * post).sum(0) / (lin**2 * pre * pre).sum(0)))
    with pytest.raises(ValueError, match="weights"):
        unit_affine(pre, post, weights=-unit_weights(lin))
    # first-order slopes: identity for bilinear and SQS (the paper's), 1/2 for GELU/SwiGLU, none for ReLU
    assert [first_order_slope(gt) for gt in GATES] == [None, 0.5, 0.5, 1.0, 1.0]
    with pytest.raises(ValueError, match="no first-order reading"):
        unit_reading("first-order", "relu", h=3)
    with pytest.raises(ValueError, match="fitted"):
        unit_reading("gain", "sqs")


def test_affine_reading_is_the_bilinear_decomposition_for_the_identity_gate_and_the_gain_reading_when_a_is_0():
    glu = GLUWeights.of(make_model("bilinear", seed=2).layers[0])
    u = torch.randn(300, D, generator=torch.Generator().manual_seed(3), dtype=F64) + 0.5
    exact = interaction_matrices(glu.W, glu.V, glu.P)  # the bilinear decomposition's matrices
    for reading in READINGS:
        B = read_layers(glu, u)[reading].B
        torch.testing.assert_close(B[:, :D, :D], exact, rtol=0, atol=1e-12 * float(exact.abs().max()))
        torch.testing.assert_close(B[:, D], torch.zeros_like(B[:, D]), rtol=0, atol=1e-9 * float(exact.abs().max()))
    # an odd gate (SQS) fitted on symmetric data (u and -u): the affine fit finds a = 0, and is the gain reading
    sqs = GLUWeights.of(make_model("sqs", seed=2).layers[0])
    u_sym = torch.cat([u, -u]) * 3.0
    aff, gain = read_layer(sqs, "affine", u_sym), read_layer(sqs, "gain", u_sym)
    torch.testing.assert_close(aff.a, torch.zeros(H, dtype=F64), rtol=0, atol=1e-12)
    torch.testing.assert_close(aff.B, gain.B, rtol=0, atol=1e-12)
    assert not torch.allclose(read_layer(sqs, "affine", u * 3.0).B, gain.B)  # asymmetric data: a != 0


@pytest.mark.parametrize("n_layers", [1, 2])
def test_surrogate_equals_a_model_whose_gate_is_affine_on_its_data(n_layers):
    """SQS with lam = 0 is v - c sgn(v): on inputs where every v > 0 the gate is exactly affine (v - c),
    so the affine reading (a = -c, b = 1) in homogeneous coordinates reproduces the model exactly,
    layer by layer and end to end (RMSNorm and residual included)."""
    c = 0.3
    model = make_model("sqs", n_layers=n_layers, seed=4, norm="rms", positive=True, c=c, lam=0.0)
    train, test = images(200, 5), images(100, 6)
    tr = trace(model, test)
    assert all(bool((glu.pre(u) > 0).all()) for glu, u in zip(stack_layers(model), tr.inputs))
    stack = read_stack(model, train, readings=("gain", "affine"))
    for rd in stack["affine"]:
        torch.testing.assert_close(rd.a, torch.full((H,), -c, dtype=F64), rtol=0, atol=1e-10)
        torch.testing.assert_close(rd.b, torch.ones(H, dtype=F64), rtol=0, atol=1e-10)
    for rd, u, y in zip(stack["affine"], tr.inputs, tr.outputs):  # the forms in [u; 1] are the layer
        torch.testing.assert_close(rd.form_output(u), y, rtol=0, atol=1e-10)
    fid = stack_fidelity(model, stack["affine"], test, labels_for(100, 7), true_trace=tr)
    assert all(s["r2"] == pytest.approx(1.0, abs=1e-10) for s in fid["layers"])
    assert fid["logit_r2"] == pytest.approx(1.0, abs=1e-10) and fid["agreement"] == 1.0
    torch.testing.assert_close(surrogate_trace(model, stack["affine"], test).logits, model(test), rtol=0, atol=1e-9)
    assert stack_fidelity(model, stack["gain"], test, labels_for(100, 7))["logit_r2"] < 1 - 1e-6  # misses the shift


# --------------------------------------------------------------------------- depth


@pytest.mark.parametrize("norm,residual", [("rms", True), ("none", True), ("rms", False)])
def test_trace_is_the_models_forward_with_the_norm_weight_folded(norm, residual):
    model = make_model("sqs", n_layers=3, seed=8, norm=norm, residual=residual)
    img = images(20, 9)
    tr = trace(model, img)
    torch.testing.assert_close(tr.logits, model(img), rtol=0, atol=1e-10)
    x = model.embed(img)
    for glu, norm_l, layer, u, y in zip(stack_layers(model), model.norms, model.layers, tr.inputs, tr.outputs):
        torch.testing.assert_close(y, layer(norm_l(x)), rtol=0, atol=1e-10)  # the reading's input space is u
        torch.testing.assert_close(glu.output(u), y, rtol=0, atol=1e-12)
        x = x + y if residual else y


@pytest.mark.parametrize("n_layers", [2, 3])
def test_every_reading_of_a_bilinear_stack_is_exact_per_layer_and_end_to_end(n_layers):
    model = make_model("bilinear", n_layers=n_layers, seed=10, norm="rms")
    train, test, y = images(400, 11), images(150, 12), labels_for(150, 13)
    res = read_model(model, train, test, y)
    assert set(res["readings"]) == set(READINGS) and res["best"] == "first-order"  # all exact: the simplest wins
    for reading, fid in res["fidelity"].items():
        assert len(fid["layers"]) == n_layers
        assert all(s["r2"] == pytest.approx(1.0, abs=1e-9) for s in fid["layers"]), reading
        assert fid["logit_r2"] == pytest.approx(1.0, abs=1e-9) and fid["agreement"] == 1.0
        torch.testing.assert_close(surrogate_trace(model, res["readings"][reading], test).logits, model(test),
                                   rtol=0, atol=1e-8)
    tr = trace(model, test)
    for rds in res["readings"].values():  # outputs through the units (fast path) and through the forms agree
        for rd, u, y in zip(rds, tr.inputs, tr.outputs):
            torch.testing.assert_close(rd.form_output(u), y, rtol=0, atol=1e-9)
            torch.testing.assert_close(rd(u), rd.form_output(u), rtol=0, atol=1e-9)


def test_readings_are_fitted_on_training_data_only():
    model = make_model("swiglu", n_layers=2, seed=14, norm="rms")
    model.layers[0].proj.weight.data[H:] *= 4.0  # gate inputs well away from 0
    train, test1, test2 = images(300, 15), images(100, 16), images(100, 17)
    y = labels_for(100, 18)
    r1, r2 = read_model(model, train, test1, y), read_model(model, train, test2, y)
    other = read_model(model, images(300, 19), test1, y)
    assert set(r1["readings"]) == set(READINGS)
    for reading in READINGS:
        for l1, l2, lo in zip(r1["readings"][reading], r2["readings"][reading], other["readings"][reading]):
            assert torch.equal(l1.B, l2.B)  # other test data: the same fitted reading
            if reading != "first-order":  # other training data: another fit (first-order uses no data)
                assert not torch.allclose(l1.B, lo.B)
            else:
                assert torch.equal(l1.B, lo.B)
        assert r1["fidelity"][reading]["logit_r2"] != r2["fidelity"][reading]["logit_r2"]  # measured on the test data
    with pytest.raises(ValueError, match="evaluate on the test split"):
        read_model(model, train, train[:100], y)
    with pytest.raises(ValueError, match="u_fit"):
        read_layer(stack_layers(model)[0], "affine")


@pytest.mark.parametrize("gate", GATES)
def test_every_gate_is_read_and_the_best_reading_is_named(gate):
    kw = {"c": 0.05, "lam": 0.5} if gate == "sqs" else {}
    model = make_model(gate, n_layers=2, seed=20, norm="rms", **kw)
    with torch.no_grad():
        for layer in model.layers:
            layer.proj.weight[H:] *= 5.0  # beyond the near-linear range of every gate
    train, test, y = images(500, 21), images(200, 22), labels_for(200, 23)
    res = read_model(model, train, test, y, readings=("first-order", "gain", "affine"))
    expect = {"first-order", "gain", "affine"} - ({"first-order"} if gate == "relu" else set())
    assert set(res["fidelity"]) == expect
    assert res["best"] == res["order"][0] and res["best"] in expect
    r2s = {r: f["logit_r2"] for r, f in res["fidelity"].items()}
    assert r2s[res["best"]] == max(r2s.values())
    assert r2s["affine"] >= r2s["gain"] - 0.05  # the affine reading holds the gain reading as a = 0


def test_best_reading_prefers_the_simpler_one_on_a_tie():
    s = {"fit": {"r2": 1.0}, "affine": {"r2": 1.0 - 1e-12}, "gain": {"r2": 0.5}}
    assert best_reading(s) == ("affine", ["affine", "fit", "gain"])
    assert best_reading({"gain": {"r2": 0.2}, "fit": {"r2": 0.9}})[0] == "fit"
    with pytest.raises(ValueError, match="no readings"):
        best_reading({})


# --------------------------------------------------------------------------- 1-layer models and agreement


def test_one_layer_protocol_matches_decompose_and_pixel_fidelity():
    model = make_model("sqs", seed=24)
    with torch.no_grad():
        model.layers[0].proj.weight[H:] *= 8.0
    train, test, y = images(400, 25), images(150, 26), labels_for(150, 27)
    res = read_model(model, train, test, y, readings=("first-order", "gain", "affine"))
    for reading in ("first-order", "gain", "affine"):
        rds = res["readings"][reading]
        dec = decomposition(model, rds)
        legacy = decompose(model, reading=reading, fit_images=train, homogeneous=True, weighted=True)
        torch.testing.assert_close(dec.B, legacy.B, rtol=0, atol=1e-12)
        torch.testing.assert_close(class_forms(model, rds), dec.B)
        # the end-to-end surrogate of a 1-layer model is its per-class eigen-surrogate
        assert fidelity(model, dec, test, y)["logit_r2"] == pytest.approx(res["fidelity"][reading]["logit_r2"], abs=1e-9)
    assert decomposition(model, res["readings"]["first-order"]).reading.startswith("first-order")


def test_compare_models_reads_each_through_its_best_reading_in_the_order_given():
    bil = make_model("bilinear", seed=28)
    sq = make_model("sqs", seed=28)
    sq.load_state_dict(bil.state_dict())
    with torch.no_grad():
        for m in (bil, sq):
            m.layers[0].proj.weight[H:] *= 6.0
    train, test, y = images(400, 29), images(150, 30), labels_for(150, 31)
    res = compare_models(sq, bil, train, test, y, k=3, readings=("first-order", "gain", "affine"))
    assert res["a"]["gate"] == "sqs" and res["b"]["gate"] == "bilinear"  # the order given
    assert res["b"]["reading"] == "first-order" and res["b"]["logit_r2"] == pytest.approx(1.0, abs=1e-9)
    assert res["a"]["reading"] == max(res["a"]["fidelity"], key=lambda r: res["a"]["fidelity"][r]["logit_r2"])
    assert res["space"] == "pixel" and len(res["positive"]["per_rank"]) == 3
    swapped = compare_models(bil, sq, train, test, y, k=3, readings=("first-order", "gain", "affine"))
    assert swapped["a"]["gate"] == "bilinear" and swapped["b"]["reading"] == res["a"]["reading"]
    assert swapped["form_cosine"] == pytest.approx(res["form_cosine"], abs=1e-12)  # symmetric measure
    same = compare_models(bil, bil, train, test, y, k=3, readings=("first-order",))
    for side in ("positive", "negative"):
        np.testing.assert_allclose(same[side]["per_rank"], 1.0, atol=1e-9)
        assert same[side]["overlap"] == pytest.approx(1.0, abs=1e-9)
    assert same["form_cosine"] == pytest.approx(1.0, abs=1e-12)


def test_deep_models_agree_through_probe_profiles():
    a = make_model("bilinear", n_layers=2, seed=32, norm="rms")
    b = make_model("bilinear", n_layers=2, seed=33, norm="rms")
    train, test, y = images(300, 34), images(120, 35), labels_for(120, 36)
    same = compare_models(a, a, train, test, y, k=3, readings=("first-order",))
    assert same["space"] == "probe profiles" and same["form_cosine"] is None
    np.testing.assert_allclose(same["positive"]["best_match"], 1.0, atol=1e-9)
    other = compare_models(a, b, train, test, y, k=3, readings=("first-order",))
    assert other["positive"]["overlap"] < 0.99


def test_homogeneous_decompositions_compare_with_plain_ones():
    model = make_model("bilinear", seed=37)
    dec = decompose(model)
    lifted = to_homogeneous(dec)
    assert lifted.homogeneous and lifted.rank == D + 1 and lifted.n_pixels == PIX
    img = images(30, 38)
    torch.testing.assert_close(fidelity(model, lifted, img, labels_for(30, 39))["logit_r2"], 1.0)
    assert lifted.pictures.shape == (C, D + 1, PIX)
    assert LayerReading("x", torch.zeros(2, D + 1, D + 1)).is_quadratic_form
    assert unit_gains(img[:, :3], 2 * img[:, :3]).tolist() == [2.0, 2.0, 2.0]
