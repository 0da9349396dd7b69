"""The LM spectra experiment's report: summary.md (tables and a verdict computed from the numbers),
summary.json and figures, plus the one-direction figure of `sqs spectra lm`."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np

from sqs.experiments.style import GATE_COLOR, fmt, gate_label
from sqs.io import save_figure, write_json, write_text

FAITHFUL_R2 = 0.9  # a reading "reproduces" a layer's direct contribution when R^2 >= this
TOP_RANKS = 5  # agreement summaries average the first TOP_RANKS ranks of a side
PAIR_LABELS = ("sqs-s0 vs bilinear-s0", "sqs-s0 vs sqs-s1")
MODEL_ORDER = ("bilinear-s0", "sqs-s0", "sqs-s1")


def slug(text: str) -> str:
    """A file-name-safe name of a token ('.' -> 'dot', ' happy' -> 'happy')."""
    s = re.sub(r"[^A-Za-z0-9]+", "_", text.strip()).strip("_")
    names = {".": "dot", ",": "comma", "!": "bang", "?": "question", "": "space"}
    return s or names.get(text.strip(), "tok" + "_".join(str(ord(c)) for c in text))


def _tok(t: str) -> str:
    return repr(t).replace("|", "\\|")


def _toks(ts: list[str], n: int = 6) -> str:
    return " ".join(_tok(t) for t in ts[:n])


def _ends(row: dict | None, n: int = 5) -> str:
    return "—" if row is None else f"+ {_toks(row['plus'], n)} / − {_toks(row['minus'], n)}"


# ----------------------------------------------------------------------------- figures


def _draw_spectrum(ax, lam: list[float], color: str, title: str) -> None:
    lam = np.asarray(lam)
    ax.bar(np.arange(len(lam)), lam, width=1.0, color=np.where(lam >= 0, "tab:red", "tab:blue"))
    ax.axhline(0, color="k", lw=0.6)
    ax.set_title(title, fontsize=9, color=color)
    ax.set_xlabel("eigenvalue index (signed order)", fontsize=8)
    ax.tick_params(labelsize=7)


def _token_text(res: dict, n_vec: int = 2, n_tok: int = 4) -> str:
    lines = []
    for side, mark in (("positive", "+"), ("negative", "−")):
        for row in res["sides"][side][:n_vec]:
            lines.append(f"λ{mark}{row['rank']} = {row['eigenvalue']:+.3g}")
            lines.append("  + " + " ".join(repr(t) for t in row["plus"][:n_tok]))
            lines.append("  − " + " ".join(repr(t) for t in row["minus"][:n_tok]))
    return "\n".join(lines) or "(no eigenvalues)"


def plot_reading(res: dict, path) -> Path:
    """One direction at one layer: the signed spectrum beside the top eigenvectors' tokens."""
    import matplotlib.pyplot as plt

    fig, (ax, tx) = plt.subplots(1, 2, figsize=(12, 4.2), gridspec_kw={"width_ratios": [1, 1.4]})
    _draw_spectrum(ax, res["eigenvalues"], "k", f"layer {res['layer']} ({gate_label(res['gate'])}): spectrum of B_u, "
                   f"u = token {res['token']!r}")
    tx.axis("off")
    lines = []
    for side, mark in (("positive", "+"), ("negative", "−")):
        for row in res["sides"][side]:
            lines.append(f"λ{mark}{row['rank']} = {row['eigenvalue']:+.3g}  ({100 * row['share']:.0f}% of Σ|λ|)")
            lines.append("   + end: " + " ".join(repr(t) for t in row["plus"][:7]))
            lines.append("   − end: " + " ".join(repr(t) for t in row["minus"][:7]))
    tx.text(0, 1, "\n".join(lines), va="top", ha="left", family="monospace", fontsize=8, transform=tx.transAxes)
    tx.set_title("top eigenvectors read as tokens (tokens whose embedding projects most on q)", fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_direction(L_by_layer: list[dict], j: int, models: list[str], path) -> Path:
    """Direction j at every layer (rows) for each model (columns): spectrum + top tokens of each side."""
    import matplotlib.pyplot as plt

    n = len(L_by_layer)
    fig, axes = plt.subplots(n, 2 * len(models), figsize=(9.5 * len(models), 2.3 * n), squeeze=False,
                             gridspec_kw={"width_ratios": [1, 1.9] * len(models)})
    for r, L in enumerate(L_by_layer):
        for c, name in enumerate(models):
            res = L["models"][name]["reads"][j]
            _draw_spectrum(axes[r, 2 * c], res["eigenvalues"], GATE_COLOR.get(res["gate"], "k"),
                           f"{name}, layer {L['layer']}")
            t = axes[r, 2 * c + 1]
            t.axis("off")
            t.text(0.02, 1, _token_text(res), va="top", ha="left", family="monospace", fontsize=7,
                   transform=t.transAxes)
            if r < n - 1:
                axes[r, 2 * c].set_xlabel("")
    d = L_by_layer[0]["directions"][j]
    fig.suptitle(f"B_u for u = token {d['token']!r}: signed spectrum and the tokens at both ends (+/−) of the top "
                 "two eigenvectors per side", fontsize=10)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_fidelity(res: dict, path) -> Path:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    layers = [L["layer"] for L in res["layers"]]
    for name in _models(res):
        for reading, ls in (("first_order", "-"), ("gain", "--")):
            if name.startswith("bilinear") and reading == "gain":
                continue
            ys = [L["models"][name]["fidelity"][reading]["r2"] for L in res["layers"]]
            gate = res["layers"][0]["models"][name]["gate"]
            ax.plot(layers, ys, ls, marker="o", color=GATE_COLOR.get(gate, "k"),
                    alpha=1.0 if name.endswith("s0") else 0.5, label=f"{name} {reading.replace('_', '-')}")
    ax.axhline(FAITHFUL_R2, color="grey", lw=0.6, ls=":")
    ax.set_xlabel("layer")
    ax.set_xticks(layers)
    ax.set_ylabel("R² of u·MLP(n) (direct contribution)")
    ax.set_ylim(min(0.0, ax.get_ylim()[0]), 1.02)
    ax.legend(fontsize=7)
    ax.set_title("how much of each layer's direct contribution the quadratic form reproduces", fontsize=9)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


def plot_agreement(res: dict, path) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, side in zip(axes, ("positive", "negative")):
        for label, ls in zip(PAIR_LABELS, ("-", "--")):
            s = res["agreement"].get(label)
            if not s:
                continue
            for m, marker in (("best_match", "o"), ("per_rank", "x")):
                y = [np.nan if v is None else v for v in s[side][m]["mean"]]
                ax.plot(range(1, len(y) + 1), y, ls, marker=marker, label=f"{label}: {m.replace('_', ' ')}")
        ax.set_title(f"{side} side", fontsize=9)
        ax.set_xlabel("rank")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("|corr| of token profiles")
    axes[0].legend(fontsize=7)
    fig.suptitle("eigenvector agreement in token space (mean over directions and layers)", fontsize=10)
    fig.tight_layout()
    out = save_figure(fig, path)
    plt.close(fig)
    return out


# ----------------------------------------------------------------------------- summary


def _models(res: dict) -> list[str]:
    have = res["layers"][0]["models"]
    return [m for m in MODEL_ORDER if m in have]


def _top_mean(stat: dict, n: int = TOP_RANKS) -> float:
    vals = [v for v in stat["mean"][:n] if v is not None]
    return float(np.mean(vals)) if vals else math.nan


def verdict(res: dict) -> list[str]:
    """Sentences computed from the measured numbers."""
    out = []
    layers = res["layers"]
    bil = [L["models"]["bilinear-s0"]["fidelity"]["first_order"]["r2"] for L in layers]
    out.append(f"Bilinear is read exactly: R² ≥ {min(bil):.6f} at every layer (the quadratic form is the layer)."
               if min(bil) > 0.999 else f"Bilinear's R² is only {min(bil):.4f} at worst: check float precision.")
    fo = [L["models"]["sqs-s0"]["fidelity"]["first_order"]["r2"] for L in layers]
    gn = [L["models"]["sqs-s0"]["fidelity"]["gain"]["r2"] for L in layers]
    good = [L["layer"] for L, g in zip(layers, gn) if g >= FAITHFUL_R2]
    bad = [L["layer"] for L, g in zip(layers, gn) if g < FAITHFUL_R2]
    out.append(f"SQS, first-order reading: R² {min(fo):.3f}–{max(fo):.3f} over layers; gain reading "
               f"{min(gn):.3f}–{max(gn):.3f}. Read faithfully (gain R² ≥ {FAITHFUL_R2}) at layer(s) "
               f"{', '.join(map(str, good)) or 'none'}" + (f"; not at {', '.join(map(str, bad))}." if bad else "."))
    weak = []
    for L in layers:
        f = L["models"]["sqs-s0"]["fidelity"]["gain"]["r2_per_direction"]
        weak += [f"{d['token']!r}@{L['layer']} ({v:.2f})" for d, v in zip(L["directions"], f) if v < FAITHFUL_R2]
    n_all = sum(len(L["directions"]) for L in layers)
    out.append(f"Per direction: {n_all - len(weak)} of {n_all} (token, layer) pairs reach gain R² ≥ {FAITHFUL_R2}"
               + (f"; below it: {', '.join(weak)}." if weak else "."))
    ag = res["agreement"]
    a = ag.get(PAIR_LABELS[0])
    if a:
        msg = []
        for side in ("positive", "negative"):
            x = _top_mean(a[side]["best_match"])
            msg.append(f"{side} side best-match |corr| {x:.2f} (per rank {_top_mean(a[side]['per_rank']):.2f}, "
                       f"overlap {a[side]['overlap']['mean']:.2f})")
        line = f"SQS vs Bilinear (same initialisation), top {TOP_RANKS} ranks in token space: " + "; ".join(msg)
        b = ag.get(PAIR_LABELS[1])
        if b:
            xa = np.nanmean([_top_mean(a[s]["best_match"]) for s in ("positive", "negative")])
            xb = np.nanmean([_top_mean(b[s]["best_match"]) for s in ("positive", "negative")])
            rel = ("higher than" if xa > xb + 0.05 else "lower than" if xa < xb - 0.05 else "about the same as")
            why = (": the features follow the shared initialisation more than the gate" if xa > xb + 0.05 else
                   ": changing the gate changes the features more than changing the seed" if xa < xb - 0.05 else
                   ": the gate changes the features about as much as a different seed does")
            line += (f". That is {rel} the SQS-vs-SQS different-seed baseline ({xa:.2f} vs {xb:.2f}, mean best "
                     f"match over both sides){why}.")
        else:
            line += ". The SQS different-seed baseline (sqs-s1) is missing, so it is not yet known how much of this "\
                    "a different seed would give."
        out.append(line)
    return out


def write_report(res: dict, out) -> dict:
    out = Path(out)
    models = _models(res)
    figs = []
    for j, d in enumerate(res["layers"][0]["directions"]):
        name = "top_promoted" if d["label"] == "top-promoted" else slug(d["label"])
        p = plot_direction(res["layers"], j, [m for m in models if m != "sqs-s1"], out / f"spectra_{name}.png")
        figs.append((p.name, f"direction {d['label']!r}" + (" (per layer: " + ", ".join(
            repr(L["directions"][j]["token"]) for L in res["layers"]) + ")" if d["label"] == "top-promoted" else "")))
    figs.append((plot_fidelity(res, out / "fidelity.png").name, "fidelity per layer"))
    if res["agreement"]:
        figs.append((plot_agreement(res, out / "agreement.png").name, "agreement in token space"))
    res["verdict"] = verdict(res)
    write_json(out / "summary.json", res)
    write_text(out / "summary.md", summary_md(res, figs))
    return res


def summary_md(res: dict, figs: list[tuple[str, str]]) -> str:
    models = _models(res)
    L0 = res["layers"][0]
    md = ["# Reading the TinyStories GLU layers as quadratic forms over tokens", "",
          "Each GLU layer's direct contribution to a token's logit, u·MLP(n) with n the block's pre-MLP "
          "RMSNorm output, is read as n^T B_u n (exact for Bilinear; for SQS the gate taken as the identity, "
          "the paper's first-order reading, and the gain reading that scales each unit by its least-squares "
          "gate gain). u = the token's (tied) unembedding row through the final norm's weight and its mean "
          "scale. Eigenvectors are read as tokens through each token's embedding alone, normed by the layer's "
          "pre-MLP norm: for layer 0 that leaves out the position embedding and the first attention output, "
          "for deeper layers every earlier block, so beyond layer 0 the token lists are a rough vocabulary probe. "
          "Spectra and token lists use the first-order reading.", "",
          "## Verdict", ""] + [f"- {v}" for v in res["verdict"]] + ["", "## Runs", "",
          "| run | status | steps | val loss | training time (elapsed_s) |", "|---|---|---:|---:|---:|"]
    for name, r in res["runs"].items():
        el = r.get("elapsed_s")
        md.append(f"| {name} | {r['status']} | {r.get('step', '—') or '—'} | {fmt(r.get('val_loss'), 3)} | "
                  f"{'—' if el is None else f'{el / 60:.0f} min'} |")
    md += ["", f"Training times are the runs' own `elapsed_s` on this machine (config {res['config']}; the "
           "machine's load varies, so they are an upper bound for an idle one). "
           f"Analysis: {res['windows']} validation windows of {res['context']} tokens (half fit the gain "
           f"reading, half are scored), {res['analysis_s']:.0f} s at {res['threads']} thread(s)."]
    if res["missing"]:
        md += ["", f"Missing: {', '.join(res['missing'])} (analysed without it)."]
    if res["tokens_skipped"]:
        md += ["", f"Skipped tokens (not one token of this tokenizer): {', '.join(map(repr, res['tokens_skipped']))}."]
    # fidelity
    ks = [k for k in L0["models"]["bilinear-s0"]["fidelity"]["first_order"]["truncated"]]
    md += ["", "## Fidelity", "",
           "R² of the quadratic form against the layer's direct contribution u·MLP(n) on held-out positions, "
           "pooled over the directions; sign = sign agreement; top-k = the k largest-|λ| eigenvectors only.", "",
           "| model | layer | reading | R² | sign | " + " | ".join(f"R² top-{k}" if k != "all" else "R² all"
                                                                  for k in ks) + " |",
           "|---|---:|---|---:|---:|" + "---:|" * len(ks)]
    for L in res["layers"]:
        for name in models:
            f = L["models"][name]["fidelity"]
            readings = ("first_order",) if name.startswith("bilinear") else ("first_order", "gain")
            for rd in readings:
                tr = f[rd]["truncated"]
                label = "exact" if name.startswith("bilinear") else rd.replace("_", "-")
                md.append(f"| {name} | {L['layer']} | {label} | "
                          f"{fmt(f[rd]['r2'])} | {fmt(f[rd]['sign_agreement'], 3)} | "
                          + " | ".join(fmt(tr[k]["r2"], 3) for k in ks) + " |")
    md += ["", "R² per direction, sqs-s0 (first-order / gain):", "",
           "| layer | " + " | ".join(_tok(d["label"]) if d["label"] != "top-promoted" else "top-promoted"
                                    for d in L0["directions"]) + " |",
           "|---:|" + "---|" * len(L0["directions"])]
    for L in res["layers"]:
        f = L["models"]["sqs-s0"]["fidelity"]
        cells = [(f"{_tok(d['token'])}: " if d["label"] == "top-promoted" else "") + f"{fo:.3f} / {g:.3f}"
                 for d, fo, g in zip(L["directions"], f["first_order"]["r2_per_direction"],
                                     f["gain"]["r2_per_direction"])]
        md.append(f"| {L['layer']} | " + " | ".join(cells) + " |")
    # tokens
    md += ["", "## Top tokens of the top eigenvectors", "",
           "Per direction and layer: the largest positive (λ+1) and most negative (λ−1) eigenvector, each read as "
           "the tokens whose input projects most positively (+) and most negatively (−) on it. An eigenvector's sign "
           "is arbitrary (the quadratic form ignores it; it is fixed so the largest-|projection| token is at the + "
           "end), so the same feature can appear with its ends swapped in two models. More ranks are in "
           "summary.json."]
    for j, d in enumerate(L0["directions"]):
        md += ["", f"### Direction {d['label']!r}", "",
               "| layer | model | token | λ+1 | q+1: + end / − end | λ−1 | q−1: + end / − end |",
               "|---:|---|---|---:|---|---:|---|"]
        for L in res["layers"]:
            for name in models:
                r = L["models"][name]["reads"][j]
                p = r["sides"]["positive"][0] if r["sides"]["positive"] else None
                n = r["sides"]["negative"][0] if r["sides"]["negative"] else None
                md.append(f"| {L['layer']} | {name} | {_tok(r['token'])} | {fmt(p and p['eigenvalue'], 3)} | "
                          f"{_ends(p)} | {fmt(n and n['eigenvalue'], 3)} | {_ends(n)} |")
        ex = [(name, L0["models"][name]["reads"][j]["sides"]["positive"]) for name in models]
        lines = [f"- {name}, q+1: " + " · ".join(f"`{e}`" for e in rows[0].get("examples", [])) for name, rows in ex
                 if rows and rows[0].get("examples")]
        if lines:
            md += ["", "Layer 0, max-|q·n| validation contexts (token «marked»):", ""] + lines
    # agreement
    if res["agreement"]:
        md += ["", "## SQS vs Bilinear in token space", "",
               "Eigenvectors compared by the correlation of their token-projection profiles over the vocabulary "
               f"(the models' residual bases differ), k = {res['k']} per side, the image analysis' fair matching: "
               f"|corr| per rank within a signed side, best one-to-one match, subspace overlap (mean over the top "
               f"{TOP_RANKS} ranks; overlap of the top-{res['k']} subspaces).", "",
               "| layer | pair | + per rank | + best match | + overlap | − per rank | − best match | − overlap |",
               "|---|---|---:|---:|---:|---:|---:|---:|"]
        rows = [(str(L["layer"]), L["agreement"]) for L in res["layers"]] + [("all", res["agreement"])]
        for lay, ag in rows:
            for label in PAIR_LABELS:
                if label in ag:
                    a = ag[label]
                    md.append(f"| {lay} | {label} | " + " | ".join(
                        f"{fmt(_top_mean(a[s]['per_rank']), 2)} | {fmt(_top_mean(a[s]['best_match']), 2)} | "
                        f"{fmt(a[s]['overlap']['mean'], 2)}" for s in ("positive", "negative")) + " |")
    md += ["", "## Figures", ""] + [f"- [{cap}]({p})" for p, cap in figs]
    md += [""] + [f"![{cap}]({p})" for p, cap in figs[:1]]
    return "\n".join(md) + "\n"
