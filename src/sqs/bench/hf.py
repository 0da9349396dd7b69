"""Training-step time of a small Hugging Face Llama with SwiGLU, unfused SQS and fused SQS.

The three models share their weights and batch and step in turn (interleaved), so the
machine's load drifts hit all of them alike; every number is a ratio to a row measured
in the same run. Needs the `hf` extra (transformers).
"""

from __future__ import annotations

import statistics
import warnings

import torch

from sqs.bench.ops import BenchResult, time_interleaved
from sqs.integrations.transformers import apply_sqs, register

#: variant -> (what it is, in the table)
HF_VARIANTS = {
    "swiglu": "SwiGLU (hidden_act='silu')",
    "sqs-unfused": "SQS as act_fn, the library's forward",
    "sqs-fused": "SQS with apply_sqs (fused op)",
}


def _llama(hidden_act: str, layers: int, d_model: int, intermediate: int, heads: int, vocab: int, seq: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=d_model, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=vocab,
                      max_position_embeddings=seq, hidden_act=hidden_act, pad_token_id=0, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


def _train_step(model: torch.nn.Module, batch: torch.Tensor, opt: torch.optim.Optimizer):
    def run():
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def bench_hf(batch: int = 8, seq: int = 256, layers: int = 4, d_model: int = 256, intermediate: int = 688,
             heads: int = 4, vocab: int = 2048, reps: int = 10, warmup: int = 3) -> list[BenchResult]:
    """Median seconds per training step (forward, backward, AdamW) of each variant in `HF_VARIANTS`.

    `warmup` steps per variant come first: the fused op compiles its kernels on first use
    (about 15 s, then cached on disk), which must not land in the timed steps.
    """
    register()
    torch.manual_seed(0)
    base = _llama("silu", layers, d_model, intermediate, heads, vocab, seq)
    models = {"swiglu": base}
    for name in ("sqs-unfused", "sqs-fused"):
        m = _llama("sqs", layers, d_model, intermediate, heads, vocab, seq)
        m.load_state_dict(base.state_dict())
        models[name] = apply_sqs(m, fused=name == "sqs-fused")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(3, vocab, (batch, seq), generator=gen)
    fns = {}
    for name, m in models.items():
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1)
        fns[name] = _train_step(m, x, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # transformers' notes about tiny configs
        times = time_interleaved(fns, reps=reps, warmup=warmup)
    return [BenchResult(n, statistics.median(times[n]), None) for n in models]


def format_hf_table(results: list[BenchResult], batch: int, seq: int, layers: int = 4, d_model: int = 256,
                    intermediate: int = 688, vocab: int = 2048) -> str:
    """Step time, tokens/s and tokens/s as ratios to SwiGLU and to unfused SQS."""
    by = {r.name: r for r in results}
    tokens = batch * seq
    lines = [f"Llama-shaped LlamaForCausalLM training step (forward + backward + AdamW): {layers} layers, "
             f"d {d_model}, intermediate {intermediate}, vocab {vocab:,}, batch {batch} x {seq} tokens, float32, "
             f"{torch.get_num_threads()} threads, variants interleaved step by step, median step time",
             "", "| variant | step (ms) | tokens/s | tokens/s / SwiGLU | tokens/s / SQS unfused |",
             "|---|---|---|---|---|"]
    for r in results:
        vs = [f"{by[b].median_s / r.median_s:.3f}" if b in by else "n/a" for b in ("swiglu", "sqs-unfused")]
        lines.append(f"| {r.name}: {HF_VARIANTS.get(r.name, r.name)} | {r.median_s * 1e3:.1f} | "
                     f"{tokens / r.median_s:,.0f} | {vs[0]} | {vs[1]} |")
    return "\n".join(lines)
