"""`sqs read MODEL --out DIR`: every gated MLP of a pretrained decoder read as quadratic forms over tokens.

Loads a Hugging Face directory, a GGUF file or a fetched name (`sqs.integrations.pretrained`), runs
the decoder once over training text and once over held-out text with hooks on every gated MLP and
the final norm (`pretrained.record`), then reads each layer (`sqs.interp.pretrained_reading`): for
the chosen tokens and the layer's most promoted tokens, every per-unit reading of its gate fitted on
the training-text inputs and scored on the held-out inputs, and the best reading's spectrum and
token read-outs. Writes DIR/reading.json (everything), DIR/reading.md (tables) and figures.

The fit and evaluation sets are whole windows of two disjoint text splits (`text_split`: held-out
Shakespeare is every 10th of 100 pieces), so no token is in both.
"""

from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from sqs.interp.pretrained_reading import LAYER_READINGS, PROMOTED, TRUNCATIONS, DecoderLayer, Head, read_decoder_layer
from sqs.io import UserError, save_figure, write_json, write_text

DEFAULT_TOKENS = (" Paris", " dog", ".")
READING_COLOR = {"first-order": "tab:gray", "gain": "tab:blue", "affine": "tab:red"}


class ReadError(UserError, ValueError):
    """A token, layer or text the reading cannot use; the message says what to give instead."""


def token_id(tokenizer, text: str) -> int:
    """The id of `text` if the (Hugging Face) tokenizer makes it one token, e.g. " Paris"."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise ReadError(f"--token {text!r} is {len(ids)} tokens {pieces} for this model's tokenizer, not one; pick "
                        "a single token (byte-level BPE words usually carry their leading space, e.g. ' dog')")
    return int(ids[0])


def _cpu_s() -> float:
    """CPU seconds of this process so far (user + system, all threads)."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def decoder_layers(model) -> list[DecoderLayer]:
    """Every gated MLP of the model (`hf_mlps.find_gated_mlps`) with the norm that feeds it."""
    from sqs.integrations.hf_mlps import NotAGatedMLP, find_gated_mlps
    from sqs.integrations.pretrained import mlp_norm

    try:
        found = find_gated_mlps(model)
    except NotAGatedMLP as e:
        raise ReadError(str(e)) from e
    return [DecoderLayer.of(g.path, g.module, mlp_norm(model, g.path)) for g in found]


