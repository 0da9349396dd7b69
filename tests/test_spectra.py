"""Weight spectra (sqs.interp.spectra) on small hand-built models: no data, no training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sqs.interp import spectra
from sqs.interp.spectra import (
    EXACT_READING,
    FIRST_ORDER_READING,
    NotQuadratic,
    UnsupportedGate,
    contributions,
    cosine_per_rank,
    decompose,
    fidelity,
    surrogate_logits,
)
from sqs.interp.readings import interaction_matrices, quadratic_form
from sqs.models.image import ImageClassifier, ImageModelConfig

D, H, C, PIX = 16, 24, 10, 784


def make_model(gate="identity", seed=0, n_layers=1, d=D, h=H, **gate_kwargs):
    torch.manual_seed(seed)
    cfg = ImageModelConfig(n_layers=n_layers, d_model=d, d_hidden=h, gate=gate, gate_kwargs=gate_kwargs)
    return ImageClassifier(cfg).double().eval()


def test_interaction_matrices_einsum_matches_loop():
    g = torch.Generator().manual_seed(1)
    W, V, P = (torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randn(5, 4, generator=g, dtype=torch.float64),
               torch.randn(3, 5, generator=g, dtype=torch.float64))
    B = interaction_matrices(W, V, P)
    for a in range(3):
        ref = sum(P[a, i] * torch.outer(W[i], V[i]) for i in range(5))
        torch.testing.assert_close(B[a], 0.5 * (ref + ref.T))


def test_symmetrising_keeps_the_quadratic_form():
    g = torch.Generator().manual_seed(2)
    W, V = (torch.randn(H, D, generator=g, dtype=torch.float64) for _ in range(2))
    P = torch.randn(C, H, generator=g, dtype=torch.float64)
    raw = torch.einsum("ai,ij,ik->ajk", P, W, V)
    assert not torch.allclose(raw, raw.transpose(-1, -2))
    x = torch.randn(50, D, generator=g, dtype=torch.float64)
    torch.testing.assert_close(quadratic_form(interaction_matrices(W, V, P), x), quadratic_form(raw, x))


def test_bilinear_decomposition_reproduces_model_logits():
    model = make_model("identity", seed=3)
    dec = decompose(model)
    assert dec.exact and dec.reading == EXACT_READING and dec.gate == "bilinear"
    img = torch.rand(64, PIX, dtype=torch.float64)
    z = model(img)
    torch.testing.assert_close(surrogate_logits(dec, dec.embed_images(img)), z, rtol=1e-9, atol=1e-10)
    # eigenvalues sorted by |lambda| descending, eigenvectors orthonormal rows
    assert torch.all(dec.eigenvalues.abs()[:, :-1] >= dec.eigenvalues.abs()[:, 1:])
    eye = torch.eye(D, dtype=torch.float64).expand(C, D, D)
    torch.testing.assert_close(dec.eigenvectors @ dec.eigenvectors.transpose(-1, -2), eye)
    # the pixel-space reading is exact with the raw vectors: q.(E img) = u.img
    torch.testing.assert_close(torch.einsum("akp,np->nak", dec.pixel_raw, img),
                               torch.einsum("akd,nd->nak", dec.eigenvectors, dec.embed_images(img)))
    torch.testing.assert_close(dec.pixel.norm(dim=-1), torch.ones(C, D, dtype=torch.float64))
    # fidelity is perfect for the bilinear model, and float32 models work too
    labels = torch.randint(0, C, (64,))
    fid = fidelity(model, dec, img, labels)
    assert fid["logit_r2"] == pytest.approx(1.0, abs=1e-9)
    assert fid["agreement"] == 1.0 and fid["surrogate_acc"] == fid["model_acc"]
    assert set(fid["truncated"]) == {"1", "2", "5", "10", "all"}
    json.dumps(fid)
    json.dumps(dec.to_dict())
    dec32 = decompose(model.float())
    torch.testing.assert_close(dec32.eigenvalues, dec.eigenvalues, rtol=1e-4, atol=1e-6)


def test_hand_built_eigenvectors_are_recovered():
    model = make_model("identity", d=D, h=D)
    g = torch.Generator().manual_seed(4)
    Q, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))  # columns orthonormal
    Q = Q.T  # rows q_i
    # distinct |eigval| per class, mixed signs
    eigvals = torch.stack([torch.linspace(3.0, 0.1, D, dtype=torch.float64)[torch.randperm(D, generator=g)]
                           * torch.where(torch.rand(D, generator=g) < 0.5, -1.0, 1.0).double() for _ in range(C)])
    E = torch.zeros(D, PIX, dtype=torch.float64)
    E[torch.arange(D), torch.arange(D) * 7] = 1.0  # orthonormal rows: pixel space = embedding space
    with torch.no_grad():
        model.embed.weight.copy_(E)
        model.layers[0].proj.weight.copy_(torch.cat([Q, Q]))  # W = V = Q
        model.layers[0].out.weight.copy_(torch.eye(D, dtype=torch.float64))  # P = I
        model.head.weight.copy_(eigvals)  # (H P)_ai = eigval_ai
    dec = decompose(model)
    order = eigvals.abs().argsort(-1, descending=True)
    torch.testing.assert_close(dec.eigenvalues, eigvals.gather(-1, order))
    for a in range(C):
        expect = Q[order[a]]  # (D, D) rows in |lambda| order
        cos = (dec.eigenvectors[a] * expect).sum(-1)
        torch.testing.assert_close(cos.abs(), torch.ones(D, dtype=torch.float64))  # equal up to sign
        torch.testing.assert_close(dec.pixel[a], dec.eigenvectors[a] @ E)
    # contributions of one input sum to the logits
    img = torch.rand(PIX, dtype=torch.float64)
    contrib = contributions(dec, img)
    torch.testing.assert_close(contrib.sum(-1), model(img[None])[0])


@pytest.mark.parametrize("gate", ["relu", "gelu", "silu", "swiglu"])
def test_refuses_gates_without_a_quadratic_reading(gate):
    model = make_model(gate)
    with pytest.raises(UnsupportedGate, match="force"):
        decompose(model)
    dec = decompose(model, force=True)
    assert not dec.exact and "forced" in dec.reading


def test_sqs_is_first_order_and_refuses_deep_models():
    dec = decompose(make_model("sqs"))
    assert not dec.exact and dec.reading == FIRST_ORDER_READING and "first-order" in dec.label
    assert decompose(make_model("sqs", c=0.0, lam=0.0)).exact  # sqs with c = lam = 0 is bilinear
    with pytest.raises(NotQuadratic):
        decompose(make_model("identity", n_layers=2))
    with pytest.raises(NotQuadratic):
        decompose(make_model("identity", n_layers=2), force=True)


def test_sqs_first_order_reading_matches_bilinear_weights_and_fidelity_is_measured(eager_backend):
    """Same weights, SQS gate: the eigenvectors are those of the bilinear model; the
    fidelity numbers tell how far the first-order reading is from the model."""
    bil, sq = make_model("identity", seed=5), make_model("sqs", seed=5)
    sq.load_state_dict(bil.state_dict())
    db, ds = decompose(bil), decompose(sq)
    torch.testing.assert_close(db.eigenvalues, ds.eigenvalues)
    torch.testing.assert_close(cosine_per_rank(db, ds), torch.ones(C, D, dtype=torch.float64))
    img = torch.rand(32, PIX, dtype=torch.float64)
    fid = fidelity(sq, ds, img, torch.zeros(32, dtype=torch.long))
    assert fid["logit_r2"] < 1.0 and fid["reading"] == FIRST_ORDER_READING


def test_cosine_per_rank_self_is_one_and_symmetric():
    da, db = decompose(make_model(seed=6)), decompose(make_model(seed=7))
    for space in ("pixel", "embedding"):
        torch.testing.assert_close(cosine_per_rank(da, da, space=space), torch.ones(C, D, dtype=torch.float64))
    cab = cosine_per_rank(da, db)
    assert cab.shape == (C, D) and torch.all(cab <= 1 + 1e-12) and torch.all(cab >= 0)
    torch.testing.assert_close(cab, cosine_per_rank(db, da))
    # sign flips do not matter
    flipped = decompose(make_model(seed=6))
    flipped.pixel = -flipped.pixel
    torch.testing.assert_close(cosine_per_rank(da, flipped), torch.ones(C, D, dtype=torch.float64))
    torch.testing.assert_close(spectra.cosine_best_match(da, da), torch.ones(C, D, dtype=torch.float64))
    assert torch.all(spectra.cosine_best_match(da, db) >= cab - 1e-12)  # best match >= same-rank match
    pc = spectra.pair_cosines([da, db, da])
    assert pc.shape == (3, C, D)


def test_truncated_surrogate():
    model = make_model(seed=8)
    dec = decompose(model)
    x = dec.embed_images(torch.rand(20, PIX, dtype=torch.float64))
    full = surrogate_logits(dec, x)
    torch.testing.assert_close(surrogate_logits(dec, x, k=dec.rank), full)
    torch.testing.assert_close(surrogate_logits(dec, x, k=10 * dec.rank), full)
    # top-1: exactly the first eigenvector's term
    one = dec.eigenvalues[:, 0] * torch.einsum("ad,nd->na", dec.eigenvectors[:, 0], x) ** 2
    torch.testing.assert_close(surrogate_logits(dec, x, k=1), one)
    with pytest.raises(ValueError):
        surrogate_logits(dec, x, k=0)


# --------------------------------------------------------------------------- commands / report (fake runs)


@pytest.fixture
def fake_runs(monkeypatch, tmp_path, eager_backend):
    """Runs resolved by name ('<gate>-s<seed>' dirs) to tiny hand-built models; a tiny fake test set."""
    from sqs.experiments import weight_spectra as sx
    from sqs.interp import plots

    monkeypatch.setattr(plots, "DPI", 30)

    def load_run(run_dir):
        name = str(run_dir).rstrip("/").split("/")[-1]
        gate, rest = name.split("-", 1)
        seed = rest[1:] if rest.startswith("s") else rest.split("-")[0][1:]  # <gate>-s<k> or <gate>-i<k>-d<j>
        m = make_model({"bilinear": "identity"}.get(gate, gate), seed=int(seed), d=8, h=8)
        return m.float(), {"data": {"dataset": "mnist"}, "gate": gate}

    g = torch.Generator().manual_seed(0)
    test = (torch.rand(60, PIX, generator=g), torch.randint(0, C, (60,), generator=g))
    trained = []
    monkeypatch.setattr(sx, "load_run", load_run)
    monkeypatch.setattr(sx, "load_test", lambda ds, data_dir=None: test)
    monkeypatch.setattr(sx, "load_train", lambda ds, data_dir=None: torch.rand(80, PIX, generator=g))
    monkeypatch.setattr(sx, "is_finished", lambda rd: rd in trained)
    monkeypatch.setattr(sx, "train_one", lambda ds, gate, seed, epochs, rd, data_dir=None, **seeds: trained.append(rd))
    return tmp_path, trained


def test_experiment_and_report_end_to_end(fake_runs, monkeypatch):
    """The experiment and CLI commands with signature-checked figure stubs (matplotlib is slow
    on 2 shared cores); write_report then renders every kind of figure for real."""
    import inspect

    import matplotlib.pyplot as plt

    from sqs.cli import main
    from sqs.experiments.demo import write_report
    from sqs.interp import plots

    real = {}

    def stub(fn):
        def build(*args, **kwargs):
            inspect.signature(fn).bind(*args, **kwargs)  # the call would be valid
            return plt.figure()
        return build

    def fast_save(fig, path, dpi=None):
        plt.close(fig)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"png")
        return path

    for name in ("save", "plot_spectrum", "plot_eigenvector_grid", "plot_comparison_grid", "plot_cosine_per_rank",
                 "plot_explanation", "plot_truncation"):
        real[name] = getattr(plots, name)
        monkeypatch.setattr(plots, name, fast_save if name == "save" else stub(real[name]))

    tmp, trained = fake_runs
    out = tmp / "results"
    assert main(["experiment", "spectra", "--runs-dir", str(tmp / "runs"), "--out", str(out), "--seeds", "2",
                 "--datasets", "mnist", "--epochs", "1"]) == 0
    assert len(trained) == 8  # 2 gates x (2 seeds + 2 same-init baselines), one training call each
    assert {p.name for p in trained} >= {"bilinear-i0-d1", "sqs-i1-d2"}
    summary = json.loads((out / "summary.json").read_text())
    cos = summary["datasets"]["mnist"]["cosine"]
    assert set(cos) == {"sqs_vs_bilinear_same_seed", "sqs_vs_bilinear_cross_seed", "bilinear_vs_bilinear",
                        "sqs_vs_sqs"}
    # same seed -> same init in this fake -> same first-order eigenvectors
    first = summary["datasets"]["mnist"]["agreement"]["first-order"]["sqs_vs_bilinear_same_init"]["positive"]
    assert first["overlap"] == pytest.approx(1.0) and min(v for v in first["per_rank"] if v) == pytest.approx(1.0)
    fb = summary["datasets"]["mnist"]["fidelity"]["bilinear"]["0"]
    assert fb["logit_r2"] == pytest.approx(1.0, abs=1e-5)
    md = (out / "summary.md").read_text()
    assert "first-order" in md and "never below 0.5" in md and "| MNIST Bilinear |" in md
    d = summary["datasets"]["mnist"]
    assert d["reading"] in ("first-order", "gain") and "Verdict" in md and "Fair agreement" in md
    assert {"bilinear_same_init", "sqs_vs_bilinear_same_init", "sqs_other_init"} <= set(d["agreement"][d["reading"]])
    assert set(d["fidelity_by_reading"]) == {"first-order", "gain"} and len(d["fidelity_by_reading"]["gain"]) == 2
    assert (out / "mnist" / "cosine_per_rank.png").stat().st_size > 0

    # single-run commands
    runs = tmp / "runs" / "sec41" / "mnist"  # runs/<config>/<dataset>/<gate>-s<seed>
    rd = {"bilinear": runs / "bilinear-s0", "sqs": runs / "sqs-s0"}
    run = str(rd["sqs"])
    assert main(["spectra", "decompose", run, "--out", str(tmp / "d")]) == 0
    assert json.loads((tmp / "d" / "spectra.json").read_text())["decomposition"]["exact"] is False
    assert main(["spectra", "compare", str(rd["bilinear"]), run, "--out", str(tmp / "c")]) == 0
    from sqs.experiments.weight_spectra import compare_runs

    res, lines = compare_runs(str(rd["bilinear"]), run, out=tmp / "c2")  # A is the first run given, named so
    assert lines[0].startswith(f"A = {rd['bilinear']}: bilinear, read first-order")
    assert lines[1].startswith(f"B = {run}: sqs, read ") and res["b"]["reading"] in lines[1]
    assert res["a"]["gate"] == "bilinear" and res["b"]["gate"] == "sqs" and res["space"] == "pixel"
    assert all(len(res[side]["best_match"]) == 10 and 0 <= res[side]["overlap"] <= 1 for side in ("positive", "negative"))
    assert main(["spectra", "explain", run, "--index", "3", "--out", str(tmp / "e")]) == 0
    assert (tmp / "e" / "explanation_3.png").exists()
    relu = str(runs / "relu-s0")
    assert main(["spectra", "decompose", relu, "--out", str(tmp / "r"), "--no-fidelity"]) == 2  # refused
    assert main(["spectra", "decompose", relu, "--out", str(tmp / "r"), "--no-fidelity", "--force"]) == 0

    for name, fn in real.items():
        monkeypatch.setattr(plots, name, fn)
    paths = write_report(rd, tmp / "report", "mnist", classes=[0, 1])  # few panels: fast to render
    html = paths["html"].read_text()
    assert "data:image/png;base64," in html and "first-order" in html and 'src="mnist' not in html
    md = paths["md"].read_text()
    assert "Weight spectra" in md and "![" in md
    pngs = list((tmp / "report").glob("*.png"))
    assert len(pngs) >= 8 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
