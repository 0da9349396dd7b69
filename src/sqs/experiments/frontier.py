"""The (c, lam, p) frontier (`sqs experiment frontier`): how much shrink can a readable model afford?

    grid = load_grid()                                   # sqs/configs/image/frontier.toml
    specs = plan_frontier("runs", grid)                  # 1-layer and 2-layer runs, priority order
    run_frontier(specs, workers=2, threads=1, log="runs/frontier.log")   # resumable, skips finished runs
    frontier_report.write_report("runs", "results/frontier", grid)      # analysis cached per run

The grid (its design is stated in the TOML file) varies one SQS parameter at a time around
the paper's default, beside the references Bilinear, SwiGLU and GELU. Runs live where every
image run lives, `<runs>/<config>/<dataset>/<run name>` (each config's `run_dir`):
`runs/sec41/mnist/sqs-lam0.1-s0`, `runs/sec41/mnist/bilinear-i0-d1`; the paper's default
gate keeps the plain name (`sqs-s0`), so the sec41 Bilinear / SQS runs are the spectra
experiment's and the sec42 references are Table 1's: nothing is trained twice.

What is measured on each finished run is `sqs.experiments.frontier_analysis`; the report is
`sqs.experiments.frontier_report`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from sqs.experiments.style import ProgressLog, gate_label, hms
from sqs.core import canonical_gate
from sqs.io import append_jsonl
from sqs.runs.config_files import Overrides, load_config_dict, override_items
from sqs.runs.image_config import DATASETS, ImageRunConfig, load_config
from sqs.runs.image_pipeline import run_grid
from sqs.runs.naming import SQS_DEFAULTS, gate_key
from sqs.runs.pool import RunSpec, default_workers
from sqs.training.rundir import is_complete

GRID = "frontier"


# ----------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Setting:
    """One gate setting of the grid: a gate and its non-default parameters (as sorted pairs)."""

    gate: str
    params: tuple[tuple[str, float], ...] = ()

    @property
    def gate_kwargs(self) -> dict[str, float]:
        return dict(self.params)

    @property
    def key(self) -> str:
        """`sqs`, `sqs-lam0.1`, `bilinear`: the run name without its seed part."""
        return gate_key(self.gate, self.gate_kwargs)

    @property
    def is_sqs(self) -> bool:
        return self.gate == "sqs"

    @property
    def is_default(self) -> bool:
        return self.is_sqs and not self.params

    def value(self, name: str) -> float | None:
        """The gate's c / lam / p (defaults filled in) for SQS; None for other gates."""
        return float(self.gate_kwargs.get(name, SQS_DEFAULTS[name])) if self.is_sqs else None

    @property
    def label(self) -> str:
        if not self.is_sqs:
            return gate_label(self.gate)
        return f"SQS c={self.value('c'):g} λ={self.value('lam'):g} p={self.value('p'):g}"


def sqs_setting(**kw: float) -> Setting:
    """The SQS setting with these parameters; parameters equal to the default are dropped."""
    bad = sorted(set(kw) - set(SQS_DEFAULTS))
    if bad:
        raise ValueError(f"frontier: unknown SQS parameter(s) {bad}; valid: c, lam, p")
    return Setting("sqs", tuple(sorted((k, float(v)) for k, v in kw.items() if float(v) != SQS_DEFAULTS[k])))


@dataclass
class Grid:
    """The frontier grid as read from its TOML file (see sqs/configs/image/frontier.toml)."""

    datasets: list[str]
    references: list[str]
    sqs_axes: dict[str, list[float]]
    one_layer: dict
    two_layer: dict
    analysis: dict = field(default_factory=dict)
    where: str = GRID

    def sqs_settings(self) -> list[Setting]:
        """One axis at a time around the default, default first, no duplicates."""
        out = [sqs_setting()]
        for axis in ("lam", "c", "p"):
            for v in self.sqs_axes.get(axis, []):
                s = sqs_setting(**{axis: v})
                if s not in out:
                    out.append(s)
        return out

    def settings(self) -> list[Setting]:
        return self.sqs_settings() + [Setting(canonical_gate(g)) for g in self.references]

    def two_layer_settings(self) -> list[Setting]:
        return [s for s in self.sqs_settings() if not s.is_default]


def load_grid(name_or_path: str | Path = GRID, overrides: Overrides = None) -> Grid:
    """Read the grid TOML (a shipped name or a path) through the one config loader; overrides
    are dotted keys (`grid.one_layer.seeds=[0]`, `grid.datasets=["mnist"]`)."""
    d, where = load_config_dict("image", name_or_path, overrides)
    g = d.get("grid")
    if not isinstance(g, Mapping):
        raise ValueError(f"{where}: not a frontier grid (no [grid] table)")
    try:
        grid = Grid(datasets=list(g["datasets"]), references=list(g.get("references", [])),
                    sqs_axes={k: [float(v) for v in vs] for k, vs in dict(g.get("sqs", {})).items()},
                    one_layer=dict(g["one_layer"]), two_layer=dict(g.get("two_layer", {})),
                    analysis=dict(d.get("analysis", {})), where=where)
    except KeyError as e:
        raise ValueError(f"{where}: the [grid] table lacks {e.args[0]!r}") from e
    bad = sorted(set(grid.datasets) - set(DATASETS))
    if bad:
        raise ValueError(f"{where}: unknown dataset(s) {bad}; choose from {', '.join(DATASETS)}")
    bad = sorted(set(grid.sqs_axes) - set(SQS_DEFAULTS))
    if bad:
        raise ValueError(f"{where}: unknown SQS axis {bad} in [grid.sqs]; valid: c, lam, p")
    return grid


