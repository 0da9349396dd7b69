"""The frontier's report: results/frontier/{table.md, frontier.json, accuracy_vs_fidelity.png, agreement_vs_lambda.png}.

    write_report("runs", "results/frontier", load_grid())

Reads only finished run directories (and their cached analyses, `frontier.cached_analysis`);
the references of the 2-layer table come from the same runs folder (Table 1's sec42 runs) or,
when those are absent, from a Table 1 report (`table1_json`). Every sentence of the
conclusion is computed from the numbers (`conclusion`).
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any, Sequence

from sqs.experiments import frontier as fr
from sqs.experiments.config import paper_reference, run_dir
from sqs.experiments.image import load_data, load_image_model
from sqs.experiments.style import DATASET_LABEL, DATASET_ORDER, GATE_COLOR, fmt, gate_label
from sqs.interp.spectra import decompose
from sqs.io import write_json, write_text
from sqs.training.trainer import is_complete

#: The reading the agreement is read with when no better one is measured on every seed.
FALLBACK_READING = "first-order"
BASELINES = ("bilinear_same_init", "bilinear_other_init", "sqs_same_init", "sqs_other_init",
             "sqs_vs_bilinear_same_init", "sqs_vs_bilinear_other_init")
BASELINE_LABEL = {
    "bilinear_same_init": "Bilinear vs Bilinear, same init, other data seed",
    "bilinear_other_init": "Bilinear vs Bilinear, other init",
    "sqs_same_init": "SQS vs SQS, same init, other data seed",
    "sqs_other_init": "SQS vs SQS, other init",
    "sqs_vs_bilinear_same_init": "SQS vs Bilinear, same init and data",
    "sqs_vs_bilinear_other_init": "SQS vs Bilinear, other init",
}


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    v = [float(x) for x in values if x is not None and not (isinstance(x, float) and math.isnan(x))]
    if not v:
        return None, None, 0
    return statistics.fmean(v), (statistics.pstdev(v) if len(v) > 1 else 0.0), len(v)


def _ms(values) -> dict:
    m, s, n = _mean_std(values)
    return {"mean": m, "std": s, "n": n}


# ----------------------------------------------------------------------------- collecting


_DATA: dict[str, tuple] = {}  # per process: a dataset's tensors, loaded once


def _analyse_job(spec, grid, runs_dir, cache_dir):
    """One run's cached analysis (in a worker process of `collect`, or inline)."""
    def get():
        if spec.dataset not in _DATA:
            _DATA[spec.dataset] = load_data(spec.dataset, cache_dir=cache_dir)
        return _DATA[spec.dataset]

    return fr.cached_analysis(spec, grid, runs_dir, get)


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def collect(runs_dir: str | Path, grid: fr.Grid, epochs: float | None = None, overrides=(), cache_dir=None,
            workers: int = 1) -> list:
    """[(spec, analysis or None)] for every run of the grid; analyses cached in the run dirs.
    `workers` > 1 analyses the runs without a cached analysis in that many single-threaded processes
    (the least-squares reading takes about a minute per run)."""
    specs = fr.plan_frontier(runs_dir, grid, epochs=epochs, overrides=overrides)
    todo = [s for s in specs if is_complete(s.run_dir)]
    results: dict[Path, dict | None] = {}
    if workers > 1 and len(todo) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_init_worker,
                                 initargs=(1,)) as pool:
            futs = {pool.submit(_analyse_job, s, grid, runs_dir, cache_dir): s for s in todo}
            for i, f in enumerate(as_completed(futs)):
                results[futs[f].run_dir] = f.result()
                _say(f"[frontier] analysed {futs[f].name} ({i + 1}/{len(todo)})")
    else:
        for i, s in enumerate(todo):
            if not (s.run_dir / fr.ANALYSIS_FILE).exists():
                _say(f"[frontier] analysing {s.name} ({i + 1}/{len(todo)})")
            results[s.run_dir] = _analyse_job(s, grid, runs_dir, cache_dir)
    return [(s, results.get(s.run_dir)) for s in specs]


