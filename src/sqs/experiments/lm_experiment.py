"""The TinyStories experiment (Sec. 4.2.2): every gate under one budget, timed side by side, reported.

    run_experiment("tinystories-cpu", out="results/lm", runs_dir="runs")
    # runs at runs/tinystories-cpu/tinystories/<gate>-s<seed>
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from sqs.experiments.config import check_no_legacy, config_name, run_dir
from sqs.experiments.lm import DATASET, LMRunConfig, dist_rank_world, load_config, run_lm
from sqs.experiments.lm_report import write_report
from sqs.functional import GATES, canonical_gate
from sqs.io import write_json
from sqs.training.trainer import TrainingDiverged, is_complete


def experiment_runs(gates, extra_seeds, seed: int = 0) -> list[tuple[str, int]]:
    runs = [(canonical_gate(g), seed) for g in gates]
    for s in extra_seeds:
        for g in ("sqs", "swiglu"):
            if canonical_gate(g) in [canonical_gate(x) for x in gates]:
                runs.append((canonical_gate(g), int(s)))
    seen, out = set(), []
    for r in runs:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def run_experiment(config: str | os.PathLike = "tinystories-cpu", out: str | os.PathLike = "results/lm",
                   runs_dir: str | os.PathLike = "runs", gates=GATES, extra_seeds=(1,),
                   overrides: list[str] | None = None, report_only: bool = False,
                   cache_dir: str | os.PathLike | None = None, device: str | None = "auto",
                   progress: bool = True, samples: bool = True, max_new_tokens: int = 160,
                   throughput_reps: int = 30) -> dict:
    """Train every (gate, seed) that is not finished yet, then write the report.

    Runs live in `runs_dir/<config name>/tinystories/<gate>-s<seed>`; finished runs are skipped, interrupted
    ones resume, diverged ones (diverged.json) are reported, not retried. After training, every
    gate's training step is also timed side by side (`measure_throughput`), because the runs'
    own tokens/s come from different times and so carry the machine's load drift.
    """
    base = load_config(config, overrides)
    root = Path(runs_dir) / config_name(base.name) / DATASET
    rank, _ = dist_rank_world()
    todo = experiment_runs(gates, extra_seeds, base.seed)
    if not report_only:
        for i, (gate, seed) in enumerate(todo):
            rd = run_dir(runs_dir, base.name, DATASET, gate, seed)
            if is_complete(rd, verify=True):
                if rank == 0:
                    print(f"[{i + 1}/{len(todo)}] {rd}: finished, skipped", file=sys.stderr)
                continue
            if (rd / "diverged.json").exists():
                if rank == 0:
                    print(f"[{i + 1}/{len(todo)}] {rd}: diverged earlier (see diverged.json), skipped",
                          file=sys.stderr)
                continue
            check_no_legacy(runs_dir, base.name, DATASET, gate, seed)
            if rank == 0:
                print(f"[{i + 1}/{len(todo)}] training {rd}", file=sys.stderr)
            try:
                run_lm(base.replace(gate=gate, seed=seed), rd, cache_dir=cache_dir, device=device, progress=progress)
            except TrainingDiverged as e:
                if rank == 0:
                    write_json(rd / "diverged.json", {"message": str(e)})
                    print(f"  {e}", file=sys.stderr)
    if rank != 0:
        return {}
    if not report_only and throughput_reps > 0:
        measure_throughput(base, list(dict.fromkeys(g for g, _ in todo)), reps=throughput_reps,
                           path=Path(out) / "throughput.json")
    return write_report(root, out, todo, base, samples=samples, max_new_tokens=max_new_tokens,
                        cache_dir=cache_dir)


def measure_throughput(cfg: LMRunConfig, gates: list[str], reps: int = 12, batch: int | None = None,
                       path: str | os.PathLike | None = None) -> dict:
    """Training-step tokens/s of every gate at `cfg`'s model size, interleaved step by step
    (sqs.bench.ops.bench_lm); `batch` defaults to the config's micro-batch. Saved as JSON if `path`."""
    import datetime

    from sqs.bench.ops import bench_lm

    micro = batch or cfg.micro_batch
    kw = cfg.model_kwargs(cfg.vocab_size)
    kw.pop("gate")
    print(f"timing one training step per gate, interleaved ({reps} rounds, {micro} sequences)", file=sys.stderr)
    res = bench_lm([canonical_gate(g) for g in gates], batch_size=micro, reps=reps, **kw)
    tps = micro * cfg.context
    ref = next((r.median_s for r in res if r.name == "swiglu"), None)
    out = {"measured": f"{datetime.datetime.now():%Y-%m-%d %H:%M}", "threads": torch.get_num_threads(),
           "reps": reps, "sequences_per_step": micro, "tokens_per_step": tps,
           "gates": {r.name: {"step_s": r.median_s, "tokens_per_s": tps / r.median_s,
                              "vs_swiglu": (ref / r.median_s) if ref else None} for r in res}}
    if path is not None:
        write_json(path, out)
    return out


