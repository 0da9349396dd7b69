"""The (c, lam, p) frontier (`sqs experiment frontier`): how much shrink can a readable model afford?

    grid = load_grid()                                   # sqs/configs/image/frontier.toml
    specs = plan_frontier("runs", grid)                  # 1-layer and 2-layer runs, priority order
    run_frontier(specs, workers=2, threads=1, log="runs/frontier.log")   # resumable, skips finished runs
    frontier_report.write_report("runs", "results/frontier", grid)      # analysis cached per run

The grid (its design is stated in the TOML file) varies one SQS parameter at a time around
the paper's default, beside the references Bilinear, SwiGLU and GELU. Runs live where every
image run lives, `<runs>/<config>/<dataset>/<run name>` (`sqs.experiments.config.run_dir`):
`runs/sec41/mnist/sqs-lam0.1-s0`, `runs/sec41/mnist/bilinear-i0-d1`; the paper's default
gate keeps the plain name (`sqs-s0`), so the sec41 Bilinear / SQS runs are the spectra
experiment's and the sec42 references are Table 1's: nothing is trained twice.

Per finished run (`analyse`, cached in `<run dir>/frontier_analysis.json`): test accuracy and
loss; per GLU layer the share of test gate inputs |Vx| beyond 1/lam (`saturation_share`); for
1-layer Bilinear / SQS models the fidelity on the test set of each reading (first-order, gain,
and for `analysis.fit_seeds` the least-squares fit on `analysis.fit_train_images` training
images), and for SQS the agreement of each reading's eigenvectors with the Bilinear run at the
same init and data seeds (`sqs.interp.agreement`).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from sqs.core import DEFAULT_C, DEFAULT_LAM, DEFAULT_P
from sqs.experiments import config as _config
from sqs.experiments.config import run_dir
from sqs.experiments.image import DATASETS, load_config
from sqs.experiments.table1 import RunSpec, default_workers, run_grid  # noqa: F401 - the one pool runner
from sqs.functional import canonical_gate
from sqs.interp.agreement import SIDES, agreement_summary
from sqs.interp.spectra import decompose, fidelity, model_logits
from sqs.io import atomic_write, write_json
from sqs.training.trainer import is_complete

GRID = "frontier"
SQS_DEFAULT = {"c": DEFAULT_C, "lam": DEFAULT_LAM, "p": DEFAULT_P}


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
        tag = _config.gate_tag(self.gate, self.gate_kwargs)
        return self.gate + (f"-{tag}" if tag else "")

    @property
    def is_sqs(self) -> bool:
        return self.gate == "sqs"

    @property
    def is_default(self) -> bool:
        return self.is_sqs and not self.params

    def value(self, name: str) -> float | None:
        """The gate's c / lam / p (defaults filled in) for SQS; None for other gates."""
        return float(self.gate_kwargs.get(name, SQS_DEFAULT[name])) if self.is_sqs else None

    @property
    def label(self) -> str:
        from sqs.experiments.style import gate_label

        if not self.is_sqs:
            return gate_label(self.gate)
        return f"SQS c={self.value('c'):g} λ={self.value('lam'):g} p={self.value('p'):g}"


def sqs_setting(**kw: float) -> Setting:
    """The SQS setting with these parameters; parameters equal to the default are dropped."""
    bad = sorted(set(kw) - set(SQS_DEFAULT))
    if bad:
        raise ValueError(f"frontier: unknown SQS parameter(s) {bad}; valid: c, lam, p")
    return Setting("sqs", tuple(sorted((k, float(v)) for k, v in kw.items() if float(v) != SQS_DEFAULT[k])))


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


def load_grid(name_or_path: str | Path = GRID, overrides: _config.Overrides = None) -> Grid:
    """Read the grid TOML (a shipped name or a path) through the one config loader; overrides
    are dotted keys (`grid.one_layer.seeds=[0]`, `grid.datasets=["mnist"]`)."""
    d, where = _config.load_config_dict("image", name_or_path, overrides)
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
    bad = sorted(set(grid.sqs_axes) - set(SQS_DEFAULT))
    if bad:
        raise ValueError(f"{where}: unknown SQS axis {bad} in [grid.sqs]; valid: c, lam, p")
    return grid


@dataclass
class FrontierSpec(RunSpec):
    """A run of the frontier (a `table1.RunSpec`, so the Table 1 pool runs it)."""

    setting: Setting = Setting("sqs")
    layers: int = 1
    config: str = "sec41"

    @property
    def name(self) -> str:  # unique across configs (1- and 2-layer runs share dataset/run name)
        return f"{self.config}/{self.cfg.name()}"

    @property
    def init_seed(self) -> int:
        return self.cfg.model_seed

    @property
    def data_seed(self) -> int:
        return self.cfg.batch_seed


