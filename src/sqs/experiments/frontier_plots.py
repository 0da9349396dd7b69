"""The frontier's two figures: accuracy against reading fidelity, agreement and saturation against λ."""

from __future__ import annotations

import statistics
from pathlib import Path

from sqs.experiments.agreement_baselines import BASELINE_LABEL
from sqs.experiments.style import DATASET_LABEL, DATASET_ORDER, GATE_COLOR, gate_label
from sqs.interp.plots import save


def ordered_rows(rows: dict):
    """Rows of one table in reading order: SQS settings (λ axis, then c, then p), then the references."""
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
        for key, r in ordered_rows(rows):
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
