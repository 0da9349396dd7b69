"""GLU layers of a decoder read as quadratic forms over tokens (sqs.interp.lm_quadratic).

Tiny random layers and a tiny random GPT built here; float64 wherever exactness is asserted.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from sqs.interp.lm_quadratic import (
    GAIN_READING,
    Spectrum,
    direct_contribution,
    direction_matrices,
    direction_matrix,
    direction_norms,
    eig_signed,
    glu_weights,
    layer_inputs,
    lm_fidelity,
    lm_reading_fidelity,
    max_activating,
    mean_inv_rms,
    orient,
    read_tokens,
    split_windows,
    token_directions,
    token_id,
    token_inputs,
    top_promoted,
)
from sqs.interp.readings import READINGS, homogeneous, quadratic_form, unit_gains
from sqs.interp.spectra import NotQuadratic, UnsupportedGate
from sqs.models.gpt import GPT, GPTConfig
from sqs.nn import GLU, SQS

D, H = 12, 20
F64 = torch.float64


def make_glu(gate="bilinear", seed=0, d=D, h=H, **kw) -> GLU:
    torch.manual_seed(seed)
    glu = GLU(d, h, d, gate=gate, **kw).double()
    for p in glu.parameters():
        nn.init.normal_(p, 0.0, 1.0 / d ** 0.5)
    return glu


class LlamaMLP(nn.Module):
    """The Llama MLP's shape: down(act(gate(x)) * up(x)), no biases (not imported from transformers)."""

    def __init__(self, d, h, act, bias=False):
        super().__init__()
        self.gate_proj = nn.Linear(d, h, bias=bias)
        self.up_proj = nn.Linear(d, h, bias=bias)
        self.down_proj = nn.Linear(h, d, bias=bias)
        self.act_fn = act

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def llama_copy(glu: GLU, act) -> LlamaMLP:
    m = LlamaMLP(glu.d_in, glu.d_hidden, act).double()
    with torch.no_grad():
        m.up_proj.weight.copy_(glu.W)
        m.gate_proj.weight.copy_(glu.V)
        m.down_proj.weight.copy_(glu.P)
    return m


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


# --------------------------------------------------------------------------- the quadratic form


def test_bilinear_quadratic_form_is_the_layers_direct_contribution():
    glu = make_glu("bilinear")
    W, V, P, gate, kw = glu_weights(glu)
    U, n = randn(4, D, seed=1), randn(200, D, seed=2)
    with torch.no_grad():
        actual = glu(n) @ U.T  # u . MLP(n) through the module's own forward
    torch.testing.assert_close(direct_contribution(W, V, P, gate, kw, U, n), actual, rtol=0, atol=1e-12)
    torch.testing.assert_close(quadratic_form(direction_matrices(W, V, P, U), n), actual, rtol=0, atol=1e-12)


def test_direction_matrix_is_the_sum_over_units_symmetric_and_eigen_reconstructs():
    W, V, P, _, _ = glu_weights(make_glu("bilinear", seed=3))
    u = randn(D, seed=4)
    B = direction_matrix(W, V, P, u)
    ref = sum((u @ P[:, i]) * torch.outer(W[i], V[i]) for i in range(H))
    torch.testing.assert_close(B, 0.5 * (ref + ref.T), rtol=0, atol=1e-12)
    torch.testing.assert_close(B, B.T, rtol=0, atol=0)
    spec = Spectrum.of(B)
    torch.testing.assert_close(spec.reconstruct(), B, rtol=0, atol=1e-12)
    eigvals = spec.eigenvalues
    assert (eigvals[:-1] >= eigvals[1:]).all()  # signed, descending
    pos, _ = spec.side("positive", 3)
    neg, _ = spec.side("negative", 3)
    torch.testing.assert_close(pos, eigvals[eigvals > 0][:3])
    torch.testing.assert_close(neg, eigvals[eigvals < 0].flip(0)[:3])  # most negative first
    assert (neg < 0).all() and neg[0] == eigvals.min()
    eigvals_abs, Q_abs = spec.by_abs()
    assert (eigvals_abs.abs()[:-1] >= eigvals_abs.abs()[1:]).all()
    torch.testing.assert_close(torch.einsum("k,kj,kl->jl", eigvals_abs, Q_abs, Q_abs), B, rtol=0, atol=1e-12)
    # batched eig_signed agrees with the single one
    eigvals_b, _ = eig_signed(direction_matrices(W, V, P, torch.stack([u, 2 * u])))
    torch.testing.assert_close(eigvals_b[1], 2 * eigvals)


