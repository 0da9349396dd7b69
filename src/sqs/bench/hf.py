"""Training-step time of a small Hugging Face Llama with SwiGLU, unfused SQS and fused SQS.

The three models share their weights and batch and step in turn (interleaved), so the
machine's load drifts hit all of them alike; every number is a ratio to a row measured
in the same run. Needs the `hf` extra (transformers).
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from sqs.bench.timing import BenchResult
from sqs.integrations.transformers import apply_sqs, register

#: variant -> (what it is, in the table)
HF_VARIANTS = {
    "swiglu": "SwiGLU (hidden_act='silu')",
    "sqs-unfused": "SQS as act_fn, the library's forward",
    "sqs-fused": "SQS with apply_sqs (fused op)",
}


@dataclass
class HFBenchResult(BenchResult):
    """A `BenchResult` (median wall time) with the median CPU time of the process too.

    Why both: on a shared machine other jobs take the cores for seconds at a time, which
    stretches wall time several-fold at random; CPU time counts only while this process
    runs, so its ratios stay close to what an idle machine would show.
    """

    cpu_s: float = float("nan")
    tokens: int = 0


def time_interleaved_wall_cpu(fns: dict[str, Callable[[], None]], reps: int, warmup: int
                              ) -> dict[str, tuple[list[float], list[float]]]:
    """`sqs.bench.ops.time_interleaved`, recording (wall, process CPU) seconds per call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    out: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            out[k][0].append(time.perf_counter() - t0)
            out[k][1].append(time.process_time() - c0)
    return out


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
             heads: int = 4, vocab: int = 2048, reps: int = 10, warmup: int = 3) -> list[HFBenchResult]:
    """Seconds per training step (forward, backward, AdamW) of each variant in `HF_VARIANTS`.

    `warmup` steps per variant come first: the fused op compiles its kernels on first use
    (about 15 s, then cached on disk), which must not land in the timed steps.
    """
    sizes = {"batch": batch, "seq": seq, "layers": layers, "d_model": d_model, "intermediate": intermediate,
             "heads": heads, "vocab": vocab, "reps": reps}
    for name, val in sizes.items():
        if not isinstance(val, int) or val <= 0:
            raise ValueError(f"bench_hf: `{name}` must be a positive int, got {val!r}")
    if d_model % heads:
        raise ValueError(f"bench_hf: d_model ({d_model}) must be a multiple of heads ({heads})")
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
        # fused=True: the Trainer's default optimizer ("adamw_torch_fused") on torch >= 2.8
        opt = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        fns[name] = _train_step(m, x, opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # transformers' notes about tiny configs
        times = time_interleaved_wall_cpu(fns, reps=reps, warmup=warmup)
    return [HFBenchResult(n, statistics.median(times[n][0]), None, statistics.median(times[n][1]), batch * seq)
            for n in models]


def format_hf_table(results: list[HFBenchResult], layers: int = 4, d_model: int = 256, intermediate: int = 688,
                    vocab: int = 2048) -> str:
    """Step time, tokens/s, and tokens/s as ratios to SwiGLU and to unfused SQS, by wall and by CPU time."""
    by = {r.name: r for r in results}
    tokens = results[0].tokens

    def ratio(r: HFBenchResult, base: str, attr: str) -> str:
        return f"{getattr(by[base], attr) / getattr(r, attr):.3f}" if base in by else "n/a"

    lines = [f"Hugging Face LlamaForCausalLM training step (forward + backward + fused AdamW): {layers} layers, "
             f"d {d_model}, intermediate {intermediate}, vocab {vocab:,}, {tokens:,} tokens per step, float32, "
             f"{torch.get_num_threads()} threads, variants interleaved step by step, medians",
             "", "| variant | step (ms) | tokens/s | / SwiGLU | / SQS unfused | CPU per step (ms) | / SwiGLU (CPU) "
             "| / SQS unfused (CPU) |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r.name}: {HF_VARIANTS.get(r.name, r.name)} | {r.median_s * 1e3:.1f} | "
                     f"{tokens / r.median_s:,.0f} | {ratio(r, 'swiglu', 'median_s')} | "
                     f"{ratio(r, 'sqs-unfused', 'median_s')} | {r.cpu_s * 1e3:.1f} | {ratio(r, 'swiglu', 'cpu_s')} | "
                     f"{ratio(r, 'sqs-unfused', 'cpu_s')} |")
    lines += ["", "Ratios are throughput over the baseline's (above 1: faster). CPU time is the process's, all "
              "threads together; on a shared machine it is the steadier of the two."]
    return "\n".join(lines)
