"""LM spectra on run directories: token-space agreement, `sqs spectra lm`, `sqs experiment lm-spectra`.

Tiny GPT runs (a few steps) on the shipped TinyStories sample with a 300-token BPE.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

import sqs
from sqs.cli import main
from sqs.experiments import lm_spectra
from sqs.interp.lm_quadratic import token_agreement, token_profiles

TINY_TOML = """
name = "tiny-lmspec"
[model]
n_layers = 2
d_model = 16
n_heads = 2
d_hidden = 16
context = 32
[data]
vocab_size = 300
[train]
batch_size = 8
steps = 4
lr = 3e-3
warmup_steps = 1
[eval]
eval_every = 2
eval_windows = 8
eval_batch = 8
"""
F64 = torch.float64


pytestmark = pytest.mark.usefixtures("eager_backend")  # same math as compiled, no Inductor start-up


@pytest.fixture(scope="module")
def cache(tinystories_cache):
    return tinystories_cache


@pytest.fixture(scope="module")
def experiment(tmp_path_factory, cache):
    """The experiment end to end: it trains the three tiny runs it needs (4 steps each), then analyses them."""
    root = tmp_path_factory.mktemp("lmspec")
    cfg = root / "tiny-lmspec.toml"
    cfg.write_text(TINY_TOML)
    with sqs.ops.backend("eager"):  # the fused SQS op's eager backend: no Inductor compile in the tests
        res = lm_spectra.run_experiment(str(cfg), out=root / "out", runs_dir=root / "runs",
                                        tokens=(".", " the", " zebra"), windows=8, k=4, cache_dir=cache,
                                        device="cpu", progress=False)
    return root, cfg, res


# ---- agreement in token space -----------------------------------------------------------------


def _planted(d=8, V=60, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(V, d, generator=g, dtype=F64)
    Q = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64)).Q  # columns = eigenvectors
    lam = torch.tensor([8.0, 6.0, 4.0, 2.0, -7.0, -5.0, -3.0, -1.0], dtype=F64)[:d]
    B = torch.stack([Q @ torch.diag(lam * (1 + 0.1 * c)) @ Q.T for c in range(K)])
    swap = torch.arange(d).view(-1, 2).flip(-1).flatten()  # neighbouring ranks swap eigenvalues
    signs = torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0).to(F64)
    Qb = Q * signs
    Bb = torch.stack([Qb @ torch.diag(lam[swap] * (1 + 0.1 * c)) @ Qb.T for c in range(K)])
    R = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64)).Q  # another residual basis: q -> R q, x -> R x
    return B, X, R @ Bb @ R.T, X @ R.T


def test_token_agreement_of_a_model_with_itself_is_one():
    B, X, _, _ = _planted()
    a = token_agreement(B, X, B, X, k=4)
    for side in ("positive", "negative", "abs"):
        np.testing.assert_allclose(a[side]["per_rank"], 1.0, atol=1e-9)
        np.testing.assert_allclose(a[side]["best_match"], 1.0, atol=1e-9)
        np.testing.assert_allclose(a[side]["overlap"], 1.0, atol=1e-9)


def test_permuted_and_sign_flipped_eigenvectors_in_another_basis_agree_by_match_not_by_rank():
    B, X, Bb, Xb = _planted()
    a = token_agreement(B, X, Bb, Xb, k=4)
    for side in ("positive", "negative"):
        np.testing.assert_allclose(a[side]["best_match"], 1.0, atol=1e-9)
        np.testing.assert_allclose(a[side]["overlap"], 1.0, atol=1e-9)
        assert np.nanmean(a[side]["per_rank"]) < 0.6  # the swapped ranks pair different eigenvectors
        assert (a[side]["match"][:, :4] == np.array([1, 0, 3, 2])).all()


def test_token_profiles_are_centred_unit_and_their_cosine_is_the_correlation():
    B, X, _, _ = _planted()
    Q = torch.linalg.eigh(B[0]).eigenvectors.T[:3]
    prof = token_profiles(Q, X)
    np.testing.assert_allclose(prof.sum(-1), 0.0, atol=1e-9)
    np.testing.assert_allclose(prof.norm(dim=-1), 1.0, atol=1e-12)
    raw = (Q @ X.T).numpy()
    np.testing.assert_allclose(float(prof[0] @ prof[1]), np.corrcoef(raw[0], raw[1])[0, 1], atol=1e-12)


def test_token_agreement_refuses_different_vocabularies():
    B, X, _, _ = _planted()
    with pytest.raises(ValueError, match="one shared tokenizer"):
        token_agreement(B, X, B, X[:-1])


# ---- the experiment ---------------------------------------------------------------------------


def test_experiment_end_to_end_writes_the_report(experiment):
    root, _, res = experiment
    out = root / "out"
    for name in ("summary.md", "summary.json", "fidelity.png", "agreement.png", "spectra_dot.png",
                 "spectra_top_promoted.png"):
        assert (out / name).stat().st_size > 0, name
    md = (out / "summary.md").read_text()
    s = json.loads((out / "summary.json").read_text())
    assert s["tokens_skipped"] == [" zebra"] and "' zebra'" in md
    assert s["missing"] == [] and set(s["runs"]) == {"bilinear-s0", "sqs-s0", "sqs-s1"}
    assert all(r["elapsed_s"] > 0 for r in s["runs"].values())
    assert len(s["layers"]) == 2
    for L in s["layers"]:
        assert [d["label"] for d in L["directions"]] == [".", " the", "top-promoted"]
        bil = L["models"]["bilinear-s0"]["fidelity"]["first_order"]
        assert bil["r2"] > 1 - 1e-9 and bil["sign_agreement"] > 0.999  # Bilinear: exact
        sq = L["models"]["sqs-s0"]["fidelity"]
        assert sq["gain"]["r2"] <= 1 and set(L["agreement"]) == {"sqs-s0 vs bilinear-s0", "sqs-s0 vs sqs-s1"}
        read = L["models"]["sqs-s0"]["reads"][0]
        assert read["sides"]["positive"][0]["plus"] and read["token"] == "."
    assert ("examples" in s["layers"][0]["models"]["sqs-s0"]["reads"][0]["sides"]["positive"][0]
            and "examples" not in s["layers"][1]["models"]["sqs-s0"]["reads"][0]["sides"]["positive"][0])
    # the verdict is computed: it quotes the measured bilinear R^2 and the agreement with its baseline
    assert any("Bilinear is read exactly" in v for v in s["verdict"])
    assert any("different-seed baseline" in v for v in s["verdict"])
    for heading in ("## Verdict", "## Fidelity", "## Top tokens", "## SQS vs Bilinear in token space",
                    "sqs-s0 vs sqs-s1"):
        assert heading in md


def test_no_train_reports_an_unfinished_run_as_missing_and_trains_nothing(experiment, cache, tmp_path):
    root, cfg, _ = experiment
    runs = tmp_path / "runs" / "tiny-lmspec" / "tinystories"
    runs.mkdir(parents=True)
    for name in ("bilinear-s0", "sqs-s0"):
        (runs / name).symlink_to(root / "runs" / "tiny-lmspec" / "tinystories" / name)
    (runs / "sqs-s1").mkdir()
    (runs / "sqs-s1" / "config.json").write_text(
        (root / "runs" / "tiny-lmspec" / "tinystories" / "sqs-s1" / "config.json").read_text())  # started, no weights
    code = main(["experiment", "lm-spectra", "--config", str(cfg), "--runs-dir", str(tmp_path / "runs"),
                 "--out", str(tmp_path / "out"), "--no-train", "--cache-dir", str(cache), "--windows", "4",
                 "--directions", ".", "--k", "3"])
    assert code == 0
    assert not (runs / "sqs-s1" / "metrics.jsonl").exists()  # nothing trained
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["missing"] == ["sqs-s1 (unfinished)"] and set(s["layers"][0]["agreement"]) == {"sqs-s0 vs bilinear-s0"}
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "Missing: sqs-s1 (unfinished)" in md and "baseline (sqs-s1) is missing" in md


def test_no_train_without_the_main_runs_is_a_one_line_error(experiment, cache, tmp_path, capsys):
    _, cfg, _ = experiment
    code = main(["experiment", "lm-spectra", "--config", str(cfg), "--runs-dir", str(tmp_path / "none"),
                 "--out", str(tmp_path / "out"), "--no-train", "--cache-dir", str(cache)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "bilinear-s0, sqs-s0" in err and "--no-train" in err
    assert not (tmp_path / "none").exists()


# ---- sqs spectra lm ---------------------------------------------------------------------------


def test_spectra_lm_prints_token_lists_and_writes_the_figure(experiment, cache, tmp_path, capsys):
    root, _, _ = experiment
    rd = root / "runs" / "tiny-lmspec" / "tinystories" / "sqs-s0"
    code = main(["spectra", "lm", str(rd), "--layer", "0", "--token", ".", "--k", "2", "--out", str(tmp_path),
                 "--cache-dir", str(cache), "--windows", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "direction of token '.'" in out and "pos #1" in out and "neg #1" in out
    assert out.count("+ end:") == 4 and "e.g. " in out and "«" in out  # layer 0: max-activating contexts
    assert (tmp_path / "lm_layer0_dot.png").stat().st_size > 0
    res = json.loads((tmp_path / "lm_layer0_dot.json").read_text())
    assert res["n_positive"] + res["n_negative"] <= 16 and len(res["sides"]["positive"]) <= 2
    code = main(["spectra", "lm", str(rd), "--layer", "1", "--direction", "top-promoted", "--out", str(tmp_path),
                 "--cache-dir", str(cache), "--windows", "4"])
    out = capsys.readouterr().out
    assert code == 0 and "top-promoted" in out and "e.g. " not in out
    assert (tmp_path / "lm_layer1_top-promoted.png").exists()


@pytest.mark.parametrize("args, needle", [
    (["--layer", "0", "--token", " zebra"], "not one"),
    (["--layer", "5", "--token", "."], "layer 5 is out of range"),
])
def test_spectra_lm_bad_token_or_layer_is_a_one_line_error(experiment, cache, tmp_path, capsys, args, needle):
    root, _, _ = experiment
    rd = root / "runs" / "tiny-lmspec" / "tinystories" / "bilinear-s0"
    code = main(["spectra", "lm", str(rd), *args, "--out", str(tmp_path), "--cache-dir", str(cache), "--windows", "4"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert not list(tmp_path.iterdir())


def test_analysis_refuses_a_gate_without_a_quadratic_reading(experiment, cache):
    root, _, _ = experiment
    an = lm_spectra.load_analysis(root / "runs" / "tiny-lmspec" / "tinystories" / "sqs-s0", cache_dir=cache, windows=2)
    an.lm.model.blocks[0].mlp.gate = "relu"
    with pytest.raises(ValueError, match="relu"):
        lm_spectra.read_direction(an, 0, token=".")
    assert math.isfinite(an.scale) and an.idx.shape == (2, 32)


def test_the_demo_report_links_to_the_lm_spectra_summary_only_if_present(tmp_path):
    from sqs.experiments.demo import link_lm_spectra
    from sqs.experiments.doc import Doc

    doc = Doc(tmp_path / "report")
    assert not link_lm_spectra(doc, tmp_path / "results" / "lm_spectra") and doc.markdown() == "\n"
    (tmp_path / "results" / "lm_spectra").mkdir(parents=True)
    (tmp_path / "results" / "lm_spectra" / "summary.md").write_text("# x\n")
    assert link_lm_spectra(doc, tmp_path / "results" / "lm_spectra")
    assert "](../results/lm_spectra/summary.md)." in doc.markdown()
    assert 'href="../results/lm_spectra/summary.md"' in doc.html("t")
