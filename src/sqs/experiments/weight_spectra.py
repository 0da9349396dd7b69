"""The Sec. 4.1 / App. B experiment: 1-layer Bilinear and SQS classifiers, decomposed and compared.

    run_experiment("runs", "results/spectra", seeds=5)   # runs/sec41/<dataset>/<gate>-s<seed>

trains (or reuses finished) 1-layer Bilinear and SQS models per seed and dataset with
the image pipeline's `sec41` config, decomposes them (`sqs.interp`) and writes
results/spectra/{summary.md, summary.json, <dataset>/*.png} (`weight_spectra_report`).
`overrides` (`model.gate_kwargs.lam=0.1`) give the SQS runs other parameters and their
tagged run directories (`sqs-lam0.1-s0`); the Bilinear runs take none. This module also
holds the run-directory side of the analysis: `load_run` and `analyse_run` turn a run
directory into a model, its decomposition and its fidelity on the test set, and the
single-run commands (`sqs spectra decompose|compare|explain`).
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import torch

from sqs.experiments.agreement_baselines import agreement_brief, baseline_pairs
from sqs.experiments.style import say
from sqs.experiments.weight_spectra_report import (
    GATES,
    fig2_reference,
    reference_lines,
    spectra_figures,
    summary_markdown,
    verdict,
)
from sqs.interp import plots
from sqs.interp.spectra import (
    DEFAULT_KS,
    Decomposition,
    contributions,
    cosine_best_match,
    cosine_per_rank,
    decompose,
    fidelity,
    model_logits,
)
from sqs.io import atomic_write, write_json, write_text
from sqs.runs.config_files import grid_gate_overrides
from sqs.runs.image_config import ImageRunConfig, load_config
from sqs.runs.image_pipeline import load_image_model, run_image
from sqs.runs.naming import check_no_legacy
from sqs.stats import mean_std
from sqs.training.rundir import SPECTRA, is_complete, locked

CONFIG = "sec41"


# --------------------------------------------------------------------------- runs


def run_config(dataset: str, gate: str, seed: int, epochs: int, init_seed: int | None = None,
               data_seed: int | None = None, overrides: Iterable[str] = ()) -> ImageRunConfig:
    """The Sec. 4.1 run of one (dataset, gate, seed): `sec41` with `overrides`, whose gate parameters
    reach the SQS runs only (Bilinear takes none). Its `run_dir` is where the run lives."""
    ov = list(overrides) + grid_gate_overrides(gate)
    ov += [f"dataset={json.dumps(dataset)}", f"model.gate={json.dumps(gate)}", f"seed={int(seed)}", f"epochs={epochs}"]
    ov += [f"{k}={int(v)}" for k, v in (("init_seed", init_seed), ("data_seed", data_seed)) if v is not None]
    return load_config(CONFIG, ov)


def train_one(dataset: str, gate: str, seed: int, epochs: int, run_dir: str | Path, data_dir: str | None = None,
              cache_dir: str | None = None, init_seed: int | None = None, data_seed: int | None = None,
              overrides: Iterable[str] = ()):
    """Train one Sec. 4.1 run (1 GLU layer) with the image pipeline. The only training call here.

    `run_image` resumes an interrupted run and returns at once for a finished one. The init is
    seeded by `init_seed` (default `seed`), the batches and noise by `data_seed` (default `seed`):
    the Bilinear and SQS runs of one seed start from identical weights and see identical
    batches and noise; a run with another data seed is the same-init baseline.
    """
    cfg = run_config(dataset, gate, seed, epochs, init_seed, data_seed, overrides)
    return run_image(cfg, run_dir, data_dir=data_dir, cache_dir=cache_dir)


def is_finished(run_dir: str | Path) -> bool:
    return is_complete(run_dir, verify=True)


def load_run(run_dir: str | Path):
    """(model in eval mode, config dict) of a finished image run."""
    model, cfg = load_image_model(run_dir)
    model.eval()
    return model, cfg


def dataset_of(config) -> str | None:
    """The dataset name stored in a run config (looks for a `dataset` key at any depth)."""
    if isinstance(config, dict):
        for key in ("dataset", "dataset_name"):
            if isinstance(config.get(key), str):
                return config[key]
        for v in config.values():
            found = dataset_of(v)
            if found:
                return found
    elif hasattr(config, "__dict__"):
        return dataset_of(vars(config))
    return None


def load_test(dataset: str, data_dir: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    from sqs.data import images

    return images.load(dataset, "test", data_dir=data_dir)


def load_train(dataset: str, data_dir: str | None = None) -> torch.Tensor:
    """The training images (N, 784): what the gain reading is fitted on (never the test set)."""
    from sqs.data import images

    return images.load(dataset, "train", data_dir=data_dir)[0]


@dataclass
class RunAnalysis:
    run_dir: Path
    model: torch.nn.Module
    config: dict
    dec: Decomposition
    dataset: str | None
    fidelity: dict | None
    fidelity_error: str | None = None
    readings: dict | None = None  # {reading: {"dec": Decomposition, "fidelity": dict | None}} when several

    def with_reading(self, reading: str) -> "RunAnalysis":
        """This analysis with another of its readings as `dec` / `fidelity` (exact runs: unchanged)."""
        if not self.readings or reading not in self.readings:
            return self
        r = self.readings[reading]
        return RunAnalysis(self.run_dir, self.model, self.config, r["dec"], self.dataset, r["fidelity"],
                           self.fidelity_error, self.readings)

    @property
    def title(self) -> str:
        return self.dec.label


def analyse_run(run_dir: str | Path, dataset: str | None = None, data_dir: str | None = None, force: bool = False,
                with_fidelity: bool = True, test: tuple | None = None, ks=DEFAULT_KS,
                train_images: torch.Tensor | None = None, reading: str = "first-order") -> RunAnalysis:
    """Load, decompose and (if the test set is available) measure fidelity of one run.

    With `train_images`, an SQS model is also read with the gain reading (fitted on them) and
    both readings' fidelity is measured; `reading` picks the one `dec` holds: a reading name,
    or "best" (the higher test logit R²; the first-order one without fidelity numbers)."""
    model, cfg = load_run(run_dir)
    dec = decompose(model, force=force)
    dataset = dataset or dataset_of(cfg)
    decs = {"first-order": dec}
    if train_images is not None and not dec.exact and dec.gate == "sqs":
        decs["gain"] = decompose(model, reading="gain", fit_images=train_images)
    fids, err = {}, None
    if with_fidelity:
        try:
            if test is None:
                if dataset is None:
                    raise ValueError("the run config names no dataset; pass one")
                test = load_test(dataset, data_dir)
            fids = {r: fidelity(model, d, test[0], test[1], ks=ks) for r, d in decs.items()}
        except Exception as e:  # the figures are still useful without the numbers
            err = f"{type(e).__name__}: {e}"
    readings = {r: {"dec": d, "fidelity": fids.get(r)} for r, d in decs.items()}
    a = RunAnalysis(Path(run_dir), model, cfg, dec, dataset, fids.get("first-order"), err,
                    readings if len(decs) > 1 else None)
    if reading == "best":
        reading = best_reading([a])
    return a.with_reading(reading)


def best_reading(analyses: list[RunAnalysis]) -> str:
    """The reading with the highest mean test logit R² over these runs, among the readings every
    run has (the first-order one when none has several, or without fidelity numbers)."""
    common = None
    for a in analyses:
        have = {r for r, x in (a.readings or {}).items() if x["fidelity"]}
        common = have if common is None else common & have
    if not common:
        return "first-order"
    return max(sorted(common), key=lambda r: (sum(a.readings[r]["fidelity"]["logit_r2"] for a in analyses),
                                              r == "first-order"))


# --------------------------------------------------------------------------- the experiment


def cosine_summary(cos: torch.Tensor, best: torch.Tensor | None = None, cos_min: float = 0.5) -> dict:
    """(n_pairs, C, r) -> per-rank mean/std over (pair, class) and headline numbers.

    `best` (same shape): best-match |cos| (`cosine_best_match`), summarised per rank too.
    `cos_min`: the paper's floor (Fig. 2), for the first rank whose mean falls below it.
    """
    flat = cos.reshape(-1, cos.shape[-1])
    mean = flat.mean(0)
    std = mean_std(flat.double().numpy())["std"]  # sample std over (pair, class), per rank
    below = (mean < cos_min).nonzero()
    extra = {}
    if best is not None:
        bm = best.reshape(-1, best.shape[-1]).mean(0)
        extra = {"best_match_mean": bm.tolist(), "best_match_top5": bm[:5].tolist(),
                 "best_match_min_top10": float(bm[:10].min())}
    return {"n_pairs": int(cos.shape[0]), "mean": mean.tolist(), "std": std, **extra,
            "top5": mean[:5].tolist(), "top5_std": std[:5],
            "min_top10": float(mean[:10].min()), "min_top20": float(mean[:20].min()), "min_all": float(mean.min()),
            "first_rank_below_0.5": int(below[0]) + 1 if len(below) else None,
            "frac_entries_below_0.5_top10": float((cos[..., :10] < cos_min).double().mean())}


#: The |cos|-per-rank tables' pairings of the unsplit seeds, by their `baseline_pairs` name.
COSINE_PAIRINGS = {"sqs_vs_bilinear_same_seed": "sqs_vs_bilinear_same_init",
                   "sqs_vs_bilinear_cross_seed": "sqs_vs_bilinear_other_init",
                   "bilinear_vs_bilinear": "bilinear_other_init", "sqs_vs_sqs": "sqs_other_init"}


def seed_pairings(decs: dict[str, dict[int, Decomposition]], measure) -> dict[str, torch.Tensor]:
    """`measure(a, b)` stacked over each pairing of COSINE_PAIRINGS ({gate: {seed: decomposition}}):
    (n_pairs, C, r) per pairing that has pairs (one seed: no seed-vs-seed pairs)."""
    pairs = baseline_pairs({(g, s, s): d for g, by_seed in decs.items() for s, d in by_seed.items()})
    return {name: torch.stack([measure(a, b) for a, b in pairs[key]])
            for name, key in COSINE_PAIRINGS.items() if pairs[key]}


def run_experiment(runs_dir="runs", out="results/spectra", seeds: int = 5, datasets=("mnist", "fashion-mnist"),
                   epochs: int = 20, report_only: bool = False, data_dir: str | None = None,
                   explain_index: int = 0, splits=((0, 1), (1, 2)), reading: str = "best", k: int = 10,
                   frontier_json: str | Path | None = "results/frontier/frontier.json",
                   overrides: Iterable[str] = ()) -> dict:
    """Train what is missing (unless report_only), decompose everything, write summary.md/json + figures.

    Runs live at `runs_dir/sec41/<dataset>/<gate>-s<seed>` (each run config's `run_dir`; `overrides`
    apply to every run, gate parameters to the SQS runs only); `splits` adds, per (init, data) pair,
    Bilinear and SQS runs at init seed `init` trained on data seed `data`
    (`<gate>-i<init>-d<data>`): the same-init baselines of the fair agreement table. SQS is read
    with `reading` ("best": the most faithful of first-order and gain, by test logit R²); the
    agreement table lists it and the paper's first-order reading. `frontier_json`: a frontier
    report whose recommended setting is shown beside the default (skipped when absent).
    """
    out = Path(out)
    fig2 = fig2_reference()
    summary = {"runs_dir": str(Path(runs_dir) / CONFIG), "seeds": seeds, "epochs": epochs, "space": "pixel",
               "splits": [list(x) for x in splits],
               "paper": {"cos_min": fig2["cos_min"], "cos_top": fig2["cos_top"]}, "datasets": {}, "missing": []}
    figures: dict[str, list[tuple[str, str]]] = {}
    for ds in datasets:
        # 1. train (one call per missing run)
        runs: dict[str, dict[int, Path]] = {g: {} for g in GATES}
        split_runs: dict[tuple, Path] = {}
        todo = [(g, s, None, None) for g in GATES for s in range(seeds)]
        todo += [(g, i, i, d) for i, d in splits for g in GATES]
        for gate, seed, init, dseed in todo:
            cfg = run_config(ds, gate, seed, epochs, init, dseed, overrides)
            rd = cfg.run_dir(runs_dir)
            if not is_finished(rd):
                if report_only:
                    summary["missing"].append(str(rd))
                    continue
                check_no_legacy(rd, cfg.legacy_dirs(runs_dir))
                say(f"[spectra] training {ds} {rd.name} -> {rd}")
                train_one(ds, gate, seed, epochs, rd, data_dir=data_dir, init_seed=init, data_seed=dseed,
                          overrides=overrides)
            if init is None:
                runs[gate][seed] = rd
            else:
                split_runs[(gate, init, dseed)] = rd
        if not any(runs.values()):
            say(f"[spectra] {ds}: no finished runs, skipped")
            continue
        # 2. analyse: every SQS model read first-order and with the gain reading (fitted on train)
        test, train = load_test(ds, data_dir), load_train(ds, data_dir)
        an = {g: {s: analyse_run(rd, dataset=ds, test=test, train_images=train) for s, rd in sorted(runs[g].items())}
              for g in GATES}
        an_split = {key: analyse_run(rd, dataset=ds, test=test, train_images=train) for key, rd in split_runs.items()}
        chosen = best_reading(list(an["sqs"].values())) if reading == "best" else reading
        an = {g: {s: a.with_reading(chosen) for s, a in an[g].items()} for g in GATES}
        decs = {g: {s: a.dec for s, a in an[g].items()} for g in GATES}
        cos = seed_pairings(decs, measure=cosine_per_rank)
        best = seed_pairings(decs, measure=cosine_best_match)
        agreement = {}
        for r in dict.fromkeys([chosen, "first-order"]):
            keyed = {(g, s, s): a.with_reading(r).dec for g in GATES for s, a in an[g].items()}
            keyed.update({key: a.with_reading(r).dec for key, a in an_split.items()})
            agreement[r] = {name: agreement_brief(p, k=k) for name, p in baseline_pairs(keyed).items() if p}
        figures[ds] = spectra_figures(an, cos, ds, out, explain_index, test, reference_lines())
        summary["datasets"][ds] = {
            "runs": {g: {str(s): str(rd) for s, rd in runs[g].items()} for g in GATES},
            "split_runs": {"-".join(map(str, key)): str(rd) for key, rd in split_runs.items()},
            "reading": chosen,
            "cosine": {k_: cosine_summary(v, best[k_], fig2["cos_min"]) for k_, v in cos.items()},
            "agreement": agreement,
            "verdict": verdict(agreement, chosen, fig2),
            "fidelity": {g: {str(s): a.fidelity for s, a in an[g].items()} for g in GATES},
            "fidelity_by_reading": {r: [a.readings[r]["fidelity"] for a in an["sqs"].values()
                                        if a.readings and r in a.readings]
                                    for r in ("first-order", "gain")},
            "spectrum_top5_share": {g: [float((a.dec.eigenvalues[:, :5].abs().sum(-1)
                                               / a.dec.eigenvalues.abs().sum(-1)).mean()) for a in an[g].values()]
                                    for g in GATES},
            "readings": {g: next(iter(an[g].values())).dec.reading for g in GATES if an[g]},
        }
    summary["recommended"] = recommended_setting(frontier_json)
    summary["figures"] = {ds: [list(f) for f in figs] for ds, figs in figures.items()}
    write_json(out / "summary.json", summary)
    write_text(out / "summary.md", summary_markdown(summary, figures))
    say(f"[spectra] wrote {out}/summary.md, summary.json and figures")
    return summary


def recommended_setting(frontier_json: str | Path | None) -> dict | None:
    """The frontier report's recommended SQS setting ({"setting", "label", "criterion", "acc"}), or None."""
    if not frontier_json or not Path(frontier_json).exists():
        return None
    try:
        rec = json.loads(Path(frontier_json).read_text()).get("facts", {}).get("recommendation") or None
    except (OSError, json.JSONDecodeError):
        return None
    return rec and {**rec, "source": str(frontier_json)}