def _decs(runs_dir, grid, ds, config, cache_dir, data) -> dict:
    """{(gate, init, data): {"exact" or reading: Decomposition}} of the finished 1-layer Bilinear /
    SQS-default runs of the grid (unsplit seeds and the same-init baselines)."""
    one = grid.one_layer
    keys = [(s, None, None) for s in one.get("seeds", [])] + [(a, a, b) for a, b in one.get("split", [])]
    out = {}
    for gate in ("bilinear", "sqs"):
        for seed, init, dseed in keys:
            rd = run_dir(runs_dir, config, ds, gate, int(seed), init_seed=init, data_seed=dseed)
            if not is_complete(rd):
                continue
            model, cfg = load_image_model(rd)
            key = (gate, int(seed) if init is None else int(init), int(seed) if dseed is None else int(dseed))
            if gate == "bilinear":
                d = decompose(model)
                out[key] = {"first-order": d, "gain": d}
            else:
                out[key] = {"first-order": decompose(model),
                            "gain": decompose(model, reading="gain", fit_images=data()[0])}
    return out


def baselines(runs_dir, grid: fr.Grid, ds: str, cache_dir=None, out_dir: Path | None = None) -> dict:
    """What "agree" means, per reading of the SQS models: the agreement (positive side etc., mean over
    pairs and classes) of each pairing in BASELINES. Cached in out_dir/baselines_<ds>.json,
    keyed by the weights of the runs involved."""
    config = grid.one_layer.get("config", "sec41")
    one = grid.one_layer
    keys = [(s, None, None) for s in one.get("seeds", [])] + [(a, a, b) for a, b in one.get("split", [])]
    stamps = {f"{g}-{s}-{i}-{d}": fr._stamp(run_dir(runs_dir, config, ds, g, int(s), init_seed=i, data_seed=d))
              for g in ("bilinear", "sqs") for s, i, d in keys}
    cache = out_dir / f"baselines_{ds}.json" if out_dir else None
    k = int(grid.analysis.get("k", 10))
    if cache and cache.exists():
        old = json.loads(cache.read_text())
        if old.get("key") == {"stamps": stamps, "k": k, "version": fr.ANALYSIS_VERSION}:
            return old["result"]
    data_store: dict = {}

    def data():
        if "d" not in data_store:
            data_store["d"] = load_data(ds, cache_dir=cache_dir)
        return data_store["d"]

    decs = _decs(runs_dir, grid, ds, config, cache_dir, data)
    result = {}
    for reading in ("first-order", "gain"):
        pairs = baseline_pairs({key: v[reading] for key, v in decs.items()})
        result[reading] = {name: fr.agreement_brief(p, k=k) for name, p in pairs.items() if p}
    if cache:
        write_json(cache, {"key": {"stamps": stamps, "k": k, "version": fr.ANALYSIS_VERSION}, "result": result})
    return result


def baseline_pairs(decs: dict) -> dict[str, list[tuple]]:
    """The pairs of each baseline from {(gate, init seed, data seed): Decomposition}."""
    keys = sorted(decs)
    out: dict[str, list] = {name: [] for name in BASELINES}
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            ga, ia, da = a
            gb, ib, db = b
            if ga == gb:
                name = f"{ga}_same_init" if ia == ib else (f"{ga}_other_init" if da != db and ia != ib else None)
                if name and (ia != ib or da != db):
                    out[name].append((decs[a], decs[b]))
    for a in keys:
        for b in keys:
            if a[0] == "sqs" and b[0] == "bilinear":
                if a[1:] == b[1:]:
                    out["sqs_vs_bilinear_same_init"].append((decs[a], decs[b]))
                elif a[1] != b[1] and a[2] != b[2]:
                    out["sqs_vs_bilinear_other_init"].append((decs[a], decs[b]))
    return out


# ----------------------------------------------------------------------------- aggregating


def _reading_of(rows: list[dict]) -> str:
    """The most faithful reading measured on every seed of a setting: highest mean logit R²."""
    common = None
    for r in rows:
        have = set((r.get("fidelity") or {}).keys()) & set(fr.CHEAP_READINGS)
        common = have if common is None else common & have
    if not common:
        return FALLBACK_READING
    return max(sorted(common), key=lambda x: (_mean_std([r["fidelity"][x]["logit_r2"] for r in rows])[0] or -math.inf,
                                              x == FALLBACK_READING))


