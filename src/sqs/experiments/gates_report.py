"""The gate benchmark's report: one table, one figure, a computed verdict (`results/gates/`).

Cells are (task, depth, setting); every number is a mean ± sample std over the cell's seeds.
Loss: the image runs' final test cross-entropy, the LM runs' final validation loss (nats/token).
Fidelity: image runs, the end-to-end logit R^2 of the surrogate that replaces every GLU by its
reading (`gates_analysis`); LM runs, the R^2 of each GLU layer's reading against the layer's
direct contribution to the token directions, averaged over the layers. A cell's best reading is
the reading with the highest mean fidelity among those computed for all its seeds (the
least-squares "fit" reading is computed for some seeds only and is shown beside, never chosen).

The verdict, per panel (task x depth) and overall:
- the Pareto front of (loss down, fidelity of the best reading up) over the settings;
- whether an SQS setting is on it;
- whether an SQS setting beats both Bilinear on loss and SwiGLU-with-its-best-reading on
  fidelity, by the means, and whether that holds seed by seed (every gate of a seed starts
  from the same weights, so differences are paired);
- whether the settings separate at all on loss: the spread of the means against the seed noise.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from sqs.experiments.gates import GateRun, GatesGrid, load_grid, plan
from sqs.experiments.gates_analysis import collect
from sqs.experiments.style import DATASET_LABEL, GATE_COLOR, STD_NOTE, fmt, gate_label, pm, say
from sqs.io import save_figure, write_json, write_text
from sqs.stats import mean_std

TASK_LABEL = {**DATASET_LABEL, "tinystories": "TinyStories"}
DEPTH_LABEL = {"sec41": "1 layer", "sec42": "2 layers", "depth2-rmsnorm": "2 layers + RMSNorm",
               "depth4-rmsnorm": "4 layers + RMSNorm"}
#: Separation rule: the settings' loss means span more than this many seed std's.
SEPARATION = 2.0


def setting_label(key: str) -> str:
    """`sqs` -> `SQS λ=0.5`, `sqs-lam0.05` -> `SQS λ=0.05`, `swiglu` -> `SwiGLU`."""
    if key == "sqs":
        return "SQS λ=0.5"
    if key.startswith("sqs-lam"):
        return f"SQS λ={key[len('sqs-lam'):]}"
    return gate_label(key)


def depth_label(depth: str, is_lm: bool = False) -> str:
    return f"{depth} (4-layer decoder)" if is_lm else DEPTH_LABEL.get(depth, depth)


# ----------------------------------------------------------------------------- aggregation


def _fidelity_of(a: dict, reading: str) -> float | None:
    """One run's fidelity under a reading: end-to-end logit R^2 (image) or mean layer R^2 (LM)."""
    if a["kind"] == "lm":
        vals = [L["readings"][reading]["r2"] for L in a["per_layer"] if reading in L["readings"]]
        return float(np.mean(vals)) if len(vals) == len(a["per_layer"]) else None
    f = a["fidelity"].get(reading)
    return None if f is None else f["logit_r2"]


def _layers_of(a: dict, reading: str) -> list[float] | None:
    if a["kind"] == "lm":
        return [L["readings"][reading]["r2"] if reading in L["readings"] else math.nan for L in a["per_layer"]]
    f = a["fidelity"].get(reading)
    return None if f is None else f["layers_r2"]


def _match5(vs: dict | None) -> float | None:
    """Mean best one-to-one |cos| (or |corr|) of ranks 1-5, over the positive and negative sides."""
    if not vs:
        return None
    vals = [x for side in ("positive", "negative") for x in (vs[side]["best_match"] or [])[:5] if x is not None]
    return float(np.mean(vals)) if vals else None


def _overlap(vs: dict | None) -> float | None:
    if not vs:
        return None
    vals = [vs[side]["overlap"] for side in ("positive", "negative") if vs[side]["overlap"] is not None]
    return float(np.mean(vals)) if vals else None


