"""`sqs demo`: the main job in short form.

Fetches MNIST, trains the paper's Sec. 4.1 model (embed -> 1 GLU layer -> head) with
the Bilinear and the SQS gate, decomposes both into per-class eigenvectors and
writes a self-contained report (report.html with the images embedded, report.md
with PNGs beside it): eigenvector images side by side, spectra, an explanation of
one test digit, and how faithful the quadratic-form reading is (surrogate R² and
accuracy, truncated to the top-k eigenvectors).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Iterable

from sqs.core import DEFAULT_C, DEFAULT_LAM, DEFAULT_P
from sqs.experiments import weight_spectra
from sqs.experiments.agreement_baselines import agreement_brief, baseline_pairs, baseline_table
from sqs.experiments.doc import Doc
from sqs.experiments.style import gate_label
from sqs.experiments.weight_spectra_report import fidelity_table, fig2_reference, reference_lines, verdict
from sqs.interp import plots
from sqs.interp.spectra import cosine_per_rank, model_logits
from sqs.io import write_json, write_text


LM_SPECTRA = "results/lm_spectra"


def link_lm_spectra(doc: Doc, folder: str | Path | None) -> bool:
    """Add a sentence linking to the language-model spectra summary if `folder`/summary.md exists."""
    if folder is None or not (Path(folder) / "summary.md").is_file():
        return False
    target = Path(os.path.relpath(Path(folder).resolve() / "summary.md", doc.root.resolve()))
    doc.h(2, "Language models")
    doc.link("The same reading applied to the GLU layers of the TinyStories language models (each layer's "
             "contribution to a token's logit as a quadratic form over tokens, SQS vs Bilinear): ",
             (Path(folder) / "summary.md").as_posix(), target, ".")
    return True


def run_demo(out: str | Path = "report", runs_dir: str | Path = "runs/demo", dataset: str = "mnist",
             epochs: int = 20, seed: int = 0, data_dir: str | None = None, cache_dir: str | None = None,
             baselines: bool = False, frontier_json: str | Path | None = "results/frontier/frontier.json",
             overrides: Iterable[str] = ()) -> dict:
    """Train (or reuse) the two Sec. 4.1 runs at `runs_dir/sec41/<dataset>/<gate>-s<seed>`, then
    write the report to `out`; returns the report's paths. `overrides` apply to both runs, gate
    parameters to the SQS run only (`model.gate_kwargs.lam=0.1`: run `sqs-lam0.1-s0`). `baselines`:
    also train both gates from the same init on data seed `seed + 1` (`<gate>-i<seed>-d<seed+1>`),
    for the agreement table's same-init baselines."""
    from sqs.data import images

    t0 = time.perf_counter()
    if data_dir is None:
        images.fetch(dataset, cache_dir=cache_dir)
    run_dirs = {}
    for gate in weight_spectra.GATES:  # the same Sec. 4.1 runs as `sqs experiment spectra`
        run_dirs[gate] = weight_spectra.run_config(dataset, gate, seed, epochs, overrides=overrides).run_dir(runs_dir)
        print(f"demo: training 1-layer {gate} on {dataset} ({epochs} epochs) -> {run_dirs[gate]}", flush=True)
        weight_spectra.train_one(dataset, gate, seed, epochs, run_dirs[gate], data_dir=data_dir, cache_dir=cache_dir,
                                 overrides=overrides)
    extra = {}
    if baselines:
        for gate in weight_spectra.GATES:
            rd = weight_spectra.run_config(dataset, gate, seed, epochs, data_seed=seed + 1,
                                           overrides=overrides).run_dir(runs_dir)
            print(f"demo: training 1-layer {gate}, same init, data seed {seed + 1} -> {rd}", flush=True)
            weight_spectra.train_one(dataset, gate, seed, epochs, rd, data_dir=data_dir, cache_dir=cache_dir,
                                     data_seed=seed + 1, overrides=overrides)
            extra[(gate, seed, seed + 1)] = rd
    print("demo: decomposing and writing the report", flush=True)
    paths = write_report(run_dirs, out, dataset=dataset, data_dir=data_dir, baseline_dirs=extra, seed=seed,
                         frontier_json=frontier_json)
    print(f"demo: done in {time.perf_counter() - t0:.0f} s; open {paths.get('html', out)}", flush=True)
    return paths


def sqs_parameters(config: dict) -> str:
    """`c = 0.01, λ = 0.5, p = 1` of a run's config (its gate parameters over the defaults)."""
    kw = {"c": DEFAULT_C, "lam": DEFAULT_LAM, "p": DEFAULT_P, **((config.get("model") or {}).get("gate_kwargs") or {})}
    return f"c = {kw['c']:g}, λ = {kw['lam']:g}, p = {kw['p']:g}"


