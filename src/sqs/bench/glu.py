"""Forward+backward time and peak memory of the gate op alone (`sqs bench ops`) and of a 1-layer GLU
with its matmuls, the paper's App. C grid (`sqs bench glu`)."""

from __future__ import annotations

import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from sqs.bench.timing import BenchResult, peak_bytes, ratio_table, time_interleaved
from sqs.core import sqs_reference
from sqs.functional import glu_packed
from sqs.ops import sqs_glu

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
    return [BenchResult(n, statistics.median(times[n]), peak_bytes(fns[n], device)) for n in names]


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
    return ratio_table(results, "swiglu", f"gate op forward+backward, {numel:,} elements, "
                        f"{str(dtype).replace('torch.', '')}{on}")


def format_glu_table(grid: dict[tuple[int, int], list[BenchResult]]) -> str:
    names = list(GLU_VARIANTS)
    lines = ["1-layer GLU forward+backward (matmuls included): time in ms, (ratio to swiglu)", "",
             "| batch | width | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for (b, w), res in grid.items():
        base = next(r for r in res if r.name == "swiglu").median_s
        cells = [f"{r.median_s * 1e3:.2f} ({r.median_s / base:.2f})" for r in res]
        lines.append(f"| {b} | {w} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
