"""The TinyStories report: table.md / table.json (with the paper's values beside ours),
curves.png and samples.md, from the run directories alone (`write_report`); table.md can be
re-made from table.json (`rerender`)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from sqs.core import GATE_LABEL, canonical_gate
from sqs.experiments.style import GATE_COLOR, STD_NOTE
from sqs.io import save_figure, write_json, write_text
from sqs.runs.config_files import paper_reference
from sqs.runs.lm_config import LMRunConfig
from sqs.runs.lm_pipeline import FRACTIONS, generate_text, load_lm
from sqs.runs.naming import gate_tag
from sqs.stats import mean_std
from sqs.training.rundir import CONFIG, is_complete, last_divergence, read_metrics

DEFAULT_PROMPTS = ("Once upon a time", "One day, a little girl named Lily", "The dog was sad because")


def paper_lm() -> dict[str, dict]:
    """The paper's TinyStories table at 100 %: {gate: {"loss", "ppl_as_printed"}}."""
    return {g: v for g, v in paper_reference()["lm"].items() if isinstance(v, dict)}


def read_throughput(path: Path) -> dict | None:
    """throughput.json of `measure_throughput`; gates written under old names (silu, identity) are renamed."""
    if not path.exists():
        return None
    tp = json.loads(path.read_text())
    tp["gates"] = {canonical_gate(g): v for g, v in tp.get("gates", {}).items()}
    return tp


def _at_fraction(records: list[dict], f: float) -> dict | None:
    for r in records:
        if r.get("fraction") == f:
            return r
    return None


def summarize_run(run_dir: Path) -> dict:
    recs = read_metrics(run_dir)
    info: dict[str, Any] = {"run_dir": str(run_dir), "complete": is_complete(run_dir)}
    ev = last_divergence(run_dir)
    if ev is not None:
        info["diverged"] = f"{ev.get('what', 'diverged')} at step {ev.get('step')}"
    try:
        cfg = json.loads((run_dir / CONFIG).read_text())
        info["plan"] = cfg.get("plan")
        info["data"] = cfg.get("data")
    except (OSError, ValueError):
        pass
    at = {}
    for f in FRACTIONS:
        r = _at_fraction(recs, f)
        if r is not None:
            at[f"{int(f * 100)}%"] = {k: r[k] for k in ("step", "tokens", "val_loss", "val_ppl", "val_bpb")}
    info["at"] = at
    last = recs[-1] if recs else None
    if last and last.get("elapsed_s"):
        # Median over evaluation intervals, the first one left out (compilation warm-up): robust to
        # other work on the machine. The overall mean (warm-up included) is kept beside it.
        rates = [r["tokens_per_s"] for r in recs[1:] if r.get("tokens_per_s")]
        info["tokens_per_s"] = float(np.median(rates[1:] if len(rates) > 2 else rates)) if rates else None
        info["tokens_per_s_overall"] = last["tokens"] / last["elapsed_s"]
        info["train_seconds"] = last["elapsed_s"]
    info["curve"] = [{"tokens": r["tokens"], "val_loss": r["val_loss"]} for r in recs if "val_loss" in r]
    return info


