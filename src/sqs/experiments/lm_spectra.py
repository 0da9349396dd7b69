"""The TinyStories GLU layers read as quadratic forms over tokens: one run (`sqs spectra lm`) and the
SQS-vs-Bilinear experiment (`sqs experiment lm-spectra`).

The analysis is `sqs.interp.lm_quadratic` (pure functions on weights and tensors); this module
only loads run directories (model, tokenizer, validation windows) and feeds it:

    res = read_direction(load_analysis("runs/tinystories-cpu/tinystories/sqs-s0"), layer=0, token=" happy")

Validation windows: the first stories of the validation split, encoded with the run's own
tokenizer (each story followed by the end-of-text token, as in training) and cut into
consecutive windows of the model's context; `windows` of them (a fixed subsample, so the
analysis stays within minutes on a CPU). The experiment splits them in two halves: the gain
reading is fitted on the first, every score is measured on the second.

Spectra and token lists use the first-order reading B_u (the gate taken as the identity: exact
for Bilinear, the paper's reading for SQS); the fidelity table also scores the gain reading.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from sqs.experiments.lm_spectra_report import plot_reading, slug, write_report
from sqs.experiments.style import say
from sqs.interp.agreement import summarise
from sqs.interp.lm_quadratic import (
    LayerInputs,
    Spectrum,
    direction_matrices,
    glu_weights,
    layer_inputs,
    lm_fidelity,
    max_activating,
    mean_inv_rms,
    orient,
    read_tokens,
    split_windows,
    token_agreement,
    token_directions,
    token_id,
    token_inputs,
    top_promoted,
)
from sqs.interp.spectra import gate_reading
from sqs.io import UserError, write_json
from sqs.runs.config_files import grid_gate_overrides
from sqs.runs.lm_config import LMRunConfig, load_config
from sqs.runs.lm_pipeline import LoadedLM, load_lm, run_lm
from sqs.runs.naming import check_no_legacy
from sqs.training.rundir import CONFIG, SPECTRA, is_complete, last_divergence, locked, read_metrics
from sqs.training.trainer import TrainingDiverged

TOP_PROMOTED = "top-promoted"
DEFAULT_TOKENS = (" happy", " dog", ".")
RUNS = (("bilinear", 0), ("sqs", 0), ("sqs", 1))  # same init (seed 0) per gate, + the different-seed baseline
KS = (1, 4, 16, None)
DEFAULT_WINDOWS = 128
SIDES = ("positive", "negative")


class LMSpectraError(UserError, ValueError):
    """A layer, token or run the LM spectra analysis cannot use (the message says what to give instead)."""


# ----------------------------------------------------------------------------- loading


def validation_windows(tokenizer, context: int, n_windows: int, cache_dir: str | os.PathLike | None = None
                       ) -> torch.Tensor:
    """(n_windows, context) token ids: the validation split's first stories, encoded with `tokenizer`."""
    from sqs.data.tinystories import EOT, iter_stories

    eot = tokenizer.token_to_id(EOT)
    need, ids = n_windows * context, []
    for story in iter_stories("valid", cache_dir=cache_dir):
        ids += tokenizer.encode(story, add_special_tokens=False).ids + ([eot] if eot is not None else [])
        if len(ids) >= need:
            break
    n = len(ids) // context
    if n < 2:
        raise LMSpectraError(f"the validation split holds only {len(ids)} tokens, fewer than two windows of "
                             f"{context}; fetch the data (`sqs data fetch tinystories`)")
    n = min(n, n_windows)
    return torch.tensor(ids[:n * context], dtype=torch.long).view(n, context)