def test_direction_norms_without_forming_the_matrices():
    W, V, P, _, _ = glu_weights(make_glu("bilinear", seed=5))
    U = randn(30, D, seed=6)
    ref = direction_matrices(W, V, P, U).flatten(1).norm(dim=-1)
    torch.testing.assert_close(direction_norms(W, V, P, U), ref, rtol=1e-10, atol=1e-12)
    idx, score = top_promoted(W, V, P, U, k=3)
    assert idx.tolist() == ref.argsort(descending=True)[:3].tolist()
    n = randn(100, D, seed=7)
    idx_mean, _ = top_promoted(W, V, P, U, k=3, by="mean", n=n, gate="bilinear")
    assert idx_mean.tolist() == direct_contribution(W, V, P, "bilinear", {}, U, n).mean(0).argsort(
        descending=True)[:3].tolist()


@pytest.mark.parametrize("gate,act", [("bilinear", nn.Identity()), ("sqs", SQS(c=0.02, lam=0.3)),
                                      ("swiglu", nn.SiLU())])
def test_llama_style_mlp_gives_the_same_matrix_and_contribution(gate, act):
    kw = {"c": 0.02, "lam": 0.3} if gate == "sqs" else {}
    glu = make_glu(gate, seed=8, **kw)
    llama = llama_copy(glu, act)
    Wg, Vg, Pg, gate_g, kw_g = glu_weights(glu)
    Wl, Vl, Pl, gate_l, kw_l = glu_weights(llama)
    assert gate_l == gate_g == gate and {k: kw_l[k] for k in kw} == kw
    U, n = randn(3, D, seed=9), randn(50, D, seed=10)
    torch.testing.assert_close(direction_matrices(Wl, Vl, Pl, U), direction_matrices(Wg, Vg, Pg, U), rtol=0, atol=0)
    with torch.no_grad():
        torch.testing.assert_close(direct_contribution(Wl, Vl, Pl, gate_l, kw_l, U, n), llama(n) @ U.T,
                                   rtol=1e-12, atol=1e-12)


def test_glu_weights_refuses_biases_and_unknown_modules():
    glu = make_glu()
    with pytest.raises(NotQuadratic, match="biases"):
        glu_weights(LlamaMLP(D, H, nn.Identity(), bias=True))
    with pytest.raises(NotQuadratic, match="output projection"):
        glu_weights(GLU(D, H, None, gate="bilinear"))
    with pytest.raises(TypeError, match="Llama-style"):
        glu_weights(nn.Linear(D, D))
    with pytest.raises(ValueError, match="act_fn"):
        glu_weights(llama_copy(glu, nn.Tanh()))


# --------------------------------------------------------------------------- tokens


def test_token_direction_gives_the_heads_logit_through_the_final_norm():
    torch.manual_seed(11)
    E, w = randn(40, D, seed=11), randn(D, seed=12).abs() + 0.5
    h = randn(7, D, seed=13)
    h = h / h.pow(2).mean(-1, keepdim=True).sqrt() * 3.0  # every position has rms 3
    logits = nn.functional.rms_norm(h, (D,), w, eps=0.0) @ E.T
    s = mean_inv_rms(h, eps=0.0)
    assert s == pytest.approx(1 / 3)
    U = token_directions(E, w, [5, 17], scale=s)
    torch.testing.assert_close(h @ U.T, logits[:, [5, 17]])
    with pytest.raises(ValueError, match="token ids"):
        token_directions(E, w, [40])


