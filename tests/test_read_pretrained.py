"""`sqs read`: a pretrained decoder's gated MLPs read as quadratic forms over tokens
(sqs.interp.pretrained_reading, sqs.experiments.read_pretrained), on tiny random Llama models written as
Hugging Face directories and GGUF files; nothing is downloaded."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from tiny_hf import TINY, VOCAB, tiny_llama  # noqa: E402

from sqs.cli import main  # noqa: E402
from sqs.experiments.read_pretrained import ReadError, read_model  # noqa: E402
from sqs.interp.pretrained_reading import eigen_readout  # noqa: E402

pytestmark = pytest.mark.usefixtures("eager_backend")

G = torch.Generator().manual_seed(11)
FIT = torch.randint(3, VOCAB, (6, 16), generator=G)
EVAL = torch.randint(3, VOCAB, (6, 16), generator=G)
TEXT = "\n".join(f"the cat sat. a dog ran, did it? {'yes' if i % 3 else 'no'}! said Ann." for i in range(400))


class _Tok:
    """The smallest tokenizer `read_model` needs: one token per character of 'abc...', ids 3 + index."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [3 + ord(c) - ord("a") for c in text]}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(ord("a") + i - 3) if i >= 3 else f"<{i}>" for i in ids)


def _llama(act: str, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=True, hidden_act=act)).eval()


def _inputs(model, blocks, layer):
    """By hand: layer `layer`'s MLP inputs and the last residual stream, from forward hooks on the norms."""
    got = {}
    lyr = model.model.layers[layer]
    h1 = lyr.post_attention_layernorm.register_forward_hook(lambda m, a, o: got.setdefault("n", o.detach()))
    h2 = model.model.norm.register_forward_hook(lambda m, a, o: got.setdefault("h", a[0].detach()))
    with torch.no_grad():
        model(input_ids=blocks)
    h1.remove()
    h2.remove()
    return got["n"].reshape(-1, 32).double(), got["h"].reshape(-1, 32).double()


def _r2(pred, target):
    return float(1 - ((target - pred) ** 2).sum() / ((target - target.mean(0)) ** 2).sum())


def test_a_bilinear_mlp_is_read_exactly_by_every_reading():
    res = read_model(_llama("linear"), _Tok(), FIT, EVAL, tokens=("a", "b"), promoted=2)
    for L in res["layers"]:
        assert L["gate"] == "bilinear" and L["exact"] and L["best"] == "first-order"
        for r in ("first-order", "gain", "affine"):
            assert L["readings"][r]["r2"] == pytest.approx(1.0, abs=1e-9)
            assert all(v == pytest.approx(1.0, abs=1e-9) for v in L["readings"][r]["r2_per_direction"])
        assert L["readings"]["first-order"]["truncated_r2"]["all"] == pytest.approx(1.0, abs=1e-9)
        assert len(L["directions"]) == 4 and [d["label"] for d in L["directions"]] == ["token"] * 2 + ["promoted"] * 2


def test_the_swiglu_readings_fidelity_matches_a_hand_computation():
    model = tiny_llama()  # SwiGLU
    layer, ids = 1, [3, 10, 20]
    res = read_model(model, _Tok(), FIT, EVAL, tokens=("a", "h", "r"), promoted=0)
    L = res["layers"][layer]
    n_fit, h_fit = _inputs(model, FIT, layer)
    n_eval, _ = _inputs(model, EVAL, layer)
    mlp = model.model.layers[layer].mlp
    W, V, P = (p.weight.detach().double() for p in (mlp.up_proj, mlp.gate_proj, mlp.down_proj))
    s = float(torch.rsqrt(h_fit.pow(2).mean(-1) + TINY["rms_norm_eps"]).mean())
    U = model.model.embed_tokens.weight.detach().double()[ids] * model.model.norm.weight.detach().double() * s
    assert res["final_norm_scale"] == pytest.approx(s, rel=1e-9)
    w, v = n_fit @ W.T, n_fit @ V.T
    g, wt = F.silu(v), w ** 2  # each unit's fit weighted by its linear branch squared
    gain = (wt * v * g).sum(0) / (wt * v * v).sum(0)
    mv, mg = (wt * v).sum(0) / wt.sum(0), (wt * g).sum(0) / wt.sum(0)
    b_aff = (wt * (v - mv) * (g - mg)).sum(0) / (wt * (v - mv) ** 2).sum(0)
    a_aff = mg - b_aff * mv
    we, ve = n_eval @ W.T, n_eval @ V.T
    target = (we * F.silu(ve)) @ (U @ P).T
    for name, gate in (("first-order", 0.5 * ve), ("gain", gain * ve), ("affine", a_aff + b_aff * ve)):
        assert L["readings"][name]["r2"] == pytest.approx(_r2((we * gate) @ (U @ P).T, target), abs=1e-7), name
    assert L["gate"] == "swiglu" and 0 < L["readings"]["first-order"]["r2"] < L["readings"]["gain"]["r2"] < 1
    assert L["best"] == max(L["readings"], key=lambda r: L["readings"][r]["r2"])