def aggregate(pairs: list) -> dict:
    """{layers: {dataset: {setting key: row}}} over the unsplit seeds of each setting."""
    groups: dict = {}
    settings: dict = {}
    for spec, a in pairs:
        settings[spec.setting.key] = spec.setting
        if a is None or spec.cfg.init_seed is not None or spec.cfg.data_seed is not None:
            continue
        groups.setdefault((spec.layers, spec.dataset, spec.setting.key), []).append(a)
    out: dict = {}
    for (layers, ds, key), rows in groups.items():
        st = settings[key]
        row: dict[str, Any] = {"setting": key, "label": st.label, "gate": st.gate, "c": st.value("c"),
                               "lam": st.value("lam"), "p": st.value("p"), "seeds": sorted(r["seed"] for r in rows),
                               "test_acc": _ms([r["test_acc"] for r in rows]),
                               "test_loss": _ms([r["test_loss"] for r in rows])}
        n_layers = len(rows[0]["saturation"])
        row["saturation"] = [_ms([r["saturation"][i] for r in rows]) for i in range(n_layers)]
        if any(r.get("fidelity") for r in rows):
            readings = sorted({x for r in rows for x in (r.get("fidelity") or {})},
                              key=lambda x: ("first-order", "gain", "fit").index(x))
            row["fidelity"] = {x: {m: _ms([r["fidelity"][x][m] for r in rows if x in r.get("fidelity", {})])
                                   for m in ("surrogate_acc", "agreement", "logit_r2", "logit_r2_scaled")}
                               for x in readings}
            for x in readings:
                row["fidelity"][x]["top10_acc"] = _ms([r["fidelity"][x]["truncated"]["10"]["acc"]
                                                       for r in rows if x in r.get("fidelity", {})])
            row["reading"] = _reading_of(rows)
            row["exact"] = bool(rows[0]["fidelity"][readings[0]].get("exact"))
        if any(r.get("agreement") for r in rows):
            row["agreement"] = {}
            for x in sorted({x for r in rows for x in (r.get("agreement") or {})}):
                rs = [r["agreement"][x] for r in rows if x in (r.get("agreement") or {})]
                row["agreement"][x] = {
                    "n_pairs": len(rs),
                    "positive_per_rank": [_ms([r["positive"]["per_rank"][i] for r in rs])["mean"] for i in range(len(rs[0]["positive"]["per_rank"]))],
                    "positive_best_match": [_ms([r["positive"]["best_match"][i] for r in rs])["mean"] for i in range(len(rs[0]["positive"]["best_match"]))],
                    "positive_overlap": _ms([r["positive"]["overlap"] for r in rs]),
                    "form_cosine": _ms([r["form_cosine"] for r in rs])}
        out.setdefault(layers, {}).setdefault(ds, {})[key] = row
    return out


def table1_references(runs_dir, grid: fr.Grid, table1_json: str | Path | None, cache_dir=None) -> dict:
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
            rds = [run_dir(runs_dir, config, ds, gate, s) for s in range(10)]
            rds = [rd for rd in rds if is_complete(rd)]
            if rds:
                recs = [_final(rd) for rd in rds]
                out.setdefault(ds, {})[gate] = {"test_acc": _ms([r.get("test_acc") for r in recs]),
                                                "test_loss": _ms([r.get("test_loss") for r in recs]),
                                                "source": f"{len(rds)} run(s) in {Path(runs_dir) / config / ds}"}
                continue
            s = summary.get(f"{ds}/{gate}", {}).get("fractions", {}).get("1.0")
            if s:
                out.setdefault(ds, {})[gate] = {"test_acc": s["test_acc"], "test_loss": s["test_loss"],
                                                "source": str(table1_json)}
    return out


def _final(rd: Path) -> dict:
    last = {}
    with open(rd / "metrics.jsonl", encoding="utf-8") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if "test_acc" in rec:
                last = rec
    return last


