"""The report of the Table 1 grid: collect the run directories, summarise, render.

    write_report("runs", "results/image")             # runs/sec42/<dataset>/<gate>-s<seed>

writes table1.md (mean ± std over seeds at 25/50/75/100 % beside the paper's values,
first gate to 80/85/90 % accuracy, timings), table1.json and curves_<dataset>.png.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sqs.core import GATE_LABEL, GATES, canonical_gate
from sqs.experiments.style import DATASET_LABEL, DATASET_ORDER, GATE_COLOR, STD_NOTE, fmt, pm
from sqs.io import read_jsonl, save_figure, write_json, write_text
from sqs.runs.config_files import config_name, paper_reference
from sqs.runs.naming import gate_key
from sqs.stats import mean_std
from sqs.training.rundir import CONFIG, TIMING, is_complete, read_metrics

GATE_ORDER = GATES
#: One line per `sqs experiment table1` call that trained something, in <runs>/<config>/.
GRID_LOG = "grid_log.jsonl"
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
THRESHOLDS = (0.80, 0.85, 0.90)


# ----------------------------------------------------------------------------- collecting


def collect_runs(runs_dir: str | Path) -> list[dict]:
    """Every image run under `runs_dir`: its config, metrics, completeness and timings.
    Runs written before the gate renaming (`identity`, `silu`) are filed under the new names; a
    gate with non-default parameters is its own setting (`sqs-lam0.1`, as in its run name)."""
    out = []
    for cfg_path in sorted(Path(runs_dir).rglob(CONFIG)):
        run_dir = cfg_path.parent
        try:
            config = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if config.get("kind") != "image":
            continue
        timing = {}
        if (run_dir / TIMING).exists():
            try:
                timing = json.loads((run_dir / TIMING).read_text())
            except json.JSONDecodeError:
                pass
        gate = gate_key(canonical_gate(config["model"]["gate"]), config["model"].get("gate_kwargs"))
        out.append({"run_dir": str(run_dir), "dataset": config["dataset"], "gate": gate,
                    "seed": config["seed"], "config": config, "metrics": read_metrics(run_dir),
                    "complete": is_complete(run_dir), "timing": timing})
    return out


def _signature(config: dict) -> str:
    """What must agree for runs to be shown together (all but dataset, gate and its parameters, seed)."""
    c = {k: v for k, v in config.items() if k not in ("dataset", "seed", "resolved", "kind")}
    c["model"] = {k: v for k, v in c["model"].items() if k not in ("gate", "gate_kwargs")}
    return json.dumps(c, sort_keys=True)


def _seed_stats(xs: list[float]) -> dict:
    """Mean and sample std (`sqs.stats.mean_std`), min, max and n over seeds."""
    st = mean_std(xs)
    return {"mean": st["mean"], "std": st["std"], "min": min(xs), "max": max(xs), "n": st["n"]}


def settings(cells: dict, ds: str) -> list[str]:
    """The settings with a cell for dataset `ds` (a gate, or a gate with its tag: `sqs-lam0.1`), the
    paper's gates first in its order, each gate's tagged settings after it."""
    keys = [k.split("/", 1)[1] for k in cells if k.split("/", 1)[0] == ds]
    return sorted(keys, key=_setting_order)


def _setting_order(key: str) -> tuple:
    gate = key.split("-", 1)[0]
    return (GATE_ORDER.index(gate) if gate in GATE_ORDER else 99, key != gate, key)


def setting_label(key: str) -> str:
    """`SQS`, `SQS (lam0.1)`: the paper's gate label and the tag of non-default parameters."""
    gate, _, tag = key.partition("-")
    return GATE_LABEL.get(gate, gate) + (f" ({tag})" if tag else "")