def test_planted_eigenvectors_read_back_as_the_planted_tokens():
    V_, d = 60, 24
    X = token_inputs(randn(V_, d, seed=14), randn(d, seed=15).abs() + 0.5)
    a, b = 7, 42
    q1 = X[a] / X[a].norm()
    q2 = X[b] - (X[b] @ q1) * q1
    q2 = q2 / q2.norm()
    B = 5.0 * torch.outer(q1, q1) - 4.0 * torch.outer(q2, q2)
    B = B + 0.05 * (lambda R: R + R.T)(randn(d, d, seed=16))
    spec = Spectrum.of(B)
    _, Qp = spec.side("positive", 1)
    _, Qn = spec.side("negative", 1)
    names = {i: f"tok{i}" for i in range(V_)}
    top_pos = read_tokens(orient(Qp[0], X), X, k=3, decode=names.__getitem__)
    top_neg = read_tokens(orient(Qn[0], X), X, k=3, decode=names.__getitem__)
    assert top_pos["positive"].ids[0] == a and top_pos["positive"].text[0] == f"tok{a}"
    assert top_neg["positive"].ids[0] == b
    # the sign is a convention: the flipped vector reads the same token on the other side
    assert read_tokens(-orient(Qp[0], X), X, k=1)["negative"].ids == [a]
    vals = top_pos["positive"].values
    assert vals == sorted(vals, reverse=True)


def test_read_tokens_decodes_with_a_tokenizers_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"<unk>": 0, "happy": 1, "dog": 2, "sad": 3}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    X = torch.eye(4, dtype=F64)
    q = torch.tensor([0.0, 1.0, 0.2, -1.5], dtype=F64)
    out = read_tokens(q, X, k=1, decode=tok)
    assert out["positive"].text == ["happy"] and out["negative"].text == ["sad"]
    assert token_id(tok, "dog") == 2
    with pytest.raises(ValueError, match="not one"):
        token_id(tok, "happy dog")


def test_max_activating_finds_the_planted_positions_and_marks_the_token():
    B_, T, d = 3, 10, 6
    idx = torch.arange(B_ * T).reshape(B_, T) % 26
    n = 0.01 * randn(B_, T, d, seed=17)
    q = torch.zeros(d, dtype=F64)
    q[2] = 1.0
    n[1, 4, 2], n[2, 7, 2], n[0, 0, 2] = 5.0, 3.0, -4.0
    letters = lambda i: chr(ord("a") + int(i))  # noqa: E731
    ex = max_activating(n, q, idx, k=2, decode=letters, before=2, after=1)
    assert [(e.window, e.position) for e in ex] == [(1, 4), (2, 7)]
    assert ex[0].value == pytest.approx(5.0) and ex[0].text == "mn«o»p"  # idx[1, 2:6] = 12..15
    neg = max_activating(n, q, idx, k=1, side="negative", decode=letters, before=2, after=1)
    assert (neg[0].window, neg[0].position, neg[0].text) == (0, 0, "«a»b")
    both = max_activating(n, q, idx, k=2, side="abs", decode=letters)
    assert [(e.window, e.position, e.value) for e in both] == [(1, 4, 5.0), (0, 0, -4.0)]


# --------------------------------------------------------------------------- layer inputs on a GPT


def tiny_gpt(gate="bilinear", **kw) -> GPT:
    torch.manual_seed(18)
    return GPT(GPTConfig(vocab_size=50, n_layers=2, d_model=16, n_heads=2, d_hidden=24, context=12, gate=gate,
                         gate_kwargs=kw)).double().eval()


