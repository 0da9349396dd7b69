"""SQS in Hugging Face models (sqs.integrations.transformers), tested as Liger-Kernel tests its patches:
tiny models built from configs here (no hub access), the patched model against the library's own
forward with identical weights, then loading, side effects, refusals, tools that watch the gate, the
fused loss and `sqs bench hf`."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import sqs

transformers = pytest.importorskip("transformers")

from sqs.bench.timing import peak_bytes  # noqa: E402
from sqs.integrations import hf_fused  # noqa: E402
from sqs.integrations import transformers as sqs_hf  # noqa: E402
from sqs.integrations.hf_loss import causal_lm_loss  # noqa: E402
from sqs.nn import SQS  # noqa: E402
from sqs.ops import sqs_glu, sqs_glu_packed  # noqa: E402

# Odd sizes on purpose: hidden 20 (2 heads of 10), intermediate 37, vocab 61, sequences of 7. Expert banks
# get intermediate sizes that are multiples of 4: transformers' CPU grouped_mm needs 16-byte strides.
TINY = dict(hidden_size=20, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=10, vocab_size=61, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
EXPERTS = dict(num_experts_per_tok=2, intermediate_size=36)
#: family -> (config class, causal-LM class, config overrides, the gated classes and their activation attribute)
FAMILY_MODELS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}, {"LlamaMLP": "act_fn"}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}, {"MistralMLP": "act_fn"}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}, {"Qwen2MLP": "act_fn"}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}, {"Qwen3MLP": "act_fn"}),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12,
                       shared_expert_intermediate_size=17),
                  {"Qwen2MoeMLP": "act_fn", "Qwen2MoeExperts": "act_fn"}),
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=12, mlp_only_layers=[0]),
                  {"Qwen3MoeMLP": "act_fn", "Qwen3MoeExperts": "act_fn"}),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, **EXPERTS),
                {"MixtralExperts": "act_fn"}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}, {"GemmaMLP": "act_fn"}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}, {"Gemma2MLP": "act_fn"}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}, {"Gemma3MLP": "act_fn"}),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", {}, {"Phi3MLP": "activation_fn"}),
    "olmo": ("OlmoConfig", "OlmoForCausalLM", {}, {"OlmoMLP": "act_fn"}),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", {}, {"Olmo2MLP": "act_fn"}),
    "granite": ("GraniteConfig", "GraniteForCausalLM", {}, {"GraniteMLP": "act_fn"}),
    "granitemoe": ("GraniteMoeConfig", "GraniteMoeForCausalLM", dict(num_local_experts=4, **EXPERTS),
                   {"GraniteMoeExperts": "act_fn"}),
    "smollm3": ("SmolLM3Config", "SmolLM3ForCausalLM", {}, {"SmolLM3MLP": "act_fn"}),
    # Not in the dispatch table: recognised by structure, verified by the probe.
    "helium": ("HeliumConfig", "HeliumForCausalLM", {}, {"HeliumMLP": "act_fn"}),
    "glm": ("GlmConfig", "GlmForCausalLM", {}, {"GlmMLP": "activation_fn"}),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, **EXPERTS), {"OlmoeExperts": "act_fn"}),
    "granitemoeshared": ("GraniteMoeSharedConfig", "GraniteMoeSharedForCausalLM",
                         dict(num_local_experts=4, shared_intermediate_size=17, **EXPERTS),
                         {"GraniteMoeSharedMLP": "activation", "GraniteMoeSharedExperts": "act_fn"}),
}
STRUCTURAL = {"helium", "glm", "olmoe", "granitemoeshared"}
PARAMS = {"c": 0.05, "lam": 0.7, "p": 1.0}

# The fused op's eager backend (same math as the compiled one, tested in test_ops/test_functional) keeps this
# file fast; the convergence test and the torch.compile test run the default backend.
pytestmark = pytest.mark.usefixtures("eager_backend")


@pytest.fixture(autouse=True)
def _unpatched():
    """Every test starts and ends with no opt-in patch (no register(), no class patch)."""
    sqs_hf.unregister()
    yield
    sqs_hf.unregister()


def tiny_config(family: str = "llama", **overrides):
    cfg_name, _, extra, _ = FAMILY_MODELS[family]
    return getattr(transformers, cfg_name)(**{**TINY, **extra, **overrides})


def tiny_model(family: str = "llama", seed: int = 0, **overrides):
    cfg = tiny_config(family, **overrides)
    torch.manual_seed(seed)
    return getattr(transformers, FAMILY_MODELS[family][1])(cfg).eval()


def gated_modules(model, family: str):
    """The test's own list of the gated modules (by class name), independent of the library's table."""
    names = FAMILY_MODELS[family][3]
    return [(m, names[type(m).__name__]) for m in model.modules() if type(m).__name__ in names]


def with_sqs_act(model, family: str, **params):
    """What a user can do without sqs's patch: SQS as each gated module's activation (the library's forward)."""
    for m, attr in gated_modules(model, family):
        setattr(m, attr, SQS(**params))
    return model


def tokens(batch: int = 3, seq: int = 7, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x, labels=x)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_run(ref, got, rtol, atol):
    torch.testing.assert_close(got[0], ref[0], rtol=rtol, atol=atol)
    assert ref[1].keys() == got[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def count_fused_calls(monkeypatch) -> list[str]:
    calls: list[str] = []
    monkeypatch.setattr(hf_fused, "sqs_glu", lambda *a: calls.append("split") or sqs_glu(*a))
    monkeypatch.setattr(hf_fused, "sqs_glu_packed", lambda *a: calls.append("packed") or sqs_glu_packed(*a))
    return calls


# --- every family: the fused forward equals the library's, logits and gradients ------------------------------

@pytest.mark.parametrize("family", list(FAMILY_MODELS))
def test_patched_matches_library_forward_fp32(family, monkeypatch):
    """apply_sqs changes speed only: logits and every parameter gradient as transformers' own forward with SQS as
    its activation, on the packed (21 tokens >= 20 features) and the two-matmul (5 tokens) paths."""
    ref_model = with_sqs_act(tiny_model(family), family, **PARAMS)
    model = copy.deepcopy(ref_model)
    x, x1 = tokens(), tokens(batch=1, seq=5)
    ref, ref1 = loss_and_grads(ref_model, x), loss_and_grads(ref_model, x1)

    report = sqs_hf.apply_sqs(model)
    gated = gated_modules(model, family)
    assert sorted(m.path for m in report.patched) == sorted(
        n for n, mod in model.named_modules() if any(mod is g for g, _ in gated))
    assert all(m.fused and m.family == ("structure" if family in STRUCTURAL else family) for m in report.patched)
    assert model.state_dict().keys() == ref_model.state_dict().keys()
    assert all(getattr(m, attr).c == PARAMS["c"] for m, attr in gated)
    calls = count_fused_calls(monkeypatch)
    assert_same_run(ref, loss_and_grads(model, x), rtol=1e-5, atol=1e-6)
    assert len(calls) == len(gated)  # the fused op ran once in every gated module
    assert_same_run(ref1, loss_and_grads(model, x1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "phi3", "qwen2_moe"])
def test_patched_matches_library_forward_bf16_and_general_p(family):
    """bf16 (the fused op rounds once, the library's product rounds twice), p != 1 (the general kernel), for
    Llama MLP biases (mlp_bias=True: the packed matmul joins the biases too), for Qwen2-MoE the batched_mm expert
    dispatch (grouped_mm on CPU needs 16-byte strides: no bf16 at hidden 20). bf16 tolerance: 2e-2, ~3 ulps."""
    params = {"c": 0.02, "lam": 0.4, "p": 1.5}
    x = tokens()
    extra = {"llama": {"mlp_bias": True}, "qwen2_moe": {"experts_implementation": "batched_mm"}}.get(family, {})
    ref32 = with_sqs_act(tiny_model(family, **extra), family, **params)
    ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
    want32, want16 = loss_and_grads(ref32, x), loss_and_grads(ref16, x)
    sqs_hf.apply_sqs(ref32)
    sqs_hf.apply_sqs(ref16)
    assert_same_run(want32, loss_and_grads(ref32, x), rtol=1e-5, atol=1e-6)
    assert_same_run(want16, loss_and_grads(ref16, x), rtol=2e-2, atol=2e-2)


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
    """40 AdamW steps from the same seed: the same losses and final weights with and without apply_sqs (on the
    default kernel backend: compiled on CPU)."""
    ref = with_sqs_act(tiny_model("llama"), "llama", **PARAMS)
    model = copy.deepcopy(ref)
    ref_losses = _train(ref, 40)
    sqs_hf.apply_sqs(model)
    with sqs.ops.backend("compiled"):
        losses = _train(model, 40)
    assert losses[-1] < 0.5 * losses[0], "the mini-model should learn (else the comparison says little)"
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


# --- Gemma 2/3 read hidden_activation ------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_hidden_activation_sqs_builds_the_sqs_gate(family):
    """Gemma 2/3 MLPs read hidden_activation: hidden_activation="sqs" builds SQS(config.sqs), fused, and computes
    what the library's forward computes with that gate set by hand."""
    sqs_hf.register()
    model = tiny_model(family, hidden_activation="sqs", sqs=PARAMS)
    sqs_hf.unregister()
    acts = [getattr(m, a) for m, a in gated_modules(model, family)]
    assert all(isinstance(a, SQS) and (a.c, a.lam, a.p) == (0.05, 0.7, 1.0) for a in acts)
    assert all(hf_fused.is_bound(m) for m, _ in gated_modules(model, family))
    ref = with_sqs_act(tiny_model(family, hidden_activation="gelu_pytorch_tanh"), family, **PARAMS)
    ref.load_state_dict(model.state_dict())
    x = tokens()
    assert_same_run(loss_and_grads(ref, x), loss_and_grads(model, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_hidden_act_sqs_is_refused_not_silently_gelu(family):
    """Gemma2Config(hidden_act="sqs") used to build GELU-tanh MLPs while saving hidden_act="sqs"; now refused, with
    the key to set."""
    sqs_hf.register()
    with pytest.raises(ValueError, match=r"hidden_act='sqs', but \w+MLP builds its gate from "
                                         r"hidden_activation='gelu_pytorch_tanh'; set hidden_activation='sqs'"):
        tiny_model(family, hidden_act="sqs", sqs=PARAMS)
    sqs_hf.unregister()
    model = tiny_model(family, hidden_act="sqs")  # built without register(): apply_sqs names the mismatch
    with pytest.raises(ValueError, match="gates with GELUTanh.*set hidden_activation='sqs'.*to_sqs"):
        sqs_hf.apply_sqs(model)


def test_to_sqs_gemma2_writes_hidden_activation(tmp_path):
    model = tiny_model("gemma2")
    with pytest.warns(UserWarning, match="GELUTanh"):
        sqs_hf.to_sqs(model, c=0.02)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hidden_activation"] == "sqs" and saved["sqs"]["c"] == 0.02
    loaded = sqs_hf.AutoSQSForCausalLM.from_pretrained(tmp_path).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model.eval()(x).logits, rtol=0, atol=0)


# --- loading ---------------------------------------------------------------------------------------------

def _saved_sqs_model(path, params=None):
    params = params or {"c": 0.03, "lam": 0.8, "p": 1.5}
    model = sqs_hf.AutoSQSForCausalLM.from_config(tiny_config("llama", hidden_act="sqs", sqs=params)).eval()
    model.save_pretrained(path)
    return model


def test_register_round_trip_and_generate(tmp_path):
    """register(): LlamaConfig(hidden_act="sqs", sqs=...) builds fused SQS MLPs; non-default c, lam, p survive
    save_pretrained/from_pretrained, and the loaded model generates the same tokens."""
    params = {"c": 0.03, "lam": 0.8, "p": 1.5}
    sqs_hf.register()
    model = tiny_model("llama", hidden_act="sqs", sqs=params)
    act = model.model.layers[1].mlp.act_fn
    assert isinstance(act, SQS) and (act.c, act.lam, act.p) == (0.03, 0.8, 1.5)
    assert hf_fused.is_bound(model.model.layers[1].mlp)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["hidden_act"] == "sqs" and saved["sqs"] == sqs_hf.config_block(params)
    assert "AutoSQSForCausalLM.from_pretrained" in saved["sqs"]["load_with"]

    loaded = type(model).from_pretrained(tmp_path).eval()
    act = loaded.model.layers[1].mlp.act_fn
    assert (act.c, act.lam, act.p) == (0.03, 0.8, 1.5) and hf_fused.is_bound(loaded.model.layers[1].mlp)
    x = tokens(batch=1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    out = loaded.generate(x, **kw)
    assert out.shape == (1, x.shape[1] + 5) and torch.equal(out, model.generate(x, **kw))


def test_default_params_written_in_full():
    sqs_hf.register()
    model = tiny_model("llama", hidden_act="sqs")
    assert sqs_hf.sqs_params(model.config) == {"c": 0.01, "lam": 0.5, "p": 1.0}
    assert model.config.sqs == sqs_hf.config_block({"c": 0.01, "lam": 0.5, "p": 1.0})


def test_loading_without_register_names_register(tmp_path):
    """Not transformers' bare KeyError: 'sqs', but an error that says what to call."""
    _saved_sqs_model(tmp_path)
    with pytest.raises(sqs_hf.SQSNotRegisteredError, match=r"call sqs\.integrations\.transformers\.register\(\) "
                                                           r"before building or loading.*AutoSQSForCausalLM"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    with pytest.raises(sqs_hf.SQSNotRegisteredError, match="register"):
        tiny_model("llama", hidden_act="sqs")


def test_auto_sqs_loads_in_a_new_process_without_side_effects(tmp_path):
    """One call in a fresh interpreter: same logits, fused MLPs, and no process-wide patch left behind."""
    model = _saved_sqs_model(tmp_path)
    x = tokens(batch=2)
    with torch.no_grad():
        want = model(x).logits
    torch.save(x, tmp_path / "x.pt")
    script = f"""
import json, torch, transformers
from transformers.modeling_utils import PreTrainedModel
from transformers.models.llama.modeling_llama import LlamaMLP
before = (LlamaMLP.forward, LlamaMLP.__init__, PreTrainedModel.post_init)
from sqs.integrations import hf_fused, transformers as sqs_hf
m = sqs_hf.AutoSQSForCausalLM.from_pretrained({str(tmp_path)!r}).eval()
x = torch.load({str(tmp_path / 'x.pt')!r})
with torch.no_grad():
    torch.save(m(x).logits, {str(tmp_path / 'got.pt')!r})
print(json.dumps({{"fused": all(hf_fused.is_bound(l.mlp) for l in m.model.layers),
                  "untouched": before == (LlamaMLP.forward, LlamaMLP.__init__, PreTrainedModel.post_init),
                  "registered": sqs_hf.is_registered()}}))
"""
    env = {**os.environ, "SQS_BACKEND": "eager"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == {"fused": True, "untouched": True, "registered": False}
    torch.testing.assert_close(torch.load(tmp_path / "got.pt"), want, rtol=0, atol=0)


def test_auto_sqs_convert_loads_a_swiglu_model_as_sqs(tmp_path):
    tiny_model("qwen3").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="gates with SiLUActivation, not SQS.*to_sqs"):
        sqs_hf.AutoSQSForCausalLM.from_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="until it is fine-tuned"):
        model = sqs_hf.AutoSQSForCausalLM.from_pretrained(tmp_path, convert=True, c=0.02)
    assert all(isinstance(layer.mlp.act_fn, SQS) and layer.mlp.act_fn.c == 0.02 for layer in model.model.layers)


def test_config_sqs_validated():
    sqs_hf.register()
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['lambda'\]; valid keys: c, lam, p"):
        tiny_model("llama", hidden_act="sqs", sqs={"lambda": 0.5})
    with pytest.raises(ValueError, match="`p` must be > 0"):
        tiny_model("llama", hidden_act="sqs", sqs={"p": 0})


@pytest.mark.parametrize("family", ["llama", "qwen2_moe"])
def test_apply_sqs_to_class_alone_builds_fused_models(family):
    """Liger's entry point, on its own (it registers the name it needs): patch the classes, then every model built
    with hidden_act="sqs" is SQS and fused; unregister restores the classes."""
    ref = with_sqs_act(tiny_model(family), family, **PARAMS)
    originals = {type(m): dict(vars(type(m))) for m, _ in gated_modules(ref, family)}
    assert set(sqs_hf.apply_sqs_to_class(family)) == set(originals)
    model = tiny_model(family, hidden_act="sqs", sqs=PARAMS)
    assert all(isinstance(getattr(m, a), SQS) and not hf_fused.is_bound(m) for m, a in gated_modules(model, family))
    sqs_hf.unregister()
    assert all(dict(vars(c)) == attrs for c, attrs in originals.items())
    ref.load_state_dict(model.state_dict())
    x = tokens()
    sqs_hf.apply_sqs_to_class(family)
    got = loss_and_grads(model, x)
    sqs_hf.unregister()
    assert_same_run(loss_and_grads(ref, x), got, rtol=1e-5, atol=1e-6)


# --- no process-wide side effects; configs are never shared-and-rewritten ----------------------------------------

def test_apply_sqs_patches_one_instance_only():
    from transformers.modeling_utils import PreTrainedModel
    from transformers.models.llama.modeling_llama import LlamaMLP

    before = (LlamaMLP.forward, LlamaMLP.__init__, PreTrainedModel.post_init)
    a = with_sqs_act(tiny_model("llama"), "llama", **PARAMS)
    b = with_sqs_act(tiny_model("llama"), "llama", **PARAMS)
    sqs_hf.apply_sqs(a)
    assert all(hf_fused.is_bound(layer.mlp) for layer in a.model.layers)
    assert not any(hf_fused.is_bound(layer.mlp) for layer in b.model.layers)
    assert (LlamaMLP.forward, LlamaMLP.__init__, PreTrainedModel.post_init) == before
    assert not sqs_hf.is_registered()


def test_to_sqs_never_rewrites_a_shared_config(tmp_path):
    """Two models built from one config object share it; converting one leaves the other (and the object) alone."""
    cfg = tiny_config("llama")
    torch.manual_seed(0)
    a, b = transformers.LlamaForCausalLM(cfg), transformers.LlamaForCausalLM(cfg)
    assert a.config is cfg and b.config is cfg
    with pytest.warns(UserWarning):
        report = sqs_hf.to_sqs(a)
    assert "own copy" in report.config
    assert cfg.hidden_act == "silu" and not hasattr(cfg, "sqs") and b.config is cfg
    assert a.config is not cfg and a.model.config is a.config and a.config.hidden_act == "sqs"
    b.save_pretrained(tmp_path / "b")
    assert json.loads((tmp_path / "b" / "config.json").read_text())["hidden_act"] == "silu"


def test_report_lists_what_was_patched():
    model = with_sqs_act(tiny_model("qwen2_moe"), "qwen2_moe", **PARAMS)
    report = sqs_hf.apply_sqs(model, c=0.1)
    layouts = {(m.path, m.cls, m.layout) for m in report.patched}
    assert ("model.layers.0.mlp.shared_expert", "Qwen2MoeMLP", "split") in layouts
    assert ("model.layers.1.mlp.experts", "Qwen2MoeExperts", "experts") in layouts
    assert report.params == {"c": 0.1, "lam": 0.7, "p": 1.0} and model.config.sqs["c"] == 0.1
    text = str(report)
    assert "4 gated MLPs set to SQS(c=0.1, lam=0.7, p=1.0), 4 with the fused forward" in text
    assert "Qwen2MoeExperts [qwen2_moe, experts] SQS -> SQS (fused)" in text


def test_eager_expert_bank_is_reported_unfused_and_still_equal():
    model = with_sqs_act(tiny_model("mixtral", experts_implementation="eager"), "mixtral", **PARAMS)
    ref = copy.deepcopy(model)
    report = sqs_hf.apply_sqs(model)
    assert any("experts_implementation='eager'" in n for n in report.notes)
    x = tokens()
    assert_same_run(loss_and_grads(ref, x), loss_and_grads(model, x), rtol=1e-5, atol=1e-6)


# --- refusals: never a silent no-op, never a silent wrong gate ----------------------------------------------

def test_non_gated_mlps_are_refused_by_name():
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=61))
    with pytest.raises(sqs_hf.NotAGatedMLP, match=r"apply_sqs: GPT2MLP is not a gated MLP .*\(at transformer.h.0.mlp\)"):
        sqs_hf.apply_sqs(gpt2)
    arcee = transformers.ArceeForCausalLM(transformers.ArceeConfig(**TINY))  # up/down with relu^2, no gate
    with pytest.raises(sqs_hf.NotAGatedMLP, match="ArceeMLP is not a gated MLP"):
        sqs_hf.to_sqs(arcee)
    with pytest.raises(ValueError, match="apply_sqs_to_class: GPT2MLP is not a gated MLP class"):
        sqs_hf.apply_sqs_to_class(type(gpt2.transformer.h[0].mlp))


class _SwappedMLP(torch.nn.Module):
    """Has gate_proj/up_proj/down_proj and an act_fn, but gates the up branch: not down(act(gate(x)) * up(x))."""

    def __init__(self, d=8, h=12):
        super().__init__()
        self.gate_proj, self.up_proj = torch.nn.Linear(d, h), torch.nn.Linear(d, h)
        self.down_proj = torch.nn.Linear(h, d)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.gate_proj(x) * self.act_fn(self.up_proj(x)))


def test_structure_without_the_computation_is_refused():
    net = torch.nn.Sequential(_SwappedMLP())
    with pytest.raises(sqs_hf.NotAGatedMLP, match=r"_SwappedMLP has gate/up/down projections, but its forward does "
                                                  r"not compute down\(act\(gate\(x\)\) \* up\(x\)\)"):
        sqs_hf.to_sqs(net)


class _LoRALinear(torch.nn.Module):
    """A wrapped projection as PEFT makes one: not an nn.Linear, but with in_features/out_features."""

    def __init__(self, base: torch.nn.Linear, r: int = 2):
        super().__init__()
        self.base_layer, self.in_features, self.out_features = base, base.in_features, base.out_features
        self.lora_a, self.lora_b = torch.nn.Linear(base.in_features, r, bias=False), torch.nn.Linear(r, base.out_features, bias=False)

    def forward(self, x):
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


def test_wrapped_projections_are_called_as_modules():
    """LoRA-style wrapped gate/up projections (in either order with apply_sqs) run their own forward: the adapter
    counts, the gate stays fused."""
    ref = with_sqs_act(tiny_model("llama"), "llama", **PARAMS)
    torch.manual_seed(3)
    for layer in ref.model.layers:
        layer.mlp.gate_proj, layer.mlp.up_proj = _LoRALinear(layer.mlp.gate_proj), _LoRALinear(layer.mlp.up_proj)
    model = copy.deepcopy(ref)
    report = sqs_hf.apply_sqs(model)
    assert all(m.fused for m in report.patched)
    x = tokens()
    assert_same_run(loss_and_grads(ref, x), loss_and_grads(model, x), rtol=1e-5, atol=1e-6)


def test_apply_sqs_refuses_to_change_the_gate():
    with pytest.raises(ValueError, match="gates with SiLUActivation, not SQS.*use to_sqs"):
        sqs_hf.apply_sqs(tiny_model("llama"))


def test_negative_c_is_the_other_reading_of_the_shift():
    """SPEC: a negative c gives (v + |c| sgn v)/(1 + lam|v|^p) and must work; it is carried, not refused."""
    model = sqs_hf.AutoSQSForCausalLM.from_config(tiny_config("llama", hidden_act="sqs"), c=-0.05)
    assert model.model.layers[0].mlp.act_fn.c == -0.05 and model.config.sqs["c"] == -0.05
    assert "the other reading of the shift" in str(sqs_hf.apply_sqs(model))  # said, not silent


@pytest.mark.parametrize("version", ["4.57.1", "6.0.0", "not-a-version"])
def test_unsupported_transformers_version_refused(monkeypatch, version):
    monkeypatch.setattr(transformers, "__version__", version)
    model = with_sqs_act(tiny_model("llama"), "llama")
    for call in (sqs_hf.register, lambda: sqs_hf.apply_sqs(model), lambda: sqs_hf.apply_sqs_to_class("llama")):
        with pytest.raises(RuntimeError, match=rf"supports transformers >=5.0,<6.0 .*found {version}.*pip install"):
            call()
    assert not sqs_hf.is_registered() and not hf_fused.is_bound(model.model.layers[0].mlp)


# --- multimodal: the language model's MLPs, the vision tower left alone --------------------------------------

def test_multimodal_patches_the_language_model_only(tmp_path):
    cfg = transformers.LlavaConfig(
        text_config=transformers.LlamaConfig(**TINY),
        vision_config=transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                                    num_attention_heads=2, image_size=8, patch_size=4),
        image_token_id=60)
    torch.manual_seed(0)
    model = transformers.LlavaForConditionalGeneration(cfg).eval()
    with pytest.warns(UserWarning, match="SiLUActivation -> SQS"):
        report = sqs_hf.to_sqs(model, c=0.02)
    assert [m.path for m in report.patched] == [f"model.language_model.layers.{i}.mlp" for i in range(2)]
    assert report.left_alone and report.left_alone[0][0] == "model.vision_tower"
    assert "CLIPMLP" in report.left_alone[0][1]
    assert type(model.model.vision_tower.encoder.layers[0].mlp.activation_fn).__name__ != "SQS"
    assert model.config.text_config.hidden_act == "sqs" and model.config.text_config.sqs["c"] == 0.02
    assert model.config.vision_config.hidden_act == cfg.vision_config.hidden_act
    x = tokens(batch=1)
    with torch.no_grad():
        out = model(input_ids=x).logits
    model.save_pretrained(tmp_path)
    sqs_hf.register()
    loaded = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, out, rtol=0, atol=0)