def aggregate(results: list[tuple[GateRun, dict | None]]) -> dict:
    """{(task, depth): {setting key: cell}} over the finished runs; a cell holds per-seed values
    (paired by seed) and their mean ± std."""
    panels: dict = {}
    for spec, a in results:
        if a is None:
            continue
        cell = panels.setdefault((spec.task, spec.depth), {}).setdefault(spec.setting.key, {"runs": {}})
        cell["runs"][spec.seed] = a
    for cells in panels.values():
        for key, cell in cells.items():
            runs = cell["runs"]
            first = next(iter(runs.values()))
            lm = first["kind"] == "lm"
            cell.update(setting=key, label=setting_label(key), gate=key.split("-")[0], lm=lm,
                        seeds=sorted(runs), layers=first["layers"])
            cell["loss_by_seed"] = {s: (a["val_loss"] if lm else a["test_loss"]) for s, a in runs.items()}
            cell["loss"] = mean_std(list(cell["loss_by_seed"].values()))
            cell["score"] = mean_std([a["val_bpb"] if lm else a["test_acc"] for a in runs.values()])
            readings = [r for r in _reading_names(first) if all(_fidelity_of(a, r) is not None for a in runs.values())]
            cell["fidelity"] = {r: mean_std([_fidelity_of(a, r) for a in runs.values()]) for r in readings}
            every = set().union(*(_reading_names(a) for a in runs.values()))
            extra = sorted(every - set(readings), key=_simplicity)
            cell["fidelity_some_seeds"] = {r: mean_std([_fidelity_of(a, r) for a in runs.values()]) for r in extra}
            best = max(readings, key=lambda r: (cell["fidelity"][r]["mean"], -_simplicity(r))) if readings else None
            cell["best"] = best
            cell["best_fidelity"] = cell["fidelity"].get(best)
            cell["fidelity_by_seed"] = {s: _fidelity_of(a, best) for s, a in runs.items()} if best else {}
            if best:
                cell["layers_r2"] = mean_std(np.array([_layers_of(a, best) for a in runs.values()], dtype=np.float64))
                if not lm:
                    cell["surrogate_acc"] = mean_std([a["fidelity"][best]["surrogate_acc"] for a in runs.values()])
            cell["vs_bilinear_match5"] = mean_std([_match5(a.get("vs_bilinear")) for a in runs.values()])
            cell["vs_bilinear_overlap"] = mean_std([_overlap(a.get("vs_bilinear")) for a in runs.values()])
            if not lm:
                sat = [np.mean([x for x in a["saturation"] if x is not None]) for a in runs.values()
                       if any(x is not None for x in a["saturation"])]
                cell["saturation"] = mean_std(sat) if sat else None
    return panels


_ORDER = ("first-order", "gain", "affine", "fit")


def _simplicity(reading: str) -> int:
    return _ORDER.index(reading) if reading in _ORDER else len(_ORDER)


def _reading_names(a: dict) -> list[str]:
    if a["kind"] == "lm":
        names = set.intersection(*(set(L["readings"]) for L in a["per_layer"]))
    else:
        names = set(a["fidelity"])
    return sorted(names, key=_simplicity)


# ----------------------------------------------------------------------------- the verdict


def pareto_front(points: dict[str, tuple[float, float]]) -> list[str]:
    """Keys of the points not dominated in (loss lower, fidelity higher): no other point is at least as
    good on both and better on one. Sorted by loss."""
    front = []
    for k, (x, y) in points.items():
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for k2, (x2, y2) in points.items() if k2 != k)
        if not dominated:
            front.append(k)
    return sorted(front, key=lambda k: points[k][0])


def _paired(a: dict, b: dict) -> list[float]:
    """a[seed] - b[seed] over the seeds both have."""
    return [a[s] - b[s] for s in sorted(set(a) & set(b)) if a[s] is not None and b[s] is not None]


def panel_verdict(cells: dict) -> dict:
    """The verdict of one panel (see the module docstring)."""
    points = {k: (c["loss"]["mean"], c["best_fidelity"]["mean"]) for k, c in cells.items()
              if c.get("best_fidelity") and c["loss"]["mean"] is not None}
    front = pareto_front(points)
    sqs_keys = [k for k in cells if k.startswith("sqs")]
    out = {"front": front, "sqs_on_front": [k for k in sqs_keys if k in front], "beats_both": [],
           "beats_both_every_seed": [], "comparisons": {}}
    bil, swi = cells.get("bilinear"), cells.get("swiglu")
    for k in sqs_keys:
        c = cells[k]
        if not (bil and swi and c.get("best_fidelity") and swi.get("best_fidelity")):
            continue
        d_loss = _paired(c["loss_by_seed"], bil["loss_by_seed"])  # < 0: SQS better
        d_fid = _paired(c["fidelity_by_seed"], swi["fidelity_by_seed"])  # > 0: SQS more faithful
        mean_ok = c["loss"]["mean"] < bil["loss"]["mean"] and c["best_fidelity"]["mean"] > swi["best_fidelity"]["mean"]
        seed_ok = bool(d_loss) and bool(d_fid) and all(x < 0 for x in d_loss) and all(x > 0 for x in d_fid)
        out["comparisons"][k] = {"loss_minus_bilinear": mean_std(d_loss), "fidelity_minus_swiglu": mean_std(d_fid),
                                 "swiglu_reading": swi["best"], "reading": c["best"]}
        if mean_ok:
            out["beats_both"].append(k)
        if seed_ok:
            out["beats_both_every_seed"].append(k)
    means = [c["loss"]["mean"] for c in cells.values() if c["loss"]["mean"] is not None]
    stds = [c["loss"]["std"] for c in cells.values() if c["loss"]["std"] is not None]
    spread, noise = (max(means) - min(means)) if means else None, (max(stds) if stds else None)
    out["loss_spread"], out["loss_noise"] = spread, noise
    out["separated"] = bool(spread is not None and noise and spread > SEPARATION * noise)
    return out