def read_model(model, tokenizer, fit_blocks: torch.Tensor, eval_blocks: torch.Tensor, tokens=DEFAULT_TOKENS,
               promoted: int = 3, layers: list[int] | None = None, k: int = 3, n_tokens: int = 8,
               batch_size: int = 8, progress: Callable[[str], None] | None = None, bar: bool = False) -> dict:
    """Read every gated MLP layer (or `layers`) of a loaded model; JSON-ready, with wall and CPU times.

    fit_blocks / eval_blocks: token windows of training / held-out text. The readings are fitted, the
    promoted tokens chosen and the final norm's scale s measured on fit_blocks only. `bar`: a progress bar
    over the layers on stderr (the per-layer lines then go through it, so they do not break it).
    """
    from sqs.integrations.pretrained import final_norm, record

    say = progress or (lambda _m: None)
    fixed = [(t, token_id(tokenizer, t)) for t in tokens]
    dlayers = decoder_layers(model)
    chosen = list(range(len(dlayers))) if layers is None else list(layers)
    bad = [i for i in chosen if not 0 <= i < len(dlayers)]
    if bad:
        raise ReadError(f"--layer {bad[0]} is out of range: the model has {len(dlayers)} gated MLP layers "
                        f"(0..{len(dlayers) - 1})")
    mlps = [model.get_submodule(dlayers[i].path) for i in chosen]
    norm = final_norm(model)
    w0, c0 = time.perf_counter(), _cpu_s()
    say(f"recording {len(chosen)} layers' inputs on {fit_blocks.numel()} training and {eval_blocks.numel()} "
        "held-out tokens ...")
    fit = record(model, mlps + [norm], fit_blocks, batch_size)
    held = record(model, mlps, eval_blocks, batch_size)
    collect = {"wall_s": time.perf_counter() - w0, "cpu_s": _cpu_s() - c0}
    w1, c1 = time.perf_counter(), _cpu_s()
    eps = getattr(norm, "eps", getattr(norm, "variance_epsilon", None))
    head = Head.of(model.get_input_embeddings().weight, model.get_output_embeddings().weight, norm.weight,
                   fit[-1], None if eps is None else float(eps))
    U_all = head.all_directions() if promoted else None
    out_layers = []
    pbar = tqdm(total=len(chosen), desc="sqs read", unit="layer", file=sys.stderr, disable=not bar, leave=False)
    if bar and progress is not None:
        def say(m: str) -> None:
            with tqdm.external_write_mode(file=sys.stderr):  # lift the bar, print the line, redraw it
                progress(m)
    for j, i in enumerate(chosen):
        lw = time.perf_counter()
        res = read_decoder_layer(dlayers[i], head, fit[j], held[j], [tid for _, tid in fixed], promoted=promoted,
                                 U_all=U_all, k=k, n_tokens=n_tokens, decode=tokenizer)
        res["layer"] = i
        res["read_s"] = time.perf_counter() - lw
        out_layers.append(res)
        best = res["readings"][res["best"]]
        say(f"layer {i:2d} ({res['gate']}): best reading {res['best']}, held-out R^2 {best['r2']:.3f} "
            f"({res['read_s']:.1f} s)")
        pbar.update(1)
    pbar.close()
    read = {"wall_s": time.perf_counter() - w1, "cpu_s": _cpu_s() - c1}
    return {
        "tokens": [{"text": t, "token_id": i} for t, i in fixed], "promoted_per_layer": promoted,
        "readings_tried": list(LAYER_READINGS), "truncations": [("all" if x is None else x) for x in TRUNCATIONS],
        "fit_tokens": int(fit_blocks.numel()), "eval_tokens": int(eval_blocks.numel()),
        "context": int(fit_blocks.shape[1]), "n_layers_model": len(dlayers), "final_norm_scale": head.scale,
        "layers": out_layers,
        "timing": {"collect": collect, "read": read, "threads": torch.get_num_threads(),
                   "after_loading_wall_s": collect["wall_s"] + read["wall_s"],
                   "after_loading_cpu_s": collect["cpu_s"] + read["cpu_s"]},
    }


def read_pretrained(model: str | os.PathLike, out: str | os.PathLike, tokens=DEFAULT_TOKENS, promoted: int = 3,
                    fit_text: str = "shakespeare", eval_text: str | None = None, context: int = 128,
                    fit_windows: int = 16, eval_windows: int = 16, layers: list[int] | None = None, k: int = 3,
                    n_tokens: int = 8, compare: str | os.PathLike | None = None,
                    cache_dir: str | os.PathLike | None = None, progress: Callable[[str], None] | None = print,
                    bar: bool = False) -> dict:
    """`sqs read`: load `model`, read it (`read_model`) on `fit_windows` training and `eval_windows` held-out
    windows of `context` tokens, write OUT/reading.json, OUT/reading.md and OUT/*.png. `compare`: another
    reading.json (e.g. of the model this one was converted from) whose per-layer fidelity the table shows."""
    from sqs.integrations.pretrained import load_pretrained, text_blocks

    say = progress or (lambda _m: None)
    baseline = _load_compare(compare) if compare is not None else None
    w0, c0 = time.perf_counter(), _cpu_s()
    pre = load_pretrained(model, cache_dir=cache_dir)
    if pre.tokenizer is None:
        raise ReadError(f"{pre.source} has no tokenizer; save one with the model (tokenizer.save_pretrained(DIR)) "
                        "to read it over tokens")
    fit_blocks = text_blocks(pre.tokenizer, fit_text, "train", context, fit_windows, cache_dir)
    eval_blocks = text_blocks(pre.tokenizer, eval_text or fit_text, "heldout", context, eval_windows, cache_dir)
    load = {"wall_s": time.perf_counter() - w0, "cpu_s": _cpu_s() - c0}
    say(f"loaded {pre.source} ({load['wall_s']:.0f} s)")
    res = read_model(pre.model, pre.tokenizer, fit_blocks, eval_blocks, tokens, promoted, layers, k, n_tokens,
                     progress=say, bar=bar)
    res.update(model=str(model), source=_portable(pre.source), kind=pre.kind, fit_text=str(fit_text),
               eval_text=str(eval_text or fit_text), model_type=getattr(pre.model.config, "model_type", None))
    res["timing"]["load"] = load
    if baseline is not None:
        res["compare"] = baseline
    write_report(res, out)
    return res


