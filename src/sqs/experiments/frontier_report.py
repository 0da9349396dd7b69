"""The frontier's report: results/frontier/{table.md, frontier.json, accuracy_vs_fidelity.png, agreement_vs_lambda.png}.

    write_report("runs", "results/frontier", load_grid())      # from the run directories
    rerender("results/frontier")                                # from frontier.json alone

`write_report` collects the finished runs' cached analyses, the agreement baselines and the
2-layer references (`sqs.experiments.frontier_analysis`) into what frontier.json holds;
`render` turns that into the tables, the conclusion and the figures, so a report can be
re-made from its JSON when the report changes but the runs are gone. Every sentence of the
conclusion is computed from the numbers (`conclusion`); every ± is a sample std over seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

from sqs.experiments.agreement_baselines import baseline_table
from sqs.experiments.frontier import GRID, Grid, Setting, load_grid
from sqs.experiments.frontier_analysis import CHEAP_READINGS, baselines, collect, table1_references
from sqs.experiments.frontier_plots import ordered_rows, plot_accuracy_vs_fidelity, plot_agreement_vs_lambda
from sqs.experiments.style import DATASET_LABEL, DATASET_ORDER, STD_NOTE, fmt, gate_label, pm
from sqs.io import write_json, write_text
from sqs.runs.config_files import config_name, paper_reference
from sqs.stats import mean_std

#: The reading the agreement is read with when no better one is measured on every seed.
FALLBACK_READING = "first-order"


# ----------------------------------------------------------------------------- aggregating


def _reading_of(rows: list[dict]) -> str:
    """The most faithful reading measured on every seed of a setting: highest mean logit R²."""
    common = None
    for r in rows:
        have = set((r.get("fidelity") or {}).keys()) & set(CHEAP_READINGS)
        common = have if common is None else common & have
    if not common:
        return FALLBACK_READING
    return max(sorted(common), key=lambda x: (mean_std([r["fidelity"][x]["logit_r2"] for r in rows])["mean"] or -math.inf,
                                              x == FALLBACK_READING))


def aggregate(analyses: list[dict], settings: dict[str, Setting]) -> dict:
    """{layers: {dataset: {setting key: row}}} over the unsplit seeds of each setting, from the runs'
    analyses (`frontier_analysis.analyse`) and the grid's settings by key."""
    groups: dict = {}
    for a in analyses:
        if a["init_seed"] != a["seed"] or a["data_seed"] != a["seed"]:  # a same-init baseline
            continue
        groups.setdefault((a["layers"], a["dataset"], a["setting"]), []).append(a)
    out: dict = {}
    for (layers, ds, key), rows in groups.items():
        st = settings[key]
        row: dict[str, Any] = {"setting": key, "label": st.label, "gate": st.gate, "c": st.value("c"),
                               "lam": st.value("lam"), "p": st.value("p"), "seeds": sorted(r["seed"] for r in rows),
                               "test_acc": mean_std([r["test_acc"] for r in rows]),
                               "test_loss": mean_std([r["test_loss"] for r in rows])}
        n_layers = len(rows[0]["saturation"])
        row["saturation"] = [mean_std([r["saturation"][i] for r in rows]) for i in range(n_layers)]
        if any(r.get("fidelity") for r in rows):
            readings = sorted({x for r in rows for x in (r.get("fidelity") or {})},
                              key=lambda x: ("first-order", "gain", "fit").index(x))
            row["fidelity"] = {x: {m: mean_std([r["fidelity"][x][m] for r in rows if x in r.get("fidelity", {})])
                                   for m in ("surrogate_acc", "agreement", "logit_r2", "logit_r2_scaled")}
                               for x in readings}
            for x in readings:
                row["fidelity"][x]["top10_acc"] = mean_std([r["fidelity"][x]["truncated"]["10"]["acc"]
                                                       for r in rows if x in r.get("fidelity", {})])
            row["reading"] = _reading_of(rows)
            row["exact"] = bool(rows[0]["fidelity"][readings[0]].get("exact"))
        if any(r.get("agreement") for r in rows):
            row["agreement"] = {}
            for x in sorted({x for r in rows for x in (r.get("agreement") or {})}):
                rs = [r["agreement"][x] for r in rows if x in (r.get("agreement") or {})]
                row["agreement"][x] = {
                    "n_pairs": len(rs),
                    "positive_per_rank": [mean_std([r["positive"]["per_rank"][i] for r in rs])["mean"] for i in range(len(rs[0]["positive"]["per_rank"]))],
                    "positive_best_match": [mean_std([r["positive"]["best_match"][i] for r in rs])["mean"] for i in range(len(rs[0]["positive"]["best_match"]))],
                    "positive_overlap": mean_std([r["positive"]["overlap"] for r in rs]),
                    "form_cosine": mean_std([r["form_cosine"] for r in rs])}
        out.setdefault(layers, {}).setdefault(ds, {})[key] = row
    return out


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


def _sat(row: dict) -> str:
    vals = [fmt(s["mean"], 3) for s in row["saturation"] if s["mean"] is not None]
    return " / ".join(vals) if vals else "—"