# --- the structural view issue 21 builds on -------------------------------------------------------------------

def test_find_gated_mlps_gives_paths_layouts_weights_and_activation():
    model = tiny_model("qwen2_moe")
    found = {g.path: g for g in sqs_hf.find_gated_mlps(model)}
    shared, bank = found["model.layers.0.mlp.shared_expert"], found["model.layers.0.mlp.experts"]
    assert (shared.kind, shared.family, shared.config_key, type(shared.act).__name__) == (
        "split", "qwen2_moe", "hidden_act", "SiLUActivation")
    w = shared.weights()
    assert w.gate.shape == (17, 20) and w.down.shape == (20, 17) and w.gate.data_ptr() == shared.module.gate_proj.weight.data_ptr()
    wb = bank.weights()
    assert wb.gate.shape == (4, 12, 20) and wb.up.shape == (4, 12, 20) and wb.down.shape == (4, 20, 12)
    torch.testing.assert_close(wb.up, bank.module.gate_up_proj.detach()[:, 12:])
    phi = sqs_hf.find_gated_mlps(tiny_model("phi3"))[0]
    torch.testing.assert_close(phi.weights().gate, phi.module.gate_up_proj.weight.detach()[:37])
    shared.set_act(SQS(c=0.3))
    assert shared.module.act_fn.c == 0.3
    with pytest.raises(sqs_hf.NotAGatedMLP, match="no gated MLP"):
        sqs_hf.find_gated_mlps(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# --- tools that watch the gate see it ---------------------------------------------------------------------

def test_a_hook_on_the_gate_sees_and_edits_it():
    """The fused op never materialises act(gate(x)); with a hook on the activation the MLP runs the library's form,
    so the hook sees the gate and its edit takes effect, exactly as without sqs."""
    ref = with_sqs_act(tiny_model("llama"), "llama", **PARAMS)
    model = copy.deepcopy(ref)
    sqs_hf.apply_sqs(model)
    seen = []

    def halve(mod, inp, out):
        seen.append(out.detach())
        return out * 0.5

    x = tokens()
    for m in (ref, model):
        m.model.layers[0].mlp.act_fn.register_forward_hook(halve)
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, rtol=1e-5, atol=1e-6)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])


