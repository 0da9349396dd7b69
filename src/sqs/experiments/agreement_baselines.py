"""What "agree" means: the one way reports pair models, and the table of their agreement.

Models are keyed (gate, init seed, data seed). Two models of one gate from the same init
with other data show what a reader can expect of a gate against itself; other inits, less;
SQS against Bilinear at the same init and data is the comparison the paper's Fig. 2 makes.
`baseline_pairs` forms every pairing of a set of models (the Sec. 4.1 experiment, the
frontier and the demo all pair through it); `agreement_brief` summarises a pairing with
`sqs.interp.agreement` and `baseline_table` shows it.
"""

from __future__ import annotations

from sqs.experiments.style import fmt
from sqs.interp.agreement import SIDES, agreement_summary

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


def baseline_pairs(models: dict) -> dict[str, list[tuple]]:
    """The pairs of each pairing in BASELINES from {(gate, init seed, data seed): model}, in key order.

    Same gate: `<gate>_same_init` (same init, other data) and `<gate>_other_init` (init and data
    both differ), each unordered pair once; SQS vs Bilinear (SQS first): `..._same_init` (same
    init and data) and `..._other_init` (init and data both differ), every ordered combination."""
    keys = sorted(models)
    out: dict[str, list] = {name: [] for name in BASELINES}
    for i, a in enumerate(keys):
        for b in keys[i + 1:]:
            ga, ia, da = a
            gb, ib, db = b
            if ga == gb:
                name = f"{ga}_same_init" if ia == ib else (f"{ga}_other_init" if da != db and ia != ib else None)
                if name and (ia != ib or da != db):
                    out[name].append((models[a], models[b]))
    for a in keys:
        for b in keys:
            if a[0] == "sqs" and b[0] == "bilinear":
                if a[1:] == b[1:]:
                    out["sqs_vs_bilinear_same_init"].append((models[a], models[b]))
                elif a[1] != b[1] and a[2] != b[2]:
                    out["sqs_vs_bilinear_other_init"].append((models[a], models[b]))
    return out


def agreement_brief(pairs: list[tuple], k: int = 10) -> dict:
    """What the reports show of `sqs.interp.agreement.agreement_summary(pairs, k)`: per side the
    per-rank and best-match means (ranks 1..k) and the overlap mean; the form cosines' means;
    the number of pairs (means over every (pair, class))."""
    summary = agreement_summary(pairs, k=k)
    out = {"n_pairs": summary["n_pairs"], "k": summary["k"],
           "form_cosine": summary["form_cosine"]["mean"], "form_cosine_centered": summary["form_cosine_centered"]["mean"]}
    for side in SIDES:
        out[side] = {"per_rank": summary[side]["per_rank"]["mean"], "best_match": summary[side]["best_match"]["mean"],
                     "overlap": summary[side]["overlap"]["mean"]}
    return out


def baseline_table(base: dict) -> list[str]:
    """Markdown rows: {reading of SQS: {pairing: agreement_brief}} (Bilinear, exact under every reading, once)."""
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
