"""The report of conversion runs (`sqs convert report`): curves as JSON, a plot, a markdown table.

Every number comes from the runs' `curve.jsonl` and `config.json` (written by
`sqs.integrations.convert.anneal_to`); nothing is typed in by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

from sqs.integrations.convert import read_curve
from sqs.io import UserError, save_figure, write_json, write_text


class ReportError(UserError, ValueError):
    """A run directory that holds no finished conversion; the message names it."""


def summarize(run_dir: str | Path) -> dict:
    """One run's settings, baseline losses, held-out curve, final losses and wall time."""
    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ReportError(f"{run_dir}: no config.json; pass a run directory of `sqs convert run`")
    cfg = json.loads(cfg_path.read_text())
    recs = read_curve(run_dir)
    base = next((r for r in recs if r.get("kind") == "baseline"), None)
    final = next((r for r in recs if r.get("kind") == "final"), None)
    if base is None or final is None:
        raise ReportError(f"{run_dir}: the conversion has not finished (no baseline or final record in "
                          "curve.jsonl); run the same `sqs convert run` command again to finish it")
    train = [r for r in recs if r.get("kind") == "train"]
    evals = [r for r in recs if r.get("kind") == "eval"]
    return {
        "run_dir": str(run_dir), "target": cfg["target"], "steps": cfg["steps"], "anneal_steps": cfg["anneal_steps"],
        "batch": cfg["batch"], "context": cfg["context"], "lr": cfg["lr"], "mlp_only": cfg["mlp_only"],
        "sqs": cfg["sqs"] if cfg["target"] == "sqs" else None, "source": cfg.get("source", {}),
        "original": base["original"], "swap": base["swap"], "final": final["final"],
        "eval": [{"step": r["step"], "t": r["t"], "current": r["current"], "target": r["target"]} for r in evals],
        "train": [{"step": r["step"], "t": r["t"], "loss": r["loss"]} for r in train],
        "step_s_median": _median([r["step_s"] for r in train[1:]] or [r["step_s"] for r in train]),
        "wall_s": final["time_s"],
    }


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else 0.5 * (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]))


def _plot(runs: list[dict], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = sorted({k for r in runs for k in r["final"]})
    fig, axes = plt.subplots(1, len(sets) + 1, figsize=(6.4 * (len(sets) + 1), 4.2), squeeze=False)
    colors = {"sqs": "tab:red", "bilinear": "tab:blue"}
    for ax, name in zip(axes[0], sets):
        for r in runs:
            c = colors.get(r["target"], None)
            steps = [0] + [e["step"] for e in r["eval"]]
            ax.plot(steps, [r["swap"][name]] + [e["target"][name] for e in r["eval"]], "o--", color=c, alpha=0.6,
                    label=f"{r['target']}: at the target gate (t = 1)")
            ax.plot([e["step"] for e in r["eval"]], [e["current"][name] for e in r["eval"]], "s-", color=c,
                    label=f"{r['target']}: annealed model (current t)")
            ax.axvline(r["anneal_steps"], color=c, lw=0.8, ls=":")
        ax.axhline(runs[0]["original"][name], color="k", lw=1, label="original SwiGLU model")
        ax.set_yscale("log")
        ax.set_xlabel("optimizer step (dotted: t reaches 1)")
        ax.set_ylabel(f"held-out loss on {name} (nats/token)")
        ax.legend(fontsize=7)
    ax = axes[0][-1]
    for r in runs:
        ax.plot([x["step"] for x in r["train"]], [x["loss"] for x in r["train"]], ".-",
                color=colors.get(r["target"], None), label=f"{r['target']}: training batch loss")
        ax.axvline(r["anneal_steps"], color=colors.get(r["target"], None), lw=0.8, ls=":")
    ax.set_xlabel("optimizer step (dotted: t reaches 1)")
    ax.set_ylabel("training loss (nats/token)")
    ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return save_figure(fig, path)


def _table(runs: list[dict]) -> str:
    sets = sorted({k for r in runs for k in r["final"]})
    lines = ["| target | steps (anneal) | batch x context | trained | held-out text | original | plain swap | "
             "at t = 1 mid-way | final | median step (s) | wall (min) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        mid = next((e for e in r["eval"] if e["step"] >= r["anneal_steps"]), r["eval"][-1] if r["eval"] else None)
        for name in sets:
            mid_txt = "" if mid is None else f"{mid['target'][name]:.3f} (step {mid['step']})"
            lines.append(
                f"| {r['target']} | {r['steps']} ({r['anneal_steps']}) | {r['batch']} x {r['context']} | "
                f"{'MLPs' if r['mlp_only'] else 'all'} | {name} | {r['original'][name]:.3f} | {r['swap'][name]:.3f} | "
                f"{mid_txt} | {r['final'][name]:.3f} | "
                f"{r['step_s_median']:.1f} | {r['wall_s'] / 60:.1f} |")
    return "\n".join(lines)


def write_report(run_dirs: list[str | Path], out: str | Path, title: str = "conversion") -> dict[str, Path]:
    """Write OUT/curves.json, OUT/curves.png and OUT/table.md from finished conversion runs."""
    out = Path(out)
    runs = [summarize(d) for d in run_dirs]
    paths = {"curves": write_json(out / "curves.json", runs), "plot": _plot(runs, out / "curves.png", title)}
    paths["table"] = write_text(out / "table.md", f"# {title}\n\nHeld-out loss (nats/token); measured by "
                                f"`sqs convert run` and collected by `sqs convert report`.\n\n{_table(runs)}\n")
    return paths
