"""Forward+backward time and peak memory of the gate op and of a 1-layer GLU."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from sqs.functional import glu_packed, sqs_reference
from sqs.ops import sqs_glu
from sqs.ops.linear_cross_entropy import linear_cross_entropy

# name -> y = f(w, v); "swiglu" is the baseline every ratio refers to.
OP_VARIANTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "swiglu": lambda w, v: w * F.silu(v),
    "relu": lambda w, v: w * F.relu(v),
    "gelu": lambda w, v: w * F.gelu(v),
    "bilinear": lambda w, v: w * v,
    "sqs-naive": lambda w, v: w * sqs_reference(v),  # the unfused formula, autograd through every op
    "sqs-fused": lambda w, v: sqs_glu(w, v),
}


def _liger_swiglu() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None:
    """Liger-Kernel's fused SwiGLU (silu(a) * b in one Triton kernel), the GPU baseline, when installed."""
    try:
        from liger_kernel.ops.swiglu import LigerSiLUMulFunction
    except Exception:  # not installed, or no Triton/CUDA: the variant is simply left out
        return None
    return lambda w, v: LigerSiLUMulFunction.apply(v, w)


def op_variants(device: torch.device) -> dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]]:
    """OP_VARIANTS, plus Liger's SwiGLU as a second baseline on CUDA when `liger-kernel` imports."""
    out = dict(OP_VARIANTS)
    liger = _liger_swiglu() if device.type == "cuda" else None
    if liger is not None:
        out["swiglu-liger"] = liger
    return out


def _sync(device: torch.device) -> None:
    """CUDA runs asynchronously: a timer must wait for the kernels it times."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class BenchResult:
    name: str
    median_s: float
    peak_bytes: int | None


def _peak_bytes(fn: Callable[[], None], device: torch.device | None = None) -> int | None:
    """Peak bytes allocated above the starting level while `fn` runs.

    On CUDA the caching allocator keeps the peak itself. CPU tensors have no
    `max_memory_allocated`; the profiler's allocation events carry the allocator's
    running total, whose maximum is the peak.
    """
    if device is not None and device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - start
    try:
        from torch._C._profiler import _ExtraFields_Allocation
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            fn()
        allocs = []
        stack = list(prof.profiler.kineto_results.experimental_event_tree())
        while stack:
            node = stack.pop()
            if isinstance(node.extra_fields, _ExtraFields_Allocation):
                allocs.append((node.start_time_ns, node.extra_fields.alloc_size, node.extra_fields.total_allocated))
            stack.extend(node.children)
    except Exception:  # profiler internals differ across versions: report n/a, never a wrong number
        return None
    if not allocs:
        return 0
    allocs.sort()
    base = allocs[0][2] - allocs[0][1]
    return max(total for _, _, total in allocs) - base


def time_interleaved(fns: dict[str, Callable[[], None]], reps: int = 10, warmup: int = 2,
                     device: torch.device | None = None) -> dict[str, list[float]]:
    """Run every function `warmup` times, then `reps` rounds of one call each, in turn
    (on CUDA each call is timed from a synchronised start to a synchronised end)."""
    device = device or torch.device("cpu")
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def _fwd_bwd(op, w, v, g) -> Callable[[], None]:
    def run():
        wr, vr = w.detach().requires_grad_(), v.detach().requires_grad_()
        op(wr, vr).backward(g)
    return run


def bench_ops(numel: int = 8 * 2**20, reps: int = 10, dtype: torch.dtype = torch.float32,
              variants: list[str] | None = None, device: str | torch.device = "cpu") -> list[BenchResult]:
    device = torch.device(device)
    table = op_variants(device)
    names = variants or list(table)
    cols = 1024
    rows = max(1, numel // cols)
    gen = torch.Generator().manual_seed(0)
    w, v, g = (torch.randn(rows, cols, generator=gen, dtype=dtype).to(device) for _ in range(3))
    fns = {n: _fwd_bwd(table[n], w, v, g) for n in names}
    times = time_interleaved(fns, reps=reps, device=device)
    return [BenchResult(n, statistics.median(times[n]), _peak_bytes(fns[n], device)) for n in names]


def _glu_step(gate: str, fused: bool, x: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor) -> Callable[[], None]:
    """The layer as `sqs.nn.GLU` computes it; `fused=False` is the unfused (naive) SQS formula for contrast."""
    def run():
        a, b = w_in.detach().requires_grad_(), w_out.detach().requires_grad_()
        h = x @ a.T
        if fused:
            z = glu_packed(h, gate)
        else:
            w, v = h.chunk(2, -1)
            z = w * sqs_reference(v)
        (z @ b.T).sum().backward()
    return run


GLU_VARIANTS = {  # name -> (gate, fused)
    "swiglu": ("swiglu", True), "relu": ("relu", True), "gelu": ("gelu", True),
    "bilinear": ("bilinear", True), "sqs-naive": ("sqs", False), "sqs-fused": ("sqs", True),
}


def bench_glu(batch: int, width: int, reps: int = 10, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> list[BenchResult]:
    """1-layer GLU, matmuls included: x (batch, width) -> [W;V] (2w) -> gate -> P (width)."""
    device = torch.device(device)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=gen, dtype=dtype).to(device)
    w_in = (torch.randn(2 * width, width, generator=gen, dtype=dtype) / width**0.5).to(device)
    w_out = (torch.randn(width, width, generator=gen, dtype=dtype) / width**0.5).to(device)
    fns = {n: _glu_step(g, f, x, w_in, w_out) for n, (g, f) in GLU_VARIANTS.items()}
    times = time_interleaved(fns, reps=reps, device=device)
    return [BenchResult(n, statistics.median(times[n]), None) for n in GLU_VARIANTS]


def format_ops_table(results: list[BenchResult], numel: int, dtype: torch.dtype, device: str = "cpu") -> str:
    on = "" if torch.device(device).type == "cpu" else f", on {torch.cuda.get_device_name(device)}"
    return _ratio_table(results, "swiglu", f"gate op forward+backward, {numel:,} elements, "
                        f"{str(dtype).replace('torch.', '')}{on}")


def _ratio_table(results: list[BenchResult], base_name: str, what: str) -> str:
    """Time and peak memory of each variant, and both as ratios to `base_name`'s."""
    base = next(r for r in results if r.name == base_name)
    lines = [f"{what}, {torch.get_num_threads()} threads, median of the interleaved repetitions",
             "", f"| variant | time (ms) | time / {base_name} | peak mem (MiB) | mem / {base_name} |",
             "|---|---|---|---|---|"]
    for r in results:
        mem = f"{r.peak_bytes / 2**20:.1f}" if r.peak_bytes is not None else "n/a"
        mr = f"{r.peak_bytes / base.peak_bytes:.2f}" if r.peak_bytes and base.peak_bytes else "n/a"
        lines.append(f"| {r.name} | {r.median_s * 1e3:.2f} | {r.median_s / base.median_s:.2f} | {mem} | {mr} |")
    return "\n".join(lines)


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
    return [BenchResult(n, statistics.median(times[n]), _peak_bytes(fns[n])) for n in fns]