# ----------------------------------------------------------------------------- conclusion


def claim_check(row: dict, reading: str, fig2: dict, tol: float) -> dict | None:
    """Does the paper's Fig. 2 claim hold for this setting (positive side, ranks 1..k, vs Bilinear at
    the same init)? min over ranks >= cos_min, and rank 1 >= cos_top - tol."""
    ag = (row.get("agreement") or {}).get(reading)
    if not ag:
        return None
    ranks = [v for v in ag["positive_per_rank"] if v is not None]
    if not ranks:
        return None
    return {"reading": reading, "rank1": ranks[0], "min": min(ranks), "k": len(ranks),
            "holds_min": min(ranks) >= fig2["cos_min"], "holds_top": ranks[0] >= fig2["cos_top"] - tol,
            "holds": min(ranks) >= fig2["cos_min"] and ranks[0] >= fig2["cos_top"] - tol}


def recommend(agg: dict, base: dict, r2_min: float) -> dict:
    """The most accurate SQS setting with lam > 0 (mean 1-layer test accuracy over the datasets) whose agreement
    reading reproduces the logits (logit R² >= r2_min) and whose agreement with Bilinear at the same
    init (positive-side top-k subspace overlap) is at least Bilinear's own same-init, other-data
    baseline, on every dataset. Falls back to the R² criterion alone, then to accuracy alone,
    and says which criterion picked it."""
    one = agg.get(1, {})
    dss = [ds for ds in DATASET_ORDER if ds in one]
    keys = set.intersection(*[{k for k, r in one[ds].items() if r["gate"] == "sqs" and r["lam"] > 0}
                              for ds in dss]) if dss else set()  # lam = 0 is Bilinear with a shift, not a shrink

    def ok_r2(k):
        return all((one[ds][k].get("fidelity", {}).get(one[ds][k].get("reading"), {}).get("logit_r2", {}).get("mean")
                    or -math.inf) >= r2_min for ds in dss)

    def ok_agree(k):
        for ds in dss:
            row = one[ds][k]
            ag = (row.get("agreement") or {}).get(row.get("reading"))
            b = (base.get(ds, {}).get(row.get("reading")) or {}).get("bilinear_same_init")
            if not ag or not b or ag["positive_overlap"]["mean"] is None or b["positive"]["overlap"] is None:
                return False
            if ag["positive_overlap"]["mean"] < b["positive"]["overlap"]:
                return False
        return True

    def acc(k):
        return statistics.fmean(one[ds][k]["test_acc"]["mean"] for ds in dss)

    for crit, cands in (("logit R² >= {r2} and agreement >= Bilinear's same-init baseline",
                         [k for k in keys if ok_r2(k) and ok_agree(k)]),
                        ("logit R² >= {r2} (no setting also matched Bilinear's same-init baseline)",
                         [k for k in keys if ok_r2(k)]),
                        ("the most accurate (no setting met logit R² >= {r2})", list(keys))):
        if cands:
            best = max(sorted(cands), key=acc)
            return {"setting": best, "label": one[dss[0]][best]["label"], "criterion": crit.format(r2=r2_min),
                    "acc": {ds: one[ds][best]["test_acc"]["mean"] for ds in dss}, "candidates": sorted(cands)}
    return {}