# --------------------------------------------------------------------------- single runs (`sqs spectra ...`)


@contextmanager
def output_dir(run_dir: str | Path, out: str | Path | None) -> Iterator[Path]:
    """`out`, or the run's own `spectra/` folder (`sqs.training.rundir.SPECTRA`) written under the run
    lock when no `out` is given: what a command writes into a run directory, it writes as the run's
    owner does."""
    if out is not None:
        Path(out).mkdir(parents=True, exist_ok=True)
        yield Path(out)
        return
    with locked(run_dir):
        folder = Path(run_dir) / SPECTRA
        folder.mkdir(exist_ok=True)
        yield folder


def save_decomposition(dec: Decomposition, path: Path) -> Path:
    """The decomposition's tensors as safetensors, with the reading and layout in the metadata."""
    from safetensors.torch import save_file

    tensors = {"eigenvalues": dec.eigenvalues, "eigenvectors": dec.eigenvectors, "pixel_raw": dec.pixel_raw,
               "pixel": dec.pixel, "B": dec.B}
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    meta = {"gate": dec.gate, "reading": dec.reading, "exact": str(dec.exact),
            "layout": "eigenvalues (C,d) sorted by |lambda| desc; eigenvectors (C,d,d) rows q_k in embedding space; "
                      "pixel_raw = E^T q; pixel = unit-normalised pixel_raw"}
    return atomic_write(path, lambda p: save_file(tensors, str(p), metadata=meta))