@dataclass
class LMAnalysis:
    """A loaded run with its validation windows and every layer's real inputs on them."""

    lm: LoadedLM
    idx: torch.Tensor  # (B, T) validation windows
    inputs: LayerInputs
    scale: float  # mean 1/rms of the final residual stream: the final norm's scale in u_t

    @property
    def n_layers(self) -> int:
        return len(self.lm.model.blocks)

    def check_layer(self, layer: int) -> int:
        if not 0 <= layer < self.n_layers:
            raise LMSpectraError(f"layer {layer} is out of range: {self.lm.run_dir} has {self.n_layers} layers "
                                 f"(--layer 0..{self.n_layers - 1})")
        return layer

    def weights(self, layer: int, force: bool = False):
        """(W, V, P, gate, gate_kwargs) of a layer's GLU; refuses a gate without a quadratic reading."""
        W, V, P, gate, kw = glu_weights(self.lm.model.blocks[self.check_layer(layer)].mlp)
        gate_reading(gate, kw, force=force)
        return W, V, P, gate, kw

    def token_inputs(self, layer: int) -> torch.Tensor:
        norm = self.lm.model.blocks[self.check_layer(layer)].norm2
        return token_inputs(self.lm.model.tok_emb.weight, norm.weight, norm.eps)

    def directions(self, ids) -> torch.Tensor:
        m = self.lm.model
        unembed = m.tok_emb.weight if m.head is None else m.head.weight
        return token_directions(unembed, m.norm.weight, ids, self.scale)

    def token(self, text: str) -> int:
        try:
            return token_id(self.lm.tokenizer, text)
        except ValueError as e:
            raise LMSpectraError(f"{e} of this run's tokenizer") from None

    def top_promoted(self, layer: int, exclude=()) -> int:
        """The token this layer's MLP promotes most on average over the validation windows (skipping `exclude`)."""
        W, V, P, gate, kw = glu_weights(self.lm.model.blocks[self.check_layer(layer)].mlp)
        vocab = self.lm.model.tok_emb.weight.shape[0]
        ids, _ = top_promoted(W, V, P, self.directions(range(vocab)), k=len(exclude) + 1, by="mean",
                              n=self.inputs.pre_mlp[layer], gate=gate, gate_kwargs=kw)
        return next(int(i) for i in ids if int(i) not in set(exclude))

    def decode(self, i: int) -> str:
        return self.lm.tokenizer.decode([int(i)], skip_special_tokens=False)


def load_analysis(run_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
                  windows: int = DEFAULT_WINDOWS, allow_checkpoint: bool = True) -> LMAnalysis:
    """Load a run (final weights, else its last checkpoint if allowed) and run it on validation windows."""
    lm = load_lm(run_dir, device="cpu", allow_checkpoint=allow_checkpoint, cache_dir=cache_dir)
    lm.model.double()
    idx = validation_windows(lm.tokenizer, lm.model.cfg.context, windows, cache_dir)
    inputs = layer_inputs(lm.model, idx)
    return LMAnalysis(lm, idx, inputs, mean_inv_rms(inputs.final, lm.model.norm.eps))


# ----------------------------------------------------------------------------- one direction, one layer


def read_direction(an: LMAnalysis, layer: int, token: str | None = None, direction: str | None = None,
                   k: int = 3, n_tokens: int = 8, examples: int = 3, force: bool = False) -> dict:
    """Spectrum of B_u (first-order reading) for one token's output direction at one layer, and the
    top-k eigenvectors of each side read as tokens (both ends), plus max-activating validation
    contexts for layer 0 (by |q . n|: the quadratic form ignores the sign). JSON-ready."""
    layer = an.check_layer(layer)
    if (token is None) == (direction is None):
        raise LMSpectraError("give exactly one of --token TEXT or --direction top-promoted")
    if direction is not None and direction != TOP_PROMOTED:
        raise LMSpectraError(f"unknown --direction {direction!r}; the one named direction is {TOP_PROMOTED!r}")
    W, V, P, gate, kw = an.weights(layer, force=force)
    tid = an.top_promoted(layer) if direction else an.token(token)
    B = direction_matrices(W, V, P, an.directions([tid]))[0]
    return describe(an, layer, tid, Spectrum.of(B), gate, k=k, n_tokens=n_tokens, examples=examples,
                    label=TOP_PROMOTED if direction else None)


