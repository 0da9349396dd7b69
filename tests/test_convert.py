"""SwiGLU -> SQS / Bilinear conversion by annealing the gate (sqs.integrations.convert), on tiny Llama models."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from tiny_hf import VOCAB, logits, tiny_llama  # noqa: E402

from sqs.functional import glu_packed  # noqa: E402
from sqs.integrations import transformers as sqs_hf  # noqa: E402
from sqs.integrations.convert import (  # noqa: E402
    AnnealedMLP,
    ConvertConfig,
    ConvertRunMismatch,
    anneal_t,
    anneal_to,
    annealed,
    attach,
    finalize,
    read_curve,
    set_t,
)
from sqs.integrations.convert_report import ReportError, write_report  # noqa: E402
from sqs.io import ConfigError  # noqa: E402
from sqs.nn import SQS  # noqa: E402

pytestmark = pytest.mark.usefixtures("eager_backend")  # same values as compiled, no compile wait

G = torch.Generator().manual_seed(3)
TRAIN = torch.randint(0, VOCAB, (24, 12), generator=G)
HELD = {"held": torch.randint(0, VOCAB, (4, 12), generator=G)}
QUICK = dict(steps=6, anneal_steps=4, batch=4, context=12, lr=3e-3, warmup_steps=1, eval_every=2, checkpoint_every=2)
PARAMS = {"c": 0.02, "lam": 0.6, "p": 1.0}


@pytest.fixture(autouse=True)
def _unpatched():
    """Each test leaves transformers as installed (conversion to SQS registers the patched MLPs)."""
    sqs_hf.unregister()
    yield
    sqs_hf.unregister()


def _mlp_inputs(mlp, x):
    packed = F.linear(x, torch.cat([mlp.up_proj.weight, mlp.gate_proj.weight]))
    return packed, *packed.chunk(2, dim=-1)


class _Forbidden(torch.nn.Module):
    def forward(self, v):
        raise AssertionError("the original gate was evaluated")


@pytest.mark.parametrize("target", ["sqs", "bilinear"])
def test_at_t_1_only_the_fused_target_gate_runs(target):
    model = tiny_llama()
    (mlp, *_) = attach(model, target, PARAMS if target == "sqs" else {})
    mlp.act_fn = _Forbidden()  # would raise if the SiLU term were computed
    set_t(model, 1.0)
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(0))
    packed, _, _ = _mlp_inputs(mlp, x)
    want = mlp.down_proj(glu_packed(packed, target, **(PARAMS if target == "sqs" else {})))
    assert torch.equal(mlp(x), want)


def test_the_schedule_ends_at_exactly_1_and_stays_there():
    ts = [anneal_t(s, 7) for s in range(1, 12)]
    assert ts[:7] == sorted(ts[:7]) and ts[0] > 0 and ts[6] == 1.0 and set(ts[6:]) == {1.0}
    assert anneal_t(1, 0) == 1.0  # anneal_steps 0: the plain swap from the first step


def test_t_0_is_the_original_model_and_midway_is_the_interpolated_gate():
    model = tiny_llama()
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(4))
    before = logits(model, ids)
    mlps = attach(model, "sqs", PARAMS)
    torch.testing.assert_close(logits(model, ids), before, rtol=0, atol=1e-5)
    set_t(model, 0.25)
    x = torch.randn(2, 3, 32)
    _, w, v = _mlp_inputs(mlps[0], x)
    gate = 0.75 * F.silu(v) + 0.25 * (v - PARAMS["c"] * torch.sign(v)) / (1 + PARAMS["lam"] * v.abs())
    torch.testing.assert_close(mlps[0](x), mlps[0].down_proj(w * gate), rtol=1e-5, atol=1e-6)


def test_finalize_refuses_a_model_that_has_not_reached_the_target():
    model = tiny_llama()
    attach(model, "sqs")
    set_t(model, 0.5)
    with pytest.raises(ValueError, match=r"has not reached t = 1 \(t = 0.5\)"):
        finalize(model)


@pytest.mark.parametrize("target", ["sqs", "bilinear"])
def test_conversion_ends_at_the_target_and_saves_a_model_that_reloads_with_identical_logits(tmp_path, target):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    out = anneal_to(model, TRAIN, HELD, ConvertConfig(target=target, sqs=PARAMS, **QUICK), tmp_path / "run",
                    progress=None)
    assert not annealed(out)
    acts = {type(layer.mlp.act_fn).__name__ for layer in out.model.layers}
    if target == "sqs":
        assert acts == {"SQS"} and out.config.hidden_act == "sqs"
        assert {k: out.config.sqs[k] for k in PARAMS} == PARAMS
        assert all(isinstance(layer.mlp.act_fn, SQS) and layer.mlp.act_fn.c == PARAMS["c"] for layer in out.model.layers)
    else:
        assert acts == {"LinearActivation"} and out.config.hidden_act == "linear"
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    sqs_hf.register()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    assert torch.equal(logits(again, ids), logits(out, ids))
    cfg = json.loads((tmp_path / "run" / "model" / "config.json").read_text())
    assert cfg["hidden_act"] == ("sqs" if target == "sqs" else "linear")


def test_the_finalized_model_computes_what_the_annealed_model_did_at_t_1():
    model = tiny_llama()
    anneal_to(model, TRAIN, HELD, ConvertConfig(**QUICK), progress=None, stop_after=5)  # t = 1 from step 4
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(6))
    at_target = logits(model, ids)
    finalize(model)
    torch.testing.assert_close(logits(model, ids), at_target, rtol=1e-5, atol=1e-5)


def test_the_curve_records_the_original_the_plain_swap_training_and_the_final_model(tmp_path):
    model = tiny_llama()
    anneal_to(model, TRAIN, HELD, ConvertConfig(**QUICK), tmp_path / "run", progress=None)
    recs = read_curve(tmp_path / "run")
    kinds = [r["kind"] for r in recs]
    assert kinds[0] == "baseline" and kinds[-1] == "final" and kinds.count("train") == 6 and kinds.count("eval") == 3
    base = recs[0]
    from sqs.integrations.pretrained import lm_loss

    assert base["original"]["held"] == pytest.approx(lm_loss(tiny_llama(), HELD["held"], 4), rel=1e-6)
    assert base["swap"]["held"] != base["original"]["held"]
    evals = [r for r in recs if r["kind"] == "eval"]
    assert [e["t"] for e in evals] == [0.5, 1.0, 1.0] and evals[0]["target"] != evals[0]["current"]
    assert recs[-1]["final"]["held"] == pytest.approx(lm_loss(model, HELD["held"], 4), rel=1e-6)


def test_mlp_only_training_leaves_every_other_weight_as_it_was():
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    anneal_to(model, TRAIN, HELD, ConvertConfig(**QUICK), progress=None)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mlp." in k for k in changed)
    assert any("gate_proj" in k for k in changed) and any("down_proj" in k for k in changed)


def test_an_interrupted_run_resumes_to_the_same_weights(tmp_path):
    straight = anneal_to(tiny_llama(), TRAIN, HELD, ConvertConfig(**QUICK), tmp_path / "a", progress=None)
    anneal_to(tiny_llama(), TRAIN, HELD, ConvertConfig(**QUICK), tmp_path / "b", progress=None, stop_after=3)
    resumed = anneal_to(tiny_llama(), TRAIN, HELD, ConvertConfig(**QUICK), tmp_path / "b", progress=None)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_curve(tmp_path / "b") if r["kind"] == "train"]
    assert steps == list(range(1, 7))  # the steps after the checkpoint at 2 are replayed, not duplicated


def test_a_run_directory_made_with_other_settings_is_refused(tmp_path):
    anneal_to(tiny_llama(), TRAIN, HELD, ConvertConfig(**QUICK), tmp_path / "run", progress=None, stop_after=2)
    with pytest.raises(ConvertRunMismatch, match=r"\(lr differ\)"):
        anneal_to(tiny_llama(), TRAIN, HELD, ConvertConfig(**{**QUICK, "lr": 1e-3}), tmp_path / "run", progress=None)


@pytest.mark.parametrize("bad, match", [
    ({"target": "swiglu"}, "target must be one of sqs, bilinear"),
    ({"steps": 4, "anneal_steps": 5}, r"anneal_steps \(5\) must be <= steps"),
    ({"lr": 0.0}, "lr must be a finite number > 0"),
    ({"sqs": {"q": 1}}, "unknown sqs parameter"),
    ({"batch": 0}, "batch must be an integer >= 1"),
])
def test_bad_settings_are_one_line_before_anything_runs(bad, match):
    with pytest.raises(ConfigError, match=match):
        ConvertConfig(**bad)


def test_a_model_without_a_gated_mlp_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    with pytest.raises(ConfigError, match="no gated MLP"):
        attach(GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=32)), "sqs")


def test_the_report_collects_finished_runs_and_refuses_unfinished_ones(tmp_path):
    for target in ("sqs", "bilinear"):
        anneal_to(tiny_llama(), TRAIN, HELD, ConvertConfig(target=target, **QUICK), tmp_path / target, progress=None)
    paths = write_report([tmp_path / "sqs", tmp_path / "bilinear"], tmp_path / "out", title="tiny")
    runs = json.loads(paths["curves"].read_text())
    assert [r["target"] for r in runs] == ["sqs", "bilinear"] and paths["plot"].stat().st_size > 1000
    table = paths["table"].read_text()
    final = read_curve(tmp_path / "sqs")[-1]["final"]["held"]
    assert f"{final:.3f}" in table and "| sqs | 6 (4) | 4 x 12 | MLPs | held |" in table
    anneal_to(tiny_llama(), TRAIN, HELD, ConvertConfig(**QUICK), tmp_path / "half", progress=None, stop_after=2)
    with pytest.raises(ReportError, match="has not finished"):
        write_report([tmp_path / "half"], tmp_path / "out2")


def test_the_cli_converts_a_gguf_model_on_a_text_file(tmp_path, capsys):
    pytest.importorskip("gguf")
    from tiny_hf import write_gguf

    from sqs.cli import main

    write_gguf(tiny_llama(), tmp_path / "tiny.gguf")
    text = "\n".join(f"the cat sat, the dog ran! was it so? {'yes' if i % 3 else 'no'}." for i in range(300))
    (tmp_path / "t.txt").write_text(text)
    args = ["convert", "run", str(tmp_path / "tiny.gguf"), "--target", "bilinear", "--run-dir", str(tmp_path / "run"),
            "--steps", "3", "--anneal-steps", "2", "--batch", "2", "--context", "16", "--train-text",
            str(tmp_path / "t.txt"), "--eval-text", str(tmp_path / "t.txt"), "--eval-blocks", "2", "--eval-every", "3"]
    assert main(args) == 0
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert (tmp_path / "run" / "model" / "tokenizer.json").is_file()
    assert "model saved in" in capsys.readouterr().out


# ----------------------------------------------------------------------------- per-layer distillation

DISTILL = dict(steps=2, batch=4, context=12, lr=3e-3, warmup_steps=1, eval_every=2, checkpoint_every=2,
               distill_steps=6, distill_anneal_steps=4, distill_batch=32, distill_blocks=16, distill_lr=1e-2,
               distill_warmup_steps=1, distill_eval_every=2)


def test_the_cache_holds_each_mlps_own_input_and_the_original_output():
    from sqs.integrations.convert import MLPCache

    model = tiny_llama()
    cache = MLPCache.of(model, TRAIN[:5], batch=2)
    assert len(cache.inputs) == 2 and cache.rows == 5 * 12
    layer = model.model.layers[1]
    x = TRAIN[:5]
    seen = []
    h = layer.post_attention_layernorm.register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    with torch.no_grad():
        model(input_ids=x)
    h.remove()
    n = seen[0].reshape(-1, 32)
    torch.testing.assert_close(cache.inputs[1].float(), n, rtol=1e-2, atol=1e-2)  # bfloat16 storage
    with torch.no_grad():
        torch.testing.assert_close(cache.outputs[1].float(), layer.mlp(n), rtol=1e-2, atol=1e-2)


def test_a_distillation_step_fits_each_layer_to_the_original_with_the_fused_target_gate():
    from sqs.integrations.convert import MLPCache, distill_step

    model = tiny_llama()
    cache = MLPCache.of(model, TRAIN[:4])
    mlps = attach(model, "sqs", PARAMS)
    set_t(model, 1.0)
    for m in mlps:
        m.act_fn = _Forbidden()  # at t = 1 only the fused op runs
    rows = torch.arange(10)
    var = cache.variances()
    want = []
    with torch.no_grad():
        for m, x, y, v in zip(mlps, cache.inputs, cache.outputs, var):
            packed, _, _ = _mlp_inputs(m, x[rows].float())
            pred = m.down_proj(glu_packed(packed, "sqs", **PARAMS))
            want.append(float(((pred - y[rows].float()) ** 2).mean() / v))
    before = [m.up_proj.weight.clone() for m in mlps]
    opt = torch.optim.AdamW([p for m in mlps for p in m.parameters()], lr=1e-2)
    got = distill_step(mlps, cache, rows, var, opt)
    assert got == pytest.approx(want, rel=1e-5)
    assert all(not torch.equal(b, m.up_proj.weight) for b, m in zip(before, mlps))


@pytest.mark.parametrize("target", ["sqs", "bilinear"])
def test_distillation_ends_at_the_target_gate_and_the_model_reloads_with_identical_logits(tmp_path, target):
    from transformers import AutoModelForCausalLM

    model = tiny_llama()
    cfg = ConvertConfig(target=target, sqs=PARAMS, **DISTILL)
    out = anneal_to(model, TRAIN, HELD, cfg, tmp_path / "run", progress=None)
    assert not annealed(out) and out.config.hidden_act == ("sqs" if target == "sqs" else "linear")
    recs = read_curve(tmp_path / "run")
    dist = [r for r in recs if r["kind"] == "distill"]
    assert [r["t"] for r in dist] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    evals = [r for r in recs if r["kind"] == "distill_eval"]
    assert [e["step"] for e in evals] == [2, 4, 6] and all(len(e["layer_fvu"]) == 2 for e in evals)
    assert [r["t"] for r in recs if r["kind"] == "train"] == [1.0, 1.0]  # the end-to-end steps: at the target
    ids = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(5))
    sqs_hf.register()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "model").eval()
    assert torch.equal(logits(again, ids), logits(out, ids))


def test_distillation_brings_every_layer_closer_to_the_original_than_the_plain_swap():
    from sqs.integrations.convert import MLPCache, layer_fvu

    train = torch.randint(0, VOCAB, (200, 12), generator=torch.Generator().manual_seed(8))
    held = MLPCache.of(tiny_llama(), HELD["held"])  # other windows than the cached ones
    swap = attach(tiny_llama(), "sqs", PARAMS)
    for m in swap:
        m.t = 1.0
    cfg = ConvertConfig(sqs=PARAMS, **{**DISTILL, "steps": 0, "distill_steps": 60, "distill_anneal_steps": 30,
                                         "distill_eval_every": 60, "distill_blocks": 200, "distill_batch": 64,
                                         "distill_lr": 3e-3})
    model = tiny_llama()
    anneal_to(model, train, HELD, cfg, progress=None, stop_after_distill=60)  # attached, at t = 1, not finalized
    before, after = layer_fvu(swap, held), layer_fvu(annealed(model), held)
    assert all(a < 0.25 * b for a, b in zip(after, before)), (before, after)  # measured: 0.36 -> 0.015 and so on


def test_distillation_only_runs_no_end_to_end_step(tmp_path):
    cfg = ConvertConfig(**{**DISTILL, "steps": 0})
    anneal_to(tiny_llama(), TRAIN, HELD, cfg, tmp_path / "run", progress=None)
    kinds = [r["kind"] for r in read_curve(tmp_path / "run")]
    assert "train" not in kinds and kinds[-1] == "final" and kinds.count("distill") == 6


@pytest.mark.parametrize("stop", [{"stop_after_distill": 3}, {"stop_after": 1}], ids=["in-distillation", "after-it"])
def test_an_interrupted_distillation_run_resumes_to_the_same_weights(tmp_path, stop):
    cfg = ConvertConfig(**DISTILL)
    straight = anneal_to(tiny_llama(), TRAIN, HELD, cfg, tmp_path / "a", progress=None)
    anneal_to(tiny_llama(), TRAIN, HELD, cfg, tmp_path / "b", progress=None, **stop)
    resumed = anneal_to(tiny_llama(), TRAIN, HELD, cfg, tmp_path / "b", progress=None)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    recs = read_curve(tmp_path / "b")
    assert [r["step"] for r in recs if r["kind"] == "distill"] == list(range(1, 7))
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2]


def test_a_run_directory_from_before_distillation_still_resumes(tmp_path):
    anneal_to(tiny_llama(), TRAIN, HELD, ConvertConfig(**QUICK), tmp_path / "run", progress=None, stop_after=2)
    cfg_path = tmp_path / "run" / "config.json"
    old = {k: v for k, v in json.loads(cfg_path.read_text()).items() if not k.startswith("distill_")}
    cfg_path.write_text(json.dumps(old))  # as part A's runs wrote it
    anneal_to(tiny_llama(), TRAIN, HELD, ConvertConfig(**QUICK), tmp_path / "run", progress=None)
    assert read_curve(tmp_path / "run")[-1]["kind"] == "final"


@pytest.mark.parametrize("bad, match", [
    ({"distill_steps": 4, "anneal_steps": 2}, "anneal_steps must be 0"),
    ({"distill_steps": 4, "distill_anneal_steps": 5}, r"distill_anneal_steps \(5\) must be <= distill_steps"),
    ({"steps": 0}, "nothing to train"),
    ({"distill_steps": 4, "distill_lr": 0.0}, "distill_lr must be a finite number > 0"),
])
def test_bad_distillation_settings_are_one_line(bad, match):
    with pytest.raises(ConfigError, match=match):
        ConvertConfig(**bad)