def test_layer_inputs_are_what_each_mlp_sees_and_the_quadratic_form_is_exact_on_a_gpt():
    model = tiny_gpt()
    idx = torch.randint(0, 50, (5, 12), generator=torch.Generator().manual_seed(19))
    acts = layer_inputs(model, idx, batch_size=2)
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(12))
    with torch.no_grad():
        for layer, block in enumerate(model.blocks):
            x = x + block.attn(block.norm1(x))
            n = block.norm2(x)
            torch.testing.assert_close(acts.pre_mlp[layer], n, rtol=0, atol=1e-12)
            x = x + block.mlp(n)
        torch.testing.assert_close(model.norm(acts.final) @ model.tok_emb.weight.T, model(idx))
        U = token_directions(model.tok_emb.weight, model.norm.weight, [3, 9], mean_inv_rms(acts.final))
        for layer, block in enumerate(model.blocks):
            W, V, P, gate, kw = glu_weights(block.mlp)
            n = acts.pre_mlp[layer].reshape(-1, 16)
            torch.testing.assert_close(quadratic_form(direction_matrices(W, V, P, U), n), block.mlp(n) @ U.T,
                                       rtol=0, atol=1e-12)


# --------------------------------------------------------------------------- fidelity


def test_bilinear_fidelity_is_exact_and_the_gain_reading_is_the_first_order_one():
    W, V, P, gate, kw = glu_weights(make_glu("bilinear", seed=20))
    n_fit, n_eval = split_windows(randn(8, 16, D, seed=21))
    U = randn(3, D, seed=22)
    fid = lm_fidelity(W, V, P, gate, kw, U, n_fit, n_eval)
    assert fid["exact"] and fid["n_fit"] == 4 * 16 and fid["n_eval"] == 4 * 16
    torch.testing.assert_close(fid["gain"]["gains"], torch.ones(H, dtype=F64), rtol=0, atol=0)
    for reading in ("first_order", "gain"):
        assert fid[reading]["r2"] == pytest.approx(1.0, abs=1e-12)
        assert fid[reading]["sign_agreement"] == 1.0
        assert fid[reading]["truncated"]["all"]["r2"] == pytest.approx(1.0, abs=1e-12)
    trunc = [fid["first_order"]["truncated"][k]["r2"] for k in ("1", "2", "5", "10", "all")]
    assert trunc[0] < trunc[-1]
    assert fid["gain"]["reading"] == GAIN_READING


def test_gain_reading_is_fitted_on_the_fit_windows_only():
    W, V, P, gate, kw = glu_weights(make_glu("sqs", seed=23))
    n_fit, n_eval = 0.5 * randn(300, D, seed=24), 4.0 * randn(300, D, seed=25)  # different gate regimes
    U = randn(2, D, seed=26)
    fid = lm_fidelity(W, V, P, gate, kw, U, n_fit, n_eval)
    sqs = lambda v: SQS()(v)  # noqa: E731  (default c, lam, p as the layer)
    torch.testing.assert_close(fid["gain"]["gains"], unit_gains(n_fit @ V.T, sqs(n_fit @ V.T)))
    assert not torch.allclose(fid["gain"]["gains"], unit_gains(n_eval @ V.T, sqs(n_eval @ V.T)), atol=1e-3)
    # same fit data, other eval data -> same gains
    fid2 = lm_fidelity(W, V, P, gate, kw, U, n_fit, randn(50, D, seed=27))
    torch.testing.assert_close(fid2["gain"]["gains"], fid["gain"]["gains"], rtol=0, atol=0)


def test_gain_reading_beats_first_order_in_the_shrink_regime():
    # |V n| mostly between 1/lam = 2 and 10: sqs(v) ~ v / (1 + lam |v|) shrinks each unit by a roughly
    # constant factor, which the gain reading captures and the first-order reading (sqs ~ identity) does not.
    W, V, P, gate, kw = glu_weights(make_glu("sqs", seed=28))
    n = 4.0 * randn(40, 32, D, seed=29)
    assert (n.reshape(-1, D) @ V.T).abs().median() > 2.0
    n_fit, n_eval = split_windows(n)
    fid = lm_fidelity(W, V, P, gate, kw, randn(4, D, seed=30), n_fit, n_eval)
    # measured: first-order R^2 = -7.9 (it overestimates |c| about 4x), gain R^2 = 0.88
    assert fid["first_order"]["r2"] < 0.0
    assert fid["gain"]["r2"] > 0.8
    assert fid["gain"]["sign_agreement"] >= fid["first_order"]["sign_agreement"]