def _panel_sentence(task: str, depth: str, cells: dict, v: dict) -> str:
    lm = next(iter(cells.values()))["lm"]
    where = f"{TASK_LABEL.get(task, task)}, {depth_label(depth, lm)}"
    front = ", ".join(setting_label(k) for k in v["front"])
    parts = [f"**{where}**: Pareto front {front}"]
    if v["sqs_on_front"]:
        parts.append("SQS on it (" + ", ".join(setting_label(k) for k in v["sqs_on_front"]) + ")")
    else:
        parts.append("no SQS setting on it")
    for k, cmp in v["comparisons"].items():
        dl, df = cmp["loss_minus_bilinear"], cmp["fidelity_minus_swiglu"]
        both = k in v["beats_both"]
        parts.append(f"{setting_label(k)} vs Bilinear loss {_signed(dl['mean'])}, vs SwiGLU ({cmp['swiglu_reading']}) "
                     f"fidelity {_signed(df['mean'])}: " + (("beats both" + (" on every seed" if k in
                     v["beats_both_every_seed"] else " by the means, not on every seed")) if both else "does not beat both"))
    if not v["separated"]:
        parts.append(f"the settings do not separate on loss (means span {fmt(v['loss_spread'])}, "
                     f"seed std up to {fmt(v['loss_noise'])})")
    return "; ".join(parts) + "."


def _signed(x: float | None) -> str:
    return "—" if x is None else f"{x:+.4f}"


def verdict(panels: dict) -> dict:
    per = {f"{t}/{d}": panel_verdict(cells) for (t, d), cells in panels.items()}
    beats = [p for p, v in per.items() if v["beats_both"]]
    beats_seed = [p for p, v in per.items() if v["beats_both_every_seed"]]
    on_front = [p for p, v in per.items() if v["sqs_on_front"]]
    n = len(per)
    lines = [f"SQS (λ = 0.5 or 0.05) is on the Pareto front of loss against fidelity in {len(on_front)} of {n} panels."]
    if beats:
        lines.append(f"An SQS setting beats both Bilinear on loss and SwiGLU-with-its-best-reading on fidelity in "
                     f"{len(beats)} of {n} panels by the means ({', '.join(beats)}); on every seed in "
                     f"{len(beats_seed)} ({', '.join(beats_seed) or 'none'}).")
    else:
        lines.append("No SQS setting beats both Bilinear on loss and SwiGLU-with-its-best-reading on fidelity in any "
                     "panel.")
    flat = [p for p, v in per.items() if not v["separated"]]
    if flat:
        lines.append(f"The settings do not separate on loss (spread of the means < {SEPARATION:g} seed std) in: "
                     f"{', '.join(flat)}.")
    return {"panels": per, "summary": lines, "beats_both": beats, "beats_both_every_seed": beats_seed,
            "sqs_on_front": on_front}


# ----------------------------------------------------------------------------- table, figure


def _pm_fidelity(stat: dict | None) -> str:
    """An R² as mean ± std, except far below 0 (a reading worse than predicting the mean), where the
    magnitude says nothing and would swamp the table: `< −1` (summary.json keeps the numbers)."""
    if stat and stat.get("mean") is not None and stat["mean"] < -1:
        return "< −1"
    return pm(stat, 3)