def _spec(runs_dir, config: str, layers: int, ds: str, setting: Setting, seed: int,
          init: int | None = None, data: int | None = None, epochs: float | None = None,
          overrides: Iterable[str] = ()) -> FrontierSpec:
    ov = _config.override_items(list(overrides))
    ov += [("dataset", ds), ("model.gate", setting.gate), ("model.gate_kwargs", setting.gate_kwargs), ("seed", seed)]
    if init is not None:
        ov.append(("init_seed", init))
    if data is not None:
        ov.append(("data_seed", data))
    if epochs is not None:
        ov.append(("epochs", epochs))
    cfg = load_config(config, dict(ov))
    rd = run_dir(runs_dir, config, ds, setting.gate, seed, init_seed=cfg.init_seed, data_seed=cfg.data_seed,
                 gate_kwargs=setting.gate_kwargs)
    return FrontierSpec(ds, setting.gate, seed, rd, cfg, setting=setting, layers=layers, config=config)


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


class ProgressLog:
    """One line per finished run (appended to a text file), with the rate and the ETA."""

    def __init__(self, path: str | Path | None, total: int, skipped: int, workers: int):
        self.path = Path(path) if path else None
        self.total, self.skipped, self.done, self.failed = total, skipped, 0, 0
        self.t0 = time.perf_counter()
        self.write(f"start: {total} runs, {skipped} finished already, {total - skipped} to train "
                   f"({workers} worker(s))")

    def write(self, line: str) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:  # append-only log: one whole line per write
            f.write(time.strftime("%Y-%m-%d %H:%M:%S ") + line + "\n")

    def __call__(self, name: str, ok: bool, info: Any) -> None:
        self.done += 1
        self.failed += not ok
        elapsed = time.perf_counter() - self.t0
        left = self.total - self.skipped - self.done
        rate = self.done / elapsed * 60 if elapsed > 0 else 0.0
        eta = left / (self.done / elapsed) if self.done and elapsed > 0 else float("nan")
        what = (f"acc {info['test_acc']:.4f} loss {info['test_loss']:.4f} in {info['wall_s']:.0f} s"
                if ok and info.get("test_acc") is not None else ("ok" if ok else "FAILED (re-run to retry)"))
        self.write(f"[{self.skipped + self.done}/{self.total}] {name}: {what} | {rate:.2f} runs/min, "
                   f"{left} left, ETA {_hms(eta)}")


def _hms(s: float) -> str:
    if s != s:  # NaN
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def run_frontier(specs: Sequence[FrontierSpec], workers: int | None = None, threads: int = 1, cache_dir=None,
                 log: str | Path | None = None, progress: bool = True, run_bars: bool = True) -> dict:
    """Train the unfinished runs of `specs` with the Table 1 pool (finished ones skipped,
    interrupted ones resumed); one line per finished run in `log`. Returns the pool's summary."""
    workers = workers or default_workers()
    skipped = sum(is_complete(s.run_dir) for s in specs)
    plog = ProgressLog(log, len(specs), skipped, workers)
    summary = run_grid(specs, workers=workers, threads=threads, cache_dir=cache_dir, progress=progress,
                       run_bars=run_bars, log_dir=None, desc="frontier runs", on_finish=plog)
    plog.write(f"end: trained {summary['n_trained']}, skipped {summary['n_skipped']}, "
               f"{len(summary['failed'])} failed, wall {_hms(summary['wall_s'])}")
    if log:
        _append_jsonl(Path(log).with_suffix(".jsonl"), {k: v for k, v in summary.items() if k != "runs"})
    return summary


def _append_jsonl(path: Path, rec: dict) -> None:
    old = path.read_text() if path.exists() else ""
    atomic_write(path, lambda p: p.write_text(old + json.dumps(rec) + "\n"))


# ----------------------------------------------------------------------------- analysis (cached per run)

#: Bump when the analysis changes: every cached analysis is recomputed.
ANALYSIS_VERSION = 1
ANALYSIS_FILE = "frontier_analysis.json"
#: Readings computed for every 1-layer SQS run (cheap); "fit" only for `analysis.fit_seeds`.
CHEAP_READINGS = ("first-order", "gain")


@torch.no_grad()
def saturation_share(model, images: torch.Tensor, batch_size: int = 5000) -> list[float | None]:
    """Per GLU layer, the share of gate inputs v = V x with |v| > 1/lam on `images`
    (None for a layer whose gate has no 1/lam scale: other gates, or lam = 0).

    Beyond |v| = 1/lam the SQS gate's denominator 1 + lam|v| is over 2: the unit is in the
    shrink regime, where the first-order reading (gate = identity) is off by more than 2x."""
    lams = [float(layer.gate_kwargs.get("lam", DEFAULT_LAM)) if layer.gate == "sqs" else 0.0
            for layer in model.layers]
    over, n = [0] * len(lams), 0
    for s in range(0, images.shape[0], batch_size):
        x = model.embed(images[s:s + batch_size].flatten(1))
        for i, (norm, layer) in enumerate(zip(model.norms, model.layers)):
            h = norm(x)
            if lams[i] > 0:
                over[i] += int(((h @ layer.V.T).abs() > 1.0 / lams[i]).sum())
            y = layer(h)
            x = x + y if model.residual else y
        n += images[s:s + batch_size].shape[0]
    return [over[i] / (n * layer.d_hidden) if lams[i] > 0 else None for i, layer in enumerate(model.layers)]


