"""`sqs spectra decompose|compare|explain` and `sqs experiment spectra` (Sec. 4.1 + App. B).

    sqs spectra decompose RUN_DIR [--out DIR] [--force]
    sqs spectra compare RUN_DIR_A RUN_DIR_B [--out DIR]
    sqs spectra explain RUN_DIR --index I [--out DIR]
    sqs experiment spectra [--runs-dir runs/sec41] [--out results/spectra] [--seeds 5]
                           [--datasets mnist fashion-mnist] [--epochs 20] [--report-only]

The experiment trains (or reuses finished) 1-layer Bilinear and SQS models per
seed and dataset with the image pipeline's Sec. 4.1 config, decomposes them and
writes results/spectra/{summary.md, summary.json, <dataset>/*.png}.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

GATES = ("bilinear", "sqs")  # run-directory names; "bilinear" is the identity gate
PAIRINGS = {
    "sqs_vs_bilinear_same_seed": "SQS vs Bilinear, same seed",
    "sqs_vs_bilinear_cross_seed": "SQS vs Bilinear, different seeds",
    "bilinear_vs_bilinear": "Bilinear vs Bilinear (seeds)",
    "sqs_vs_sqs": "SQS vs SQS (seeds)",
}
PAPER_CLAIMS = "paper (Sec. 4.1): |cos| never below 0.5, ≈0.95 for the most important eigenvectors"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- training (one call)


def run_dir_for(runs_dir: str | Path, dataset: str, gate: str, seed: int) -> Path:
    return Path(runs_dir) / dataset / f"{gate}-seed{seed}"


def train_one(dataset: str, gate: str, seed: int, epochs: int, run_dir: str | Path, data_dir: str | None = None,
              cache_dir: str | None = None):
    """Train one Sec. 4.1 run (1 GLU layer) with the image pipeline. The only training call here.

    `run_image` resumes an interrupted run and returns at once for a finished one; its
    model init is seeded by `seed` alone, so the Bilinear and SQS runs of one seed start
    from identical weights and see identical batches and noise.
    """
    from sqs.experiments import image as pipeline

    cfg = pipeline.load_config("sec41", overrides={"dataset": dataset, "model.gate": gate, "seed": seed,
                                                   "epochs": epochs})
    return pipeline.run_image(cfg, run_dir, data_dir=data_dir, cache_dir=cache_dir)


def is_finished(run_dir: str | Path) -> bool:
    from sqs.training.trainer import is_complete

    return is_complete(run_dir)


# --------------------------------------------------------------------------- sqs spectra ...


def _decompose_cmd(args) -> int:
    from sqs.interp import plots
    from sqs.interp.report import analyse_run
    from sqs.io import write_json

    a = analyse_run(args.run_dir, dataset=args.dataset, data_dir=args.data_dir, force=args.force,
                    with_fidelity=not args.no_fidelity)
    out = Path(args.out) if args.out else Path(args.run_dir) / "spectra"
    out.mkdir(parents=True, exist_ok=True)
    plots.save(plots.plot_spectrum(a.dec, dataset=a.dataset), out / "spectrum.png")
    plots.save(plots.plot_eigenvector_grid(a.dec, n=args.n, dataset=a.dataset), out / "eigenvectors.png")
    if a.fidelity:
        plots.save(plots.plot_truncation({a.title: a.fidelity}), out / "truncation.png")
    _save_tensors(a.dec, out / "spectra.safetensors")
    result = {"run_dir": str(a.run_dir), "dataset": a.dataset, "decomposition": a.dec.to_dict(),
              "fidelity": a.fidelity, "fidelity_error": a.fidelity_error}
    write_json(out / "spectra.json", result)
    print(f"{a.title}: {a.dec.reading}")
    if a.fidelity:
        f = a.fidelity
        print(f"  model acc {f['model_acc']:.4f}  surrogate acc {f['surrogate_acc']:.4f}  agreement "
              f"{f['agreement']:.4f}  logit R² {f['logit_r2']:.4f} (scaled {f['logit_r2_scaled']:.4f})")
        print("  top-k surrogate acc: " + ", ".join(f"k={k}: {v['acc']:.4f}" for k, v in f["truncated"].items()))
    elif a.fidelity_error:
        print(f"  fidelity not measured: {a.fidelity_error}")
    print(f"wrote {out}/spectra.json, spectrum.png, eigenvectors.png, spectra.safetensors")
    return 0


def _save_tensors(dec, path: Path) -> None:
    from safetensors.torch import save_file

    from sqs.io import atomic_write

    tensors = {"eigenvalues": dec.eigenvalues, "eigenvectors": dec.eigenvectors, "pixel_raw": dec.pixel_raw,
               "pixel": dec.pixel, "B": dec.B}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"gate": dec.gate, "reading": dec.reading, "exact": str(dec.exact),
            "layout": "eigenvalues (C,d) sorted by |lambda| desc; eigenvectors (C,d,d) rows q_k in embedding space; "
                      "pixel_raw = E^T q; pixel = unit-normalised pixel_raw"}
    atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def _compare_cmd(args) -> int:
    from sqs.interp import plots
    from sqs.interp.report import analyse_run
    from sqs.interp.spectra import cosine_per_rank
    from sqs.io import write_json

    a = analyse_run(args.run_dir_a, force=args.force, with_fidelity=False)
    b = analyse_run(args.run_dir_b, force=args.force, with_fidelity=False)
    cos = cosine_per_rank(a.dec, b.dec)  # (C, r), pixel space
    out = Path(args.out) if args.out else Path("results") / "spectra" / "compare"
    out.mkdir(parents=True, exist_ok=True)
    label = f"{b.title} vs {a.title}"
    plots.save(plots.plot_cosine_per_rank({label: cos[None]}), out / "cosine_per_rank.png")
    plots.save(plots.plot_comparison_grid({a.title: a.dec, b.title: b.dec}, classes=range(min(5, a.dec.n_classes)),
                                          dataset=a.dataset), out / "eigenvectors_side_by_side.png")
    m = cos.mean(0)
    res = {"a": str(a.run_dir), "b": str(b.run_dir), "reading_a": a.dec.reading, "reading_b": b.dec.reading,
           "space": "pixel", "mean_over_classes": m.tolist(), "per_class": cos.tolist(),
           "top5": m[:5].tolist(), "min_top10": float(m[:10].min()), "min_all": float(m.min())}
    write_json(out / "compare.json", res)
    print(f"{label}: |cos| per rank (pixel space, mean over classes)")
    print("  ranks 1-5: " + "  ".join(f"{float(v):.3f}" for v in m[:5]))
    print(f"  min over top-10 ranks {res['min_top10']:.3f}; min over all {len(m)} ranks {res['min_all']:.3f}")
    print(f"wrote {out}/compare.json, cosine_per_rank.png, eigenvectors_side_by_side.png")
    return 0


def _explain_cmd(args) -> int:
    from sqs.interp import plots
    from sqs.interp.report import analyse_run, load_test
    from sqs.interp.spectra import contributions, model_logits

    a = analyse_run(args.run_dir, dataset=args.dataset, force=args.force, with_fidelity=False)
    if a.dataset is None:
        raise SystemExit("explain: the run config names no dataset; pass --dataset")
    images, labels = load_test(a.dataset, args.data_dir)
    if not 0 <= args.index < images.shape[0]:
        raise SystemExit(f"explain: --index must be in [0, {images.shape[0]}), got {args.index}")
    img, label = images[args.index], int(labels[args.index])
    z = model_logits(a.model, img[None])[0]
    contrib = contributions(a.dec, img)
    pred = int(z.argmax())
    out = Path(args.out) if args.out else Path(args.run_dir) / "spectra"
    path = plots.save(plots.plot_explanation(a.dec, img, z, label=label, dataset=a.dataset, top=args.top),
                      out / f"explanation_{args.index}.png")
    names = plots.class_names(a.dataset, a.dec.n_classes)
    print(f"{a.title}; test image {args.index}: label {names[label]}, predicted {names[pred]}")
    print("  logits model:     " + " ".join(f"{float(v):+.3f}" for v in z))
    print("  logits surrogate: " + " ".join(f"{float(v):+.3f}" for v in contrib.sum(-1)))
    order = contrib[pred].abs().argsort(descending=True)[:args.top]
    for i in order.tolist():
        print(f"  eigenvector {i + 1:3d}: λ={float(a.dec.eigenvalues[pred, i]):+.4f}  "
              f"λ(q·x)²={float(contrib[pred, i]):+.4f}")
    print(f"wrote {path}")
    return 0


# --------------------------------------------------------------------------- sqs experiment spectra


def _stats(cos: torch.Tensor, best: torch.Tensor | None = None) -> dict:
    """(n_pairs, C, r) -> per-rank mean/std over (pair, class) and headline numbers.

    `best` (same shape): best-match |cos| (`cosine_best_match`), summarised per rank too.
    """
    flat = cos.reshape(-1, cos.shape[-1])
    mean, std = flat.mean(0), flat.std(0, unbiased=False)
    below = (mean < 0.5).nonzero()
    extra = {}
    if best is not None:
        bm = best.reshape(-1, best.shape[-1]).mean(0)
        extra = {"best_match_mean": bm.tolist(), "best_match_top5": bm[:5].tolist(),
                 "best_match_min_top10": float(bm[:10].min())}
    return {"n_pairs": int(cos.shape[0]), "mean": mean.tolist(), "std": std.tolist(), **extra,
            "top5": mean[:5].tolist(), "top5_std": std[:5].tolist(),
            "min_top10": float(mean[:10].min()), "min_top20": float(mean[:20].min()), "min_all": float(mean.min()),
            "first_rank_below_0.5": int(below[0]) + 1 if len(below) else None,
            "frac_entries_below_0.5_top10": float((cos[..., :10] < 0.5).double().mean())}


def run_experiment(runs_dir="runs/sec41", out="results/spectra", seeds: int = 5, datasets=("mnist", "fashion-mnist"),
                   epochs: int = 20, report_only: bool = False, data_dir: str | None = None,
                   explain_index: int = 0) -> dict:
    """Train what is missing (unless report_only), decompose everything, write summary.md/json + figures."""
    from sqs.interp import plots
    from sqs.interp.report import analyse_run, load_test
    from sqs.interp.spectra import cosine_best_match, cosine_per_rank
    from sqs.io import write_json, write_text

    out = Path(out)
    summary = {"runs_dir": str(runs_dir), "seeds": seeds, "epochs": epochs, "space": "pixel",
               "paper": {"cos_min": 0.5, "cos_top": 0.95}, "datasets": {}, "missing": []}
    figures: dict[str, list[tuple[str, str]]] = {}
    for ds in datasets:
        # 1. train (one call per missing run)
        runs: dict[str, dict[int, Path]] = {g: {} for g in GATES}
        for gate in GATES:
            for seed in range(seeds):
                rd = run_dir_for(runs_dir, ds, gate, seed)
                if not is_finished(rd):
                    if report_only:
                        summary["missing"].append(str(rd))
                        continue
                    _say(f"[spectra] training {ds} {gate} seed {seed} -> {rd}")
                    train_one(ds, gate, seed, epochs, rd, data_dir=data_dir)
                runs[gate][seed] = rd
        if not any(runs.values()):
            _say(f"[spectra] {ds}: no finished runs, skipped")
            continue
        # 2. analyse
        test = load_test(ds, data_dir)
        an = {g: {s: analyse_run(rd, dataset=ds, test=test) for s, rd in sorted(runs[g].items())} for g in GATES}
        ds_out = out / ds
        figs = figures.setdefault(ds, [])
        bil, sq = an["bilinear"], an["sqs"]
        pairs = {  # (A, B) decompositions per pairing; |cos| is symmetric in A, B
            "sqs_vs_bilinear_same_seed": [(sq[s].dec, bil[s].dec) for s in sorted(set(sq) & set(bil))],
            "sqs_vs_bilinear_cross_seed": [(sq[i].dec, bil[j].dec) for i in sq for j in bil if i != j],
            "bilinear_vs_bilinear": [(bil[i].dec, bil[j].dec) for i in bil for j in bil if i < j],
            "sqs_vs_sqs": [(sq[i].dec, sq[j].dec) for i in sq for j in sq if i < j],
        }
        cos = {k: torch.stack([cosine_per_rank(a, b) for a, b in v]) for k, v in pairs.items() if v}
        best = {k: torch.stack([cosine_best_match(a, b) for a, b in v]) for k, v in pairs.items() if v}
        curves = {PAIRINGS[k]: v for k, v in cos.items()}
        if curves:
            p = plots.save(plots.plot_cosine_per_rank(curves, title=f"{ds}: |cos| per rank, pixel space "
                                                      "(SQS: first-order reading)\nmean over classes and seed "
                                                      "pairs, band ±1 std"), ds_out / "cosine_per_rank.png")
            figs.append((str(p.relative_to(out)), "cosine per rank, all ranks"))
            p = plots.save(plots.plot_cosine_per_rank(curves, max_rank=20, title=f"{ds}: |cos| per rank, top 20 "
                                                      "(SQS: first-order reading)"), ds_out / "cosine_per_rank_top20.png")
            figs.append((str(p.relative_to(out)), "cosine per rank, top 20 ranks"))
        # figures of the first seed of each gate
        s0 = {g: min(an[g]) for g in GATES if an[g]}
        if len(s0) == 2:
            p = plots.save(plots.plot_comparison_grid({an[g][s0[g]].title: an[g][s0[g]].dec for g in GATES},
                                                      classes=range(5), n=2, dataset=ds,
                                                      title=f"{ds}: top eigenvectors, Bilinear vs SQS (first-order "
                                                            "reading), seed " + str(s0['sqs'])),
                           ds_out / "eigenvectors_side_by_side.png")
            figs.append((str(p.relative_to(out)), "Fig. 2 style: Bilinear vs SQS top eigenvectors, 5 classes"))
        for g, s in s0.items():
            a = an[g][s]
            for name, fig, cap in (
                    (f"eigenvectors_{g}.png", plots.plot_eigenvector_grid(a.dec, n=2, dataset=ds),
                     f"{a.title}: top positive/negative eigenvectors per class (seed {s})"),
                    (f"spectrum_{g}.png", plots.plot_spectrum(a.dec, dataset=ds),
                     f"{a.title}: eigenvalue spectra per class (seed {s})")):
                p = plots.save(fig, ds_out / name)
                figs.append((str(p.relative_to(out)), cap))
            img, label = test[0][explain_index], int(test[1][explain_index])
            from sqs.interp.spectra import model_logits

            z = model_logits(a.model, img[None])[0]
            p = plots.save(plots.plot_explanation(a.dec, img, z, label=label, dataset=ds),
                           ds_out / f"explanation_{g}_idx{explain_index}.png")
            figs.append((str(p.relative_to(out)), f"{a.title}: explanation of test image {explain_index}"))
        fids = {an[g][s].title: an[g][s].fidelity for g in GATES for s in list(an[g])[:1] if an[g][s].fidelity}
        if fids:
            p = plots.save(plots.plot_truncation(fids, title=f"{ds}: truncated eigen-surrogate accuracy (seed 0; "
                                                 "dotted: model)\nSQS: first-order reading"), ds_out / "truncation.png")
            figs.append((str(p.relative_to(out)), "truncated surrogate accuracy"))
        summary["datasets"][ds] = {
            "runs": {g: {str(s): str(rd) for s, rd in runs[g].items()} for g in GATES},
            "cosine": {k: _stats(v, best[k]) for k, v in cos.items()},
            "fidelity": {g: {str(s): a.fidelity for s, a in an[g].items()} for g in GATES},
            "spectrum_top5_share": {g: [float((a.dec.eigenvalues[:, :5].abs().sum(-1)
                                               / a.dec.eigenvalues.abs().sum(-1)).mean()) for a in an[g].values()]
                                    for g in GATES},
            "readings": {g: next(iter(an[g].values())).dec.reading for g in GATES if an[g]},
        }
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary, figures))
    _say(f"[spectra] wrote {out}/summary.md, summary.json and figures")
    return summary


def _f(v, nd=3):
    return "—" if v is None else f"{v:.{nd}f}"


def summary_markdown(summary: dict, figures: dict | None = None) -> str:
    from sqs.interp.report import mean_std

    L = ["# Weight spectra: Bilinear vs SQS (Sec. 4.1, App. B)", ""]
    L.append(f"1-layer GLU classifiers, {summary['seeds']} seeds per gate and dataset, {summary['epochs']} epochs "
             f"(runs in `{summary['runs_dir']}`). Bilinear = identity gate: the eigendecomposition is exact. SQS: "
             "**first-order reading** (the SQS gate treated as the identity, as in the paper); how faithful that "
             "reading is, is measured below. Eigenvectors are compared in **pixel space** (u = E^T q): the models "
             "have different embeddings E, so embedding-space vectors of two models are not comparable. |cos| is "
             "taken between eigenvectors of equal rank (rank = order by |λ| within each class), then averaged over "
             "the 10 classes and the seed pairs.")
    if summary["missing"]:
        L += ["", f"**Missing runs (not included):** {', '.join(summary['missing'])}"]
    for ds, d in summary["datasets"].items():
        L += ["", f"## {ds}", "", "### |cos| per rank", ""]
        L.append("| pairing | pairs | rank 1 | rank 2 | rank 3 | rank 4 | rank 5 | min top-10 | min top-20 | "
                 "min all ranks | first rank < 0.5 | best-match ranks 1-5 |")
        L.append("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for k, st in d["cosine"].items():
            L.append(f"| {PAIRINGS[k]} | {st['n_pairs']} | "
                     + " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in zip(st["top5"], st["top5_std"]))
                     + f" | {_f(st['min_top10'])} | {_f(st['min_top20'])} | {_f(st['min_all'])} | "
                     f"{st['first_rank_below_0.5'] or 'never'} | "
                     + (" / ".join(f"{v:.2f}" for v in st["best_match_top5"]) if "best_match_top5" in st else "—")
                     + " |")
        L += ["", "Mean ± std over (class, seed pair); min columns: minimum over ranks of the mean curve. "
                  "Best-match: for the eigenvector of rank k of the first model, the largest |cos| with any "
                  "eigenvector of the same class of the second (high best-match with low per-rank |cos| = same "
                  "features in swapped ranks). Same-seed pairs share the initial weights, the batches and the "
                  "input noise (the pipeline seeds all three by `seed`), so compare them with the cross-seed rows. "
                  + PAPER_CLAIMS[0].upper() + PAPER_CLAIMS[1:] + "."]
        L += [""] + _claims(d["cosine"])
        share = d["spectrum_top5_share"]
        L += ["", "Spectrum concentration (App. B: the first few eigenvalues dominate): top-5 share of Σ|λ|, "
                  "mean over classes: " + "; ".join(f"{g} {mean_std(v)}" for g, v in share.items() if v) + "."]
    L += ["", "## Fidelity of the eigen-reading (test set, mean ± std over seeds)", ""]
    L += _fidelity_side_by_side(summary)
    if figures:
        L += ["", "## Figures", ""]
        for ds, figs in figures.items():
            for path, cap in figs:
                L.append(f"- [{ds}: {cap}]({path})")
    return "\n".join(L) + "\n"


def _claims(cos: dict) -> list[str]:
    st = cos.get("sqs_vs_bilinear_same_seed") or cos.get("sqs_vs_bilinear_cross_seed")
    if not st:
        return ["No SQS/Bilinear pair to compare."]
    out = []
    top1 = st["top5"][0]
    out.append(f"- Paper: ≈0.95 for the top eigenvectors. Ours (SQS vs Bilinear, "
               f"{'same seed, shared init' if 'sqs_vs_bilinear_same_seed' in cos else 'different seeds'}): rank 1 "
               f"{top1:.3f}, ranks 1-5 {', '.join(f'{v:.3f}' for v in st['top5'])}. "
               + ("Agrees." if top1 >= 0.9 else "**Differs: lower than the paper.**"))
    verdict = "Agrees over all ranks." if st["min_all"] >= 0.5 else (
        f"**Differs: the mean falls below 0.5 from rank {st['first_rank_below_0.5']} on** "
        f"(min over top-10 ranks {st['min_top10']:.3f}, over all ranks {st['min_all']:.3f}).")
    out.append(f"- Paper: never below 0.5. Ours: min of the mean curve over all ranks {st['min_all']:.3f}. {verdict}")
    if "sqs_vs_bilinear_same_seed" in cos and "sqs_vs_bilinear_cross_seed" in cos:
        x = cos["sqs_vs_bilinear_cross_seed"]
        out.append(f"- SQS vs Bilinear with different seeds (no shared initialisation): ranks 1-5 "
                   f"{', '.join(f'{v:.3f}' for v in x['top5'])}, min top-10 {x['min_top10']:.3f}.")
    for k in ("bilinear_vs_bilinear", "sqs_vs_sqs"):
        if k in cos:
            out.append(f"- Baseline {PAIRINGS[k]}: ranks 1-5 {', '.join(f'{v:.3f}' for v in cos[k]['top5'])}, "
                       f"min top-10 {cos[k]['min_top10']:.3f}.")
    if any(k in cos for k in ("bilinear_vs_bilinear", "sqs_vs_sqs")):
        out.append("- The baselines say how stable eigenvectors are across seeds of one gate: a SQS-vs-Bilinear "
                   "similarity at that level means the two gates differ no more than two seeds of one gate do.")
    return out


def _fidelity_side_by_side(summary: dict) -> list[str]:
    from sqs.interp.report import fidelity_table

    cols = {}
    for ds, d in summary["datasets"].items():
        short = {"mnist": "MNIST", "fashion-mnist": "F-MNIST"}.get(ds, ds)
        for g in GATES:
            fids = [f for f in d["fidelity"].get(g, {}).values() if f]
            if fids:
                cols[f"{short} {'Bilinear' if g == 'bilinear' else 'SQS (1st-order)'}"] = fids
    if not cols:
        return ["No fidelity numbers (test sets unavailable)."]
    header, rows = fidelity_table(cols)
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows]
            + ["", "Surrogate = logits rebuilt from the eigendecomposition Σ_k λ_k (q_k·x)², top-k eigenvectors "
                   "per class. Bilinear: exact by construction (R² = 1 up to float error). SQS: R² < 1 measures what "
                   "the first-order reading leaves out; 'after best single scale' forgives an overall shrink."])


def _experiment_cmd(args) -> int:
    run_experiment(runs_dir=args.runs_dir, out=args.out, seeds=args.seeds, datasets=args.datasets,
                   epochs=args.epochs, report_only=args.report_only, data_dir=args.data_dir,
                   explain_index=args.explain_index)
    return 0


# --------------------------------------------------------------------------- registration


def _clean_errors(fn):
    """Report the analysis' refusals (gate, depth) and missing runs as one line, exit status 2."""
    import functools

    @functools.wraps(fn)
    def wrapper(args):
        from sqs.interp.spectra import NotQuadratic, UnsupportedGate

        try:
            return fn(args)
        except (UnsupportedGate, NotQuadratic, FileNotFoundError) as e:
            print(f"sqs spectra: {e}", file=sys.stderr)
            return 2
    return wrapper