def decompose_run(run_dir: str | Path, out: str | Path | None = None, dataset: str | None = None,
                  data_dir: str | None = None, force: bool = False, with_fidelity: bool = True,
                  n: int = 2) -> tuple[dict, list[str]]:
    """Decompose one 1-layer run; write spectra.json, spectrum/eigenvector figures and
    spectra.safetensors to `out` (default RUN_DIR/spectra). Returns (result, lines to print)."""
    a = analyse_run(run_dir, dataset=dataset, data_dir=data_dir, force=force, with_fidelity=with_fidelity)
    with output_dir(run_dir, out) as out:
        plots.save(plots.plot_spectrum(a.dec, dataset=a.dataset), out / "spectrum.png")
        plots.save(plots.plot_eigenvector_grid(a.dec, n=n, dataset=a.dataset), out / "eigenvectors.png")
        if a.fidelity:
            plots.save(plots.plot_truncation({a.title: a.fidelity}), out / "truncation.png")
        save_decomposition(a.dec, out / "spectra.safetensors")
        result = {"run_dir": str(a.run_dir), "dataset": a.dataset, "decomposition": a.dec.to_dict(),
                  "fidelity": a.fidelity, "fidelity_error": a.fidelity_error}
        write_json(out / "spectra.json", result)
    lines = [f"{a.title}: {a.dec.reading}"]
    if a.fidelity:
        f = a.fidelity
        lines.append(f"  model acc {f['model_acc']:.4f}  surrogate acc {f['surrogate_acc']:.4f}  agreement "
                     f"{f['agreement']:.4f}  logit R² {f['logit_r2']:.4f} (scaled {f['logit_r2_scaled']:.4f})")
        lines.append("  top-k surrogate acc: " + ", ".join(f"k={k}: {v['acc']:.4f}" for k, v in f["truncated"].items()))
    elif a.fidelity_error:
        lines.append(f"  fidelity not measured: {a.fidelity_error}")
    lines.append(f"wrote {out}/spectra.json, spectrum.png, eigenvectors.png, spectra.safetensors")
    return result, lines