@torch.no_grad()
def test_metrics(model, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Test accuracy and mean cross-entropy of the finished model."""
    z = model_logits(model, images).to(torch.float64)
    return {"test_acc": float((z.argmax(-1) == labels).double().mean()),
            "test_loss": float(F.cross_entropy(z, labels, reduction="mean"))}


def _agreement_brief(summary: dict) -> dict:
    """The part of `agreement_summary` the frontier reports: per side per-rank / best-match means
    (ranks 1..k), overlap and form cosine means, and the number of pairs."""
    out = {"n_pairs": summary["n_pairs"], "k": summary["k"],
           "form_cosine": summary["form_cosine"]["mean"], "form_cosine_centered": summary["form_cosine_centered"]["mean"]}
    for side in SIDES:
        out[side] = {"per_rank": summary[side]["per_rank"]["mean"], "best_match": summary[side]["best_match"]["mean"],
                     "overlap": summary[side]["overlap"]["mean"]}
    return out


def agreement_brief(pairs: list[tuple], k: int = 10) -> dict:
    """`_agreement_brief(agreement_summary(pairs, k))`: mean over (pair, class)."""
    return _agreement_brief(agreement_summary(pairs, k=k))


def partner_dir(spec: FrontierSpec, runs_dir: str | Path) -> Path | None:
    """The Bilinear run at the same init and data seeds as a 1-layer run (None: none to compare with)."""
    if spec.layers != 1 or spec.setting.gate != "sqs":
        return None
    return run_dir(runs_dir, spec.config, spec.dataset, "bilinear", spec.seed, init_seed=spec.cfg.init_seed,
                   data_seed=spec.cfg.data_seed)


def _stamp(path: Path) -> list[int] | None:
    """(mtime_ns, size) of a finished run's weights: the cache is recomputed when they change."""
    f = path / "model.safetensors"
    if not f.exists():
        return None
    st = f.stat()
    return [st.st_mtime_ns, st.st_size]


def analysis_options(grid: Grid, spec: FrontierSpec) -> dict:
    a = grid.analysis
    fit = (spec.layers == 1 and spec.setting.is_sqs and spec.cfg.init_seed is None and spec.cfg.data_seed is None
           and spec.seed in [int(s) for s in a.get("fit_seeds", [0])] and int(a.get("fit_train_images", 0)) > 0)
    return {"version": ANALYSIS_VERSION, "k": int(a.get("k", 10)),
            "fit_train_images": int(a.get("fit_train_images", 0)) if fit else 0}


def analyse(spec: FrontierSpec, data: tuple, options: dict, partner: Path | None) -> dict:
    """Everything the frontier reports about one finished run (see the module docstring)."""
    from sqs.experiments.image import load_image_model

    x_tr, _, x_te, y_te = data
    model, _ = load_image_model(spec.run_dir)
    t0 = time.perf_counter()
    out = {"run": spec.name, "setting": spec.setting.key, "layers": spec.layers, "dataset": spec.dataset,
           "seed": spec.seed, "init_seed": spec.init_seed, "data_seed": spec.data_seed,
           **test_metrics(model, x_te, y_te), "saturation": saturation_share(model, x_te)}
    if spec.layers == 1 and spec.setting.gate in ("sqs", "bilinear"):
        readings = list(CHEAP_READINGS) + (["fit"] if options["fit_train_images"] else [])
        decs, fid, secs = {}, {}, {}
        for r in readings:
            t = time.perf_counter()
            fit_images = x_tr[:options["fit_train_images"]] if r == "fit" else x_tr
            decs[r] = decompose(model, reading=r, fit_images=fit_images)
            secs[r] = time.perf_counter() - t
            fid[r] = fidelity(model, decs[r], x_te, y_te)
            if decs[r].exact:  # Bilinear (or c = lam = 0): every reading is the exact one
                break
        out["fidelity"], out["reading_seconds"] = fid, secs
        if partner is not None and is_complete(partner):
            bil = decompose(load_image_model(partner)[0])
            out["partner"] = "/".join(Path(partner).parts[-3:])  # <config>/<dataset>/<run>: no machine path
            out["agreement"] = {r: agreement_brief([(d, bil)], k=options["k"]) for r, d in decs.items()}
    out["analysis_seconds"] = time.perf_counter() - t0
    return out


def cached_analysis(spec: FrontierSpec, grid: Grid, runs_dir: str | Path, data) -> dict | None:
    """The run's analysis from `<run dir>/frontier_analysis.json` if it is current (same analysis
    version and options, same weights of the run and its Bilinear partner), else computed and
    written there. `data`: the dataset's tensors, or a callable returning them (loaded only when
    something is computed). None for an unfinished run."""
    if not is_complete(spec.run_dir):
        return None
    partner = partner_dir(spec, runs_dir)
    key = {"options": analysis_options(grid, spec), "run": _stamp(spec.run_dir),
           "partner": _stamp(partner) if partner is not None else None}
    path = spec.run_dir / ANALYSIS_FILE
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if old.get("key") == key:
                return old["result"]
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    result = analyse(spec, data() if callable(data) else data, key["options"], partner)
    write_json(path, {"key": key, "result": result})
    return result