def describe(an: LMAnalysis, layer: int, tid: int, spec: Spectrum, gate: str, k: int = 3, n_tokens: int = 8,
             examples: int = 3, label: str | None = None) -> dict:
    X = an.token_inputs(layer)
    lam = spec.eigenvalues
    out = {"run_dir": str(an.lm.run_dir), "gate": gate, "layer": layer, "token_id": tid, "token": an.decode(tid),
           "direction": label or "token", "eigenvalues": lam.tolist(), "n_positive": int((lam > 0).sum()),
           "n_negative": int((lam < 0).sum()), "abs_sum": float(lam.abs().sum()), "sides": {}}
    for side in SIDES:
        vals, Q = spec.side(side, k)
        Q = orient(Q, X)
        rows = []
        for r, (v, q) in enumerate(zip(vals.tolist(), Q)):
            toks = read_tokens(q, X, n_tokens, an.lm.tokenizer)
            row = {"rank": r + 1, "eigenvalue": v, "share": abs(v) / out["abs_sum"],
                   "plus": toks["positive"].text, "plus_values": toks["positive"].values,
                   "minus": toks["negative"].text, "minus_values": toks["negative"].values}
            if layer == 0 and examples:
                row["examples"] = [e.text for e in max_activating(an.inputs.pre_mlp[0], q, an.idx, k=examples,
                                                                   side="abs", decode=an.lm.tokenizer)]
            rows.append(row)
        out["sides"][side] = rows
    return out


def tokens_str(toks: list[str], n: int | None = None) -> str:
    return " ".join(repr(t) for t in toks[:n])


def format_reading(res: dict) -> list[str]:
    lam = res["eigenvalues"]
    lines = [f"{res['run_dir']}: layer {res['layer']} ({res['gate']}), direction of token {res['token']!r} "
             f"(id {res['token_id']}{', top-promoted' if res['direction'] == TOP_PROMOTED else ''})",
             f"spectrum: {res['n_positive']} positive, {res['n_negative']} negative eigenvalues; "
             f"largest {max(lam):+.4g}, most negative {min(lam):+.4g}"]
    for side in SIDES:
        for row in res["sides"][side]:
            lines.append(f"  {side[:3]} #{row['rank']}  lam {row['eigenvalue']:+.4g} ({100 * row['share']:.1f}% of "
                         f"sum|lam|)")
            lines.append(f"      + end: {tokens_str(row['plus'])}")
            lines.append(f"      - end: {tokens_str(row['minus'])}")
            for ex in row.get("examples", []):
                lines.append(f"      e.g. {ex}")
    return lines


def spectra_lm(run_dir: str | os.PathLike, layer: int, token: str | None = None, direction: str | None = None,
               k: int = 3, out: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None,
               windows: int = 16, force: bool = False) -> tuple[dict, list[str]]:
    """`sqs spectra lm`: read one direction at one layer of a run; print it, write a figure and JSON to
    `out` (default RUN_DIR/spectra, written under the run's lock)."""
    an = load_analysis(run_dir, cache_dir=cache_dir, windows=windows)
    res = read_direction(an, layer, token=token, direction=direction, k=k, force=force)
    stem = f"lm_layer{layer}_{slug(res['token']) if res['direction'] == 'token' else TOP_PROMOTED}"
    if out is not None:
        fig, js = plot_reading(res, Path(out) / f"{stem}.png"), write_json(Path(out) / f"{stem}.json", res)
    else:
        with locked(run_dir):
            out = Path(run_dir) / SPECTRA
            fig, js = plot_reading(res, out / f"{stem}.png"), write_json(out / f"{stem}.json", res)
    return res, format_reading(res) + [f"wrote {fig} and {js}"]


# ----------------------------------------------------------------------------- the experiment


