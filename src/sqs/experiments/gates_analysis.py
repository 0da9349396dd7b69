"""What the gate benchmark measures on each finished run, cached next to it (`gates_analysis.json`).

Image run (any depth): the final test loss and accuracy; per GLU layer the share of test gate
inputs beyond 1/lam (SQS); every reading of the protocol (`sqs.interp.image_stack.read_model`:
fitted on the 60k training images, scored on the 10k test images), each with its per-layer R^2
(the reading's layer output against the true one, from the true layer input) and its end-to-end
surrogate (every GLU replaced by its reading): logit R^2, accuracy, argmax agreement; the most
faithful reading by name; and the agreement of that reading's eigenvectors with the Bilinear run
from the same initial weights (`sqs.interp.compare.compare_read`: 1-layer models in pixel space,
deeper ones through activation profiles of the last layer's eigenvectors). A Bilinear run is
compared with the Bilinear run of the next seed instead: what "agree" means between two models
that share nothing but the gate.

Language-model run: the final validation loss and bits per byte; per GLU layer, for a few token
directions (the grid's tokens and the layer's most promoted token), every reading fitted on the
layer inputs of training windows and scored on validation windows
(`sqs.interp.lm_quadratic.lm_reading_fidelity`: R^2 of the reading's contribution to the token
directions against the layer's true direct contribution); the agreement in token space of the
best reading's quadratic part with the Bilinear run of the same seed (or, for Bilinear, the next
seed), for the grid's tokens.
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path

import numpy as np
import torch

from sqs.experiments.frontier_analysis import saturation_share
from sqs.experiments.gates import GateRun, GatesGrid, partner
from sqs.experiments.lm_spectra import LMAnalysis, load_analysis
from sqs.interp.agreement import summarise
from sqs.interp.compare import compare_read, summary_brief
from sqs.interp.image_stack import read_model
from sqs.interp.lm_quadratic import direction_matrices, glu_weights, layer_inputs, lm_reading_fidelity, token_agreement
from sqs.runs.image_pipeline import load_data, load_image_model
from sqs.runs.pool import map_single_threaded
from sqs.training.rundir import GATES_ANALYSIS, MODEL, is_complete, read_metrics, write_run_json

#: Bump when the analysis changes: every cached analysis is recomputed.
ANALYSIS_VERSION = 1
DEFAULT_READINGS = ("first-order", "gain", "affine")


def options(grid: GatesGrid, spec: GateRun) -> dict:
    """The analysis settings of one run (part of its cache key)."""
    a = grid.analysis
    readings = list(a.get("readings", DEFAULT_READINGS))
    if (not spec.is_lm and spec.depth in a.get("fit_reading_depths", []) and spec.seed in a.get("fit_seeds", [])
            and "fit" not in readings):
        readings.append("fit")
    return {"version": ANALYSIS_VERSION, "readings": readings, "k": int(a.get("k", 10)),
            "fit_rows": int(a.get("fit_rows", 12000)), "probe_images": int(a.get("probe_images", 2000)),
            "lm_windows": int(a.get("lm_windows", 128)), "lm_fit_windows": int(a.get("lm_fit_windows", 128)),
            "lm_tokens": list(a.get("lm_tokens", [" happy", " dog", "."]))}


def comparison_partner(spec: GateRun, specs: list[GateRun]) -> GateRun | None:
    """Bilinear from the same init for every other setting; the next seed's Bilinear for a Bilinear run."""
    if spec.setting.gate != "bilinear" or spec.setting.params:
        return partner(spec, specs)
    seeds = sorted({s.seed for s in specs if s.depth == spec.depth and s.task == spec.task})
    later = [s for s in seeds if s > spec.seed] or [s for s in seeds if s < spec.seed]
    return partner(spec, specs, seed=later[0]) if later else None


def _final(run_dir: Path, key: str) -> dict:
    return next((r for r in reversed(read_metrics(run_dir)) if key in r), {})


def _stamp(run_dir: Path | None) -> list[int] | None:
    """(mtime_ns, size) of a finished run's weights: a cached analysis is recomputed when they change."""
    if run_dir is None or not (run_dir / MODEL).exists():
        return None
    st = (run_dir / MODEL).stat()
    return [st.st_mtime_ns, st.st_size]


def _brief(cmp: dict) -> dict:
    """The agreement numbers the report shows: per side the best one-to-one match per rank and the overlap."""
    return {"space": cmp.get("space"), "reading_a": cmp["a"]["reading"] if "a" in cmp else None,
            "reading_b": cmp["b"]["reading"] if "b" in cmp else None,
            **{side: {"best_match": cmp[side]["best_match"], "overlap": cmp[side]["overlap"]}
               for side in ("positive", "negative")},
            "form_cosine_quadratic": cmp.get("form_cosine_quadratic")}