def test_nnsight_traces_and_edits_the_sqs_gate():
    nnsight = pytest.importorskip("nnsight")
    model = sqs_hf.AutoSQSForCausalLM.from_config(tiny_config("llama", hidden_act="sqs", sqs=PARAMS)).eval()
    x = tokens()
    traced = nnsight.NNsight(model)
    with traced.trace(x):
        gate_in = traced.model.layers[0].mlp.act_fn.input.save()
        gate_out = traced.model.layers[0].mlp.act_fn.output.clone().save()
        traced.model.layers[0].mlp.act_fn.output[:] = 0
        edited = traced.output.logits.save()
    torch.testing.assert_close(gate_out, SQS(**PARAMS)(gate_in))
    silenced = copy.deepcopy(model)  # what zeroing the gate means: the first MLP adds nothing
    with torch.no_grad():
        silenced.model.layers[0].mlp.down_proj.weight.zero_()
        torch.testing.assert_close(edited, silenced(x).logits, rtol=1e-5, atol=1e-6)


def test_torch_compile_patched_mlp_has_no_graph_break():
    """fullgraph=True fails on any graph break; the compiled MLP matches the eager fused one."""
    model = with_sqs_act(tiny_model("llama"), "llama", **PARAMS)
    sqs_hf.apply_sqs(model)
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
        report = sqs_hf.to_sqs(model, c=0.02)
    assert report.changed_gates == ["LlamaMLP.SiLUActivation"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # same weights
    assert isinstance(model.model.layers[0].mlp.act_fn, SQS) and hf_fused.is_bound(model.model.layers[0].mlp)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["hidden_act"] == "sqs" and cfg["sqs"] == sqs_hf.config_block({"c": 0.02, "lam": 0.5, "p": 1.0})
    losses = _train(model, 8)
    assert losses[-1] < losses[0]


# --- the fused loss: apply_sqs(..., fused_linear_cross_entropy=True) ------------------------------------------
# A causal LM's training loss from the head's input, chunk by chunk, without the full logits: the same loss and
# gradients as transformers' own.

def sqs_model(cfg_name: str = "LlamaConfig", **overrides):
    cfg = getattr(transformers, cfg_name)(**{**TINY, "hidden_act": "sqs", **overrides})
    torch.manual_seed(0)
    return sqs_hf.AutoSQSForCausalLM.from_config(cfg).train()


def batch(seed: int = 1, ignore: bool = True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, TINY["vocab_size"], (3, 7), generator=g)
    labels = x.clone()
    if ignore:
        labels[0, :3] = -100  # a padded prompt: not counted
    return x, labels


def run(model, x, labels, **kw):
    model.zero_grad(set_to_none=True)
    out = model(input_ids=x, labels=labels, **kw)
    out.loss.backward()
    return out, {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(ref, got, rtol=1e-5, atol=1e-6):
    torch.testing.assert_close(got[0].loss, ref[0].loss, rtol=rtol, atol=atol)
    assert ref[1].keys() == got[1].keys()
    for name in ref[1]:
        torch.testing.assert_close(got[1][name], ref[1][name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("cfg_name,overrides", [
    ("LlamaConfig", {}),
    ("LlamaConfig", {"tie_word_embeddings": True}),  # the head's gradient lands on the shared embedding
    ("GraniteConfig", {"logits_scaling": 4.0}),  # logits = lm_head(h) / 4: folded into h
    ("MixtralConfig", {"num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 36,
                       "output_router_logits": True}),  # + router_aux_loss_coef * aux_loss, as the model adds it
])
def test_fused_loss_equals_the_library_loss(cfg_name, overrides):
    ref = sqs_model(cfg_name, **overrides)
    model = copy.deepcopy(ref)
    report = sqs_hf.apply_sqs(model, fused_linear_cross_entropy=True)
    assert report.fused_loss and "fused loss: on" in str(report)
    x, labels = batch()
    want, got = run(ref, x, labels), run(model, x, labels)
    assert got[0].logits is None and want[0].logits.shape == (3, 7, TINY["vocab_size"])
    assert_same(want, got)
    if "output_router_logits" in overrides:
        assert got[0].aux_loss is not None


def test_num_items_in_batch_and_shift_labels_as_the_library():
    """Gradient accumulation divides the summed loss by the tokens of the whole batch (the Trainer's
    num_items_in_batch); shift_labels (context parallelism) replaces the shift."""
    ref = sqs_model()
    model = copy.deepcopy(ref)
    sqs_hf.apply_sqs(model, fused_linear_cross_entropy=True)
    x, labels = batch()
    n = torch.tensor(40)
    assert_same(run(ref, x, labels, num_items_in_batch=n), run(model, x, labels, num_items_in_batch=n))
    shifted = torch.roll(labels, -1, dims=1)
    assert_same(run(ref, x, labels, shift_labels=shifted), run(model, x, labels, shift_labels=shifted))


def test_eval_and_no_labels_return_logits():
    ref = sqs_model()
    model = copy.deepcopy(ref)
    sqs_hf.apply_sqs(model, fused_linear_cross_entropy=True)
    x, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=x).logits, ref(input_ids=x).logits)  # train mode, no labels
        ref.eval(), model.eval()
        want, got = ref(input_ids=x, labels=labels), model(input_ids=x, labels=labels)
    torch.testing.assert_close(got.logits, want.logits)
    torch.testing.assert_close(got.loss, want.loss)


@pytest.mark.parametrize("cfg_name,overrides,why", [
    ("Gemma2Config", {"hidden_activation": "sqs"}, r"final_logit_softcapping=30\.0"),
    ("CohereConfig", {}, r"logit_scale=0\.0625"),
])
def test_models_that_transform_their_logits_are_refused(cfg_name, overrides, why):
    model = sqs_model(cfg_name, **overrides)
    with pytest.raises(sqs_hf.FusedLossRefused, match=rf"transforms its logits after the output layer \({why}\)"):
        sqs_hf.apply_sqs(model, fused_linear_cross_entropy=True)
    assert sqs_hf.apply_sqs(model).fused_loss is False  # the MLPs still fuse; the library loss stays


def test_turning_the_fused_loss_off_restores_the_library_forward():
    model = sqs_model()
    sqs_hf.apply_sqs(model, fused_linear_cross_entropy=True)
    sqs_hf.apply_sqs(model)
    assert "forward" not in vars(model) and "forward" not in vars(model.lm_head)
    x, labels = batch()
    assert model(input_ids=x, labels=labels).logits is not None


def test_causal_lm_loss_all_ignored_is_nan_like_the_library():
    h, w = torch.randn(2, 3, 4), torch.randn(5, 4)
    labels = torch.full((2, 3), -100)
    assert torch.isnan(causal_lm_loss(h, w, labels))


def test_fused_loss_step_needs_far_less_memory():
    """The point of the fused loss: at a vocabulary larger than the model, the step's peak tensor memory
    (forward + backward, CPU allocator) drops well below half of the library loss's."""
    cfg = dict(vocab_size=4096, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
               num_key_value_heads=2, head_dim=16, max_position_embeddings=512)
    ref = sqs_model(**cfg)
    model = copy.deepcopy(ref)
    sqs_hf.apply_sqs(model, fused_linear_cross_entropy=True)
    x = torch.randint(3, 4096, (4, 512), generator=torch.Generator().manual_seed(0))

    def step(m):
        return lambda: m(input_ids=x, labels=x).loss.backward()

    plain, fused = peak_bytes(step(ref)), peak_bytes(step(model))
    if plain is None:
        pytest.skip("this torch's profiler gives no allocation events")
    logits = 4 * 512 * 4096 * 4
    assert plain > 2 * logits and fused < 0.5 * plain, (plain, fused)


def test_bench_hf_tiny_reports_time_and_memory():
    from sqs.bench.hf import HF_VARIANTS, bench_hf, format_hf_table

    sizes = dict(batch=2, seq=8, layers=1, d_model=16, intermediate=24, heads=2, kv_heads=1, vocab=64)
    res = bench_hf("small", reps=1, warmup=0, **sizes)
    assert [r.name for r in res] == list(HF_VARIANTS)
    assert all(r.median_s > 0 and r.cpu_s > 0 and r.resident_bytes > 0 and r.peak_bytes for r in res)
    table = format_hf_table(res, "small", **sizes)
    assert "| sqs-fused-loss: SQS with apply_sqs(fused_linear_cross_entropy=True) |" in table
    assert "2x8 = 16 tokens per step" in table and "2 heads / 1 kv heads" in table
    with pytest.raises(ValueError, match=r"d_model \(16\) must be a multiple of heads \(3\)"):
        bench_hf("small", d_model=16, heads=3)
    with pytest.raises(ValueError, match="unknown shape 'huge'"):
        bench_hf("huge")