def _mean_curve(runs: list[dict], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """Steps present in every run, and the mean / min / max of `key` over runs there."""
    per = [{m["step"]: m[key] for m in r["metrics"] if m.get(key) is not None} for r in runs]
    steps = sorted(set.intersection(*(set(p) for p in per))) if per else []
    vals = [[p[s] for p in per] for s in steps]
    return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def first_crossing(steps: list[int], values: list[float], thr: float) -> tuple[int, float] | None:
    """(first evaluated step with value >= thr, linearly interpolated crossing step)."""
    for i, (s, v) in enumerate(zip(steps, values)):
        if v >= thr:
            if i == 0:
                return s, float(s)
            s0, v0 = steps[i - 1], values[i - 1]
            return s, s0 + (thr - v0) / (v - v0) * (s - s0) if v != v0 else float(s)
    return None


def summarize(runs: list[dict]) -> dict:
    """Group complete runs by (dataset, gate); statistics at the fractions; curves; thresholds."""
    complete = [r for r in runs if r["complete"]]
    sigs: dict[str, int] = {}
    for r in complete:
        sigs[_signature(r["config"])] = sigs.get(_signature(r["config"]), 0) + 1
    main_sig = max(sigs, key=sigs.get) if sigs else None
    used = [r for r in complete if _signature(r["config"]) == main_sig]
    excluded = [r["run_dir"] for r in complete if _signature(r["config"]) != main_sig]
    cells: dict[tuple[str, str], list[dict]] = {}
    for r in used:
        cells.setdefault((r["dataset"], r["gate"]), []).append(r)
    datasets = [d for d in DATASET_ORDER if any(k[0] == d for k in cells)] + sorted(
        {k[0] for k in cells} - set(DATASET_ORDER))
    out: dict[str, Any] = {"datasets": datasets, "cells": {}, "records": [], "thresholds": {},
                           "incomplete": sorted(r["run_dir"] for r in runs if not r["complete"]),
                           "excluded_other_config": excluded,
                           "config": json.loads(main_sig) if main_sig else None,
                           "example_config": used[0]["config"] if used else None}
    for (ds, gate), rs in sorted(cells.items()):
        rs.sort(key=lambda r: r["seed"])
        cell = {"seeds": [r["seed"] for r in rs], "fractions": {}}
        for f in FRACTIONS:
            recs = [next((m for m in r["metrics"] if m.get("fraction") == f), None) for r in rs]
            recs_ok = [(r, m) for r, m in zip(rs, recs) if m is not None]
            for r, m in recs_ok:
                out["records"].append({"dataset": ds, "gate": gate, "seed": r["seed"], "fraction": f,
                                       "step": m["step"], "test_loss": m["test_loss"], "test_acc": m["test_acc"]})
            if recs_ok:
                cell["fractions"][f] = {"step": recs_ok[0][1]["step"],
                                        "test_loss": _seed_stats([m["test_loss"] for _, m in recs_ok]),
                                        "test_acc": _seed_stats([m["test_acc"] for _, m in recs_ok])}
        for key in ("test_loss", "test_acc"):
            cell[key + "_curve"] = dict(zip(("steps", "mean", "min", "max"), _mean_curve(rs, key)))
        cell["timing"] = [{"seed": r["seed"], "train_s": (r["metrics"][-1].get("elapsed_s") if r["metrics"] else None),
                           "wall_s": r["timing"].get("wall_s"), "threads": r["timing"].get("threads"),
                           "steps": r["metrics"][-1]["step"] if r["metrics"] else None} for r in rs]
        out["cells"][f"{ds}/{gate}"] = cell
    for ds in datasets:
        th = {}
        for thr in THRESHOLDS:
            per_gate = {}
            for gate in settings(out["cells"], ds):
                cell = out["cells"].get(f"{ds}/{gate}")
                if cell is None:
                    continue
                c = cell["test_acc_curve"]
                hit = first_crossing(c["steps"], c["mean"], thr)
                per_gate[gate] = None if hit is None else {"step": hit[0], "interpolated": hit[1]}
            reached = {g: v for g, v in per_gate.items() if v is not None}
            first = sorted(reached, key=lambda g: (reached[g]["interpolated"], reached[g]["step"]))
            th[str(thr)] = {"per_gate": per_gate, "first": first[0] if first else None,
                            "first_by_eval_step": sorted(g for g in reached if reached[g]["step"] == min(
                                v["step"] for v in reached.values())) if reached else []}
        out["thresholds"][ds] = th
    return out


# ----------------------------------------------------------------------------- writing


def _signed(x: float, nd: int = 4) -> str:
    return f"{x:+.{nd}f}".replace("-", "−")


def _ranking(vals: dict[str, float], reverse: bool = False) -> str:
    order = sorted(vals, key=vals.get, reverse=reverse)
    return (" > " if reverse else " < ").join(setting_label(g) for g in order)


def render_markdown(s: dict, paper: dict, grid_log: list[dict]) -> str:
    L: list[str] = []
    cfg = s["example_config"]
    L.append("# Table 1 and Fig. 3 (paper Sec. 4.2): test loss and accuracy of the GLU gates\n")
    if cfg is None:
        L.append("No finished runs found.\n")
        return "\n".join(L)
    m, res = cfg["model"], cfg.get("resolved", {})
    tr = res.get("train", {})
    L.append(f"Setup: embed 784→{m['d_model']}, {m['n_layers']} GLU layers (d_hidden {m['d_hidden']}, "
             f"residual={'yes' if m['residual'] else 'no'}, norm={m['norm']}, no bias), head →10; "
             f"batch {cfg['batch_size']}, {cfg['epochs']} epochs = {tr.get('steps', '?')} AdamW steps "
             f"(lr {tr.get('lr')}, wd {tr.get('weight_decay')}, cosine to {tr.get('min_lr')}), "
             f"Gaussian input noise std {cfg['noise_std']}"
             + (" × the training pixels' std (the paper's 'std 1.0' read on normalised inputs: 0.31 on MNIST, "
                "0.35 on Fashion-MNIST in [0,1] pixel units; see configs/image/sec42.toml)"
                if cfg.get("noise_relative") else " on [0,1] pixels")
             + (f", applied to a random {cfg['noise_prob']:.0%} of the images" if cfg.get("noise_prob", 1.0) < 1 else "")
             + " in training; test set evaluated every "
             f"{tr.get('eval_every')} steps"
             + (f" and every {cfg['early_eval_every']} steps up to step {cfg['early_eval_until']}"
                if cfg.get("early_eval_every") else "") + ".\n")
    L.append(f"Ours: {STD_NOTE} over seeds (n per cell below). Paper: mean of 5 seeds, reference values "
             "of the paper's Table 1 (`sqs/configs/reference/paper.toml`). Δ = ours − paper.\n")
    fr_hdr = " | ".join(f"{int(f * 100)}%" for f in FRACTIONS)
    for ds in s["datasets"]:
        L.append(f"## {DATASET_LABEL.get(ds, ds)}\n")
        pds = paper.get(ds, {})
        for key, label in (("test_loss", "Test loss"), ("test_acc", "Test accuracy")):
            pkey = "loss" if key == "test_loss" else "acc"
            L.append(f"### {label}\n")
            L.append(f"| Gate | | {fr_hdr} |")
            L.append("|---|---|" + "---|" * len(FRACTIONS))
            for gate in settings(s["cells"], ds):
                cell = s["cells"].get(f"{ds}/{gate}")
                if cell is None:
                    continue
                n = len(cell["seeds"])
                ours, pap, dif = [], [], []
                for i, f in enumerate(FRACTIONS):
                    st = cell["fractions"].get(f, {}).get(key)
                    pv = pds.get(gate, {}).get(pkey, [None] * 4)[i]
                    ours.append(pm(st) if st else "—")
                    pap.append(fmt(pv))
                    dif.append(_signed(st["mean"] - pv) if (st and pv is not None) else "—")
                L.append(f"| {setting_label(gate)} | ours (n={n}) | " + " | ".join(ours) + " |")
                if pds:
                    L.append("| | paper | " + " | ".join(pap) + " |")
                    L.append("| | Δ | " + " | ".join(dif) + " |")
            L.append("")
        # rankings and the paper's claims
        for f in (0.25, 1.0):
            ours_l = {g: s["cells"][f"{ds}/{g}"]["fractions"][f]["test_loss"]["mean"] for g in settings(s["cells"], ds)
                      if f in s["cells"].get(f"{ds}/{g}", {}).get("fractions", {})}
            i = FRACTIONS.index(f)
            pap_l = {g: v["loss"][i] for g, v in pds.items() if g in ours_l}
            if ours_l:
                L.append(f"- Test loss ranking at {int(f * 100)}%: ours {_ranking(ours_l)}"
                         + (f"; paper {_ranking(pap_l)}" if pap_l else ""))
        claims = []
        for f in FRACTIONS:
            c = {g: s["cells"].get(f"{ds}/{g}", {}).get("fractions", {}).get(f) for g in ("sqs", "relu", "bilinear")}
            if all(c.values()):
                claims.append(c["sqs"]["test_loss"]["mean"] < min(c["relu"]["test_loss"]["mean"],
                                                                 c["bilinear"]["test_loss"]["mean"]))
        if claims:
            L.append(f"- Paper: SQS has lower test loss than ReLU and Bilinear at every checkpoint → ours: "
                     f"{'holds' if all(claims) else 'does not hold'} "
                     f"({sum(claims)}/{len(claims)} checkpoints)")
        L.append("")
        # thresholds
        th = s["thresholds"].get(ds, {})
        if th:
            gates_here = settings(s["cells"], ds)
            L.append(f"### First to reach 80 / 85 / 90% test accuracy ({DATASET_LABEL.get(ds, ds)})\n")
            L.append("Mean accuracy curve over seeds; cell: first evaluated step at or above the threshold "
                     "(linearly interpolated crossing in parentheses). Paper: SQS is the first to reach "
                     "80%, 85% and 90%.\n")
            L.append("| Threshold | " + " | ".join(setting_label(g) for g in gates_here) + " | first |")
            L.append("|---|" + "---|" * (len(gates_here) + 1))
            for thr in THRESHOLDS:
                t = th[str(thr)]
                cells = []
                for g in gates_here:
                    v = t["per_gate"].get(g)
                    cells.append("not reached" if v is None else f"{v['step']} (~{v['interpolated']:.0f})")
                first = setting_label(t["first"]) if t["first"] else "none"
                tied = t["first_by_eval_step"]
                if len(tied) > 1:
                    first += f" (same eval step: {', '.join(setting_label(g) for g in tied)})"
                L.append(f"| {int(thr * 100)}% | " + " | ".join(cells) + f" | {first} |")
            L.append("")
        L.append(f"Curves: `curves_{ds}.png` (mean over seeds, band = min–max).\n")
    # timing
    L.append("## Timing\n")
    if grid_log:
        L.append("| started | runs finished | skipped (already done) | workers × threads | wall time | failed | |")
        L.append("|---|---|---|---|---|---|---|")
        for g in grid_log:
            L.append(f"| {g.get('started')} | {g.get('n_trained')} | {g.get('n_skipped')} | "
                     f"{g.get('workers')} × {g.get('threads')} | {_dur(g.get('wall_s'))} | "
                     f"{len(g.get('failed', []))} | {'interrupted' if g.get('interrupted') else ''} |")
        total = sum(g.get("wall_s") or 0 for g in grid_log)
        L.append(f"\nTotal grid wall time (all invocations): {_dur(total)}.\n")
    else:
        L.append(f"No {GRID_LOG} in the runs directory (runs trained one by one).\n")
    rows = []
    for key, cell in sorted(s["cells"].items(), key=lambda kv: (_order(kv[0]))):
        ds, gate = key.split("/")
        for t in cell["timing"]:
            rows.append((ds, gate, t))
    if rows:
        walls = [t["wall_s"] for _, _, t in rows if t["wall_s"]]
        trains = [t["train_s"] for _, _, t in rows if t["train_s"]]
        if walls:
            L.append(f"Per run: {len(rows)} runs, wall time mean {_dur(sum(walls) / len(walls))} "
                     f"(min {_dur(min(walls))}, max {_dur(max(walls))}), sum {_dur(sum(walls))}; "
                     f"training-only time (excludes evaluation) mean {_dur(sum(trains) / max(1, len(trains)))}.\n")
        L.append("| dataset | gate | seed | steps | train s | wall s | threads | ms/step |")
        L.append("|---|---|---|---|---|---|---|---|")
        for ds, gate, t in rows:
            ms = (1000 * t["train_s"] / t["steps"]) if (t["train_s"] and t["steps"]) else None
            L.append(f"| {ds} | {setting_label(gate)} | {t['seed']} | {t['steps']} | {fmt(t['train_s'], 1)} | "
                     f"{fmt(t['wall_s'], 1)} | {t['threads'] or '—'} | {fmt(ms, 1)} |")
        L.append("")
    if s["incomplete"]:
        L.append(f"Unfinished runs (not in the tables): {len(s['incomplete'])}: "
                 + ", ".join(f"`{d}`" for d in s["incomplete"][:20]) + "\n")
    if s["excluded_other_config"]:
        L.append("Finished runs made with another config (left out): "
                 + ", ".join(f"`{d}`" for d in s["excluded_other_config"][:20]) + "\n")
    return "\n".join(L)


def _order(key: str) -> tuple:
    ds, gate = key.split("/")
    return (DATASET_ORDER.index(ds) if ds in DATASET_ORDER else 99,) + _setting_order(gate)


def _dur(sec: float | None) -> str:
    if sec is None:
        return "—"
    sec = float(sec)
    if sec < 120:
        return f"{sec:.1f} s"
    return f"{int(sec // 60)} min {sec % 60:02.0f} s"


def plot_curves(s: dict, ds: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    lo_acc, hi_acc = 1.0, 0.0
    for gate in settings(s["cells"], ds):
        cell = s["cells"].get(f"{ds}/{gate}")
        if cell is None:
            continue
        n = len(cell["seeds"])
        color, ls = GATE_COLOR.get(gate.split("-", 1)[0], "k"), "-" if "-" not in gate else "--"
        for ax, key in zip(axes, ("test_loss", "test_acc")):
            c = cell[key + "_curve"]
            if not c["steps"]:
                continue
            ax.plot(c["steps"], c["mean"], color=color, ls=ls, lw=1.6, label=f"{setting_label(gate)} (n={n})")
            ax.fill_between(c["steps"], c["min"], c["max"], color=color, alpha=0.18, lw=0)
        c = cell["test_acc_curve"]
        if c["steps"]:  # zoom past the first 5% of training, keeping the 80% line in view
            cut = c["steps"][-1] * 0.05
            late = [v for st, v in zip(c["steps"], c["mean"]) if st >= cut] or c["mean"]
            lo_acc, hi_acc = min(lo_acc, min(late)), max(hi_acc, max(c["max"]))
    axes[0].set_yscale("log")
    axes[0].set_ylabel("test loss (cross-entropy)")
    axes[1].set_ylabel("test accuracy")
    if hi_acc > 0:
        axes[1].set_ylim(max(0.0, min(THRESHOLDS[0], lo_acc) - 0.02), min(1.0, max(hi_acc, THRESHOLDS[-1]) + 0.01))
    for thr in THRESHOLDS:
        axes[1].axhline(thr, color="0.6", lw=0.7, ls=":")
    for ax in axes:
        ax.set_xlabel("iteration (optimizer step)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"{DATASET_LABEL.get(ds, ds)}: test loss and accuracy vs iteration (mean over seeds, min–max band)")
    fig.tight_layout()
    save_figure(fig, path)
    return path


def read_grid_log(runs_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(runs_dir) / GRID_LOG)


def write_report(runs_dir: str | Path, out_dir: str | Path, config: str = "sec42") -> dict[str, Path]:
    """table1.md, table1.json and curves_<dataset>.png from the run directories alone
    (those under `runs_dir/<config name>/`)."""
    out_dir = Path(out_dir)
    runs_dir = Path(runs_dir) / config_name(config)
    runs = collect_runs(runs_dir)
    s = summarize(runs)
    paper = paper_reference()["table1"]
    grid_log = read_grid_log(runs_dir)
    paths = {"md": write_text(out_dir / "table1.md", render_markdown(s, paper, grid_log))}
    cells = {k: {kk: vv for kk, vv in c.items() if not kk.endswith("_curve")} for k, c in s["cells"].items()}
    doc = {"description": "Paper Table 1 (Sec. 4.2) reproduction: one record per dataset, gate, seed and fraction "
                          "of training; summary has mean/std over seeds; paper = the paper's Table 1 values",
           "runs_dir": str(runs_dir), "config": s["example_config"], "records": s["records"],
           "summary": {k: {"seeds": c["seeds"], "fractions": {str(f): v for f, v in c["fractions"].items()},
                           "timing": c["timing"]} for k, c in cells.items()},
           "first_to_threshold": s["thresholds"],
           "curves": {k: {"test_loss": c["test_loss_curve"], "test_acc": c["test_acc_curve"]}
                      for k, c in s["cells"].items()},
           "paper": {k: v for k, v in paper.items() if k in DATASET_ORDER},
           "grid_log": grid_log, "incomplete": s["incomplete"]}
    paths["json"] = write_json(out_dir / "table1.json", doc)
    for ds in s["datasets"]:
        paths[f"curves_{ds}"] = plot_curves(s, ds, out_dir / f"curves_{ds}.png")
    return paths