def one_layer_table(rows: dict) -> list[str]:
    out = ["| setting | seeds | test acc | test loss | share \\|Vx\\| > 1/λ | reading | agreement ranks 1–5 (positive side) "
           "| best match 1–5 | top-10 overlap | form cos | agreement ranks 1–5, first-order | surrogate acc: first-order / gain / fit "
           "| logit R²: first-order / gain / fit |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in ordered_rows(rows):
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
        out.append(f"| {r['label']} | {len(r['seeds'])} | {pm(r['test_acc'])} | {pm(r['test_loss'])} | {_sat(r)} "
                   f"| {reading if fid else '—'} | {ranks(ag)} | {ranks(ag, 'positive_best_match')} "
                   f"| {pm(ag['positive_overlap'], 3) if ag else '—'} | {pm(ag['form_cosine'], 3) if ag else '—'} "
                   f"| {ranks(ag1)} | {surr} | {r2s} |")
    return out


def two_layer_table(rows: dict, refs: dict) -> list[str]:
    out = ["| setting | seeds | test acc | test loss | share \\|Vx\\| > 1/λ (layer 1 / 2) |", "|---|---|---|---|---|"]
    for gate, ref in refs.items():
        out.append(f"| {gate_label(gate)}{' (default)' if gate == 'sqs' else ''} (reference: {ref['source']}) "
                   f"| {ref['test_acc'].get('n', '—')} | {pm(ref['test_acc'])} | {pm(ref['test_loss'])} | — |")
    for key, r in ordered_rows(rows):
        out.append(f"| {r['label']} | {len(r['seeds'])} | {pm(r['test_acc'])} | {pm(r['test_loss'])} | {_sat(r)} |")
    return out


# ----------------------------------------------------------------------------- the report


def write_report(runs_dir: str | Path, out: str | Path, grid: Grid | None = None, epochs: float | None = None,
                 overrides=(), cache_dir=None, table1_json: str | Path | None = "results/image/table1.json",
                 progress: bool = True, workers: int = 1) -> list[Path]:
    """Analyse the finished runs (cached; `workers` processes) and write table.md, frontier.json and the
    plots to `out`."""
    grid = grid or load_grid()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    pairs = collect(runs_dir, grid, epochs=epochs, overrides=overrides, cache_dir=cache_dir, workers=workers)
    analyses = [an for _, an in pairs if an is not None]
    datasets = {a["dataset"] for a in analyses if a["layers"] == 1 and a["init_seed"] == a["seed"] == a["data_seed"]}
    data = {"grid": grid.where, "runs_dir": str(runs_dir), "n_runs": len(pairs), "n_finished": len(analyses),
            "baselines": {ds: baselines(runs_dir, grid, ds, cache_dir=cache_dir, out_dir=out)
                          for ds in grid.datasets if ds in datasets},
            "references_two_layer": table1_references(runs_dir, grid, table1_json),
            "missing": [str(s.run_dir) for s, an in pairs if an is None], "runs": analyses}
    return render(data, grid, out)


def rerender(out: str | Path, grid: Grid | None = None) -> list[Path]:
    """Re-make the report in `out` from its frontier.json alone (the runs' analyses, baselines and
    references it holds), e.g. after a change to the tables; the grid is the one it names."""
    out = Path(out)
    data = json.loads((out / "frontier.json").read_text())
    return render(data, grid or load_grid(config_name(data.get("grid", GRID))), out)


def render(data: dict, grid: Grid, out: Path) -> list[Path]:
    """table.md, frontier.json and the figures from the collected data (see `write_report`)."""
    out.mkdir(parents=True, exist_ok=True)
    agg = aggregate(data["runs"], {s.key: s for s in grid.settings()})
    base, refs = data["baselines"], data["references_two_layer"]
    fig2 = paper_reference()["fig2"]
    a = grid.analysis
    tol, r2_min = float(a.get("cos_top_tol", 0.05)), float(a.get("r2_min", 0.95))
    lines, facts = conclusion(agg, base, fig2, tol, r2_min)
    figs = [plot_accuracy_vs_fidelity(agg, out / "accuracy_vs_fidelity.png"),
            plot_agreement_vs_lambda(agg, base, fig2, out / "agreement_vs_lambda.png")]
    md = ["# The (c, λ, p) frontier", "",
          f"Grid: {grid.where} ({data['n_runs']} runs, {data['n_finished']} finished). One SQS parameter at a time around the "
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
          "readings fitted on training images only. Saturation: share of test pre-activations |Vx| beyond 1/λ. "
          f"Columns with ±: {STD_NOTE} over the seeds (the column *seeds*).", "",
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
    if data["missing"]:
        md += [f"Unfinished runs ({len(data['missing'])}): re-run the same command to train them.", ""]
    paths = [write_text(out / "table.md", "\n".join(md)),
             write_json(out / "frontier.json", {"grid": grid.where, "runs_dir": data["runs_dir"], "n_runs": data["n_runs"],
                                                "n_finished": data["n_finished"], "aggregate": {str(k): v for k, v in agg.items()},
                                                "baselines": base, "references_two_layer": refs,
                                                "conclusion": lines, "facts": facts, "paper_fig2": fig2,
                                                "missing": data["missing"], "runs": data["runs"]})]
    return paths + [p for p in figs if p]
