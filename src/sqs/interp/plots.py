"""Figures for weight spectra (matplotlib, Agg backend; every function returns a Figure).

Eigenvector images use a diverging colormap centred at 0 (RdBu_r: red = positive,
blue = negative, white = 0) with symmetric limits per image. Every title names
the reading: "exact" for Bilinear, "first-order reading" for SQS.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from sqs.interp.spectra import Decomposition, contributions  # noqa: E402
from sqs.io import save_figure  # noqa: E402

CMAP = "RdBu_r"
CLASS_NAMES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"],
}
DPI = 110  # PNG resolution used by `save` (tests lower it)


def class_names(dataset: str | None, n: int = 10) -> list[str]:
    names = CLASS_NAMES.get((dataset or "").lower())
    return names if names and len(names) == n else [str(i) for i in range(n)]


def _img(ax, u: torch.Tensor | np.ndarray, title: str | None = None, fontsize: int = 8):
    u = np.asarray(u, dtype=np.float64).reshape(28, 28)
    m = float(np.abs(u).max()) or 1.0
    ax.imshow(u, cmap=CMAP, vmin=-m, vmax=m, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=fontsize)


def save(fig, path: str | Path, dpi: int | None = None) -> Path:
    return save_figure(fig, path, dpi=dpi or DPI, bbox_inches="tight")


def plot_spectrum(dec: Decomposition, classes=None, top: int = 30, dataset: str | None = None,
                  title: str | None = None):
    """Signed eigenvalues per class in |eigval| order (App. B): does the top few dominate?"""
    classes = list(range(dec.n_classes)) if classes is None else list(classes)
    names = class_names(dataset, dec.n_classes)
    top = min(top, dec.rank)
    ncol = min(5, len(classes))
    nrow = -(-len(classes) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(2.6 * ncol, 2.1 * nrow), squeeze=False, sharey=False)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for ax, a in zip(axes.flat, classes):
        eigvals = dec.eigenvalues[a, :top].numpy()
        ax.bar(np.arange(1, top + 1), eigvals, color=np.where(eigvals >= 0, "tab:red", "tab:blue"), width=0.8)
        ax.axhline(0, color="k", lw=0.5)
        share = float(dec.eigenvalues[a, :5].abs().sum() / dec.eigenvalues[a].abs().sum())
        ax.set_title(f"class {names[a]}: top-5 = {share:.0%} of Σ|λ|", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[-1]:
        ax.set_xlabel("rank (by |λ|)", fontsize=8)
    fig.suptitle(title or f"Eigenvalue spectra per class — {dec.label}", fontsize=10)
    fig.tight_layout()
    return fig


def _top_by_sign(dec: Decomposition, a: int, n: int) -> tuple[list[int], list[int]]:
    eigvals = dec.eigenvalues[a]
    pos = [i for i in range(dec.rank) if eigvals[i] > 0][:n]
    neg = [i for i in range(dec.rank) if eigvals[i] < 0][:n]
    return pos, neg


def plot_eigenvector_grid(dec: Decomposition, classes=None, n: int = 2, dataset: str | None = None,
                          title: str | None = None):
    """Fig. 2 style: per class (rows), the top-n positive and top-n negative eigenvectors as 28x28."""
    classes = list(range(dec.n_classes)) if classes is None else list(classes)
    names = class_names(dataset, dec.n_classes)
    fig, axes = plt.subplots(len(classes), 2 * n, figsize=(1.5 * 2 * n, 1.6 * len(classes)), squeeze=False)
    for r, a in enumerate(classes):
        pos, neg = _top_by_sign(dec, a, n)
        for j in range(2 * n):
            ax = axes[r, j]
            ax.axis("off")
            idx = (pos + [None] * n)[j] if j < n else (neg + [None] * n)[j - n]
            if idx is None:
                continue
            ax.axis("on")
            _img(ax, dec.pictures[a, idx], f"λ{idx + 1}={float(dec.eigenvalues[a, idx]):+.3g}", fontsize=7)
        axes[r, 0].set_ylabel(names[a], fontsize=9)
        axes[r, 0].axis("on")
        axes[r, 0].set_xticks([])
        axes[r, 0].set_yticks([])
    fig.suptitle(title or f"Top eigenvectors per class in pixel space — {dec.label}\n"
                          f"left {n}: largest positive λ, right {n}: largest negative λ\n"
                          "(red +, blue −, symmetric scale; λk: rank k by |λ|)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_comparison_grid(decs: dict[str, Decomposition], classes=None, n: int = 2, dataset: str | None = None,
                         title: str | None = None):
    """Rows: classes; for each model, its top-n eigenvectors by |eigval| side by side.

    Signs of later models' eigenvectors are flipped to match the first model's of
    equal rank (an eigenvector's sign is arbitrary); the |cos| is printed above.
    """
    labels = list(decs)
    ref = decs[labels[0]]
    classes = list(range(ref.n_classes)) if classes is None else list(classes)
    names = class_names(dataset, ref.n_classes)
    ncol = n * len(labels)
    fig, axes = plt.subplots(len(classes), ncol, figsize=(1.45 * ncol, 1.6 * len(classes)), squeeze=False)
    for r, a in enumerate(classes):
        for m, lab in enumerate(labels):
            dec = decs[lab]
            for k in range(n):
                ax = axes[r, m * n + k]
                u = dec.pictures[a, k]  # pixels only (a homogeneous reading's constant is not drawn)
                t = f"λ{k + 1}={float(dec.eigenvalues[a, k]):+.3g}"
                if m > 0:
                    v = ref.pictures[a, k]
                    c = float(torch.dot(u, v) / (u.norm() * v.norm()).clamp_min(1e-300))
                    u = u * (1.0 if c >= 0 else -1.0)
                    t += f"\n|cos|={abs(c):.2f}"
                _img(ax, u, t, fontsize=6.5)
        axes[r, 0].set_ylabel(names[a], fontsize=9)
    for m, lab in enumerate(labels):
        axes[0, m * n].annotate(decs[lab].label, (0.0, 1.6), xycoords="axes fraction", ha="left", fontsize=8,
                                weight="bold")
    fig.suptitle(title or "Top eigenvectors by |λ|, side by side (pixel space; red +, blue −)", fontsize=9)
    fig.tight_layout()
    return fig


def cosine_stats(cos: torch.Tensor) -> dict[str, np.ndarray]:
    """cos (n_pairs, C, r) -> per-rank mean, std, min over (pairs, classes), and min/max of the class mean
    over pairs."""
    flat = cos.reshape(-1, cos.shape[-1]).numpy()
    per_pair = cos.mean(1).numpy()
    return {"mean": flat.mean(0), "std": flat.std(0), "min": flat.min(0),
            "pair_min": per_pair.min(0), "pair_max": per_pair.max(0)}


def plot_cosine_per_rank(curves: dict[str, torch.Tensor], max_rank: int | None = None, title: str | None = None,
                         reference: dict[float, str] | None = None):
    """|cos| between eigenvectors of equal rank vs rank: mean over classes and seed pairs,
    band = ±1 std over (class, pair). curves: label -> (n_pairs, C, r). `reference`:
    horizontal lines to draw, {level: label} (e.g. a paper's claims)."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    for label, cos in curves.items():
        st = cosine_stats(cos)
        r = len(st["mean"]) if max_rank is None else min(max_rank, len(st["mean"]))
        x = np.arange(1, r + 1)
        line, = ax.plot(x, st["mean"][:r], lw=1.6, label=f"{label} (n_pairs={cos.shape[0]})")
        ax.fill_between(x, np.clip(st["mean"][:r] - st["std"][:r], 0, 1), np.clip(st["mean"][:r] + st["std"][:r], 0, 1),
                        color=line.get_color(), alpha=0.18, lw=0)
    for i, (level, text) in enumerate(sorted((reference or {}).items(), reverse=True)):
        ax.axhline(level, color="grey", ls="--" if i == 0 else ":", lw=0.8)
        ax.text(1.0, level + 0.01, text, fontsize=7, color="grey", ha="right", transform=ax.get_yaxis_transform())
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("eigenvector rank (sorted by |λ| per class)")
    ax.set_ylabel("|cos| in pixel space")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False)
    ax.set_title(title or "Eigenvector similarity per rank (SQS: first-order reading)\n"
                          "mean over classes and seed pairs, band ±1 std", fontsize=9)
    fig.tight_layout()
    return fig


def plot_explanation(dec: Decomposition, img: torch.Tensor, logits: torch.Tensor | None = None,
                     label: int | None = None, dataset: str | None = None, top: int = 4, title: str | None = None):
    """Explain one input: image, logits (model and eigen-surrogate), and the top contributing
    eigenvectors of the predicted class with their contributions eigval_i (q_i . x)^2."""
    names = class_names(dataset, dec.n_classes)
    contrib = contributions(dec, img)  # (C, d)
    surrogate = contrib.sum(-1)
    z = surrogate if logits is None else torch.as_tensor(logits, dtype=torch.float64).reshape(-1)
    pred = int(z.argmax())
    order = contrib[pred].abs().argsort(descending=True)[:top].tolist()

    fig = plt.figure(figsize=(2.2 * (2 + top), 3.2))
    gs = fig.add_gridspec(2, 2 + top, height_ratios=[4, 1])
    ax = fig.add_subplot(gs[:, 0])
    ax.imshow(np.asarray(img, dtype=np.float64).reshape(28, 28), cmap="gray_r")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(f"input (label {names[label]})" if label is not None else "input", fontsize=8)

    ax = fig.add_subplot(gs[:, 1])
    y = np.arange(dec.n_classes)
    if logits is not None:
        ax.barh(y + 0.2, z.numpy(), height=0.4, color="tab:gray", label="model")
        ax.barh(y - 0.2, surrogate.numpy(), height=0.4, color="tab:orange", label="eigen-surrogate")
        ax.legend(fontsize=6, loc="lower right")
    else:
        ax.barh(y, surrogate.numpy(), color="tab:orange")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="k", lw=0.5)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title(f"logits (pred {names[pred]})", fontsize=8)

    for j, i in enumerate(order):
        ax = fig.add_subplot(gs[0, 2 + j])
        _img(ax, dec.pictures[pred, i], f"λ{i + 1}={float(dec.eigenvalues[pred, i]):+.3g}", fontsize=7)
        ax2 = fig.add_subplot(gs[1, 2 + j])
        ax2.axis("off")
        ax2.text(0.5, 0.6, f"λ(q·x)² = {float(contrib[pred, i]):+.3g}", ha="center", va="center", fontsize=7)
    fig.suptitle(title or f"Explanation of one input — {dec.label}; predicted class {names[pred]}: "
                          f"top {top} contributions to its logit Σ = {float(surrogate[pred]):+.3g}", fontsize=9)
    fig.tight_layout()
    return fig


def plot_truncation(fids: dict[str, dict], title: str | None = None):
    """Surrogate accuracy vs number of eigenvectors kept per class, one line per model/dataset."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    for label, fid in fids.items():
        keys = list(fid["truncated"])
        ks = [fid["truncated"][k]["k"] for k in keys]
        ax.plot(ks, [fid["truncated"][k]["acc"] for k in keys], marker="o", label=label)
        ax.axhline(fid["model_acc"], ls=":", lw=0.8, color=ax.lines[-1].get_color())
    ax.set_xscale("log")
    ax.set_xlabel("eigenvectors kept per class (k)")
    ax.set_ylabel("test accuracy of the surrogate")
    ax.legend(fontsize=7)
    ax.set_title(title or "Truncated eigen-surrogate accuracy (dotted: model)\nSQS: first-order reading",
                 fontsize=9)
    fig.tight_layout()
    return fig