def _portable(path: str) -> str:
    """A path without the user's home directory (reports name no machine paths)."""
    home = str(Path.home())
    return "~" + path[len(home):] if path.startswith(home) else path


def _load_compare(path) -> dict:
    import json

    p = Path(path)
    if p.is_dir():
        p = p / "reading.json"
    if not p.is_file():
        raise ReadError(f"--compare {path}: no reading.json there; pass the --out folder of an earlier `sqs read`")
    res = json.loads(p.read_text())
    return {"path": str(path), "model": res.get("model"),
            "layers": {str(L["layer"]): {"gate": L["gate"], "best": L["best"],
                                         "r2": {r: L["readings"][r]["r2"] for r in L["readings"]}}
                       for L in res["layers"]}}


# ----------------------------------------------------------------------------- report


def _tok(t: str) -> str:
    return repr(t).replace("|", "\\|")


def _toks(ts: list[str], n: int) -> str:
    return " ".join(_tok(t) for t in ts[:n])


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def fidelity_table(res: dict) -> str:
    """Per layer: held-out R^2 of every reading, the best one, its top-k truncations, and the promoted tokens."""
    cmp = res.get("compare")
    ks = [str(k) for k in res["truncations"] if str(k) != "all"]
    head = ["layer", "gate"] + [f"R² {r}" for r in res["readings_tried"]] + ["best"] + [f"best, top {k}" for k in ks]
    head += ["sign agr."] + (["compared: best R²"] if cmp else []) + ["most promoted tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for L in res["layers"]:
        best = L["readings"][L["best"]]
        row = [str(L["layer"]), L["gate"]] + [_fmt(L["readings"][r]["r2"]) if r in L["readings"] else "—"
                                              for r in res["readings_tried"]]
        row += [L["best"]] + [_fmt(best["truncated_r2"].get(k)) for k in ks] + [f"{best['sign_agreement']:.2f}"]
        if cmp:
            c = cmp["layers"].get(str(L["layer"]))
            row.append("—" if c is None else f"{c['r2'][c['best']]:.3f} ({c['gate']}, {c['best']})")
        row.append(_toks([d["token"] for d in L["directions"] if d["label"] == PROMOTED], 3))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def per_token_table(res: dict) -> str:
    """Per layer and chosen token: the best reading's held-out R^2 for that token's direction alone."""
    toks = [t["text"] for t in res["tokens"]]
    lines = ["| layer | " + " | ".join(_tok(t) for t in toks) + " | promoted (mean) |", "|---|" + "---|" * (len(toks) + 1)]
    for L in res["layers"]:
        per = L["readings"][L["best"]]["r2_per_direction"]
        fixed = per[:len(toks)]
        prom = per[len(toks):]
        lines.append(f"| {L['layer']} | " + " | ".join(_fmt(v) for v in fixed) +
                     f" | {_fmt(sum(prom) / len(prom)) if prom else '—'} |")
    return "\n".join(lines)


def readout_lines(res: dict, which: str = "token", n_tok: int = 5) -> list[str]:
    """The top eigenvector of each sign of the best reading, per layer and direction, read as tokens."""
    lines = []
    for L in res["layers"]:
        for d in L["directions"]:
            if d["label"] != which:
                continue
            sp = d["spectrum"]
            lines.append(f"* layer {L['layer']}, {_tok(d['token'])} ({L['best']}; {sp['n_positive']} positive / "
                         f"{sp['n_negative']} negative eigenvalues)")
            for side, mark in (("positive", "+"), ("negative", "−")):
                for row in sp["sides"][side][:1]:
                    lines.append(f"  * λ{mark}1 = {row['eigenvalue']:+.3g} ({100 * row['share']:.1f} % of Σ|λ|): "
                                 f"in + {_toks(row['in']['plus'], n_tok)} / − {_toks(row['in']['minus'], n_tok)}; "
                                 f"out + {_toks(row['out']['plus'], n_tok)} / − {_toks(row['out']['minus'], n_tok)}")
    return lines


def summary_md(res: dict) -> str:
    t = res["timing"]
    n = len(res["layers"])
    best_counts = {}
    for L in res["layers"]:
        best_counts[L["best"]] = best_counts.get(L["best"], 0) + 1
    r2s = [L["readings"][L["best"]]["r2"] for L in res["layers"]]
    lines = [
        f"# `sqs read {res['model']}`: gated MLPs as quadratic forms over tokens",
        "",
        f"Model: `{res['source']}` ({res['kind']}, {res['model_type']}, {res['n_layers_model']} gated MLP layers; "
        f"{n} read). Text: fitted on {res['fit_tokens']} tokens of {res['fit_text']} (training split), scored on "
        f"{res['eval_tokens']} held-out tokens of {res['eval_text']} (windows of {res['context']}). Directions per "
        f"layer: {', '.join(_tok(x['text']) for x in res['tokens'])} and the layer's {res['promoted_per_layer']} most "
        "promoted tokens (largest mean direct contribution on the training text).",
        "",
        f"A token's direction u_t = unembedding row × final-norm weight × s, s = {res['final_norm_scale']:.4g} (the "
        "mean 1/rms of the last residual stream on the training text, standing in for the per-position norm "
        "scale: it sets only the unit). R² = held-out fidelity of the reading's quadratic forms in [n; 1] to the "
        "layer's true direct contribution u_t · MLP(n), pooled over the layer's directions; 'top k' keeps the k "
        "largest-|λ| terms of the best reading's eigen-expansion.",
        "",
        f"Best reading: {', '.join(f'{r} in {c} layers' for r, c in best_counts.items())}; its held-out R² "
        f"ranges {min(r2s):.3f}–{max(r2s):.3f} (median {sorted(r2s)[n // 2]:.3f}).",
        "",
        f"Time after loading: {t['after_loading_wall_s']:.1f} s wall, {t['after_loading_cpu_s']:.1f} s CPU "
        f"({t['threads']} threads): recording the layer inputs {t['collect']['wall_s']:.1f} s, reading "
        f"{t['read']['wall_s']:.1f} s wall / {t['read']['cpu_s']:.1f} s CPU. Loading: {t['load']['wall_s']:.1f} s.",
        "",
        "## Fidelity per layer (held-out R²)",
        "",
        fidelity_table(res),
        "",
        "## The chosen tokens: held-out R² of the best reading, per direction",
        "",
        per_token_table(res),
        "",
        "## Token read-outs: the top eigenvector of each sign",
        "",
        "'in': tokens whose normalised embedding, as this layer's norm presents it, projects most (+) and least (−) "
        "on the eigenvector (exact for layer 0's token part; deeper, a vocabulary probe). 'out': the eigenvector "
        "mapped to the residual stream and read by the unembedding (a logit lens). The quadratic form does not see "
        "the eigenvector's sign; both ends are listed.",
        "",
        *readout_lines(res, "token"),
        "",
        "### The most promoted directions",
        "",
        *readout_lines(res, PROMOTED),
        "",
    ]
    return "\n".join(lines)


def _plot_fidelity(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [L["layer"] for L in res["layers"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for r in res["readings_tried"]:
        ys = [L["readings"][r]["r2"] if r in L["readings"] else float("nan") for L in res["layers"]]
        ax.plot(layers, ys, "o-", ms=3, color=READING_COLOR.get(r), label=r)
    if res.get("compare"):
        c = res["compare"]["layers"]
        ax.plot(layers, [c[str(i)]["r2"][c[str(i)]["best"]] if str(i) in c else float("nan") for i in layers], "k--",
                lw=1, label=f"compared: best of {res['compare'].get('model')}")
    ax.axhline(1, color="k", lw=0.5)
    ax.set_ylim(max(-0.5, min(0, ax.get_ylim()[0])), 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out R² (direct contribution to the token directions)")
    ax.legend(fontsize=8)
    ax = axes[1]
    for k in res["truncations"]:
        ys = [L["readings"][L["best"]]["truncated_r2"].get(str(k)) for L in res["layers"]]
        ax.plot(layers, [float("nan") if y is None else y for y in ys], "o-", ms=3, label=f"top {k}")
    ax.set_ylim(max(-0.5, min(0, ax.get_ylim()[0])), 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out R², best reading truncated")
    ax.legend(fontsize=8)
    fig.suptitle(f"{res['model']}: gated MLPs read as quadratic forms")
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_tokens(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    toks = [t["text"] for t in res["tokens"]]
    layers = [L["layer"] for L in res["layers"]]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    ax = axes[0]
    for j, t in enumerate(toks):
        ax.plot(layers, [L["readings"][L["best"]]["r2_per_direction"][j] for L in res["layers"]], "o-", ms=3,
                label=repr(t))
    ax.set_ylim(max(-0.5, min(0, ax.get_ylim()[0])), 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("held-out R², best reading, one direction")
    ax.legend(fontsize=8)
    ax = axes[1]
    for j, t in enumerate(toks):
        top = [np.abs(L["directions"][j]["spectrum"]["top_eigenvalues"]) for L in res["layers"]]
        share = [float(v[:4].sum() / max(L["directions"][j]["spectrum"]["abs_sum"], 1e-300))
                 for v, L in zip(top, res["layers"])]
        ax.plot(layers, share, "o-", ms=3, label=repr(t))
    ax.set_xlabel("layer")
    ax.set_ylabel("share of Σ|λ| in the top 4 |λ|")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def _plot_spectra(res: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    Ls = res["layers"]
    picks = sorted({Ls[0]["layer"], Ls[len(Ls) // 2]["layer"], Ls[-1]["layer"]})
    toks = [t["text"] for t in res["tokens"]]
    fig, axes = plt.subplots(len(picks), max(1, len(toks)), figsize=(3.6 * max(1, len(toks)), 2.6 * len(picks)),
                             squeeze=False)
    by_layer = {L["layer"]: L for L in Ls}
    for a, layer in enumerate(picks):
        for j, t in enumerate(toks):
            sp = by_layer[layer]["directions"][j]["spectrum"]
            lam = sp["top_eigenvalues"]
            ax = axes[a][j]
            ax.bar(range(len(lam)), lam, color=["tab:red" if v >= 0 else "tab:blue" for v in lam])
            ax.axhline(0, color="k", lw=0.5)
            ax.set_title(f"layer {layer}, {t!r}: {sp['n_positive']}+ / {sp['n_negative']}−", fontsize=8)
            ax.tick_params(labelsize=7)
    fig.suptitle("largest |eigenvalues| of the best reading's form (signed), by rank", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def write_report(res: dict, out: str | os.PathLike) -> dict[str, Path]:
    """OUT/reading.json, OUT/reading.md, OUT/fidelity.png, OUT/tokens.png, OUT/spectra.png."""
    out = Path(out)
    paths = {"json": write_json(out / "reading.json", res), "md": write_text(out / "reading.md", summary_md(res)),
             "fidelity": _plot_fidelity(res, out / "fidelity.png")}
    if res["tokens"]:
        paths["tokens"] = _plot_tokens(res, out / "tokens.png")
        paths["spectra"] = _plot_spectra(res, out / "spectra.png")
    return paths


__all__ = ["DEFAULT_TOKENS", "ReadError", "decoder_layers", "read_model", "read_pretrained", "token_id",
           "write_report"]
