"""Run-level helpers (load a trained run, analyse it) and a self-contained report.

    write_report({"bilinear": "runs/a", "sqs": "runs/b"}, "report/spectra", "mnist")

writes report.md (images beside it) and report.html (images embedded as base64,
one file to open anywhere).
"""

from __future__ import annotations

import base64
import html
import statistics
from dataclasses import dataclass
from pathlib import Path

import torch

from sqs.interp.spectra import DEFAULT_KS, Decomposition, cosine_per_rank, decompose, fidelity, model_logits
from sqs.io import write_json, write_text

GATE_TITLES = {"bilinear": "Bilinear", "sqs": "SQS"}


# --------------------------------------------------------------------------- runs


def load_run(run_dir: str | Path):
    """(model, config dict) of a finished image run, via the image pipeline."""
    try:
        from sqs.experiments.image import load_image_model
    except ImportError as e:  # pragma: no cover - only while the pipeline is missing
        raise RuntimeError("loading a run needs sqs.experiments.image.load_image_model (the image pipeline); "
                           f"it is not importable here: {e}") from e
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


@dataclass
class RunAnalysis:
    run_dir: Path
    model: torch.nn.Module
    config: dict
    dec: Decomposition
    dataset: str | None
    fidelity: dict | None
    fidelity_error: str | None = None

    @property
    def title(self) -> str:
        return self.dec.label


def analyse_run(run_dir: str | Path, dataset: str | None = None, data_dir: str | None = None, force: bool = False,
                with_fidelity: bool = True, test: tuple | None = None, ks=DEFAULT_KS) -> RunAnalysis:
    """Load, decompose and (if the test set is available) measure fidelity of one run."""
    model, cfg = load_run(run_dir)
    dec = decompose(model, force=force)
    dataset = dataset or dataset_of(cfg)
    fid, err = None, None
    if with_fidelity:
        try:
            if test is None:
                if dataset is None:
                    raise ValueError("the run config names no dataset; pass one")
                test = load_test(dataset, data_dir)
            fid = fidelity(model, dec, test[0], test[1], ks=ks)
        except Exception as e:  # the figures are still useful without the numbers
            err = f"{type(e).__name__}: {e}"
    return RunAnalysis(Path(run_dir), model, cfg, dec, dataset, fid, err)


# --------------------------------------------------------------------------- tables


def mean_std(values) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{statistics.mean(values):.4f} ± {statistics.stdev(values):.4f}"


FIDELITY_ROWS = [
    ("model accuracy", lambda f: f["model_acc"]),
    ("surrogate accuracy (all eigenvectors)", lambda f: f["surrogate_acc"]),
    ("surrogate/model argmax agreement", lambda f: f["agreement"]),
    ("logit R² (surrogate vs model)", lambda f: f["logit_r2"]),
    ("logit R² after best single scale", lambda f: f["logit_r2_scaled"]),
]