def run_status(rd: Path) -> str:
    """'finished', 'unfinished' (started, no final weights yet), 'diverged' or 'absent'."""
    if is_complete(rd, verify=True):
        return "finished"
    if last_divergence(rd) is not None:
        return "diverged"
    return "unfinished" if (rd / CONFIG).exists() else "absent"


def run_configs(config: str | os.PathLike, overrides: list[str] | None) -> dict[tuple[str, int], LMRunConfig]:
    """The config of each run of RUNS: `config` with `overrides`, gate parameters for the SQS runs only."""
    return {(gate, seed): load_config(config, list(overrides or []) + grid_gate_overrides(gate), gate=gate, seed=seed)
            for gate, seed in RUNS}


def ensure_runs(cfgs: dict[tuple[str, int], LMRunConfig], runs_dir, train: bool = True, cache_dir=None,
                device: str | None = "auto", progress: bool = True) -> dict[tuple[str, int], dict]:
    """Status of every run the experiment needs; with `train`, trains (or resumes) the absent / unfinished."""
    out = {}
    for i, ((gate, seed), cfg) in enumerate(cfgs.items()):
        rd = cfg.run_dir(runs_dir)
        status = run_status(rd)
        if status in ("absent", "unfinished") and train:
            check_no_legacy(rd, cfg.legacy_dirs(runs_dir))
            say(f"[{i + 1}/{len(cfgs)}] training {rd}")
            try:
                run_lm(cfg, rd, cache_dir=cache_dir, device=device, progress=progress)
            except TrainingDiverged as e:
                say(f"  {e}")
            status = run_status(rd)
        out[(gate, seed)] = {"run_dir": rd, "status": status}
    return out


def _run_meta(rd: Path) -> dict:
    recs = read_metrics(rd)
    final = next((m for m in reversed(recs) if m.get("final")), recs[-1] if recs else {})
    return {"step": final.get("step"), "val_loss": final.get("val_loss"), "elapsed_s": final.get("elapsed_s")}


def _pick_tokens(an: LMAnalysis, tokens) -> tuple[list[tuple[str, int]], list[str]]:
    keep, skipped = [], []
    for t in tokens:
        try:
            keep.append((t, an.token(t)))
        except LMSpectraError:
            skipped.append(t)
    return keep, skipped


def analyse(analyses: dict[str, LMAnalysis], tokens=DEFAULT_TOKENS, k: int = 10, n_show: int = 3,
            n_tokens: int = 8) -> dict:
    """Fidelity, token read-outs and token-space agreement of the loaded models (keys 'bilinear-s0',
    'sqs-s0', optionally 'sqs-s1'), for `tokens` plus each layer's top-promoted token of Bilinear (the
    one it promotes most among the tokens not already in `tokens`)."""
    missing = [m for m in ("bilinear-s0", "sqs-s0") if m not in analyses]
    if missing:
        raise LMSpectraError(f"analyse: needs the runs {', '.join(missing)}")
    ref = analyses["bilinear-s0"]
    fixed, skipped = _pick_tokens(ref, tokens)
    res = {"tokens_skipped": skipped, "k": k, "layers": []}
    for layer in range(ref.n_layers):
        dirs = fixed + [(TOP_PROMOTED, ref.top_promoted(layer, exclude=[i for _, i in fixed]))]
        ids = [i for _, i in dirs]
        L = {"layer": layer, "directions": [{"label": lab, "token_id": i, "token": ref.decode(i)} for lab, i in dirs],
             "models": {}, "agreement": {}}
        B, X = {}, {}
        for name, an in analyses.items():
            W, V, P, gate, kw = an.weights(layer)
            U = an.directions(ids)
            n_fit, n_eval = split_windows(an.inputs.pre_mlp[layer])
            fid = lm_fidelity(W, V, P, gate, kw, U, n_fit, n_eval, ks=KS)
            for reading in ("first_order", "gain"):
                fid[reading].pop("gains", None)
            B[name], X[name] = direction_matrices(W, V, P, U), an.token_inputs(layer)
            reads = [describe(an, layer, i, Spectrum.of(B[name][j]), gate, k=n_show, n_tokens=n_tokens,
                              examples=2, label=lab) for j, (lab, i) in enumerate(dirs)]
            for r in reads:
                r.pop("run_dir")  # named once, under "runs"
            L["models"][name] = {"gate": gate, "fidelity": fid, "reads": reads}
        pairs = {"sqs-s0 vs bilinear-s0": ("sqs-s0", "bilinear-s0"), "sqs-s0 vs sqs-s1": ("sqs-s0", "sqs-s1")}
        for label, (a, b) in pairs.items():
            if a in B and b in B:
                L["agreement"][label] = token_agreement(B[a], X[a], B[b], X[b], k=k)
        res["layers"].append(L)
    res["agreement"] = {label: summarise([L["agreement"][label] for L in res["layers"]])
                        for label in res["layers"][0]["agreement"]}
    for L in res["layers"]:
        L["agreement"] = {label: summarise([a]) for label, a in L["agreement"].items()}
    return res


