"""SQS in Hugging Face gated MLPs (sqs.integrations.transformers), tested as Liger-Kernel tests
its patches: tiny models built from configs here (no hub access), the patched model against the
library's own forward with identical weights, then training, save/load, compile and conversion."""

from __future__ import annotations

import copy
import json
import time

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sqs.integrations import transformers as sqs_hf  # noqa: E402
from sqs.nn import SQS  # noqa: E402
from sqs.ops import sqs_glu, sqs_glu_packed  # noqa: E402

# Odd sizes on purpose: hidden 20 (2 heads of 10), intermediate 37, vocab 61, sequences of 7.
TINY = dict(hidden_size=20, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=10, vocab_size=61, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
FAMILY_MODELS = {  # family -> (config class, causal-LM class)
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "gemma": ("GemmaConfig", "GemmaForCausalLM"),
    "granite": ("GraniteConfig", "GraniteForCausalLM"),
    "olmo": ("OlmoConfig", "OlmoForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
}
PARAMS = {"c": 0.05, "lam": 0.7, "p": 1.0}


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with transformers as installed (no "sqs", original MLP classes)."""
    sqs_hf.unregister()
    yield
    sqs_hf.unregister()


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    cfg_name, model_name = FAMILY_MODELS[family]
    cfg = getattr(transformers, cfg_name)(**{**TINY, **overrides})
    torch.manual_seed(seed)
    return getattr(transformers, model_name)(cfg).eval()


def act_attr(family: str) -> str:
    return sqs_hf.FAMILIES[family].act


def with_sqs_act(model, family: str, **params):
    """What a user can do without this module: the SQS module as the MLP's activation (unfused)."""
    for layer in model.model.layers:
        setattr(layer.mlp, act_attr(family), SQS(**params))
    return model


def tokens(batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=x)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same_run(ref, got, rtol, atol):
    torch.testing.assert_close(got[0], ref[0], rtol=rtol, atol=atol)
    assert ref[1].keys() == got[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_patched_matches_library_forward_fp32(family, monkeypatch):
    """apply_sqs changes speed only: logits and every parameter gradient as transformers' own forward."""
    if sqs_hf.FAMILIES[family] not in sqs_hf._mlp_classes().values():
        pytest.skip(f"{family} not in this transformers")
    ref_model = with_sqs_act(tiny_model(family), family, **PARAMS)
    model = copy.deepcopy(ref_model)
    x, x1 = tokens(), tokens(batch=1, seq=5)  # 21 tokens >= 20 features: packed matmul; 5: two matmuls
    ref, ref1 = loss_and_grads(ref_model, x), loss_and_grads(ref_model, x1)  # classes unpatched: library forward

    sqs_hf.apply_sqs(model)
    assert model.state_dict().keys() == ref_model.state_dict().keys()
    assert model.config.hidden_act == "sqs" and model.config.sqs == PARAMS
    mlp = model.model.layers[0].mlp
    assert getattr(mlp, act_attr(family)).c == PARAMS["c"] and mlp._sqs_fused
    calls = []
    monkeypatch.setattr(sqs_hf, "sqs_glu", lambda *a: calls.append("split") or sqs_glu(*a))
    monkeypatch.setattr(sqs_hf, "sqs_glu_packed", lambda *a: calls.append("packed") or sqs_glu_packed(*a))
    assert_same_run(ref, loss_and_grads(model, x), rtol=1e-5, atol=1e-6)
    assert_same_run(ref1, loss_and_grads(model, x1), rtol=1e-5, atol=1e-6)
    n = TINY["num_hidden_layers"]
    assert calls == ["packed"] * n + ["split"] * n  # the fused op ran in every MLP, on both paths


@pytest.mark.parametrize("family", ["llama", "phi3"])
def test_patched_matches_library_forward_bf16_and_general_p(family):
    """bf16 (the fused op rounds once, the library's product rounds twice), p != 1 (the general kernel) and,
    for Llama, MLP biases (mlp_bias=True: the packed matmul joins the biases too).

    bf16 tolerance: 2e-2 relative/absolute on logits and gradients, ~3 bf16 ulps at these scales.
    """
    params = {"c": 0.02, "lam": 0.4, "p": 1.5}
    x = tokens()
    ref32 = with_sqs_act(tiny_model(family, **({"mlp_bias": True} if family == "llama" else {})), family, **params)
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    want32, want16 = loss_and_grads(ref32, x), loss_and_grads(ref16, x)

    got32 = loss_and_grads(sqs_hf.apply_sqs(ref32), x)
    got16 = loss_and_grads(sqs_hf.apply_sqs(ref16), x)
    assert ref16.model.layers[0].mlp._sqs_fused and ref16.config.sqs == params
    assert_same_run(want32, got32, rtol=1e-5, atol=1e-6)
    assert_same_run(want16, got16, rtol=2e-2, atol=2e-2)


def _train(model, steps: int, lr: float = 1e-2) -> list[float]:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    x = tokens(batch=4, seq=9, seed=2)  # one batch, memorised: the loss must fall
    losses = []
    for _ in range(steps):
        loss = model(x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_convergence_matches_unfused():
    """40 AdamW steps from the same seed: the same losses and final weights with and without apply_sqs."""
    ref = with_sqs_act(tiny_model("llama"), "llama", **PARAMS)
    model = copy.deepcopy(ref)
    ref_losses = _train(ref, 40)  # library forward (classes unpatched)
    losses = _train(sqs_hf.apply_sqs(model), 40)
    assert losses[-1] < 0.5 * losses[0], "the mini-model should learn (else the comparison says little)"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_hidden_act_sqs_round_trip_and_generate(tmp_path):
    """register(): LlamaConfig(hidden_act="sqs", sqs=...) builds fused SQS MLPs; non-default c, lam, p survive
    save_pretrained/from_pretrained, and the loaded model generates the same tokens."""
    params = {"c": 0.03, "lam": 0.8, "p": 1.5}
    sqs_hf.register()
    model = tiny_model("llama", hidden_act="sqs", sqs=params)
    act = model.model.layers[1].mlp.act_fn
    assert isinstance(act, SQS) and (act.c, act.lam, act.p) == (0.03, 0.8, 1.5)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hidden_act"] == "sqs" and saved["sqs"] == params

    loaded = type(model).from_pretrained(tmp_path).eval()
    assert loaded.config.sqs == params
    act = loaded.model.layers[1].mlp.act_fn
    assert (act.c, act.lam, act.p) == (0.03, 0.8, 1.5)
    x = tokens(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = loaded.generate(x, **kw)
    assert out.shape == (1, x.shape[1] + 5)
    assert torch.equal(out, model.generate(x, **kw))


def test_default_params_written_to_config(tmp_path):
    sqs_hf.register()
    model = tiny_model("llama", hidden_act="sqs")
    assert model.config.sqs == {"c": 0.01, "lam": 0.5, "p": 1.0}


def test_unregistered_name_fails_and_register_fixes():
    """Without register() transformers itself refuses the name (KeyError 'sqs', documented in the module);
    a name reaching an MLP sqs does not patch fails with a message listing the supported classes."""
    with pytest.raises(KeyError, match="sqs"):
        tiny_model("llama", hidden_act="sqs")
    sqs_hf.register()
    assert sqs_hf.is_registered()
    tiny_model("llama", hidden_act="sqs")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=61,
                                                               activation_function="sqs"))
    with pytest.raises(RuntimeError, match="does not patch.*LlamaMLP"):
        gpt2(tokens())


def test_config_sqs_validated():
    sqs_hf.register()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lambda'\]; valid keys: c, lam, p"):
        tiny_model("llama", hidden_act="sqs", sqs={"lambda": 0.5})
    with pytest.raises(ValueError, match="`p` must be > 0"):
        tiny_model("llama", hidden_act="sqs", sqs={"p": 0})


def test_unknown_mlp_refused_by_class_name():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=61))
    with pytest.raises(ValueError, match=r"apply_sqs: GPT2MLP \(at transformer.h.0.mlp\) is not a gated MLP"):
        sqs_hf.apply_sqs(gpt2)
    with pytest.raises(ValueError, match="apply_sqs_to_class: GPT2MLP is not a gated MLP class"):
        sqs_hf.apply_sqs_to_class(type(gpt2.transformer.h[0].mlp))


def test_apply_sqs_refuses_to_change_the_gate():
    with pytest.raises(ValueError, match="gates with SiLUActivation, not SQS.*use to_sqs"):
        sqs_hf.apply_sqs(tiny_model("llama"))


@pytest.mark.parametrize("version", ["4.57.1", "6.0.0", "not-a-version"])
def test_unsupported_transformers_version_refused(monkeypatch, version):
    monkeypatch.setattr(transformers, "__version__", version)
    model = with_sqs_act(tiny_model("llama"), "llama")
    for call in (sqs_hf.register, lambda: sqs_hf.apply_sqs(model), lambda: sqs_hf.apply_sqs_to_class("llama")):
        with pytest.raises(RuntimeError, match=rf"supports transformers >=5.0,<6.0 .*found {version}.*pip install"):
            call()
    assert not sqs_hf.is_registered() and not hasattr(model.model.layers[0].mlp, "_sqs_fused")


def test_apply_sqs_to_class_before_build():
    """Liger's other entry point: patch the class, then every model built with hidden_act="sqs" is fused."""
    sqs_hf.apply_sqs_to_class("llama")
    sqs_hf._hf_activations.ACT2FN["sqs"] = sqs_hf.SQSFromName  # the name; register() does both
    model = tiny_model("llama", hidden_act="sqs", sqs=PARAMS)
    ref = copy.deepcopy(model)
    for layer in ref.model.layers:
        layer.mlp._sqs_fused = False  # the library's forward with the same SQS module
    x = tokens()
    assert_same_run(loss_and_grads(ref, x), loss_and_grads(model, x), rtol=1e-5, atol=1e-6)


def test_torch_compile_patched_mlp_has_no_graph_break():
    """fullgraph=True fails on any graph break; the compiled MLP matches the eager fused one."""
    model = sqs_hf.apply_sqs(with_sqs_act(tiny_model("llama"), "llama", **PARAMS))
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 7, TINY["hidden_size"], requires_grad=True)
    t0 = time.perf_counter()
    compiled = torch.compile(mlp, fullgraph=True)
    y = compiled(x)
    y.square().sum().backward()
    got = (y.detach(), x.grad.clone(), mlp.up_proj.weight.grad.clone())
    x.grad = None
    mlp.zero_grad(set_to_none=True)
    y = mlp(x)
    y.square().sum().backward()
    torch.testing.assert_close(got[0], y.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], x.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[2], mlp.up_proj.weight.grad, rtol=1e-5, atol=1e-6)
    assert time.perf_counter() - t0 < 120


