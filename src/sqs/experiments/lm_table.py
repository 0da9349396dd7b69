"""The TinyStories experiment (Sec. 4.2.2): every gate under one budget, timed side by side, reported.

    run_experiment("tinystories-cpu", out="results/lm", runs_dir="runs")
    # runs at runs/tinystories-cpu/tinystories/<gate>-s<seed> (each config's `run_dir`)

`overrides` apply to every run; gate parameters (`model.gate_kwargs.lam=0.1`) reach the SQS
runs only, which are then filed under their tag (`sqs-lam0.1-s0`).
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import torch

from sqs.bench.lm import bench_lm
from sqs.core import GATES, canonical_gate
from sqs.experiments.lm_table_report import write_report
from sqs.experiments.style import say
from sqs.io import write_json
from sqs.runs.config_files import grid_gate_overrides
from sqs.runs.lm_config import LMRunConfig, load_config
from sqs.runs.lm_pipeline import run_lm
from sqs.runs.naming import check_no_legacy
from sqs.training.distributed import is_rank0
from sqs.training.rundir import HISTORY, is_complete, last_divergence
from sqs.training.trainer import TrainingDiverged


def experiment_runs(gates, extra_seeds, seed: int = 0) -> list[tuple[str, int]]:
    """(gate, seed) of every run: each gate at `seed`, and SQS and SwiGLU (if trained) at the extra seeds."""
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


def run_configs(config: str | os.PathLike, overrides: list[str] | None, todo: list[tuple[str, int]]) -> list[LMRunConfig]:
    """The run config of each (gate, seed): `config` with `overrides`, gate parameters for SQS only."""
    return [load_config(config, list(overrides or []) + grid_gate_overrides(gate), gate=gate, seed=seed)
            for gate, seed in todo]


def run_experiment(config: str | os.PathLike = "tinystories-cpu", out: str | os.PathLike = "results/lm",
                   runs_dir: str | os.PathLike = "runs", gates=GATES, extra_seeds=(1,),
                   overrides: list[str] | None = None, report_only: bool = False,
                   cache_dir: str | os.PathLike | None = None, device: str | None = "auto",
                   progress: bool = True, samples: bool = True, max_new_tokens: int = 160,
                   throughput_reps: int = 30) -> dict:
    """Train every (gate, seed) that is not finished yet, then write the report.

    Finished runs are skipped, interrupted ones resume, diverged ones (a `diverged` event in their
    history.jsonl that no later start dealt with) are reported, not retried. After training, every
    gate's training step is also timed side by side (`measure_throughput`), because the runs'
    own tokens/s come from different times and so carry the machine's load drift.
    """
    base = load_config(config, overrides)
    todo = experiment_runs(gates, extra_seeds, base.seed)
    cfgs = run_configs(config, overrides, todo)
    rank0 = is_rank0()
    if not report_only:
        for i, cfg in enumerate(cfgs):
            rd = cfg.run_dir(runs_dir)
            if is_complete(rd, verify=True):
                if rank0:
                    say(f"[{i + 1}/{len(cfgs)}] {rd}: finished, skipped")
                continue
            if last_divergence(rd) is not None:
                if rank0:
                    say(f"[{i + 1}/{len(cfgs)}] {rd}: diverged earlier (see {HISTORY}), skipped")
                continue
            check_no_legacy(rd, cfg.legacy_dirs(runs_dir))
            if rank0:
                say(f"[{i + 1}/{len(cfgs)}] training {rd}")
            try:
                run_lm(cfg, rd, cache_dir=cache_dir, device=device, progress=progress)
            except TrainingDiverged as e:  # recorded in the run's history.jsonl by the trainer
                if rank0:
                    say(f"  {e}")
    if not rank0:
        return {}
    if not report_only and throughput_reps > 0:
        measure_throughput(base, list(dict.fromkeys(g for g, _ in todo)), reps=throughput_reps,
                           path=Path(out) / "throughput.json")
    return write_report({cfg.run_dir(runs_dir): cfg for cfg in cfgs}, out, base, samples=samples,
                        max_new_tokens=max_new_tokens, cache_dir=cache_dir)


def measure_throughput(cfg: LMRunConfig, gates: list[str], reps: int = 12, batch: int | None = None,
                       path: str | os.PathLike | None = None) -> dict:
    """Training-step tokens/s of every gate at `cfg`'s model size, interleaved step by step
    (sqs.bench.lm.bench_lm); `batch` defaults to the config's micro-batch. Saved as JSON if `path`."""
    micro = batch or cfg.micro_batch
    kw = cfg.model_kwargs(cfg.vocab_size)
    kw.pop("gate")
    gate_kwargs = {cfg.gate: kw.pop("gate_kwargs")}  # the config's gate parameters go to its gate only
    say(f"timing one training step per gate, interleaved ({reps} rounds, {micro} sequences)")
    res = bench_lm([canonical_gate(g) for g in gates], batch_size=micro, reps=reps, gate_kwargs=gate_kwargs, **kw)
    tps = micro * cfg.context
    ref = next((r.median_s for r in res if r.name == "swiglu"), None)
    out = {"measured": f"{datetime.datetime.now():%Y-%m-%d %H:%M}", "threads": torch.get_num_threads(),
           "reps": reps, "sequences_per_step": micro, "tokens_per_step": tps,
           "gates": {r.name: {"step_s": r.median_s, "tokens_per_s": tps / r.median_s,
                              "vs_swiglu": (ref / r.median_s) if ref else None} for r in res}}
    if path is not None:
        write_json(path, out)
    return out