def write_report(runs: dict[Path, LMRunConfig], out: str | os.PathLike, cfg: LMRunConfig | None = None,
                 samples: bool = True, max_new_tokens: int = 160, prompts=DEFAULT_PROMPTS, cache_dir=None) -> dict:
    """table.md, table.json, curves.png and samples.md from the run directories {run_dir: its config}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for rd, rc in runs.items():
        tag = gate_tag(rc.gate, rc.gate_kwargs)
        info = summarize_run(Path(rd))
        rows.append({"gate": rc.gate, "label": GATE_LABEL[rc.gate] + (f" ({tag})" if tag else ""), "seed": rc.seed,
                     **info})
    plan_ = next((r["plan"] for r in rows if r.get("plan")), None)
    data_ = next((r["data"] for r in rows if r.get("data")), None)

    # per gate: mean over seeds of the final val loss; perplexity = exp(mean loss)
    tp_path = out / "throughput.json"
    throughput = read_throughput(tp_path)
    paper = paper_lm()
    per_gate = {}
    for gate in dict.fromkeys(r["gate"] for r in rows):
        fin = [r["at"]["100%"]["val_loss"] for r in rows if r["gate"] == gate and "100%" in r["at"]]
        bpb = [r["at"]["100%"]["val_bpb"] for r in rows if r["gate"] == gate and "100%" in r["at"]]
        tps = [r["tokens_per_s"] for r in rows if r["gate"] == gate and r.get("tokens_per_s")]
        if fin:
            stat = mean_std(fin)
            m = stat["mean"]
            per_gate[gate] = {"seeds": len(fin), "val_loss_mean": m, "val_loss_std": stat["std"],
                              "val_ppl_of_mean": math.exp(m), "val_bpb_mean": float(np.mean(bpb)),
                              "paper_loss": paper[gate]["loss"], "paper_ppl_as_printed": paper[gate]["ppl_as_printed"],
                              "train_tokens_per_s_mean": float(np.mean(tps)) if tps else None}
            if throughput and gate in throughput["gates"]:
                per_gate[gate]["interleaved_tokens_per_s"] = throughput["gates"][gate]["tokens_per_s"]
                per_gate[gate]["interleaved_vs_swiglu"] = throughput["gates"][gate]["vs_swiglu"]
    table = {"config": cfg.to_dict() if cfg else None, "plan": plan_, "data": data_, "runs": [
        {k: v for k, v in r.items() if k != "curve"} for r in rows], "per_gate": per_gate,
        "paper_reference": paper,
        "note": "val_ppl = exp(val_loss); per-gate perplexity = exp(mean val loss over seeds). The paper's "
                "perplexities are not exp(its losses) (exp(1.9021) = 6.70, printed 7.65)."}
    table["throughput"] = throughput
    write_json(out / "table.json", table)
    write_text(out / "table.md", _table_md(rows, per_gate, cfg, plan_, data_, throughput))
    _plot_curves(rows, out / "curves.png", cfg)
    if samples:
        write_text(out / "samples.md", _samples_md(runs, prompts, max_new_tokens, cache_dir))
    return table


def rerender(out: str | os.PathLike) -> Path:
    """Re-make table.md from the table.json in `out` alone (the curves and samples need the runs)."""
    table = json.loads((Path(out) / "table.json").read_text())
    cfg = LMRunConfig.from_dict(table["config"]) if table.get("config") else None
    return write_text(Path(out) / "table.md", _table_md(table["runs"], table["per_gate"], cfg, table.get("plan"),
                                                        table.get("data"), table.get("throughput")))


def _table_md(rows, per_gate, cfg, plan_, data_, throughput=None) -> str:
    L = ["# TinyStories (paper Sec. 4.2.2): validation loss, perplexity, bits per byte", ""]
    if cfg is not None and plan_ is not None:
        L.append(f"Config `{cfg.name}`: {cfg.n_layers} layers, d_model {cfg.d_model}, GLU hidden {cfg.d_hidden}, "
                 f"{cfg.n_heads} heads, context {cfg.context}, vocab {cfg.vocab_size} (byte-level BPE), "
                 f"AdamW lr {cfg.lr:g} wd {cfg.weight_decay:g}, cosine to {cfg.min_lr:g} after "
                 f"{plan_['warmup_steps']} warm-up steps, grad clip {cfg.grad_clip:g}; batch {cfg.batch_size} "
                 f"sequences = {plan_['tokens_per_step']:,} tokens per step; {plan_['steps']:,} steps = "
                 f"{plan_['train_tokens_total']:,} training tokens = {plan_['epochs']:.2f} epochs of the training "
                 f"split.")
    if data_:
        L.append(f"Data: {data_['train_tokens']:,} training tokens ({data_['train_stories']:,} stories); "
                 f"validation {data_['valid_tokens']:,} tokens / {data_['valid_bytes']:,} bytes "
                 f"({data_['valid_stories']:,} stories); evaluation on {cfg.eval_windows if cfg else '?'} fixed "
                 f"windows of {cfg.context if cfg else '?'} tokens.")
    L += ["", "Each cell: val loss (nats/token) / perplexity exp(loss) / bits per byte. "
          "tok/s: training tokens per second, median over evaluation intervals (evaluation and the first "
          "interval's compilation warm-up excluded).", "",
          "| Gate | seed | 25% | 50% | 75% | 100% | tok/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for f in ("25%", "50%", "75%", "100%"):
            a = r["at"].get(f)
            cells.append("—" if a is None else f"{a['val_loss']:.4f} / {a['val_ppl']:.2f} / {a['val_bpb']:.4f}")
        status = "" if r.get("complete") else (" (diverged)" if r.get("diverged") else " (unfinished)")
        tps = r.get("tokens_per_s")
        L.append(f"| {r['label']}{status} | {r['seed']} | " + " | ".join(cells) +
                 f" | {'—' if tps is None else f'{tps:,.0f}'} |")
    L += ["", "## Per gate at 100 %, with the paper's values as reference", "",
          f"Ours: final val loss, {STD_NOTE} over seeds; exp of that mean; mean bits per byte. "
          "Paper: its Table (4-layer d=128 model on the full TinyStories with its own tokenizer), "
          "values as printed.", "",
          "| Gate | seeds | ours: loss (± sample std) | ours: ppl = exp(mean loss) | ours: bpb | paper: loss | "
          "paper: 'perplexity' as printed | exp(paper loss) |", "|---|---|---|---|---|---|---|---|"]
    for gate, g in per_gate.items():
        sd = f" ± {g['val_loss_std']:.4f}" if g["val_loss_std"] is not None else ""
        L.append(f"| {GATE_LABEL[gate]} | {g['seeds']} | {g['val_loss_mean']:.4f}{sd} | {g['val_ppl_of_mean']:.2f} | "
                 f"{g['val_bpb_mean']:.4f} | {g['paper_loss']:.4f} | {g['paper_ppl_as_printed']:.2f} | "
                 f"{math.exp(g['paper_loss']):.2f} |")
    if per_gate:
        ours = sorted(per_gate, key=lambda k: per_gate[k]["val_loss_mean"])
        paper = sorted(per_gate, key=lambda k: per_gate[k]["paper_loss"])
        L += ["", f"Ranking by final loss (best first) — ours: {' < '.join(GATE_LABEL[g] for g in ours)}; "
                  f"paper: {' < '.join(GATE_LABEL[g] for g in paper)}."]
        multi = [g for g in per_gate.values() if g["val_loss_std"] is not None]
        if multi:
            L.append("Seed-to-seed sample standard deviation (n − 1) of the final loss: "
                     + ", ".join(f"{GATE_LABEL[k]} {v['val_loss_std']:.4f}" for k, v in per_gate.items()
                                 if v["val_loss_std"] is not None)
                     + "; gaps between gates smaller than that are noise.")
    if per_gate:
        L += ["", "## Training throughput", "",
              "Two measurements. *Runs*: each run's training tokens/s (median over its evaluation intervals), "
              "mean over seeds; the runs happen one after another, so a change in the machine's load between "
              "them shows up as a gap between gates. *Interleaved*: one training step (forward, backward, "
              "AdamW) of each gate in turn on the same batch, median over the rounds, measured right after "
              "training; load drift hits every gate alike, so this is the fair comparison.", ""]
        ref_run = per_gate.get("swiglu", {}).get("train_tokens_per_s_mean")
        L += ["| Gate | runs: tok/s | runs: ÷ SwiGLU | interleaved: tok/s | interleaved: ÷ SwiGLU |",
              "|---|---|---|---|---|"]
        for gate, g in per_gate.items():
            rt, it, iv = g.get("train_tokens_per_s_mean"), g.get("interleaved_tokens_per_s"), g.get("interleaved_vs_swiglu")
            L.append(f"| {GATE_LABEL[gate]} | {'—' if rt is None else f'{rt:,.0f}'} | "
                     f"{f'{rt / ref_run:.3f}' if rt and ref_run else '—'} | {'—' if it is None else f'{it:,.0f}'} | "
                     f"{'—' if iv is None else f'{iv:.3f}'} |")
        if throughput:
            L += ["", f"Interleaved: {throughput['reps']} rounds, {throughput['sequences_per_step']} sequences = "
                      f"{throughput['tokens_per_step']:,} tokens per step, {throughput['threads']} threads, measured "
                      f"{throughput['measured']}. Regenerate with `sqs bench lm`."]
    L += ["", "Notes:", "",
          "* Runs with the same seed draw the same batches in the same order and the same initial weights "
          "(all gates have the same parameter shapes), so at one seed the gate is the only difference; "
          "the extra seeds change both and show the run-to-run noise.",
          "* Perplexity here is exp(mean validation loss). The paper's perplexities are not exp of its "
          "losses: exp(1.9021) = 6.70 while it prints 7.65 for ReLU (and likewise for every gate), so they "
          "were computed some other way (e.g. a mean of per-batch perplexities, or another token "
          "normalisation); compare losses, not perplexities, with the paper.",
          "* Absolute values are not comparable with the paper's: different tokenizer (ours: byte-level BPE "
          "trained on the training split; the paper's samples are lowercased), different training data "
          "(the paper: all 2.1 M stories; the CPU config: the subset imported into the cache) and a "
          "different token budget. Bits per byte is tokenizer-independent; the ranking of gates and "
          "the gaps relative to the seed noise are the comparable quantities."]
    return "\n".join(L) + "\n"


def _plot_curves(rows, path: Path, cfg) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    first_seed = {}
    for r in rows:
        first_seed.setdefault(r["gate"], r["seed"])
    for r in rows:
        c = [p for p in r.get("curve", []) if p["val_loss"] is not None]
        if not c:
            continue
        x = np.array([p["tokens"] for p in c], dtype=float) / 1e6
        y = np.array([p["val_loss"] for p in c])
        main = r["seed"] == first_seed[r["gate"]]
        kw = dict(color=GATE_COLOR[r["gate"]], lw=1.8 if main else 1.0, ls="-" if main else "--",
                  label=r["label"] if main else f"{r['label']} (seed {r['seed']})")
        for ax, zoom in zip(axes, (False, True)):
            sel = x >= x.max() * 0.5 if zoom else slice(None)
            ax.plot(x[sel], y[sel], **kw)
    for ax, title in zip(axes, ("validation loss", "validation loss, second half of training")):
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("val loss (nats / token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if cfg is not None:
        fig.suptitle(f"TinyStories, config {cfg.name}: one line per gate (dashed: extra seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def _samples_md(runs: dict[Path, LMRunConfig], prompts, max_new_tokens: int, cache_dir) -> str:
    L = ["# TinyStories samples (compare the paper's App. D)", "",
         f"Each gate's first-seed run; the same prompts; greedy decoding and temperature 0.8 "
         f"(no top-k, generator seed 0); at most {max_new_tokens} new tokens, stopping at <|endoftext|>. "
         f"Regenerate any of them with `sqs generate RUN_DIR --prompt ... --temperature 0.8 --seed 0`.", ""]
    done = set()
    for rd, rc in runs.items():
        gate = rc.gate
        if gate in done:
            continue
        done.add(gate)
        L += [f"## {GATE_LABEL[gate]} (`{rd}`)", ""]
        try:
            lm = load_lm(rd, device="cpu", allow_checkpoint=True, cache_dir=cache_dir)
        except (FileNotFoundError, ValueError) as e:
            L += [f"_no model: {e}_", ""]
            continue
        if not is_complete(rd):
            L += [f"_(unfinished run: weights of step {lm.step})_", ""]
        for prompt in prompts:
            for label, temp in (("greedy", 0.0), ("temperature 0.8, seed 0", 0.8)):
                text = generate_text(lm, prompt, max_new_tokens=max_new_tokens, temperature=temp, seed=0)
                L += [f"**{prompt!r}, {label}:**", "", "> " + text.replace("\n", "\n> "), ""]
    return "\n".join(L) + "\n"