def format_head_table(results: list[BenchResult], tokens: int, d_model: int, vocab: int) -> str:
    return _ratio_table(results, "plain", f"output layer + cross-entropy forward+backward, {tokens:,} tokens x "
                        f"d {d_model} -> vocab {vocab:,}, float32")


def format_glu_table(grid: dict[tuple[int, int], list[BenchResult]]) -> str:
    names = list(GLU_VARIANTS)
    lines = ["1-layer GLU forward+backward (matmuls included): time in ms, (ratio to swiglu)", "",
             "| batch | width | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for (b, w), res in grid.items():
        base = next(r for r in res if r.name == "swiglu").median_s
        cells = [f"{r.median_s * 1e3:.2f} ({r.median_s / base:.2f})" for r in res]
        lines.append(f"| {b} | {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _lm_step(model: torch.nn.Module, batch: torch.Tensor, opt: torch.optim.Optimizer) -> Callable[[], None]:
    def run():
        loss = model(batch[:, :-1], targets=batch[:, 1:])  # as LMTask.loss computes it
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return run


def bench_lm(gates: list[str], batch_size: int = 32, reps: int = 10, **model_kwargs) -> list[BenchResult]:
    """One optimizer step of the TinyStories model (forward, backward, AdamW) per gate, interleaved.

    The training runs' own tokens/s come from runs made one after another, so a change in the
    machine's load between runs shows up as a gap between gates; here every gate steps in turn on
    the same batch, so load drifts hit all of them alike.
    """
    from sqs.models.gpt import GPT, GPTConfig

    fns = {}
    for gate in gates:
        torch.manual_seed(0)
        model = GPT(GPTConfig(gate=gate, **model_kwargs))
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
        gen = torch.Generator().manual_seed(0)
        batch = torch.randint(0, model.cfg.vocab_size, (batch_size, model.cfg.context + 1), generator=gen)
        fns[gate] = _lm_step(model, batch, opt)
    times = time_interleaved(fns, reps=reps, warmup=3)
    return [BenchResult(g, statistics.median(times[g]), None) for g in gates]


def format_lm_table(throughput: dict) -> str:
    """The table of `sqs.experiments.lm.measure_throughput`'s result."""
    lines = [f"TinyStories model training step (forward + backward + AdamW), {throughput['tokens_per_step']:,} tokens "
             f"per step, {throughput['threads']} threads, gates interleaved step by step, median step time",
             "", "| gate | step (ms) | tokens/s | tokens/s / SwiGLU |", "|---|---|---|---|"]
    for name, g in throughput["gates"].items():
        ratio = "—" if g["vs_swiglu"] is None else f"{g['vs_swiglu']:.3f}"
        lines.append(f"| {name} | {g['step_s'] * 1e3:.1f} | {g['tokens_per_s']:,.0f} | {ratio} |")
    return "\n".join(lines)