def compare_runs(run_dir_a: str | Path, run_dir_b: str | Path, out: str | Path | None = None,
                 force: bool = False, fit: bool = False, k: int = 10, data_dir: str | None = None
                 ) -> tuple[dict, list[str]]:
    """Two image runs (any gate, any depth) compared fairly, A first: each read with every reading of the
    protocol (fitted on the training images, scored on the test images; `fit` adds the least-squares
    reading, minutes per layer) and compared through its most faithful one, named
    (`sqs.interp.compare.compare_models`): per rank and best one-to-one match on the positive and the
    negative side, subspace overlap, form cosine. compare.json and, for 1-layer models, figures in `out`
    (default results/spectra/compare). Returns (result, lines to print). `force` is accepted for old
    scripts: every gate has a reading now."""
    from sqs.interp.compare import compare_models

    (model_a, cfg_a), (model_b, cfg_b) = load_run(run_dir_a), load_run(run_dir_b)
    ds_a, ds_b = dataset_of(cfg_a), dataset_of(cfg_b)
    if ds_a != ds_b:
        raise ValueError(f"compare: the runs were trained on different datasets ({ds_a} and {ds_b}); compare runs "
                         "of one dataset")
    if ds_a is None:
        raise ValueError("compare: the run configs name no dataset")
    x_tr, x_te, y_te = load_train(ds_a, data_dir), *load_test(ds_a, data_dir)
    readings = ("first-order", "gain", "affine") + (("fit",) if fit else ())
    res = compare_models(model_a, model_b, x_tr, x_te, y_te, k=k, readings=readings, fit_rows=12000)
    decs = res.pop("decompositions")
    res.pop("per_class")
    res = json.loads(json.dumps(res, default=float))  # numpy scalars -> JSON
    name_a, name_b = Path(run_dir_a).name, Path(run_dir_b).name
    res.update(run_a=str(run_dir_a), run_b=str(run_dir_b), dataset=ds_a)
    out = Path(out) if out else Path("results") / "spectra" / "compare"
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "compare.json", res)
    figures = []
    if decs is not None:
        figures.append(plots.save(plots.plot_comparison_grid({f"A {name_a} ({res['a']['reading']})": decs[0],
                                                              f"B {name_b} ({res['b']['reading']})": decs[1]},
                                                             classes=range(min(5, decs[0].n_classes)),
                                                             dataset=ds_a), out / "eigenvectors_side_by_side.png").name)
    space = "pixel space, |cos|" if res["space"] == "pixel" else "last layer, |corr| of activation profiles"

    def row(xs) -> str:
        return "  ".join("—" if x is None else f"{float(x):.3f}" for x in xs[:5])

    lines = [f"A = {run_dir_a}: {res['a']['gate']}, read {res['a']['reading']} (test logit R² {res['a']['logit_r2']:.3f}, "
             f"surrogate acc {res['a']['surrogate_acc']:.4f})",
             f"B = {run_dir_b}: {res['b']['gate']}, read {res['b']['reading']} (test logit R² {res['b']['logit_r2']:.3f}, "
             f"surrogate acc {res['b']['surrogate_acc']:.4f})",
             f"A vs B, {space}, mean over classes, ranks 1-5 by signed eigenvalue:"]
    for side in ("positive", "negative"):
        r = res[side]
        lines += [f"  {side:8s} per rank   {row(r['per_rank'])}",
                  f"  {side:8s} best match {row(r['best_match'])}   overlap@{k} {r['overlap']:.3f}"]
    if res.get("form_cosine") is not None:
        lines.append(f"  form cosine {res['form_cosine']:.3f} (quadratic parts only {res['form_cosine_quadratic']:.3f})")
    lines.append(f"wrote {out}/compare.json" + "".join(f", {f}" for f in figures))
    return res, lines