def fidelity_table(columns: dict[str, list[dict]]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one column per model (a list of fidelity dicts, e.g. one per seed)."""
    header = ["metric"] + list(columns)
    rows = [[name] + [mean_std([get(f) for f in fids if f]) for fids in columns.values()]
            for name, get in FIDELITY_ROWS]
    keys = []
    for fids in columns.values():
        for f in fids:
            if f:
                keys += [k for k in f["truncated"] if k not in keys]
    for k in keys:
        if k == "all":  # the "surrogate accuracy (all eigenvectors)" row
            continue
        rows.append([f"top-{k} surrogate accuracy"] + [
            mean_std([f["truncated"][k]["acc"] for f in fids if f and k in f["truncated"]])
            for fids in columns.values()])
    return header, rows


# --------------------------------------------------------------------------- documents


class Doc:
    """A few block types rendered both as Markdown and as self-contained HTML."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.blocks: list[tuple] = []

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def table(self, header: list[str], rows: list[list[str]]):
        self.blocks.append(("table", header, rows))

    def img(self, path: str | Path, caption: str = ""):
        self.blocks.append(("img", Path(path), caption))

    def markdown(self) -> str:
        out = []
        for b in self.blocks:
            if b[0] == "h":
                out.append("#" * b[1] + " " + b[2])
            elif b[0] == "p":
                out.append(b[1])
            elif b[0] == "table":
                header, rows = b[1], b[2]
                cell = lambda c: str(c).replace("|", "\\|")  # noqa: E731 - a pipe would end the cell
                out.append("\n".join(["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
                                     + ["| " + " | ".join(map(cell, r)) + " |" for r in rows]))
            elif b[0] == "img":
                rel = b[1].relative_to(self.root) if b[1].is_relative_to(self.root) else b[1]
                out.append(f"![{b[2]}]({rel.as_posix()})" + (f"\n\n*{b[2]}*" if b[2] else ""))
        return "\n\n".join(out) + "\n"

    def html(self, title: str) -> str:
        esc = html.escape
        body = []
        for b in self.blocks:
            if b[0] == "h":
                body.append(f"<h{b[1]}>{esc(b[2])}</h{b[1]}>")
            elif b[0] == "p":
                body.append(f"<p>{esc(b[1])}</p>")
            elif b[0] == "table":
                head = "".join(f"<th>{esc(str(c))}</th>" for c in b[1])
                rows = "".join("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in r) + "</tr>" for r in b[2])
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
            elif b[0] == "img":
                data = base64.b64encode(b[1].read_bytes()).decode("ascii")
                body.append(f'<figure><img src="data:image/png;base64,{data}" alt="{esc(b[2])}">'
                            f"<figcaption>{esc(b[2])}</figcaption></figure>")
        style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #bbb;padding:3px 8px;"
                 "text-align:right}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
                 "figcaption{font-style:italic;color:#555;font-size:90%}")
        return (f"<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
                f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# --------------------------------------------------------------------------- the report


def write_report(run_dirs: dict[str, str | Path], out_dir: str | Path, dataset: str | None = None,
                 data_dir: str | None = None, explain_index: int = 0, classes=None) -> dict[str, Path]:
    """Eigenvector images and fidelity numbers for each run (e.g. {"bilinear": dir, "sqs": dir}).

    Writes out_dir/report.md (+ PNGs beside it), out_dir/report.html (images embedded)
    and out_dir/report.json; returns their paths.
    """
    from sqs.interp import plots

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    test = None
    analyses: dict[str, RunAnalysis] = {}
    for gate, rd in run_dirs.items():
        if dataset is None:
            dataset = dataset_of(load_run(rd)[1])
        if test is None and dataset is not None:
            try:
                test = load_test(dataset, data_dir)
            except Exception as e:  # noqa: BLE001 - reported in the document
                print(f"report: test set of {dataset} unavailable ({e}); writing figures without fidelity")
                test = ()
        analyses[gate] = analyse_run(rd, dataset=dataset, test=test or None, with_fidelity=bool(test))
    names = {g: GATE_TITLES.get(g, g) for g in analyses}

    doc = Doc(out)
    doc.h(1, f"Weight spectra: {' vs '.join(names.values())} on {dataset or 'unknown dataset'}")
    doc.p("Each class logit of a 1-layer GLU classifier read as a quadratic form x^T B_a x of the embedded input "
          "x = E img, B_a = Σ_i (H P)_ai w_i v_i^T (symmetrised), decomposed as Σ_k λ_k (q_k·x)². "
          "For Bilinear (identity gate) this is exact. For SQS it is the paper's first-order reading: the SQS gate "
          "is treated as the identity, so the eigenvectors describe the model only approximately; the fidelity "
          "table below measures how well. Eigenvectors are shown in pixel space (E^T q; red positive, blue "
          "negative, white zero).")
    for a in analyses.values():
        doc.p(f"{a.title}: {a.run_dir} — {a.dec.reading}.")

    if len(analyses) >= 2:
        decs = {a.title: a.dec for a in analyses.values()}
        path = plots.save(plots.plot_comparison_grid(decs, classes=classes if classes is not None else range(5),
                                                     n=2, dataset=dataset), out / "eigenvectors_side_by_side.png")
        doc.h(2, "Top eigenvectors side by side")
        doc.img(path, "Top-2 eigenvectors by |λ| per class; later models' signs aligned to the first; "
                      "|cos| in pixel space between equal ranks (SQS: first-order reading).")
        labels = list(analyses)
        cos = cosine_per_rank(analyses[labels[0]].dec, analyses[labels[1]].dec)
        path = plots.save(plots.plot_cosine_per_rank({f"{names[labels[1]]} vs {names[labels[0]]}": cos[None]},
                                                     max_rank=min(64, cos.shape[-1])), out / "cosine_per_rank.png")
        doc.h(2, "Eigenvector similarity per rank")
        m = cos.mean(0)
        doc.table(["rank"] + [str(i + 1) for i in range(5)] + ["min over ranks (top 10)", "min over all ranks"],
                  [["mean |cos| over classes"] + [f"{float(m[i]):.3f}" for i in range(min(5, len(m)))]
                   + [f"{float(m[:10].min()):.3f}", f"{float(m.min()):.3f}"]])
        doc.img(path, "|cos| between eigenvectors of equal rank (pixel space), mean over classes, one model pair. "
                      "The paper reports never below 0.5 and ≈0.95 for the top eigenvectors.")

    if any(a.fidelity for a in analyses.values()):
        doc.h(2, "Fidelity of the eigen-reading on the test set")
        header, rows = fidelity_table({a.title: [a.fidelity] for a in analyses.values()})
        doc.table(header, rows)
        doc.p("Surrogate: logits rebuilt from the eigendecomposition, Σ_k λ_k (q_k·x)², using the top-k "
              "eigenvectors per class. Bilinear: R² = 1 by construction. SQS: how much of the model the "
              "first-order reading reproduces.")
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

    title = f"Weight spectra ({dataset})"
    md = write_text(out / "report.md", doc.markdown())
    ht = write_text(out / "report.html", doc.html(title))
    js = write_json(out / "report.json", {
        "dataset": dataset,
        "runs": {g: {"run_dir": str(a.run_dir), "decomposition": a.dec.to_dict(), "fidelity": a.fidelity,
                     "fidelity_error": a.fidelity_error} for g, a in analyses.items()}})
    return {"md": md, "html": ht, "json": js}