def test_relu_layers_are_refused_unless_forced():
    W, V, P, gate, kw = glu_weights(make_glu("relu", seed=31))
    n = randn(4, 8, D, seed=32)
    with pytest.raises(UnsupportedGate):
        lm_fidelity(W, V, P, gate, kw, randn(1, D), n[:2], n[2:])
    assert "forced" in lm_fidelity(W, V, P, gate, kw, randn(1, D), n[:2], n[2:], force=True)["first_order"]["reading"]


def test_split_windows_keeps_windows_whole():
    n = randn(5, 3, D)
    a, b = split_windows(n, 0.6)
    assert a.shape[0] == 3 and b.shape[0] == 2 and torch.equal(torch.cat([a, b]), n)
    with pytest.raises(ValueError, match="fit_frac"):
        split_windows(n[:1])


# --------------------------------------------------------------------------- the reading protocol (every gate)


def test_every_reading_is_exact_on_a_bilinear_gpt_layer():
    model = tiny_gpt("bilinear")
    idx = torch.randint(0, 50, (8, 12), generator=torch.Generator().manual_seed(40))
    acts = layer_inputs(model, idx, batch_size=4)
    U = token_directions(model.tok_emb.weight, model.norm.weight, [3, 9, 17], mean_inv_rms(acts.final))
    for layer, block in enumerate(model.blocks):
        W, V, P, gate, kw = glu_weights(block.mlp)
        n_fit, n_eval = split_windows(acts.pre_mlp[layer])
        res = lm_reading_fidelity(W, V, P, gate, kw, U, n_fit, n_eval, ks=(1, None))
        assert res["exact"] and res["best"] == "first-order" and set(res["order"]) == set(READINGS)
        for reading in READINGS:
            assert res[reading]["r2"] == pytest.approx(1.0, abs=1e-9), (layer, reading)
            assert res[reading]["truncated"]["all"]["r2"] == pytest.approx(1.0, abs=1e-9)
            assert res["forms"][reading].shape == (3, 17, 17)
        n = acts.pre_mlp[layer].reshape(-1, 16)  # the forms are the layer's direct contribution, in [n; 1]
        torch.testing.assert_close(quadratic_form(res["forms"]["affine"], homogeneous(n)), block.mlp(n) @ U.T,
                                   rtol=0, atol=1e-10)


@pytest.mark.parametrize("gate", ["relu", "gelu", "swiglu", "sqs"])
def test_lm_readings_read_every_gate_on_training_tokens_only(gate):
    W, V, P, gate, kw = glu_weights(make_glu(gate, seed=41))
    n = 3.0 * randn(24, 16, D, seed=42) + 0.5
    n_fit, n_eval = split_windows(n)
    U = randn(4, D, seed=43)
    res = lm_reading_fidelity(W, V, P, gate, kw, U, n_fit, n_eval, readings=("first-order", "gain", "affine"), ks=())
    assert ("first-order" in res) == (gate != "relu")  # ReLU has no first-order reading
    assert res["best"] == res["order"][0] and res["affine"]["r2"] >= res["gain"]["r2"] - 0.05
    if gate == "sqs":  # unweighted, the gain reading is lm_fidelity's gain reading, padded with zeros
        plain = lm_reading_fidelity(W, V, P, gate, kw, U, n_fit, n_eval, readings=("gain",), ks=(), weighted=False)
        assert plain["gain"]["r2"] == pytest.approx(lm_fidelity(W, V, P, gate, kw, U, n_fit, n_eval)["gain"]["r2"],
                                                    abs=1e-10)
    other_eval = lm_reading_fidelity(W, V, P, gate, kw, U, n_fit, randn(4, 16, D, seed=44), readings=("affine",),
                                     ks=())
    other_fit = lm_reading_fidelity(W, V, P, gate, kw, U, randn(12, 16, D, seed=45), n_eval, readings=("affine",),
                                    ks=())
    assert torch.equal(other_eval["forms"]["affine"], res["forms"]["affine"])
    assert not torch.allclose(other_fit["forms"]["affine"], res["forms"]["affine"])