def run_experiment(config: str | os.PathLike = "tinystories-cpu", out: str | os.PathLike = "results/lm_spectra",
                   runs_dir: str | os.PathLike = "runs", train: bool = True, tokens=DEFAULT_TOKENS,
                   windows: int = DEFAULT_WINDOWS, k: int = 10, overrides: list[str] | None = None,
                   cache_dir: str | os.PathLike | None = None, device: str | None = "auto",
                   progress: bool = True) -> dict:
    """Train the runs it needs (unless `train=False`: then unfinished runs are reported missing), analyse
    them and write `out`/summary.md, summary.json and figures. Needs bilinear-s0 and sqs-s0 finished;
    sqs-s1 (the different-seed baseline) is optional. `overrides` apply to every run, gate parameters
    (`model.gate_kwargs.lam=0.1`) to the SQS runs only, which are then filed under their tag."""
    cfgs = run_configs(config, overrides)
    runs = ensure_runs(cfgs, runs_dir, train=train, cache_dir=cache_dir, device=device, progress=progress)
    missing = [f"{g}-s{s} ({r['status']})" for (g, s), r in runs.items() if r["status"] != "finished"]
    for (g, s), r in runs.items():
        if r["status"] == "finished":
            r.update(_run_meta(r["run_dir"]))
    need = [f"{g}-s{s}" for g, s in RUNS[:2] if runs[(g, s)]["status"] != "finished"]
    if need:
        root = cfgs[RUNS[0]].run_dir(runs_dir).parent
        raise LMSpectraError(f"lm-spectra needs finished runs {', '.join(need)} under {root}; "
                             + ("they are not finished yet: wait for them, or drop --no-train to train them"
                                if not train else "their training did not finish (see their run directories)"))
    t0 = time.perf_counter()
    analyses = {f"{g}-s{s}": load_analysis(r["run_dir"], cache_dir=cache_dir, windows=windows, allow_checkpoint=False)
                for (g, s), r in runs.items() if r["status"] == "finished"}
    vocab = {n: a.lm.tokenizer.get_vocab_size() for n, a in analyses.items()}
    if len(set(vocab.values())) > 1:
        raise LMSpectraError(f"the runs use different tokenizers ({vocab}); token-space comparison needs one")
    res = analyse(analyses, tokens=tokens, k=k)
    res.update(config=cfgs[RUNS[0]].name, windows=int(next(iter(analyses.values())).idx.shape[0]),
               context=int(next(iter(analyses.values())).idx.shape[1]), missing=missing,
               runs={f"{g}-s{s}": {**r, "run_dir": Path(r["run_dir"]).relative_to(runs_dir).as_posix()}
                     for (g, s), r in runs.items()},  # relative to --runs-dir: the report names no machine paths
               threads=torch.get_num_threads())
    res["analysis_s"] = time.perf_counter() - t0
    write_report(res, out)
    return res