def _cell_row(c: dict) -> str:
    lm = c["lm"]
    fid = " / ".join(_pm_fidelity(c["fidelity"].get(r)) if r in c["fidelity"] else "—" for r in _ORDER[:3])
    fit = c["fidelity_some_seeds"].get("fit") or c["fidelity"].get("fit")
    layers = c.get("layers_r2")
    layer_txt = " ".join(fmt(x, 3) for x in layers["mean"]) if layers else "—"
    cells = [c["label"], pm(c["loss"]), pm(c["score"], 4), c["best"] or "—", fid,
             (fmt(fit["mean"], 3) + f" (n={fit['n']})") if fit else "—", layer_txt]
    if not lm:
        cells.append(pm(c.get("surrogate_acc"), 3))
        sat = c.get("saturation")
        cells.append(fmt(sat["mean"], 3) if sat else "—")
    cells += [pm(c["vs_bilinear_match5"], 2), pm(c["vs_bilinear_overlap"], 2)]
    return "| " + " | ".join(cells) + " |"


def _order(cells: dict) -> list[str]:
    rank = {"relu": 0, "gelu": 1, "swiglu": 2, "bilinear": 3, "sqs": 4}
    return sorted(cells, key=lambda k: (rank.get(k.split("-")[0], 9), k != "sqs", k))


def write_table(panels: dict, verdict_: dict, grid: GatesGrid) -> str:
    lines = ["# Which gate? Loss against readability, every gate, depth and task", "",
             "Written by `sqs experiment gates` from the run directories (`sqs/configs/image/gates.toml`). "
             f"Every number is a {STD_NOTE} over the seeds of the cell (n shown in the figure's error bars; "
             f"{len(grid.seeds)} image seeds, {len(grid.lm_seeds)} LM seeds). Readings (`sqs.interp`) are fitted on "
             "training data and scored on held-out data: **first-order** (the gate as its slope at 0: v for SQS and "
             "Bilinear, v/2 for GELU and SwiGLU, none for ReLU), **gain** (a least-squares slope b_i per unit), "
             "**affine** (a_i + b_i·v per unit: one quadratic form per output in [x; 1]), **fit** (the forms "
             "fitted directly; only for some seeds, shown beside). `< −1`: a reading far worse than predicting the mean. Fidelity: images, the end-to-end logit R² of the "
             "surrogate that replaces every GLU by its reading; LM, the R² of each layer's reading against its "
             "direct contribution to the token directions, averaged over layers. *best* = the most faithful "
             "reading of the cell (highest mean fidelity among the readings every seed has).", "",
             "## Verdict", ""] + [f"- {s}" for s in verdict_["summary"]] + [""]
    for key in sorted(verdict_["panels"], key=_panel_order(panels)):
        t, d = key.split("/", 1)
        lines.append(f"- {_panel_sentence(t, d, panels[(t, d)], verdict_['panels'][key])}")
    for task in _tasks(panels):
        lm = task == "tinystories"
        lines += ["", f"## {TASK_LABEL.get(task, task)}", ""]
        head = (["setting", "val loss (nats)", "val bits/byte", "best", "fidelity first-order / gain / affine",
                 "fit", "per-layer R² (best)"] if lm else
                ["setting", "test loss", "test acc", "best", "fidelity first-order / gain / affine", "fit (seed 0)",
                 "per-layer R² (best)", "surrogate acc (best)", "share |v| > 1/λ"])
        head += ["vs Bilinear, same init: match@5", "overlap@10"]
        for depth in [d for (t, d) in sorted(panels, key=_panel_order2(panels)) if t == task]:
            cells = panels[(task, depth)]
            lines += [f"### {depth_label(depth, lm)} (`{depth}`)", "", "| " + " | ".join(head) + " |",
                      "|" + "---|" * len(head)]
            lines += [_cell_row(cells[k]) for k in _order(cells)]
            lines.append("")
        lines.append("match@5: the mean best one-to-one |cos| (images, 1 layer: eigenvectors in pixel space) or "
                     "|corr| (deeper images: activation profiles over test images; LM: token profiles, quadratic "
                     "part) of ranks 1–5, both signed sides, between the cell's best reading and the Bilinear model "
                     "of the same seed (same initial weights); for Bilinear itself, against the Bilinear model of the "
                     "next seed: what agreement between unrelated models looks like.")
    return "\n".join(lines) + "\n"


def _tasks(panels: dict) -> list[str]:
    order = ["mnist", "fashion-mnist", "tinystories"]
    return sorted({t for t, _ in panels}, key=lambda t: order.index(t) if t in order else 9)


def _panel_order2(panels: dict):
    depth_order = list(DEPTH_LABEL)
    return lambda td: (_tasks(panels).index(td[0]), depth_order.index(td[1]) if td[1] in depth_order else 9)


def _panel_order(panels: dict):
    key = _panel_order2(panels)
    return lambda s: key(tuple(s.split("/", 1)))


