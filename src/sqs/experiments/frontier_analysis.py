"""What the frontier measures on its runs: one analysis per finished run, cached next to it,
the agreement baselines, and the Table 1 references of the 2-layer table.

Per finished run (`analyse`, cached in `<run dir>/frontier_analysis.json`): test accuracy and
loss; per GLU layer the share of test gate inputs |Vx| beyond 1/lam (`saturation_share`); for
1-layer Bilinear / SQS models the fidelity on the test set of each reading (first-order, gain,
and for `analysis.fit_seeds` the least-squares fit on `analysis.fit_train_images` training
images), and for SQS the agreement of each reading's eigenvectors with the Bilinear run at the
same init and data seeds (`sqs.interp.agreement`).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sqs.core import DEFAULT_LAM
from sqs.experiments.agreement_baselines import agreement_brief, baseline_pairs
from sqs.experiments.frontier import FrontierSpec, Grid, Setting, partner_config, plan_frontier, run_config, sqs_setting
from sqs.experiments.style import say
from sqs.interp.spectra import decompose, fidelity, model_logits
from sqs.io import write_json
from sqs.runs.image_pipeline import load_data, load_image_model
from sqs.runs.pool import map_single_threaded
from sqs.stats import mean_std
from sqs.training.rundir import FRONTIER_ANALYSIS, MODEL, is_complete, read_metrics, write_run_json


# ----------------------------------------------------------------------------- one run (cached in its directory)

#: Bump when the analysis changes: every cached analysis is recomputed.
ANALYSIS_VERSION = 1
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


def partner_dir(spec: FrontierSpec, runs_dir: str | Path) -> Path | None:
    """The directory of the Bilinear run at the same init and data seeds as a 1-layer SQS run."""
    cfg = partner_config(spec)
    return None if cfg is None else cfg.run_dir(runs_dir)


def _stamp(path: Path) -> list[int] | None:
    """(mtime_ns, size) of a finished run's weights: the cache is recomputed when they change."""
    f = path / MODEL
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
    """The run's analysis from `<run dir>/frontier_analysis.json` (`FRONTIER_ANALYSIS`) if it is current (same analysis
    version and options, same weights of the run and its Bilinear partner), else computed and
    written there. `data`: the dataset's tensors, or a callable returning them (loaded only when
    something is computed). None for an unfinished run."""
    if not is_complete(spec.run_dir):
        return None
    partner = partner_dir(spec, runs_dir)
    key = {"options": analysis_options(grid, spec), "run": _stamp(spec.run_dir),
           "partner": _stamp(partner) if partner is not None else None}
    path = spec.run_dir / FRONTIER_ANALYSIS
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if old.get("key") == key:
                return old["result"]
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    result = analyse(spec, data() if callable(data) else data, key["options"], partner)
    write_run_json(spec.run_dir, FRONTIER_ANALYSIS, {"key": key, "result": result})
    return result


# ----------------------------------------------------------------------------- every run of the grid


_DATA: dict[str, tuple] = {}  # per process: a dataset's tensors, loaded once


def _analyse_job(spec, grid, runs_dir, cache_dir):
    """One run's cached analysis (in a worker process of `collect`, or inline)."""
    def get():
        if spec.dataset not in _DATA:
            _DATA[spec.dataset] = load_data(spec.dataset, cache_dir=cache_dir)
        return _DATA[spec.dataset]

    return cached_analysis(spec, grid, runs_dir, get)


def collect(runs_dir: str | Path, grid: Grid, epochs: float | None = None, overrides=(), cache_dir=None,
            workers: int = 1) -> list:
    """[(spec, analysis or None)] for every run of the grid; analyses cached in the run dirs.
    `workers` > 1 analyses the runs without a cached analysis in that many single-threaded processes
    (the least-squares reading takes about a minute per run)."""
    specs = plan_frontier(runs_dir, grid, epochs=epochs, overrides=overrides)
    todo = [s for s in specs if is_complete(s.run_dir)]

    def starting(i, s):
        if not (s.run_dir / FRONTIER_ANALYSIS).exists():
            say(f"[frontier] analysing {s.name} ({i + 1}/{len(todo)})")

    found = map_single_threaded(functools.partial(_analyse_job, grid=grid, runs_dir=runs_dir, cache_dir=cache_dir),
                                todo, workers, starting=starting,
                                finished=lambda i, s: say(f"[frontier] analysed {s.name} ({i + 1}/{len(todo)})"))
    results = {s.run_dir: r for s, r in zip(todo, found)}
    return [(s, results.get(s.run_dir)) for s in specs]


# ----------------------------------------------------------------------------- agreement baselines


