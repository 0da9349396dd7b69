"""How every benchmark times and measures: interleaved repetitions, medians, peak memory, ratio tables.

Variants run round-robin, one call each per round, so the machine's load drifts hit all of
them alike; every number a table prints is a ratio to a baseline measured in the same run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    """CUDA runs asynchronously: a timer must wait for the kernels it times."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class BenchResult:
    name: str
    median_s: float
    peak_bytes: int | None


def peak_bytes(fn: Callable[[], None], device: torch.device | None = None) -> int | None:
    """Peak bytes allocated above the starting level while `fn` runs.

    On CUDA the caching allocator keeps the peak itself. CPU tensors have no
    `max_memory_allocated`; the profiler's allocation events carry the allocator's
    running total, whose maximum is the peak.
    """
    if device is not None and device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        sync(device)
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
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[k].append(time.perf_counter() - t0)
    return times


def ratio_table(results: list[BenchResult], base_name: str, what: str) -> str:
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
