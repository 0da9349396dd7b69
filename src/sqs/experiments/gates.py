"""The gate benchmark (`sqs experiment gates`): accuracy against readability for every gate, at depth
and in a language model.

    grid = load_grid()                                     # sqs/configs/image/gates.toml
    specs = plan("runs", grid)                             # image runs (every depth) + LM runs
    run_gates(specs, workers=2, log="runs/gates.log")      # resumable: finished runs skipped
    gates_report.write_report("runs", "results/gates", grid)   # analysis cached per run

Runs live where every run of their config lives (`cfg.run_dir`): `runs/sec42/mnist/swiglu-s1`,
`runs/depth4-rmsnorm/fashion-mnist/sqs-lam0.05-s0`, `runs/tinystories-1epoch/tinystories/relu-s2`;
so the sec41 / sec42 runs are shared with the frontier, spectra and Table 1 experiments.
What is measured on each finished run is `sqs.experiments.gates_analysis`; the table, the figure
and the verdict are `sqs.experiments.gates_report`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from sqs.core import canonical_gate
from sqs.experiments.frontier import Setting, sqs_setting
from sqs.experiments.style import ProgressLog, hms
from sqs.io import append_jsonl
from sqs.runs.config_files import Overrides, load_config_dict, override_items
from sqs.runs.image_config import DATASETS, load_config as load_image_config
from sqs.runs.image_pipeline import run_grid
from sqs.runs.lm_config import LMRunConfig, load_config as load_lm_config
from sqs.runs.lm_pipeline import DATASET as LM_TASK, train_lm_spec
from sqs.runs.pool import RunSpec, default_workers, launch
from sqs.training.rundir import is_complete

GRID = "gates"


@dataclass
class GatesGrid:
    """The benchmark's grid as read from its TOML file (see sqs/configs/image/gates.toml)."""

    datasets: list[str]
    depths: list[str]
    gates: list[str]
    sqs_lam: list[float]
    seeds: list[int]
    lm: dict = field(default_factory=dict)
    analysis: dict = field(default_factory=dict)
    where: str = GRID

    def settings(self) -> list[Setting]:
        """Every gate setting: the non-SQS gates as they are, then SQS at each lam (the default first)."""
        out = [Setting(canonical_gate(g)) for g in self.gates if canonical_gate(g) != "sqs"]
        if "sqs" in [canonical_gate(g) for g in self.gates]:
            out += [sqs_setting(lam=lam) for lam in self.sqs_lam]
        return list(dict.fromkeys(out))

    @property
    def lm_seeds(self) -> list[int]:
        return [int(s) for s in self.lm.get("seeds", [])]


def load_grid(name_or_path: str | Path = GRID, overrides: Overrides = None) -> GatesGrid:
    """Read the grid TOML (a shipped name or a path); overrides are dotted keys (`grid.seeds=[0]`,
    `grid.depths=["sec41"]`, `grid.lm.seeds=[]`)."""
    d, where = load_config_dict("image", name_or_path, overrides)
    g = d.get("grid")
    if not isinstance(g, Mapping) or "depths" not in g:
        raise ValueError(f"{where}: not a gate-benchmark grid (no [grid] table with `depths`)")
    try:
        grid = GatesGrid(datasets=list(g["datasets"]), depths=list(g["depths"]), gates=list(g["gates"]),
                         sqs_lam=[float(x) for x in g.get("sqs_lam", [0.5])], seeds=[int(s) for s in g["seeds"]],
                         lm=dict(g.get("lm", {})), analysis=dict(d.get("analysis", {})), where=where)
    except KeyError as e:
        raise ValueError(f"{where}: the [grid] table lacks {e.args[0]!r}") from e
    bad = sorted(set(grid.datasets) - set(DATASETS))
    if bad:
        raise ValueError(f"{where}: unknown dataset(s) {bad}; choose from {', '.join(DATASETS)}")
    for g_ in grid.gates:
        canonical_gate(g_)  # an unknown gate name is refused here, by name
    return grid


@dataclass
class GateRun(RunSpec):
    """A run of the benchmark: a pool `RunSpec` (name `<config>/<task>/<run name>`) with the grid's view of it."""

    task: str = "mnist"  # an image dataset, or "tinystories"
    depth: str = "sec41"  # the run's config name (the image depth series, or the LM config)
    setting: Setting = Setting("sqs")
    seed: int = 0

    @property
    def is_lm(self) -> bool:
        return self.task == LM_TASK


def image_config(depth: str, dataset: str, setting: Setting, seed: int, epochs: float | None = None,
                 overrides: Iterable[str] = ()):
    """The image run config of one grid point."""
    ov = override_items(list(overrides))
    ov += [("dataset", dataset), ("model.gate", setting.gate), ("model.gate_kwargs", setting.gate_kwargs),
           ("seed", seed)]
    if epochs is not None:
        ov.append(("epochs", epochs))
    return load_image_config(depth, dict(ov))


