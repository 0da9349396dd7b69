"""apply_sqs(..., fused_linear_cross_entropy=True): a causal LM's training loss from the head's input, chunk by
chunk, without the full logits; the same loss and gradients as transformers' own, and `sqs bench hf`."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from sqs.bench.ops import _peak_bytes  # noqa: E402
from sqs.integrations import transformers as sqs_hf  # noqa: E402
from sqs.integrations.hf_loss import causal_lm_loss  # noqa: E402

TINY = dict(hidden_size=20, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=2, head_dim=10, vocab_size=61, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)
pytestmark = pytest.mark.usefixtures("eager_backend")


@pytest.fixture(autouse=True)
def _unpatched():
    sqs_hf.unregister()
    yield
    sqs_hf.unregister()


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

    plain, fused = _peak_bytes(step(ref)), _peak_bytes(step(model))
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