def test_the_promoted_tokens_are_the_largest_mean_direct_contributions_on_the_training_text():
    model = tiny_llama()
    res = read_model(model, _Tok(), FIT, EVAL, tokens=("a",), promoted=2, layers=[0])
    n_fit, h_fit = _inputs(model, FIT, 0)
    mlp = model.model.layers[0].mlp
    with torch.no_grad():
        mean_out = mlp(n_fit.float()).double().mean(0)
    s = float(torch.rsqrt(h_fit.pow(2).mean(-1) + TINY["rms_norm_eps"]).mean())
    scores = (model.model.embed_tokens.weight.detach().double() * model.model.norm.weight.detach().double() * s) @ mean_out
    scores[3] = -float("inf")  # "a" is already read
    want = scores.topk(2).indices.tolist()
    assert [d["token_id"] for d in res["layers"][0]["directions"][1:]] == want


def test_an_eigenvector_is_read_as_the_tokens_at_both_of_its_ends():
    gen = torch.Generator().manual_seed(0)
    X = F.normalize(torch.randn(40, 8, generator=gen, dtype=torch.float64), dim=-1)
    q = X[7] - X[12]  # a planted direction: token 7 at its + end, token 12 at its - end
    q = q / q.norm()
    r = X[20] - X[20].dot(q) * q  # token 20, made orthogonal to q: the eigenvalues are exactly 3 and -0.5
    r = r / r.norm()
    B = 3.0 * torch.outer(q, q) - 0.5 * torch.outer(r, r)
    Bh = torch.zeros(9, 9, dtype=torch.float64)
    Bh[:8, :8] = B
    for form in (B, Bh):
        out = eigen_readout(form, X, X, k=1, n_tokens=3, decode=lambda i: f"t{i}")
        pos, neg = out["sides"]["positive"][0], out["sides"]["negative"][0]
        assert pos["eigenvalue"] == pytest.approx(3.0) and neg["eigenvalue"] == pytest.approx(-0.5)
        assert {pos["in"]["plus"][0], pos["in"]["minus"][0]} == {"t7", "t12"}
        assert "t20" in neg["in"]["plus"] + neg["in"]["minus"]
        assert out["n_positive"] == 1 and out["n_negative"] == 1 and pos["constant"] == 0.0


def test_a_token_that_is_several_tokens_is_one_clear_error():
    with pytest.raises(ReadError, match=r"'ab' is 2 tokens .* not one"):
        read_model(tiny_llama(), _Tok(), FIT, EVAL, tokens=("ab",))
    with pytest.raises(ReadError, match=r"--layer 5 is out of range: the model has 2 gated MLP layers"):
        read_model(tiny_llama(), _Tok(), FIT, EVAL, tokens=("a",), layers=[5])


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory):
    """A tiny SwiGLU Llama as a GGUF file and as an HF directory with the GGUF's tokenizer, and a text file."""
    pytest.importorskip("gguf")
    from tiny_hf import write_gguf

    from sqs.integrations.pretrained import load_pretrained

    root = tmp_path_factory.mktemp("read")
    model = tiny_llama()
    gguf = write_gguf(model, root / "tiny.gguf")
    model.save_pretrained(root / "hf")
    load_pretrained(gguf).tokenizer.save_pretrained(root / "hf")
    (root / "t.txt").write_text(TEXT)
    return root