def conclusion(agg: dict, base: dict, fig2: dict, tol: float, r2_min: float) -> tuple[list[str], dict]:
    """Sentences computed from the numbers, and the facts behind them."""
    lines, facts = [], {"claims": {}, "recommendation": recommend(agg, base, r2_min)}
    one = agg.get(1, {})
    for ds in DATASET_ORDER:
        if ds not in one:
            continue
        rows = sorted((r for r in one[ds].values() if r["gate"] == "sqs" and not r.get("exact")),
                      key=lambda r: (r["c"] != 0.01 or r["p"] != 1.0, r["lam"], r["c"], r["p"]))
        checks = {}
        for r in rows:
            for reading in dict.fromkeys(["first-order", r.get("reading", FALLBACK_READING)]):
                c = claim_check(r, reading, fig2, tol)
                if c:
                    checks.setdefault(reading, {})[r["setting"]] = c
        facts["claims"][ds] = checks
        for reading, cs in checks.items():
            holds = [one[ds][k]["label"] for k, c in cs.items() if c["holds"]]
            default = cs.get("sqs")
            d_txt = (f"at the paper's default (λ = 0.5) it {'holds' if default['holds'] else 'does not hold'} "
                     f"(rank-1 |cos| {default['rank1']:.2f}, min over ranks 1–{default['k']} {default['min']:.2f})"
                     if default else "the default setting has no finished runs")
            lines.append(f"{DATASET_LABEL[ds]}, {reading} reading: the paper's Fig. 2 claim (|cos| ≥ {fig2['cos_min']}, "
                         f"≈{fig2['cos_top']} at the top, positive side vs Bilinear at the same init) — {d_txt}; "
                         + (f"it holds for {', '.join(holds)}." if holds else "it holds for no SQS setting with c > 0 or λ > 0."))
    rec = facts["recommendation"]
    if rec:
        lines.append(f"Recommended setting: {rec['label']} (criterion: {rec['criterion']}; 1-layer test accuracy "
                     + ", ".join(f"{DATASET_LABEL[d]} {a:.4f}" for d, a in rec["acc"].items()) + ").")
    return lines, facts


# ----------------------------------------------------------------------------- tables and plots


def _pm(d: dict | None, nd: int = 4) -> str:
    if not d or d.get("mean") is None:
        return "—"
    return f"{d['mean']:.{nd}f} ± {d['std']:.{nd}f}" if d.get("n", 0) > 1 else f"{d['mean']:.{nd}f}"


def _sat(row: dict) -> str:
    vals = [fmt(s["mean"], 3) for s in row["saturation"] if s["mean"] is not None]
    return " / ".join(vals) if vals else "—"