# ----------------------------------------------------------------------------- image runs


def _fidelity(f: dict) -> dict:
    return {"logit_r2": f["logit_r2"], "logit_r2_scaled": f["logit_r2_scaled"], "surrogate_acc": f["surrogate_acc"],
            "agreement": f["agreement"], "layers_r2": [layer["r2"] for layer in f["layers"]]}


def analyse_image(spec: GateRun, data: tuple, opts: dict, other: GateRun | None) -> dict:
    """Everything the benchmark reports about one finished image run (see the module docstring)."""
    x_tr, _, x_te, y_te = data
    t0 = time.perf_counter()
    model, _ = load_image_model(spec.run_dir)
    final = _final(spec.run_dir, "test_acc")
    fit = {"fit_rows": opts["fit_rows"]}
    read = read_model(model, x_tr, x_te, y_te, readings=opts["readings"], **fit)
    out = {"run": spec.name, "kind": "image", "task": spec.task, "depth": spec.depth, "setting": spec.setting.key,
           "seed": spec.seed, "layers": len(model.layers), "test_acc": final.get("test_acc"),
           "test_loss": final.get("test_loss"), "saturation": saturation_share(model, x_te),
           "best": read["best"], "order": read["order"],
           "fidelity": {r: _fidelity(f) for r, f in read["fidelity"].items()}}
    if other is not None and is_complete(other.run_dir):
        omodel, _ = load_image_model(other.run_dir)
        oread = read_model(omodel, x_tr, x_te, y_te, readings=("first-order",))  # Bilinear: exact at first order
        per_unit = [r for r in read["order"] if r != "fit"]  # the fit's spectrum is spread out (see the report)
        cmp = compare_read(model, dict(read, best=per_unit[0]), omodel, oread, x_te[:opts["probe_images"]],
                           k=opts["k"])
        out["partner"] = other.name
        out["vs_bilinear"] = _brief(cmp)
    out["analysis_seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- language-model runs


def training_windows(an: LMAnalysis, n_windows: int, cache_dir=None) -> torch.Tensor:
    """(n, context) windows of the training split at evenly spaced offsets (fixed, so every model of a
    grid is read on the same tokens), encoded with the run's tokenizer (the cache's token file)."""
    from sqs.data import tinystories

    T = an.lm.model.cfg.context
    toks = tinystories.encode_split("train", cache_dir=cache_dir, vocab_size=an.lm.config.vocab_size, progress=False)
    starts = np.linspace(0, len(toks) - T - 1, n_windows).astype(np.int64)
    idx = starts[:, None] + np.arange(T, dtype=np.int64)
    return torch.from_numpy(np.asarray(toks[idx], dtype=np.int64))


def _directions(an: LMAnalysis, layer: int, tokens: list[str]) -> list[tuple[str, int]]:
    fixed = []
    for t in tokens:
        try:
            fixed.append((t, an.token(t)))
        except ValueError:  # not a single token of this tokenizer: skipped, said in the report
            continue
    return fixed + [("top-promoted", an.top_promoted(layer, exclude=[i for _, i in fixed]))]


def _lm_forms(an: LMAnalysis, fit_inputs, opts: dict) -> list[dict]:
    """Per layer: the readings' fidelity and the best reading's forms for the fixed token directions."""
    out = []
    for layer in range(an.n_layers):
        W, V, P, gate, kw = glu_weights(an.lm.model.blocks[layer].mlp)
        dirs = _directions(an, layer, opts["lm_tokens"])
        U = an.directions([i for _, i in dirs])
        fid = lm_reading_fidelity(W, V, P, gate, kw, U, fit_inputs.pre_mlp[layer], an.inputs.pre_mlp[layer],
                                  readings=opts["readings"], ks=(None,))
        forms = fid.pop("forms")
        d = W.shape[1]
        out.append({"layer": layer, "directions": [{"label": lab, "token_id": i} for lab, i in dirs],
                    "best": fid["best"], "order": fid["order"],
                    "readings": {r: {"r2": fid[r]["r2"], "r2_scaled": fid[r]["r2_scaled"],
                                     "r2_per_direction": fid[r]["r2_per_direction"]} for r in fid["order"]},
                    "B_fixed": forms[fid["best"]][:len(dirs) - 1, :d, :d]})
    return out


def analyse_lm(spec: GateRun, opts: dict, other: GateRun | None, cache_dir=None) -> dict:
    """Everything the benchmark reports about one finished LM run (see the module docstring)."""
    t0 = time.perf_counter()
    an = load_analysis(spec.run_dir, cache_dir=cache_dir, windows=opts["lm_windows"], allow_checkpoint=False)
    fit_inputs = layer_inputs(an.lm.model, training_windows(an, opts["lm_fit_windows"], cache_dir))
    layers = _lm_forms(an, fit_inputs, opts)
    final = _final(spec.run_dir, "val_loss")
    out = {"run": spec.name, "kind": "lm", "task": spec.task, "depth": spec.depth, "setting": spec.setting.key,
           "seed": spec.seed, "layers": an.n_layers, "val_loss": final.get("val_loss"), "val_bpb": final.get("val_bpb"),
           "fit_tokens": int(fit_inputs.pre_mlp[0].shape[0] * fit_inputs.pre_mlp[0].shape[1]),
           "eval_tokens": int(an.inputs.pre_mlp[0].shape[0] * an.inputs.pre_mlp[0].shape[1]),
           "per_layer": [{k: v for k, v in L.items() if k != "B_fixed"} for L in layers]}
    if other is not None and is_complete(other.run_dir):
        oan = load_analysis(other.run_dir, cache_dir=cache_dir, windows=opts["lm_windows"], allow_checkpoint=False)
        per_layer = []
        for L in layers:
            ids = [d["token_id"] for d in L["directions"][:-1]]
            W, V, P, _, _ = glu_weights(oan.lm.model.blocks[L["layer"]].mlp)
            B_other = direction_matrices(W, V, P, oan.directions(ids))  # Bilinear: its exact form
            per_layer.append(token_agreement(L["B_fixed"], an.token_inputs(L["layer"]), B_other,
                                             oan.token_inputs(L["layer"]), k=opts["k"]))
        brief = summary_brief(summarise(per_layer))
        out["partner"] = other.name
        out["vs_bilinear"] = {"space": "token profiles", **{side: {"best_match": brief[side]["best_match"],
                                                                   "overlap": brief[side]["overlap"]}
                                                            for side in ("positive", "negative")}}
    out["analysis_seconds"] = time.perf_counter() - t0
    return out


# ----------------------------------------------------------------------------- cached, every run


def cached_analysis(spec: GateRun, specs: list[GateRun], grid: GatesGrid, data=None, cache_dir=None) -> dict | None:
    """The run's analysis from `<run dir>/gates_analysis.json` if current (same analysis version and
    options, same weights of the run and its comparison partner), else computed and written there.
    `data`: a callable returning the image dataset's tensors (loaded only when something is computed).
    None for an unfinished run."""
    if not is_complete(spec.run_dir):
        return None
    other = comparison_partner(spec, specs)
    opts = options(grid, spec)
    key = {"options": opts, "run": _stamp(spec.run_dir), "partner": _stamp(other.run_dir if other else None)}
    path = spec.run_dir / GATES_ANALYSIS
    if path.exists():
        try:
            old = json.loads(path.read_text())
            if old.get("key") == key:
                return old["result"]
        except (OSError, json.JSONDecodeError, KeyError):
            pass
    if spec.is_lm:
        result = analyse_lm(spec, opts, other, cache_dir=cache_dir)
    else:
        result = analyse_image(spec, data() if callable(data) else data, opts, other)
    write_run_json(spec.run_dir, GATES_ANALYSIS, {"key": key, "result": result})
    return result


_DATA: dict[str, tuple] = {}  # per process: an image dataset's tensors, loaded once


def analyse_job(spec: GateRun, specs: list[GateRun], grid: GatesGrid, cache_dir=None) -> dict | None:
    """One run's cached analysis (in a worker process of `collect`, or inline)."""
    def get():
        if spec.task not in _DATA:
            _DATA[spec.task] = load_data(spec.task, cache_dir=cache_dir)
        return _DATA[spec.task]

    return cached_analysis(spec, specs, grid, get, cache_dir=cache_dir)


def collect(specs: list[GateRun], grid: GatesGrid, cache_dir=None, workers: int = 1, say=None) -> list:
    """[(spec, analysis or None)] for every run; analyses cached in the run directories. `workers` > 1
    analyses the runs without a current cache in that many single-threaded processes."""
    todo = [s for s in specs if is_complete(s.run_dir)]

    def starting(i, s):
        if say and not (s.run_dir / GATES_ANALYSIS).exists():
            say(f"[gates] analysing {s.name} ({i + 1}/{len(todo)})")

    def finished(i, s):
        if say:
            say(f"[gates] analysed {s.name} ({i + 1}/{len(todo)})")

    found = map_single_threaded(functools.partial(analyse_job, specs=specs, grid=grid, cache_dir=cache_dir), todo,
                                workers, starting=starting, finished=finished)
    results = {s.run_dir: r for s, r in zip(todo, found)}
    return [(s, results.get(s.run_dir)) for s in specs]