def _cli(src, root, out, *extra):
    return main(["read", str(src), "--out", str(out), "--token", "a", "--token", ".", "--text", str(root / "t.txt"),
                 "--context", "16", "--fit-windows", "4", "--eval-windows", "4", "--promoted", "1", *extra])


def test_the_cli_reads_a_gguf_file_and_the_same_model_as_a_directory_alike(tiny_files, tmp_path, capsys):
    root = tiny_files
    assert _cli(root / "tiny.gguf", root, tmp_path / "g") == 0
    assert _cli(root / "hf", root, tmp_path / "h", "--compare", str(tmp_path / "g")) == 0
    assert "2 layers read in" in capsys.readouterr().out
    g = json.loads((tmp_path / "g" / "reading.json").read_text())
    h = json.loads((tmp_path / "h" / "reading.json").read_text())
    assert g["kind"] == "gguf" and h["kind"] == "hf-dir" and [t["text"] for t in g["tokens"]] == ["a", "."]
    assert g["fit_tokens"] == 64 and g["eval_tokens"] == 64 and len(g["layers"]) == 2
    for Lg, Lh in zip(g["layers"], h["layers"]):
        assert Lg["gate"] == "swiglu" and Lg["best"] in ("gain", "affine")
        assert [d["token"] for d in Lg["directions"]][:2] == ["a", "."]
        for r in Lg["readings"]:
            assert Lg["readings"][r]["r2"] == pytest.approx(Lh["readings"][r]["r2"], abs=1e-4)
        sp = Lg["directions"][0]["spectrum"]
        assert len(sp["sides"]["positive"][0]["in"]["plus"]) == 8 and sp["n_positive"] + sp["n_negative"] <= 33
    md = (tmp_path / "h" / "reading.md").read_text()
    assert "compared: best R²" in md and "| 1 | swiglu |" in md
    for name in ("fidelity.png", "tokens.png", "spectra.png"):
        assert (tmp_path / "h" / name).stat().st_size > 1000


def test_a_converted_sqs_model_is_read_with_its_own_gate(tiny_files, tmp_path):
    from sqs.integrations import transformers as sqs_hf
    from sqs.integrations.convert import ConvertConfig, anneal_to
    from sqs.integrations.pretrained import load_pretrained, text_blocks

    pre = load_pretrained(tiny_files / "tiny.gguf")
    blocks = text_blocks(pre.tokenizer, tiny_files / "t.txt", "train", 16, 8)
    cfg = ConvertConfig(target="sqs", steps=2, anneal_steps=1, batch=2, context=16, eval_every=2)
    try:
        anneal_to(pre.model, blocks, {"held": blocks[:2]}, cfg, tmp_path / "run", tokenizer=pre.tokenizer,
                  progress=None)
        assert _cli(tmp_path / "run" / "model", tiny_files, tmp_path / "out") == 0
    finally:
        sqs_hf.unregister()
    res = json.loads((tmp_path / "out" / "reading.json").read_text())
    assert {L["gate"] for L in res["layers"]} == {"sqs"}
    assert all(0 < L["readings"][L["best"]]["r2"] <= 1 for L in res["layers"])


@pytest.mark.parametrize("src", ["tiny.gguf", "hf"])
def test_the_cli_says_in_one_line_when_a_token_is_not_one_token(tiny_files, tmp_path, capsys, src):
    code = main(["read", str(tiny_files / src), "--out", str(tmp_path / "o"), "--token", "cat",
                 "--text", str(tiny_files / "t.txt"), "--context", "16", "--fit-windows", "2", "--eval-windows", "2"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "'cat' is 3 tokens" in err


def test_the_cli_says_in_one_line_when_the_model_path_is_not_a_model(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a model")
    for bad in (tmp_path / "missing", tmp_path / "notes.txt"):
        code = main(["read", str(bad), "--out", str(tmp_path / "o")])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and str(bad) in err
        assert "Hugging Face model directory" in err and ".gguf" in err
    assert not (tmp_path / "o").exists()