def one_layer_table(rows: dict) -> list[str]:
    out = ["| setting | seeds | test acc | test loss | share \\|Vx\\| > 1/λ | reading | agreement ranks 1–5 (positive side) "
           "| best match 1–5 | top-10 overlap | form cos | agreement ranks 1–5, first-order | surrogate acc: first-order / gain / fit "
           "| logit R²: first-order / gain / fit |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in _ordered(rows):
        reading = r.get("reading", "—")
        ag = (r.get("agreement") or {}).get(reading)
        ag1 = (r.get("agreement") or {}).get("first-order")
        fid = r.get("fidelity") or {}

        def ranks(a, field="positive_per_rank"):
            return " ".join(fmt(v, 2) for v in a[field][:5]) if a else "—"

        surr = " / ".join(fmt(fid[x]["surrogate_acc"]["mean"], 3) if x in fid else "—"
                          for x in ("first-order", "gain", "fit")) if fid else "—"
        r2s = " / ".join(fmt(fid[x]["logit_r2"]["mean"], 3) if x in fid else "—"
                         for x in ("first-order", "gain", "fit")) if fid else "—"
        if r.get("exact"):
            reading, surr = "exact", fmt(fid["first-order"]["surrogate_acc"]["mean"], 3)
            r2s = fmt(fid["first-order"]["logit_r2"]["mean"], 3)
        out.append(f"| {r['label']} | {len(r['seeds'])} | {_pm(r['test_acc'])} | {_pm(r['test_loss'])} | {_sat(r)} "
                   f"| {reading if fid else '—'} | {ranks(ag)} | {ranks(ag, 'positive_best_match')} "
                   f"| {_pm(ag['positive_overlap'], 3) if ag else '—'} | {_pm(ag['form_cosine'], 3) if ag else '—'} "
                   f"| {ranks(ag1)} | {surr} | {r2s} |")
    return out


def baseline_table(base: dict) -> list[str]:
    out = ["| pairing | reading of SQS | pairs | ranks 1–5 (positive side) | best match 1–5 | top-10 overlap | form cos |",
           "|---|---|---|---|---|---|---|"]
    for reading, b in base.items():
        for name in BASELINES:
            if name not in b:
                continue
            a = b[name]
            if reading != "first-order" and name.startswith("bilinear"):
                continue  # Bilinear is exact under every reading: listed once
            out.append(f"| {BASELINE_LABEL[name]} | {'exact' if name.startswith('bilinear') else reading} | {a['n_pairs']} "
                       f"| {' '.join(fmt(v, 2) for v in a['positive']['per_rank'][:5])} "
                       f"| {' '.join(fmt(v, 2) for v in a['positive']['best_match'][:5])} "
                       f"| {fmt(a['positive']['overlap'], 3)} | {fmt(a['form_cosine'], 3)} |")
    return out


def two_layer_table(rows: dict, refs: dict) -> list[str]:
    out = ["| setting | seeds | test acc | test loss | share \\|Vx\\| > 1/λ (layer 1 / 2) |", "|---|---|---|---|---|"]
    for gate, ref in refs.items():
        out.append(f"| {gate_label(gate)}{' (default)' if gate == 'sqs' else ''} (reference: {ref['source']}) "
                   f"| {ref['test_acc'].get('n', '—')} | {_pm(ref['test_acc'])} | {_pm(ref['test_loss'])} | — |")
    for key, r in _ordered(rows):
        out.append(f"| {r['label']} | {len(r['seeds'])} | {_pm(r['test_acc'])} | {_pm(r['test_loss'])} | {_sat(r)} |")
    return out


def _ordered(rows: dict):
    def k(item):
        r = item[1]
        return (r["gate"] != "sqs", r["gate"], r["c"] != 0.01 if r["c"] is not None else 0,
                r["p"] != 1.0 if r["p"] is not None else 0, r["lam"] or 0, r["c"] or 0, r["p"] or 0)
    return sorted(rows.items(), key=k)


def plot_accuracy_vs_fidelity(agg: dict, path: Path) -> Path | None:
    """Per dataset: test accuracy against the argmax agreement of the reading (filled: the agreement
    reading, hollow: first-order), one marker per SQS setting; Bilinear/SwiGLU/GELU as lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sqs.interp.plots import save

    one = agg.get(1, {})
    dss = [ds for ds in DATASET_ORDER if ds in one]
    if not dss:
        return None
    fig, axes = plt.subplots(1, len(dss), figsize=(6.2 * len(dss), 4.8), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax, ds in zip(axes[0], dss):
        rows = one[ds]
        for gate in ("bilinear", "swiglu", "gelu"):
            if gate in rows:
                ax.axhline(rows[gate]["test_acc"]["mean"], color=GATE_COLOR[gate], ls="--", lw=1,
                           label=f"{gate_label(gate)} accuracy")
        lams = sorted({r["lam"] for d in one.values() for r in d.values() if r["gate"] == "sqs"})  # one colour per λ
        for key, r in _ordered(rows):
            if r["gate"] != "sqs" or not r.get("fidelity"):
                continue
            col = cmap(lams.index(r["lam"]) / max(1, len(lams) - 1))
            marker = "o" if (r["c"] == 0.01 and r["p"] == 1.0) else ("s" if r["p"] == 1.0 else "^")
            y = r["test_acc"]["mean"]
            rd = r.get("reading", "first-order")
            fx = r["fidelity"][rd]["agreement"]["mean"]
            ax.scatter([fx], [y], color=col, marker=marker, s=60, edgecolor="k", zorder=3,
                       label=r["label"] + (" (default)" if key == "sqs" else ""))
            if "first-order" in r["fidelity"] and rd != "first-order":
                x1 = r["fidelity"]["first-order"]["agreement"]["mean"]
                ax.scatter([x1], [y], facecolor="none", edgecolor=col, marker=marker, s=60, zorder=2)
                ax.plot([x1, fx], [y, y], color=col, lw=0.6, alpha=0.6)
        ax.set_xlabel("fidelity: surrogate argmax = model argmax (test)\nfilled: the setting's most faithful "
                      "reading (as in the table), hollow: first-order (paper)")
        ax.set_ylabel("test accuracy (1 GLU layer)")
        ax.set_title(f"{DATASET_LABEL[ds]}: accuracy against reading fidelity")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5, loc="best", ncol=1)
    fig.tight_layout()
    return save(fig, path)


def plot_agreement_vs_lambda(agg: dict, base: dict, fig2: dict, path: Path) -> Path | None:
    """Per dataset: agreement with Bilinear at the same init (positive side, mean |cos| ranks 1–5 and top-10
    overlap) and the saturation share against λ (c = 0.01, p = 1), with the baselines as lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sqs.interp.plots import save

    dss = [ds for ds in DATASET_ORDER if ds in agg.get(1, {})]
    if not dss:
        return None
    fig, axes = plt.subplots(2, len(dss), figsize=(6.2 * len(dss), 7.5), squeeze=False, sharex=True)
    for j, ds in enumerate(dss):
        rows = [r for r in agg[1][ds].values() if r["gate"] == "sqs" and r["c"] == 0.01 and r["p"] == 1.0]
        rows.sort(key=lambda r: r["lam"])
        lam = [r["lam"] for r in rows]
        ax = axes[0][j]
        for reading, ls in (("agreement", "-"), ("first-order", ":")):
            pick = [((r.get("agreement") or {}).get(r.get("reading") if reading == "agreement" else "first-order")) for r in rows]
            name = "most faithful reading" if reading == "agreement" else "first-order reading"
            xs = [l for l, a in zip(lam, pick) if a]
            ax.plot(xs, [statistics.fmean([v for v in a["positive_per_rank"][:5] if v is not None]) for a in pick if a],
                    "o" + ls, color="tab:red", label=f"|cos| ranks 1–5, {name}")
            ax.plot(xs, [a["positive_overlap"]["mean"] for a in pick if a], "s" + ls, color="tab:blue",
                    label=f"top-10 overlap, {name}")
        b = (base.get(ds) or {}).get("gain", {})
        for name, col in (("bilinear_same_init", "tab:purple"), ("bilinear_other_init", "tab:gray")):
            if name in b:
                ax.axhline(b[name]["positive"]["overlap"], color=col, ls="--", lw=1,
                           label=f"top-10 overlap, {BASELINE_LABEL[name]}")
        ax.axhline(fig2["cos_min"], color="k", lw=0.8, ls="-.", label=f"paper's floor {fig2['cos_min']}")
        ax.set_ylim(0, 1.02)
        ax.set_title(f"{DATASET_LABEL[ds]}: agreement with Bilinear (same init)")
        ax.set_ylabel("mean over classes (and seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6.5)
        ax = axes[1][j]
        pts = [(r["lam"], r["saturation"][0]["mean"]) for r in rows if r["saturation"][0]["mean"] is not None]
        if pts:  # lam = 0 has no 1/lam scale: no point
            ax.plot(*zip(*pts), "o-", color="tab:red", label="1 layer")
        two = [r for r in agg.get(2, {}).get(ds, {}).values() if r["gate"] == "sqs" and r["c"] == 0.01 and r["p"] == 1.0]
        two.sort(key=lambda r: r["lam"])
        for i, ls in ((0, "--"), (1, ":")):
            pts = [(r["lam"], r["saturation"][i]["mean"]) for r in two
                   if len(r["saturation"]) > i and r["saturation"][i]["mean"] is not None]
            if pts:
                ax.plot(*zip(*pts), "s" + ls, color="tab:orange", label=f"2 layers, layer {i + 1}")
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlabel("λ (c = 0.01, p = 1; λ = 0 is Bilinear with shift c)")
        ax.set_ylabel("share of test |Vx| > 1/λ")
        ax.set_title(f"{DATASET_LABEL[ds]}: saturation")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return save(fig, path)


# ----------------------------------------------------------------------------- the report


def write_report(runs_dir: str | Path, out: str | Path, grid: fr.Grid | None = None, epochs: float | None = None,
                 overrides=(), cache_dir=None, table1_json: str | Path | None = "results/image/table1.json",
                 progress: bool = True, workers: int = 1) -> list[Path]:
    """Analyse the finished runs (cached; `workers` processes) and write table.md, frontier.json and the
    plots to `out`."""
    grid = grid or fr.load_grid()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = collect(runs_dir, grid, epochs=epochs, overrides=overrides, cache_dir=cache_dir, workers=workers)
    agg = aggregate(pairs)
    base = {ds: baselines(runs_dir, grid, ds, cache_dir=cache_dir, out_dir=out) for ds in grid.datasets
            if ds in agg.get(1, {})}
    refs = table1_references(runs_dir, grid, table1_json)
    fig2 = paper_reference()["fig2"]
    a = grid.analysis
    tol, r2_min = float(a.get("cos_top_tol", 0.05)), float(a.get("r2_min", 0.95))
    lines, facts = conclusion(agg, base, fig2, tol, r2_min)
    figs = [plot_accuracy_vs_fidelity(agg, out / "accuracy_vs_fidelity.png"),
            plot_agreement_vs_lambda(agg, base, fig2, out / "agreement_vs_lambda.png")]
    n_done = sum(a is not None for _, a in pairs)
    md = ["# The (c, λ, p) frontier", "",
          f"Grid: {grid.where} ({len(pairs)} runs, {n_done} finished). One SQS parameter at a time around the "
          "paper's default (c = 0.01, λ = 0.5, p = 1): λ ∈ {" + ", ".join(f"{v:g}" for v in grid.sqs_axes.get("lam", []))
          + "} at c = 0.01, p = 1 (λ = 0: Bilinear with shift c); c ∈ {" + ", ".join(f"{v:g}" for v in grid.sqs_axes.get("c", []))
          + "} at λ = 0.5; p ∈ {" + ", ".join(f"{v:g}" for v in grid.sqs_axes.get("p", [])) + "} at λ = 0.5; references "
          + ", ".join(gate_label(g) for g in grid.references) + f". 1 layer: {grid.one_layer.get('config')} "
          f"(batch 2048, 20 epochs), seeds {grid.one_layer.get('seeds')}, same-init baselines (init, data) = "
          f"{grid.one_layer.get('split')}; 2 layers: {grid.two_layer.get('config')} (batch 512, 20 epochs), the non-default "
          f"SQS settings, seeds {grid.two_layer.get('seeds')}.", "",
          "Agreement: per class, eigenvectors of the positive side (λ > 0, largest first) in pixel space, vs the "
          "Bilinear model with the same init and data seeds; mean over classes and seeds. *reading*: the reading of "
          "the SQS model the agreement uses, the one with the highest test logit R² among those measured on every "
          "seed (first-order and gain; the least-squares fit only on "
          f"{a.get('fit_train_images')} training images of seed(s) {a.get('fit_seeds')}). Fidelity on the test set, "
          "readings fitted on training images only. Saturation: share of test pre-activations |Vx| beyond 1/λ.", "",
          "## Conclusion", ""] + [f"- {x}" for x in lines] + [""]
    for ds in DATASET_ORDER:
        if ds in agg.get(1, {}):
            md += [f"## {DATASET_LABEL[ds]}, 1 layer", ""] + one_layer_table(agg[1][ds]) + [""]
            if base.get(ds):
                md += [f"What agreement means ({DATASET_LABEL[ds]}, 1 layer): baselines", ""] + baseline_table(base[ds]) + [""]
    for ds in DATASET_ORDER:
        if ds in agg.get(2, {}) or ds in refs:
            md += [f"## {DATASET_LABEL[ds]}, 2 layers", ""] + two_layer_table(agg.get(2, {}).get(ds, {}), refs.get(ds, {})) + [""]
    md += ["## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figs if p] + [""]
    missing = [str(s.run_dir) for s, an in pairs if an is None]
    if missing:
        md += [f"Unfinished runs ({len(missing)}): re-run the same command to train them.", ""]
    paths = [write_text(out / "table.md", "\n".join(md)),
             write_json(out / "frontier.json", {"grid": grid.where, "runs_dir": str(runs_dir), "n_runs": len(pairs),
                                                "n_finished": n_done, "aggregate": {str(k): v for k, v in agg.items()},
                                                "baselines": base, "references_two_layer": refs,
                                                "conclusion": lines, "facts": facts, "paper_fig2": fig2,
                                                "missing": missing,
                                                "runs": [an for _, an in pairs if an is not None]})]
    return paths + [p for p in figs if p]
