"""The paper's Table 1 and Fig. 3 (Sec. 4.2): the grid of image runs.

    specs = plan_grid("runs")                         # 2 datasets x 5 gates x 5 seeds of sec42
    run_table1(specs, "runs", workers=2, threads=1)   # skips finished runs, resumes the others
    table1_report.write_report("runs", "results/image")   # from the run directories alone

Run directories are each config's `run_dir` (`sqs.runs.naming`), e.g. runs/sec42/mnist/sqs-s0;
`--set model.gate_kwargs.lam=0.1` gives the SQS runs their tagged names (sqs-lam0.1-s0) and
leaves the other gates, which take no parameters, as they are. <runs>/<config>/grid_log.jsonl
gets one line per call that trained something (wall time, parallelism). The runs go through
the pool of `sqs.runs.pool` (`sqs.runs.image_pipeline.run_grid`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

from sqs.core import GATES, canonical_gate
from sqs.experiments.style import DATASET_ORDER
from sqs.experiments.table1_report import GRID_LOG
from sqs.runs.config_files import config_name, grid_gate_overrides
from sqs.runs.image_config import load_config
from sqs.runs.image_pipeline import run_grid
from sqs.runs.pool import RunSpec


def plan_grid(runs_dir: str | Path, datasets: Sequence[str] = DATASET_ORDER, gates: Sequence[str] = GATES,
              seeds: int | Sequence[int] = 5, epochs: float | None = None, config: str = "sec42",
              overrides: Iterable[str] = ()) -> list[RunSpec]:
    """The runs of the grid under `runs_dir/<config>/`, ordered seed-major (an interrupted
    grid has every cell with fewer seeds). A bad setting is refused here (ConfigError), before
    anything is written."""
    seeds = list(range(seeds)) if isinstance(seeds, int) else list(seeds)
    gates = [canonical_gate(g) for g in gates]
    specs = []
    for seed in seeds:
        for ds in datasets:
            for gate in gates:
                ov = list(overrides) + [f"dataset={json.dumps(ds)}", f"model.gate={json.dumps(gate)}", f"seed={seed}"]
                if epochs is not None:
                    ov.append(f"epochs={epochs}")
                specs.append(RunSpec.of(load_config(config, ov + grid_gate_overrides(gate)), runs_dir))
    return specs


def grid_dir(runs_dir: str | Path, config: str = "sec42") -> Path:
    """The folder of one config's grid: `runs_dir/<config name>` (holds grid_log.jsonl)."""
    return Path(runs_dir) / config_name(config)


def run_table1(specs: Sequence[RunSpec], runs_dir: str | Path, workers: int = 2, threads: int = 1, cache_dir=None,
               progress: bool = True, run_bars: bool = True, log_dir: str | Path | None = None,
               launcher: str | None = None, launcher_options: dict | None = None, loggers: Iterable[str] = ()) -> dict:
    """Train the unfinished runs of the grid with the pool; one summary line in `log_dir`/grid_log.jsonl.
    `launcher` (e.g. "ray") with its `launcher_options`, and `loggers`, as `run_grid` takes them."""
    return run_grid(specs, workers=workers, threads=threads, cache_dir=cache_dir, progress=progress,
                    run_bars=run_bars, runs_root=runs_dir, desc="table1 runs",
                    log=Path(log_dir) / GRID_LOG if log_dir is not None else None,
                    launcher=launcher, launcher_options=launcher_options, loggers=loggers)
