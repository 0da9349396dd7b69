"""Training-step time and peak memory of a Hugging Face Llama: SwiGLU, SQS unfused, SQS fused, SQS fused + fused loss.

The four models share their weights and batch and step in turn (interleaved), so the
machine's load drifts hit all of them alike; every number is a ratio to a row measured
in the same run. Two shapes: ``small`` (the round-one benchmark: 4 layers, d 256, vocab
2,048) and ``smollm2`` (SmolLM2-135M's shape: d 576, intermediate 1,536, 9 heads / 3 kv heads,
vocab 49,152, tied embeddings, 30 layers unless overridden; random weights).

Peak memory: one more step per model runs under the PyTorch profiler with memory recording,
whose allocation events carry the running total of what the CPU allocator handed out while profiling
(`sqs.bench.timing.peak_bytes`; each step frees only what it allocated, see `_train_step`).
Why that and not the process's resident size: the four models live in one process, glibc
keeps freed blocks for reuse (so a process's peak RSS mixes variants and allocator caching),
and a fresh process per variant would also count compiled kernels and import overheads. The
allocator total counts tensor bytes only, exactly, per step. Reported: the bytes a model holds
between steps (weights and AdamW state; shared storages once) plus the step's peak above that
level (activations, logits, gradients, temporaries). Needs the `hf` extra (transformers).
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from sqs.bench.timing import BenchResult, peak_bytes
from sqs.integrations.transformers import AutoSQSForCausalLM

#: variant -> what it is, in the table
HF_VARIANTS = {
    "swiglu": "SwiGLU (hidden_act='silu'), the library's loss",
    "sqs-unfused": "SQS as act_fn (the library's forward and loss)",
    "sqs-fused": "SQS with apply_sqs (fused op), the library's loss",
    "sqs-fused-loss": "SQS with apply_sqs(fused_linear_cross_entropy=True)",
}

#: shape name -> model and batch sizes
HF_SHAPES: dict[str, dict[str, int | bool]] = {
    "small": dict(layers=4, d_model=256, intermediate=688, heads=4, kv_heads=4, vocab=2048, batch=8, seq=256,
                  tied=False),
    "smollm2": dict(layers=30, d_model=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152, batch=8, seq=512,
                    tied=True),
}


@dataclass
class HFBenchResult(BenchResult):
    """A `BenchResult` (median wall time, step peak above resident) with CPU time and resident bytes.

    Why CPU time too: on a shared machine other jobs take the cores for seconds at a time,
    which stretches wall time at random; CPU time counts only while this process runs.
    """

    cpu_s: float = float("nan")
    tokens: int = 0
    resident_bytes: int = 0

    @property
    def total_bytes(self) -> int | None:
        return None if self.peak_bytes is None else self.resident_bytes + self.peak_bytes


def time_interleaved_wall_cpu(fns: dict[str, Callable[[], None]], reps: int, warmup: int
                              ) -> dict[str, tuple[list[float], list[float]]]:
    """`sqs.bench.timing.time_interleaved`, recording (wall, process CPU) seconds per call."""
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


def shape_sizes(shape: str, **overrides: int | None) -> dict[str, int | bool]:
    """The named shape with any given (non-None) sizes replacing its own, validated."""
    if shape not in HF_SHAPES:
        raise ValueError(f"bench_hf: unknown shape {shape!r}; choose from {', '.join(HF_SHAPES)}")
    sizes = {**HF_SHAPES[shape], **{k: v for k, v in overrides.items() if v is not None}}
    unknown = sorted(set(sizes) - set(HF_SHAPES[shape]))
    if unknown:
        raise ValueError(f"bench_hf: unknown size(s) {unknown}; valid: {', '.join(HF_SHAPES[shape])}")
    for name, val in sizes.items():
        if name != "tied" and (not isinstance(val, int) or val <= 0):
            raise ValueError(f"bench_hf: `{name}` must be a positive int, got {val!r}")
    if sizes["d_model"] % sizes["heads"] or sizes["heads"] % sizes["kv_heads"]:
        raise ValueError(f"bench_hf: d_model ({sizes['d_model']}) must be a multiple of heads ({sizes['heads']}), "
                         f"and heads of kv_heads ({sizes['kv_heads']})")
    return sizes


def _llama_config(hidden_act: str, s: dict):
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=s["d_model"], intermediate_size=s["intermediate"], num_hidden_layers=s["layers"],
                       num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"], vocab_size=s["vocab"],
                       max_position_embeddings=s["seq"], hidden_act=hidden_act, pad_token_id=0, bos_token_id=1,
                       eos_token_id=2, tie_word_embeddings=s["tied"])


def _models(s: dict) -> dict[str, torch.nn.Module]:
    """The four variants with the SwiGLU model's weights."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    base = LlamaForCausalLM(_llama_config("silu", s))
    models = {"swiglu": base}
    for name in ("sqs-unfused", "sqs-fused", "sqs-fused-loss"):
        m = AutoSQSForCausalLM.from_config(_llama_config("sqs", s), fused=name != "sqs-unfused",
                                           fused_linear_cross_entropy=name == "sqs-fused-loss")
        m.load_state_dict(base.state_dict())
        models[name] = m
    return models


