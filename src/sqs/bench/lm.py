"""The language model's costs: its output layer's loss, plain vs chunked (`sqs bench head`), and one
training step of the TinyStories model per gate, interleaved (`sqs bench lm`)."""

from __future__ import annotations

import statistics
from typing import Callable, Mapping

import torch
import torch.nn.functional as F

from sqs.bench.timing import BenchResult, peak_bytes, ratio_table, time_interleaved
from sqs.models.gpt import GPT, GPTConfig
from sqs.ops.linear_cross_entropy import linear_cross_entropy

# name -> loss of the output layer h @ w.T and cross-entropy; "plain" is the baseline.
HEAD_VARIANTS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "plain": lambda h, w, t: F.cross_entropy((h @ w.T).float(), t),
    "chunked": lambda h, w, t: linear_cross_entropy(h, w, t),
}


def bench_head(tokens: int = 8192, d_model: int = 128, vocab: int = 4096, reps: int = 10) -> list[BenchResult]:
    """The LM's last step, logits and cross-entropy, forward + backward: plain vs chunked."""
    gen = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, d_model, generator=gen)
    w = torch.randn(vocab, d_model, generator=gen) * 0.02
    t = torch.randint(0, vocab, (tokens,), generator=gen)

    def step(fn):
        def run():
            fn(h.detach().requires_grad_(), w.detach().requires_grad_(), t).backward()
        return run

    fns = {n: step(f) for n, f in HEAD_VARIANTS.items()}
    times = time_interleaved(fns, reps=reps)
    return [BenchResult(n, statistics.median(times[n]), peak_bytes(fns[n])) for n in fns]


def format_head_table(results: list[BenchResult], tokens: int, d_model: int, vocab: int) -> str:
    return ratio_table(results, "plain", f"output layer + cross-entropy forward+backward, {tokens:,} tokens x "
                        f"d {d_model} -> vocab {vocab:,}, float32")


def _lm_step(model: torch.nn.Module, batch: torch.Tensor, opt: torch.optim.Optimizer) -> Callable[[], None]:
    def run():
        loss = model(batch[:, :-1], targets=batch[:, 1:])  # as LMTask.loss computes it
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def bench_lm(gates: list[str], batch_size: int = 32, reps: int = 10, gate_kwargs: Mapping[str, dict] | None = None,
             **model_kwargs) -> list[BenchResult]:
    """One optimizer step of the TinyStories model (forward, backward, AdamW) per gate, interleaved;
    `gate_kwargs` {gate: its parameters} (e.g. {"sqs": {"lam": 0.1}}; the others take none).

    The training runs' own tokens/s come from runs made one after another, so a change in the
    machine's load between runs shows up as a gap between gates; here every gate steps in turn on
    the same batch, so load drifts hit all of them alike.
    """
    fns = {}
    for gate in gates:
        torch.manual_seed(0)
        model = GPT(GPTConfig(gate=gate, gate_kwargs=dict((gate_kwargs or {}).get(gate, {})), **model_kwargs))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(0, model.cfg.vocab_size, (batch_size, model.cfg.context + 1), generator=gen)
        fns[gate] = _lm_step(model, batch, opt)
    times = time_interleaved(fns, reps=reps, warmup=3)
    return [BenchResult(g, statistics.median(times[g]), None) for g in gates]


def format_lm_table(throughput: dict) -> str:
    """The table of `sqs.experiments.lm_table.measure_throughput`'s result."""
    lines = [f"TinyStories model training step (forward + backward + AdamW), {throughput['tokens_per_step']:,} tokens "
             f"per step, {throughput['threads']} threads, gates interleaved step by step, median step time",
             "", "| gate | step (ms) | tokens/s | tokens/s / SwiGLU |", "|---|---|---|---|"]
    for name, g in throughput["gates"].items():
        ratio = "—" if g["vs_swiglu"] is None else f"{g['vs_swiglu']:.3f}"
        lines.append(f"| {name} | {g['step_s'] * 1e3:.1f} | {g['tokens_per_s']:,.0f} | {ratio} |")
    return "\n".join(lines)