def lm_config(config: str, setting: Setting, seed: int, overrides: Iterable[str] = ()) -> LMRunConfig:
    """The LM run config of one grid point."""
    base = load_lm_config(config, list(overrides))
    return base.replace(gate=setting.gate, gate_kwargs=setting.gate_kwargs, seed=seed)


def image_run(runs_dir, depth: str, dataset: str, setting: Setting, seed: int, epochs=None, overrides=()) -> GateRun:
    cfg = image_config(depth, dataset, setting, seed, epochs, overrides)
    return GateRun(f"{depth}/{cfg.label()}", cfg.run_dir(runs_dir), cfg, task=dataset, depth=depth,
                   setting=setting, seed=seed)


def lm_run(runs_dir, config: str, setting: Setting, seed: int, overrides=()) -> GateRun:
    cfg = lm_config(config, setting, seed, overrides)
    return GateRun(f"{cfg.name}/{cfg.label()}", cfg.run_dir(runs_dir), cfg, task=LM_TASK, depth=cfg.name,
                   setting=setting, seed=seed)


def plan(runs_dir: str | Path, grid: GatesGrid | None = None, epochs: float | None = None,
         overrides: Iterable[str] = (), lm_overrides: Iterable[str] = ()) -> list[GateRun]:
    """Every run of the benchmark: the image runs seed-major (per seed every depth, dataset and
    setting, so an interrupted benchmark has whole seeds), then the LM runs seed-major.
    `epochs` / `overrides` apply to every image run, `lm_overrides` to every LM run (tests, probes)."""
    grid = grid or load_grid()
    specs = [image_run(runs_dir, depth, ds, st, seed, epochs, overrides)
             for seed in grid.seeds for depth in grid.depths for ds in grid.datasets for st in grid.settings()]
    if grid.lm.get("config") and grid.lm_seeds:
        specs += [lm_run(runs_dir, grid.lm["config"], st, seed, lm_overrides)
                  for seed in grid.lm_seeds for st in grid.settings()]
    seen: set[Path] = set()
    return [s for s in specs if not (s.run_dir in seen or seen.add(s.run_dir))]


def partner(spec: GateRun, specs: Sequence[GateRun], gate: str = "bilinear", seed: int | None = None) -> GateRun | None:
    """The run of `specs` at the same depth, task and seed (or `seed`) with `gate`'s default setting:
    the Bilinear model from the same initial weights, or another seed's run for a baseline."""
    want = (spec.depth, spec.task, Setting(gate) if gate != "sqs" else sqs_setting(), spec.seed if seed is None else seed)
    return next((s for s in specs if (s.depth, s.task, s.setting, s.seed) == want), None)


def run_gates(specs: Sequence[GateRun], workers: int | None = None, threads: int = 1, cache_dir=None,
              log: str | Path | None = None, progress: bool = True, run_bars: bool = True,
              runs_root: str | Path | None = None, launcher: str | None = None,
              launcher_options: dict | None = None, loggers: Iterable[str] = ()) -> dict:
    """Train the unfinished runs of `specs` with the pool (image runs first, then the LM runs);
    finished runs are skipped, interrupted ones resumed. One line per finished run in `log` (rate,
    ETA). `launcher`, `launcher_options` and `loggers` as `run_grid` takes them (the LM runs use the
    GPU only where the launcher reserves one per run, `gpus_per_run`). Returns {"image": summary,
    "lm": summary} (the pool's summaries; "failed" lists failures)."""
    workers = workers or default_workers()
    images = [s for s in specs if not s.is_lm]
    lms = [s for s in specs if s.is_lm]
    plog = ProgressLog(log, len(specs), sum(is_complete(s.run_dir) for s in specs), workers)
    where = {"launcher": launcher, "launcher_options": launcher_options}
    out = {}
    if images:
        out["image"] = run_grid(images, workers=workers, threads=threads, cache_dir=cache_dir, progress=progress,
                                run_bars=run_bars, runs_root=runs_root, desc="gates: image runs", on_finish=plog,
                                loggers=loggers, **where)
    if lms:
        device = "auto" if (launcher_options or {}).get("gpus_per_run") else "cpu"
        run_one = functools.partial(train_lm_spec, cache_dir=cache_dir, device=device, loggers=tuple(loggers))
        out["lm"] = launch(lms, run_one, workers=workers, threads=threads, progress=progress, run_bars=run_bars,
                           desc="gates: LM runs", on_finish=plog, **where)
    failed = sum(len(s["failed"]) for s in out.values())
    trained = sum(s["n_trained"] for s in out.values())
    wall = sum(s["wall_s"] for s in out.values())
    plog.write(f"end: trained {trained}, {failed} failed, wall {hms(wall)}")
    if log:
        append_jsonl(Path(log).with_suffix(".jsonl"), {k: {kk: vv for kk, vv in v.items() if kk != "runs"}
                                                       for k, v in out.items()})
    return out