def write_report(run_dirs: dict[str, str | Path], out_dir: str | Path, dataset: str | None = None,
                 data_dir: str | None = None, explain_index: int = 0, classes=None, baseline_dirs: dict | None = None,
                 seed: int = 0, frontier_json: str | Path | None = None,
                 lm_spectra: str | Path | None = LM_SPECTRA) -> dict[str, Path]:
    """Eigenvector images and fidelity numbers for each run (e.g. {"bilinear": dir, "sqs": dir}).

    SQS is drawn with its most faithful reading (first-order or gain, by test logit R², named in
    every title); `baseline_dirs` {(gate, init seed, data seed): run dir} adds same-init baselines
    to the agreement table; `frontier_json` a frontier report whose recommended setting is shown.

    Writes out_dir/report.md (+ PNGs beside it), out_dir/report.html (images embedded)
    and out_dir/report.json; returns their paths. If `lm_spectra`/summary.md exists (written by
    `sqs experiment lm-spectra`), the report links to it (the demo trains no language model).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test, train = None, None
    analyses: dict[str, weight_spectra.RunAnalysis] = {}
    for gate, rd in run_dirs.items():
        if dataset is None:
            dataset = weight_spectra.dataset_of(weight_spectra.load_run(rd)[1])
        if test is None and dataset is not None:
            try:
                test, train = weight_spectra.load_test(dataset, data_dir), weight_spectra.load_train(dataset, data_dir)
            except Exception as e:  # noqa: BLE001 - reported in the document
                print(f"report: data of {dataset} unavailable ({e}); writing figures without fidelity")
                test = ()
        analyses[gate] = weight_spectra.analyse_run(rd, dataset=dataset, test=test or None, with_fidelity=bool(test),
                                        train_images=train, reading="best")
    names = {g: gate_label(g) for g in analyses}
    reading = analyses["sqs"].dec.method if "sqs" in analyses else "first-order"
    rec = weight_spectra.recommended_setting(frontier_json)
    sqs_default = "sqs" in analyses and sqs_parameters(analyses["sqs"].config) == sqs_parameters({})

    doc = Doc(out)
    doc.h(1, f"Weight spectra: {' vs '.join(names.values())} on {dataset or 'unknown dataset'}")
    doc.p("Each class logit of a 1-layer GLU classifier read as a quadratic form x^T B_a x of the embedded input "
          "x = E img, B_a = Σ_i (H P)_ai w_i v_i^T (symmetrised), decomposed as Σ_k λ_k (q_k·x)². "
          "For Bilinear (identity gate) this is exact. SQS ("
          + (sqs_parameters(analyses["sqs"].config) + ("; the paper's default" if sqs_default else "")
             if "sqs" in analyses else "the paper's default c = 0.01, λ = 0.5, p = 1") + ") is read "
          f"with its most faithful reading, here the {reading} reading (first-order: the gate treated as the "
          "identity, as in the paper; gain: each unit's gate replaced by its least-squares gain on the training "
          "images); the fidelity table below measures how well each reading reproduces the model. Eigenvectors are shown in pixel space (E^T q; red positive, blue "
          "negative, white zero).")
    for a in analyses.values():
        doc.p(f"{a.title}: {a.run_dir} — {a.dec.reading}.")
    doc.p(f"Recommended setting from the frontier ({rec['source']}): {rec['label']} ({rec['criterion']})." if rec
          else "Recommended setting: run `sqs experiment frontier` (no frontier results found).")
    if "sqs" in analyses and "bilinear" in analyses:
        keyed = {(g, seed, seed): analyses[g] for g in ("bilinear", "sqs")}
        for key, rd in (baseline_dirs or {}).items():
            keyed[key] = weight_spectra.analyse_run(rd, dataset=dataset, test=test or None, with_fidelity=bool(test),
                                        train_images=train)
        agreement = {r: {name: agreement_brief(p) for name, p in
                         baseline_pairs({k: a.with_reading(r).dec for k, a in keyed.items()}).items() if p}
                     for r in dict.fromkeys([reading, "first-order"])}
        doc.h(2, "Do SQS and Bilinear learn the same features?")
        doc.p(verdict(agreement, reading, fig2_reference()))
        rows = [line.strip("|").split(" | ") for line in baseline_table(agreement)[2:]]
        doc.table(["pairing", "reading of SQS", "pairs", "ranks 1–5 (positive side)", "best match 1–5",
                   "top-10 overlap", "form cos"], [[c.strip() for c in r] for r in rows])
        doc.p("Per class, eigenvectors of positive eigenvalue (largest first), pixel space, mean over classes. "
              "Best match: optimal one-to-one assignment within the top 10; overlap: mean squared canonical cosine "
              "of the two top-10 subspaces" + ("." if baseline_dirs else "; `sqs demo --baselines` adds the "
                                               "same-init, other-data baselines."))

    if len(analyses) >= 2:
        decs = {a.title: a.dec for a in analyses.values()}
        path = plots.save(plots.plot_comparison_grid(decs, classes=classes if classes is not None else range(5),
                                                     n=2, dataset=dataset), out / "eigenvectors_side_by_side.png")
        doc.h(2, "Top eigenvectors side by side")
        doc.img(path, "Top-2 eigenvectors by |λ| per class; later models' signs aligned to the first; "
                      f"|cos| in pixel space between equal ranks (SQS: {reading} reading).")
        labels = list(analyses)
        cos = cosine_per_rank(analyses[labels[0]].dec, analyses[labels[1]].dec)
        path = plots.save(plots.plot_cosine_per_rank({f"{names[labels[1]]} vs {names[labels[0]]}": cos[None]},
                                                     max_rank=min(64, cos.shape[-1]), reference=reference_lines()),
                          out / "cosine_per_rank.png")
        doc.h(2, f"Eigenvector similarity per rank by |λ| (SQS: {reading} reading)")
        m = cos.mean(0)
        doc.table(["rank"] + [str(i + 1) for i in range(5)] + ["min over ranks (top 10)", "min over all ranks"],
                  [["mean |cos| over classes"] + [f"{float(m[i]):.3f}" for i in range(min(5, len(m)))]
                   + [f"{float(m[:10].min()):.3f}", f"{float(m.min()):.3f}"]])
        doc.img(path, "|cos| between eigenvectors of equal rank (pixel space), mean over classes, one model pair. "
                      f"The paper (Sec. 4.1): {fig2_reference()['claim']}.")

    if any(a.fidelity for a in analyses.values()):
        doc.h(2, "Fidelity of the eigen-reading on the test set")
        cols = {}
        for a in analyses.values():
            for r, x in (a.readings or {None: {"fidelity": a.fidelity}}).items():
                if x["fidelity"]:
                    cols[a.with_reading(r).title if r else a.title] = [x["fidelity"]]
        header, rows = fidelity_table(cols)
        doc.table(header, rows)
        doc.p("Surrogate: logits rebuilt from the eigendecomposition, Σ_k λ_k (q_k·x)², using the top-k "
              "eigenvectors per class. Bilinear: R² = 1 by construction. SQS: how much of the model the "
              "reading reproduces (readings fitted on training images only).")
        path = plots.save(plots.plot_truncation({a.title: a.fidelity for a in analyses.values() if a.fidelity}),
                          out / "truncation.png")
        doc.img(path, "Accuracy of the surrogate keeping the top-k eigenvectors per class (dotted: the model).")
    for g, a in analyses.items():
        if a.fidelity_error:
            doc.p(f"{a.title}: fidelity not measured ({a.fidelity_error}).")

    for g, a in analyses.items():
        doc.h(2, a.title)
        p1 = plots.save(plots.plot_eigenvector_grid(a.dec, classes=classes, n=2, dataset=dataset),
                        out / f"eigenvectors_{g}.png")
        doc.img(p1, f"{a.title}: top-2 positive and negative eigenvectors per class.")
        p2 = plots.save(plots.plot_spectrum(a.dec, classes=classes, dataset=dataset), out / f"spectrum_{g}.png")
        doc.img(p2, f"{a.title}: eigenvalue spectrum per class (top 30 by |λ|).")
        if test:
            img, label = test[0][explain_index], int(test[1][explain_index])
            z = model_logits(a.model, img[None])[0]
            p3 = plots.save(plots.plot_explanation(a.dec, img, z, label=label, dataset=dataset),
                            out / f"explanation_{g}.png")
            doc.img(p3, f"{a.title}: explanation of test image #{explain_index}: contributions λ_k (q_k·x)².")

    link_lm_spectra(doc, lm_spectra)
    title = f"Weight spectra ({dataset})"
    md = write_text(out / "report.md", doc.markdown())
    ht = write_text(out / "report.html", doc.html(title))
    js = write_json(out / "report.json", {
        "dataset": dataset,
        "runs": {g: {"run_dir": str(a.run_dir), "decomposition": a.dec.to_dict(), "fidelity": a.fidelity,
                     "fidelity_error": a.fidelity_error} for g, a in analyses.items()}})
    return {"md": md, "html": ht, "json": js}


