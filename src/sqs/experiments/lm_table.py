"""The TinyStories experiment (Sec. 4.2.2): every gate under one budget, timed side by side, reported.

    run_experiment("tinystories-cpu", out="results/lm", runs_dir="runs")
    # runs at runs/tinystories-cpu/tinystories/<gate>-s<seed> (each config's `run_dir`)

`overrides` apply to every run; gate parameters (`model.gate_kwargs.lam=0.1`) reach the SQS
runs only, which are then filed under their tag (`sqs-lam0.1-s0`).
"""

from __future__ import annotations

import datetime
import functools
import os
from pathlib import Path
from typing import Iterable

import torch

from sqs.bench.lm import bench_lm
from sqs.core import GATES, canonical_gate
from sqs.experiments.lm_table_report import write_report
from sqs.experiments.style import say
from sqs.io import ConfigError, write_json
from sqs.runs.config_files import grid_gate_overrides
from sqs.runs.lm_config import LMRunConfig, load_config
from sqs.runs.lm_pipeline import run_lm, train_lm_spec
from sqs.runs.pool import RunSpec, launch
from sqs.runs.naming import check_no_legacy
from sqs.training.distributed import is_rank0, rank_world
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
                   throughput_reps: int = 30, launcher: str | None = None, launcher_options: dict | None = None,
                   loggers: Iterable[str] = ()) -> dict:
    """Train every (gate, seed) that is not finished yet, then write the report.

    Finished runs are skipped, interrupted ones resume, diverged ones (a `diverged` event in their
    history.jsonl that no later start dealt with) are reported, not retried. After training, every
    gate's training step is also timed side by side (`measure_throughput`), because the runs'
    own tokens/s come from different times and so carry the machine's load drift.

    The runs train one after another in this process (or in every rank under torchrun), unless
    `launcher` names a launcher of the pool (`sqs.runs.pool.LAUNCHERS`, e.g. "ray" with
    `launcher_options`), which then runs them as tasks (`--gpus-per-run 1` for a GPU each).
    `loggers`: where the curves also go besides metrics.jsonl (tensorboard, wandb).
    """
    base = load_config(config, overrides)
    todo = experiment_runs(gates, extra_seeds, base.seed)
    cfgs = run_configs(config, overrides, todo)
    rank0 = is_rank0()
    if launcher is not None and max(rank_world()[1], int(os.environ.get("WORLD_SIZE", "1") or 1)) > 1:
        raise ConfigError(f"--launcher {launcher} starts its own processes: run it without torchrun")
    queued = []
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
            if launcher is not None:
                queued.append(cfg)
                continue
            if rank0:
                say(f"[{i + 1}/{len(cfgs)}] training {rd}")
            try:
                run_lm(cfg, rd, cache_dir=cache_dir, device=device, progress=progress, loggers=loggers)
            except TrainingDiverged as e:  # recorded in the run's history.jsonl by the trainer
                if rank0:
                    say(f"  {e}")
    if queued:
        _launch(queued, runs_dir, cache_dir, device, progress, launcher, launcher_options, loggers)
    if not rank0:
        return {}
    if not report_only and throughput_reps > 0:
        measure_throughput(base, list(dict.fromkeys(g for g, _ in todo)), reps=throughput_reps,
                           path=Path(out) / "throughput.json")
    return write_report({cfg.run_dir(runs_dir): cfg for cfg in cfgs}, out, base, samples=samples,
                        max_new_tokens=max_new_tokens, cache_dir=cache_dir)


def _launch(cfgs: list[LMRunConfig], runs_dir, cache_dir, device, progress: bool, launcher: str,
            launcher_options: dict | None, loggers: Iterable[str]) -> dict:
    """Train `cfgs` through the pool's `launcher`; the data cache is prepared once here first."""
    from sqs.data import tinystories

    def prepare(todo) -> None:
        for vocab in sorted({s.cfg.vocab_size for s in todo}):
            tinystories.prepare(cache_dir=cache_dir, vocab_size=vocab, progress=progress)

    say(f"{len(cfgs)} run(s) to train with the {launcher} launcher")
    run_one = functools.partial(train_lm_spec, cache_dir=cache_dir, device=device, loggers=tuple(loggers))
    summary = launch([RunSpec.of(c, runs_dir) for c in cfgs], run_one, progress=progress, desc="tinystories runs",
                     prepare=prepare, launcher=launcher, launcher_options=launcher_options)
    for f in summary["failed"]:
        last = [line for line in str(f["error"]).strip().splitlines() if line.strip()][-1:]
        say(f"  {f['run']} failed: {last[0] if last else '?'} (re-run the command to retry)")
    return summary


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