SETTING_STYLE = {"sqs": ("tab:red", "o"), "sqs-lam0.05": ("salmon", "D")}


def plot_front(panels: dict, verdict_: dict, path: Path) -> Path | None:
    """Loss (x) against the fidelity of the best reading (y), one marker per setting (± seed std), one panel
    per task and depth, the Pareto front drawn."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted(panels, key=_panel_order2(panels))
    if not keys:
        return None
    ncol = min(4, len(keys))
    nrow = math.ceil(len(keys) / ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.3 * ncol, 3.7 * nrow), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    handles: dict = {}
    front_handle = None
    for ax, (task, depth) in zip(axes.flat, keys):
        cells = panels[(task, depth)]
        v = verdict_["panels"][f"{task}/{depth}"]
        for k in _order(cells):
            c = cells[k]
            if not c.get("best_fidelity"):
                continue
            col, mk = SETTING_STYLE.get(k, (GATE_COLOR.get(c["gate"], "k"), "o"))
            x, y = c["loss"], c["best_fidelity"]
            ax.errorbar(x["mean"], y["mean"], xerr=x["std"] or 0, yerr=y["std"] or 0, fmt=mk, color=col, ms=7,
                        mec="k", capsize=2, label=c["label"], zorder=3)
            ax.annotate(c["best"], (x["mean"], y["mean"]), xytext=(4, 4), textcoords="offset points", fontsize=6,
                        color="0.25", zorder=4)
            handles.setdefault(c["label"], ax.get_legend_handles_labels()[0][-1])
        fr = [(cells[k]["loss"]["mean"], cells[k]["best_fidelity"]["mean"]) for k in v["front"]]
        if fr:
            xs, ys = zip(*fr)
            front_handle = ax.step(xs, ys, where="post", color="0.3", lw=1, ls="--", zorder=2)[0]
        lm = next(iter(cells.values()))["lm"]
        ax.set_title(f"{TASK_LABEL.get(task, task)}: {depth_label(depth, lm)}", fontsize=10)
        ax.set_xlabel("validation loss (nats/token)" if lm else "test loss")
        ax.set_ylabel("fidelity, best reading\n(mean layer R²)" if lm else "fidelity, best reading\n(end-to-end logit R²)")
        ax.grid(alpha=0.3)
    if front_handle is not None:
        handles["Pareto front"] = front_handle
    # one legend for all panels, where no data can hide behind it: an empty slot, else below the panels
    spare = list(axes.flat[len(keys):])
    where = dict(loc="center") if spare else dict(loc="lower center", ncol=len(handles), bbox_to_anchor=(0.5, 0))
    (spare[0] if spare else fig).legend(list(handles.values()), list(handles), fontsize=9, **where)
    fig.suptitle("Which gate? Loss against readability (marker: mean ± seed std; beside it: the most faithful "
                 "reading)", fontsize=11)
    fig.tight_layout(rect=(0, 0 if spare else 0.05, 1, 1))
    return save_figure(fig, path)


def _json_ready(panels: dict) -> dict:
    out = {}
    for (t, d), cells in panels.items():
        out[f"{t}/{d}"] = {k: {kk: vv for kk, vv in c.items() if kk != "runs"} for k, c in cells.items()}
    return out


def write_report(runs_dir, out, grid: GatesGrid | None = None, epochs=None, overrides=(), lm_overrides=(),
                 cache_dir=None, workers: int = 1, progress: bool = True) -> list[Path]:
    """Analyse every finished run (cached per run), then write table.md, summary.json and pareto.png to `out`."""
    grid = grid or load_grid()
    specs = plan(runs_dir, grid, epochs=epochs, overrides=overrides, lm_overrides=lm_overrides)
    results = collect(specs, grid, cache_dir=cache_dir, workers=workers, say=say if progress else None)
    panels = aggregate(results)
    v = verdict(panels)
    out = Path(out)
    missing = [s.name for s, a in results if a is None]
    seconds = sum(a.get("analysis_seconds", 0.0) for _, a in results if a)
    paths = [write_text(out / "table.md", write_table(panels, v, grid)),
             write_json(out / "summary.json", {"grid": grid.where, "runs_dir": Path(runs_dir).name,
                                               "n_runs": len(specs), "n_finished": len(specs) - len(missing),
                                               "missing": missing, "analysis_seconds": seconds, "verdict": v,
                                               "panels": _json_ready(panels)})]
    fig = plot_front(panels, v, out / "pareto.png")
    if fig:
        paths.append(fig)
    return paths