def register(sub, groups) -> None:
    g = groups["spectra"]
    p = g.add_parser("decompose", help="eigendecompose one 1-layer run: figures + JSON",
                     description="Eigendecompose a 1-layer Bilinear (exact) or SQS (first-order reading) image "
                                 "classifier; write spectrum/eigenvector figures, spectra.json (with fidelity on the "
                                 "test set) and spectra.safetensors.")
    p.add_argument("run_dir")
    p.add_argument("--out", help="output folder (default RUN_DIR/spectra)")
    p.add_argument("--force", action="store_true", help="decompose relu/gelu/silu gates anyway (not a faithful reading)")
    p.add_argument("--dataset", help="override the dataset named in the run config")
    p.add_argument("--data-dir", help="folder of IDX files (default: the cache)")
    p.add_argument("--no-fidelity", action="store_true", help="skip the test-set fidelity metrics")
    p.add_argument("--n", type=int, default=2, help="eigenvectors of each sign per class in the grid")
    p.set_defaults(func=_clean_errors(_decompose_cmd))

    p = g.add_parser("compare", help="|cos| per rank between two runs' eigenvectors (pixel space)")
    p.add_argument("run_dir_a")
    p.add_argument("run_dir_b")
    p.add_argument("--out", help="output folder (default results/spectra/compare)")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_clean_errors(_compare_cmd))

    p = g.add_parser("explain", help="explain one test input by eigenvector contributions λ(q·x)²")
    p.add_argument("run_dir")
    p.add_argument("--index", type=int, required=True, help="index into the test split")
    p.add_argument("--top", type=int, default=4)
    p.add_argument("--out", help="output folder (default RUN_DIR/spectra)")
    p.add_argument("--dataset")
    p.add_argument("--data-dir")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_clean_errors(_explain_cmd))

    p = groups["experiment"].add_parser(
        "spectra", help="Sec. 4.1: train Bilinear + SQS 1-layer models, compare their eigenvectors",
        description="Train (skipping finished runs) 1-layer Bilinear and SQS models per seed and dataset, "
                    "decompose them and write summary.md, summary.json and figures.")
    p.add_argument("--runs-dir", default="runs/sec41")
    p.add_argument("--out", default="results/spectra")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--datasets", nargs="+", default=["mnist", "fashion-mnist"])
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--report-only", action="store_true", help="train nothing; analyse the finished runs")
    p.add_argument("--data-dir", help="folder of IDX files (default: the cache); only with one dataset")
    p.add_argument("--explain-index", type=int, default=0)
    p.set_defaults(func=_experiment_cmd)