def _one_layer_keys(grid: Grid) -> list[tuple]:
    """(seed, init, data) of the 1-layer Bilinear / SQS-default runs: unsplit seeds and same-init baselines."""
    one = grid.one_layer
    return [(int(s), None, None) for s in one.get("seeds", [])] + [(int(a), int(a), int(b)) for a, b in one.get("split", [])]


def _reference_setting(gate: str) -> Setting:
    return sqs_setting() if gate == "sqs" else Setting(gate)


def _decs(runs_dir, grid, ds, config, data) -> dict:
    """{(gate, init, data): {"first-order" | "gain": Decomposition}} of the finished 1-layer Bilinear /
    SQS-default runs of the grid (unsplit seeds and the same-init baselines)."""
    out = {}
    for gate in ("bilinear", "sqs"):
        for seed, init, dseed in _one_layer_keys(grid):
            rd = run_config(config, ds, _reference_setting(gate), seed, init, dseed).run_dir(runs_dir)
            if not is_complete(rd):
                continue
            model, cfg = load_image_model(rd)
            key = (gate, seed if init is None else init, seed if dseed is None else dseed)
            if gate == "bilinear":
                d = decompose(model)
                out[key] = {"first-order": d, "gain": d}
            else:
                out[key] = {"first-order": decompose(model),
                            "gain": decompose(model, reading="gain", fit_images=data()[0])}
    return out


def baselines(runs_dir, grid: Grid, ds: str, cache_dir=None, out_dir: Path | None = None) -> dict:
    """What "agree" means, per reading of the SQS models: the agreement (positive side etc., mean over
    pairs and classes) of each pairing of `agreement_baselines.BASELINES`. Cached in
    out_dir/baselines_<ds>.json, keyed by the weights of the runs involved."""
    config = grid.one_layer.get("config", "sec41")
    stamps = {f"{g}-{s}-{i}-{d}": _stamp(run_config(config, ds, _reference_setting(g), s, i, d).run_dir(runs_dir))
              for g in ("bilinear", "sqs") for s, i, d in _one_layer_keys(grid)}
    cache = out_dir / f"baselines_{ds}.json" if out_dir else None
    k = int(grid.analysis.get("k", 10))
    if cache and cache.exists():
        old = json.loads(cache.read_text())
        if old.get("key") == {"stamps": stamps, "k": k, "version": ANALYSIS_VERSION}:
            return old["result"]
    data_store: dict = {}

    def data():
        if "d" not in data_store:
            data_store["d"] = load_data(ds, cache_dir=cache_dir)
        return data_store["d"]

    decs = _decs(runs_dir, grid, ds, config, data)
    result = {}
    for reading in ("first-order", "gain"):
        pairs = baseline_pairs({key: v[reading] for key, v in decs.items()})
        result[reading] = {name: agreement_brief(p, k=k) for name, p in pairs.items() if p}
    if cache:
        write_json(cache, {"key": {"stamps": stamps, "k": k, "version": ANALYSIS_VERSION}, "result": result})
    return result


# ----------------------------------------------------------------------------- the 2-layer references


def table1_references(runs_dir, grid: Grid, table1_json: str | Path | None) -> dict:
    """{dataset: {gate: {"test_acc", "test_loss": {mean, std, n}, "source"}}} for the 2-layer references
    (SwiGLU, GELU, Bilinear, SQS default): finished sec42 runs in runs_dir if there are any,
    else the final-step summary of a Table 1 report."""
    config = grid.two_layer.get("config", "sec42")
    out: dict = {}
    summary = {}
    if table1_json and Path(table1_json).exists():
        summary = json.loads(Path(table1_json).read_text()).get("summary", {})
    for ds in grid.datasets:
        for gate in ("bilinear", "swiglu", "gelu", "sqs"):
            rds = [run_config(config, ds, _reference_setting(gate), s).run_dir(runs_dir) for s in range(10)]
            rds = [rd for rd in rds if is_complete(rd)]
            if rds:
                recs = [_final(rd) for rd in rds]
                out.setdefault(ds, {})[gate] = {"test_acc": mean_std([r.get("test_acc") for r in recs]),
                                                "test_loss": mean_std([r.get("test_loss") for r in recs]),
                                                "source": f"{len(rds)} run(s) in {Path(runs_dir) / config / ds}"}
                continue
            s = summary.get(f"{ds}/{gate}", {}).get("fractions", {}).get("1.0")
            if s:
                out.setdefault(ds, {})[gate] = {"test_acc": s["test_acc"], "test_loss": s["test_loss"],
                                                "source": str(table1_json)}
    return out


def _final(rd: Path) -> dict:
    """The last evaluation record of a run."""
    return next((r for r in reversed(read_metrics(rd)) if "test_acc" in r), {})