@dataclass
class FrontierSpec(RunSpec):
    """A run of the frontier: a pool `RunSpec` (name `<config>/<dataset>/<run name>`, unique across
    the 1- and 2-layer configs) with the grid's view of it."""

    setting: Setting = Setting("sqs")
    layers: int = 1
    config: str = "sec41"

    @property
    def dataset(self) -> str:
        return self.cfg.dataset

    @property
    def seed(self) -> int:
        return self.cfg.seed

    @property
    def init_seed(self) -> int:
        return self.cfg.model_seed

    @property
    def data_seed(self) -> int:
        return self.cfg.batch_seed


def run_config(config: str, dataset: str, setting: Setting, seed: int, init: int | None = None,
               data: int | None = None, epochs: float | None = None, overrides: Iterable[str] = ()) -> ImageRunConfig:
    """The run config of one grid point (its `run_dir` is where the run lives)."""
    ov = override_items(list(overrides))
    ov += [("dataset", dataset), ("model.gate", setting.gate), ("model.gate_kwargs", setting.gate_kwargs),
           ("seed", seed)]
    if init is not None:
        ov.append(("init_seed", init))
    if data is not None:
        ov.append(("data_seed", data))
    if epochs is not None:
        ov.append(("epochs", epochs))
    return load_config(config, dict(ov))


def _spec(runs_dir, config: str, layers: int, ds: str, setting: Setting, seed: int,
          init: int | None = None, data: int | None = None, epochs: float | None = None,
          overrides: Iterable[str] = ()) -> FrontierSpec:
    cfg = run_config(config, ds, setting, seed, init, data, epochs, overrides)
    return FrontierSpec(f"{config}/{cfg.label()}", cfg.run_dir(runs_dir), cfg, setting=setting, layers=layers,
                        config=config)


def partner_config(spec: FrontierSpec) -> ImageRunConfig | None:
    """The Bilinear run at the same init and data seeds as a 1-layer SQS run (None: none to compare with)."""
    if spec.layers != 1 or spec.setting.gate != "sqs":
        return None
    model = dataclasses.replace(spec.cfg.model, gate="bilinear", gate_kwargs={})
    return dataclasses.replace(spec.cfg, model=model)


def plan_frontier(runs_dir: str | Path, grid: Grid | None = None, epochs: float | None = None,
                  overrides: Iterable[str] = ()) -> list[FrontierSpec]:
    """Every run of the grid, priority first: per seed, the 1-layer runs, then (for seed 0) the
    first same-init baseline, then the 2-layer runs; the remaining baselines last.
    `epochs` / `overrides` (run-config overrides, `train.lr=...`) apply to every run (tests, probes)."""
    grid = grid or load_grid()
    one, two = grid.one_layer, grid.two_layer
    c1, c2 = one.get("config", "sec41"), two.get("config", "sec42")
    seeds1, seeds2 = [int(s) for s in one.get("seeds", [0])], [int(s) for s in two.get("seeds", [])]
    splits = [(int(a), int(b)) for a, b in one.get("split", [])]
    split_settings = [sqs_setting() if canonical_gate(g) == "sqs" else Setting(canonical_gate(g))
                      for g in one.get("split_gates", [])]
    kw = {"epochs": epochs, "overrides": list(overrides)}
    specs: list[FrontierSpec] = []

    def split_runs(init: int, data: int) -> list[FrontierSpec]:
        return [_spec(runs_dir, c1, 1, ds, st, init, init=init, data=data, **kw)
                for ds in grid.datasets for st in split_settings]

    for i, seed in enumerate(sorted(set(seeds1) | set(seeds2))):
        if seed in seeds1:
            specs += [_spec(runs_dir, c1, 1, ds, st, seed, **kw) for ds in grid.datasets for st in grid.settings()]
        if i == 0 and splits:
            specs += split_runs(*splits[0])
        if seed in seeds2:
            specs += [_spec(runs_dir, c2, 2, ds, st, seed, **kw) for ds in grid.datasets
                      for st in grid.two_layer_settings()]
    for init, data in splits[1:]:
        specs += split_runs(init, data)
    seen: set[Path] = set()
    return [s for s in specs if not (s.run_dir in seen or seen.add(s.run_dir))]


# ----------------------------------------------------------------------------- running


def run_frontier(specs: Sequence[FrontierSpec], workers: int | None = None, threads: int = 1, cache_dir=None,
                 log: str | Path | None = None, progress: bool = True, run_bars: bool = True,
                 runs_root: str | Path | None = None, launcher: str | None = None,
                 launcher_options: dict | None = None, loggers: Iterable[str] = ()) -> dict:
    """Train the unfinished runs of `specs` with the pool (finished ones skipped, interrupted ones
    resumed); one line per finished run in `log`, the summary in `log` with suffix .jsonl.
    `launcher`, `launcher_options` and `loggers` as `run_grid` takes them. Returns the pool's summary."""
    workers = workers or default_workers()
    skipped = sum(is_complete(s.run_dir) for s in specs)
    plog = ProgressLog(log, len(specs), skipped, workers)
    summary = run_grid(specs, workers=workers, threads=threads, cache_dir=cache_dir, progress=progress,
                       run_bars=run_bars, runs_root=runs_root, desc="frontier runs", on_finish=plog,
                       launcher=launcher, launcher_options=launcher_options, loggers=loggers)
    plog.write(f"end: trained {summary['n_trained']}, skipped {summary['n_skipped']}, "
               f"{len(summary['failed'])} failed, wall {hms(summary['wall_s'])}")
    if log:
        append_jsonl(Path(log).with_suffix(".jsonl"), {k: v for k, v in summary.items() if k != "runs"})
    return summary