def explain_run(run_dir: str | Path, index: int, out: str | Path | None = None, dataset: str | None = None,
                data_dir: str | None = None, force: bool = False, top: int = 4) -> tuple[Path, list[str]]:
    """Explain test image `index` by eigenvector contributions λ(q·x)²; the figure goes to `out`
    (default RUN_DIR/spectra). Returns (figure path, lines to print)."""
    a = analyse_run(run_dir, dataset=dataset, force=force, with_fidelity=False)
    if a.dataset is None:
        raise ValueError("explain: the run config names no dataset; pass --dataset")
    images, labels = load_test(a.dataset, data_dir)
    if not 0 <= index < images.shape[0]:
        raise ValueError(f"explain: --index must be in [0, {images.shape[0]}), got {index}")
    img, label = images[index], int(labels[index])
    z = model_logits(a.model, img[None])[0]
    contrib = contributions(a.dec, img)
    pred = int(z.argmax())
    with output_dir(run_dir, out) as out:
        path = plots.save(plots.plot_explanation(a.dec, img, z, label=label, dataset=a.dataset, top=top),
                          out / f"explanation_{index}.png")
    names = plots.class_names(a.dataset, a.dec.n_classes)
    lines = [f"{a.title}; test image {index}: label {names[label]}, predicted {names[pred]}",
             "  logits model:     " + " ".join(f"{float(v):+.3f}" for v in z),
             "  logits surrogate: " + " ".join(f"{float(v):+.3f}" for v in contrib.sum(-1))]
    for i in contrib[pred].abs().argsort(descending=True)[:top].tolist():
        lines.append(f"  eigenvector {i + 1:3d}: λ={float(a.dec.eigenvalues[pred, i]):+.4f}  "
                     f"λ(q·x)²={float(contrib[pred, i]):+.4f}")
    lines.append(f"wrote {path}")
    return path, lines