def _train_step(model: torch.nn.Module, batch: torch.Tensor, opt: torch.optim.Optimizer) -> Callable[[], None]:
    """One step in the Trainer's order: the gradients are freed at its end, so none is alive during the next
    forward (and every byte the step frees, it allocated itself: the profiler counts exactly those)."""
    def run():
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return run


def _resident_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    """Bytes a model holds between steps: weights and optimizer state (gradients, when any are alive), each
    storage once (tied weights share one)."""
    seen: dict[int, int] = {}
    tensors = [p for p in model.parameters()] + [p.grad for p in model.parameters() if p.grad is not None]
    tensors += [t for st in opt.state.values() for t in st.values() if isinstance(t, torch.Tensor)]
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def bench_hf(shape: str = "small", reps: int = 5, warmup: int = 1, memory: bool = True,
             variants: list[str] | None = None, **overrides: int | None) -> list[HFBenchResult]:
    """Seconds per training step (forward, backward, AdamW) and peak memory of each variant in `HF_VARIANTS`.

    `overrides` replace the shape's sizes (layers, d_model, intermediate, heads, kv_heads, vocab,
    batch, seq). `warmup` steps per variant come first: the fused op compiles its kernels on first
    use (about 15 s, then cached on disk), which must not land in the timed steps.
    """
    s = shape_sizes(shape, **overrides)
    if not isinstance(reps, int) or reps <= 0 or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"bench_hf: reps must be a positive int and warmup a non-negative int, got {reps}, {warmup}")
    names = variants or list(HF_VARIANTS)
    unknown = sorted(set(names) - set(HF_VARIANTS))
    if unknown:
        raise ValueError(f"bench_hf: unknown variant(s) {unknown}; valid: {', '.join(HF_VARIANTS)}")
    models = {k: m for k, m in _models(s).items() if k in names}
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(3, s["vocab"], (s["batch"], s["seq"]), generator=gen)
    fns, opts = {}, {}
    for name, m in models.items():
        m.train()
        # fused=True: the Trainer's default optimizer ("adamw_torch_fused") on torch >= 2.8
        opts[name] = torch.optim.AdamW(m.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
        fns[name] = _train_step(m, x, opts[name])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # transformers' notes about tiny configs
        times = time_interleaved_wall_cpu(fns, reps=reps, warmup=warmup)
        peaks = {n: peak_bytes(fns[n]) if memory else None for n in models}
    tokens = s["batch"] * s["seq"]
    return [HFBenchResult(n, statistics.median(times[n][0]), peaks[n], statistics.median(times[n][1]), tokens,
                          _resident_bytes(models[n], opts[n])) for n in models]


def _ratio(results: dict[str, HFBenchResult], r: HFBenchResult, base: str, get: Callable) -> str:
    b = results.get(base)
    if b is None or get(b) in (None, 0) or get(r) is None:
        return "n/a"
    return f"{get(r) / get(b):.2f}"


def format_hf_table(results: list[HFBenchResult], shape: str = "small", **overrides: int | None) -> str:
    """Step time, tokens/s and peak memory per variant, with ratios to SwiGLU and to the unfused SQS model."""
    s = shape_sizes(shape, **overrides)
    by = {r.name: r for r in results}
    mib = 2**20

    def speed(attr: str):
        return lambda r: 1.0 / getattr(r, attr)  # throughput: above 1 is faster

    def mem(r: HFBenchResult):
        return r.total_bytes

    lines = [f"Hugging Face LlamaForCausalLM training step (forward + backward + fused AdamW), shape `{shape}`: "
             f"{s['layers']} layers, d {s['d_model']}, intermediate {s['intermediate']}, {s['heads']} heads / "
             f"{s['kv_heads']} kv heads, vocab {s['vocab']:,}{', tied embeddings' if s['tied'] else ''}, "
             f"{s['batch']}x{s['seq']} = {results[0].tokens:,} tokens per step, float32, {torch.get_num_threads()} "
             "threads, variants interleaved step by step, medians", "",
             "| variant | step (ms) | tokens/s | speed / SwiGLU | speed / SQS unfused | CPU per step (ms) | "
             "CPU speed / SwiGLU | peak memory (MiB) | memory / SwiGLU | memory / SQS fused | resident + step (MiB) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        total = "n/a" if r.total_bytes is None else f"{r.total_bytes / mib:,.0f}"
        parts = "n/a" if r.peak_bytes is None else f"{r.resident_bytes / mib:,.0f} + {r.peak_bytes / mib:,.0f}"
        lines.append(
            f"| {r.name}: {HF_VARIANTS.get(r.name, r.name)} | {r.median_s * 1e3:,.1f} | {r.tokens / r.median_s:,.0f} | "
            f"{_ratio(by, r, 'swiglu', speed('median_s'))} | {_ratio(by, r, 'sqs-unfused', speed('median_s'))} | "
            f"{r.cpu_s * 1e3:,.1f} | {_ratio(by, r, 'swiglu', speed('cpu_s'))} | {total} | "
            f"{_ratio(by, r, 'swiglu', mem)} | {_ratio(by, r, 'sqs-fused', mem)} | {parts} |")
    lines += ["", "Speed ratios are throughput over the baseline's (above 1: faster); CPU time is the process's, all "
              "threads together (on a shared machine the steadier of the two). Peak memory: tensor bytes from the "
              "CPU allocator: the model's weights and AdamW state plus the training step's peak above them "
              "(activations, logits, gradients; one profiled step after the timed ones)."]
    return "\n".join(lines)