def test_to_sqs_swiglu_model_warns_saves_and_trains(tmp_path):
    model = tiny_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="SiLUActivation -> SQS.*until it is fine-tuned"):
        sqs_hf.to_sqs(model, c=0.02)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # same weights
    assert isinstance(model.model.layers[0].mlp.act_fn, SQS) and model.model.layers[0].mlp._sqs_fused
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hidden_act"] == "sqs" and cfg["sqs"] == {"c": 0.02, "lam": 0.5, "p": 1.0}
    losses = _train(model, 8)
    assert losses[-1] < losses[0]


def test_to_sqs_gelu_phi3():
    model = tiny_model("phi3", hidden_act="gelu")
    with pytest.warns(UserWarning, match="GELUActivation -> SQS"):
        sqs_hf.to_sqs(model)
    assert isinstance(model.model.layers[0].mlp.activation_fn, SQS)
    assert model.config.hidden_act == "sqs"


def test_bench_hf_tiny():
    from sqs.bench.hf import HF_VARIANTS, bench_hf, format_hf_table

    res = bench_hf(batch=2, seq=8, layers=1, d_model=16, intermediate=24, heads=2, vocab=32, reps=1, warmup=1)
    assert [r.name for r in res] == list(HF_VARIANTS) and all(r.median_s > 0 and r.cpu_s > 0 for r in res)
    table = format_hf_table(res, layers=1, d_model=16, intermediate=24, vocab=32)
    assert "| swiglu: SwiGLU (hidden_act='silu') |" in table and "16 tokens per step" in table
    with pytest.raises(ValueError, match="d_model \\(16\\) must be a multiple of heads \\(3\\)"):
        bench_hf(d_model=16, heads=3)
