"""The run-directory rule: where a run lives, from what defines it.

    <runs_root>/<config name>/<dataset>/<run name>          e.g. runs/sec42/mnist/sqs-s0
    run name = <gate>[-<tag>]-s<seed>                     sqs-s0, bilinear-s3, sqs-lam0.1-s0
             = <gate>[-<tag>]-i<init>-d<data>             a run whose init and data seeds differ

The tag lists the gate's non-default parameters (`gate_tag`), so two runs that differ only
in λ never share a directory. Only the run configs call `run_path`
(`ImageRunConfig.run_dir(root)`, `LMRunConfig.run_dir(root)`): every command and experiment
asks its config for the directory instead of building a path.

Earlier versions filed runs elsewhere (`legacy_run_dirs`); a run found there is not trained
again: `check_no_legacy` says how to move it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

from sqs.core import DEFAULT_C, DEFAULT_LAM, DEFAULT_P, canonical_gate
from sqs.runs.config_files import config_name
from sqs.training.rundir import CONFIG

SQS_DEFAULTS = {"c": DEFAULT_C, "lam": DEFAULT_LAM, "p": DEFAULT_P}


def gate_tag(gate: str, gate_kwargs: Mapping[str, Any] | None = None) -> str:
    """The gate's non-default parameters as a run-name tag: `lam0.1`, `c0`, `p2`, `lam0.5-p2` ('' for the defaults).

    SQS parameters are listed in the order c, lam, p and only where they differ from the
    defaults (`sqs.core.DEFAULT_C`, `DEFAULT_LAM`, `DEFAULT_P`), so the paper's default gate keeps
    the plain name `sqs`; other gates' keyword arguments are listed sorted by name.
    """
    kw = dict(gate_kwargs or {})
    if canonical_gate(gate) == "sqs":
        keys = [k for k in ("c", "lam", "p") if k in kw and float(kw[k]) != SQS_DEFAULTS[k]]
        keys += sorted(k for k in kw if k not in SQS_DEFAULTS)
    else:
        keys = sorted(kw)
    return "-".join(f"{k}{_num(kw[k])}" for k in keys)


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def gate_key(gate: str, gate_kwargs: Mapping[str, Any] | None = None) -> str:
    """`<gate>[-<tag>]`: the run name without its seed part (`sqs`, `sqs-lam0.1`, `bilinear`)."""
    tag = gate_tag(gate, gate_kwargs)
    return canonical_gate(gate) + (f"-{tag}" if tag else "")


def run_name(gate: str, seed: int, *, init_seed: int | None = None, data_seed: int | None = None,
             gate_kwargs: Mapping[str, Any] | None = None) -> str:
    """`<gate>[-<tag>]-s<seed>` with the gate's paper name (aliases accepted); a run whose init and
    data seeds differ from `seed` is `<gate>[-<tag>]-i<init>-d<data>` (None means `seed`)."""
    base = gate_key(gate, gate_kwargs)
    init = int(seed) if init_seed is None else int(init_seed)
    data = int(seed) if data_seed is None else int(data_seed)
    if init == int(seed) and data == int(seed):
        return f"{base}-s{int(seed)}"
    return f"{base}-i{init}-d{data}"


def run_path(runs_root: str | Path, config: str | Path, dataset: str, name: str) -> Path:
    """`<runs_root>/<config name>/<dataset>/<name>`: called by the run configs' `run_dir` only."""
    return Path(runs_root) / config_name(config) / dataset / name


_OLD_GATE_NAMES = {"bilinear": ("identity",), "swiglu": ("silu",)}


def legacy_run_dirs(runs_root: str | Path, config: str | Path, dataset: str, gate: str, seed: int) -> list[Path]:
    """Where earlier versions put the default-gate run `<gate>-s<seed>`: `<dataset>/<gate>/seed<k>`
    (table1), `<dataset>/<gate>-seed<k>` (spectra), `<config>/<gate>-s<k>` (lm), each under the
    runs folder or its `<config>` subfolder, with the old gate names too. (Tagged and split runs
    did not exist in those layouts.)"""
    gate = canonical_gate(gate)
    root, name = Path(runs_root), config_name(config)
    out = []
    for g in (gate,) + _OLD_GATE_NAMES.get(gate, ()):
        for base in (root, root / name):
            out += [base / dataset / g / f"seed{seed}", base / dataset / f"{g}-seed{seed}"]
        out.append(root / name / f"{g}-s{seed}")
        if g != gate:
            out.append(root / name / dataset / f"{g}-s{seed}")
    return out


def check_no_legacy(run_dir: Path, legacy: list[Path]) -> None:
    """Refuse to start `run_dir` from scratch when the same run sits in an old layout (one of
    `legacy`, from the run config's `legacy_dirs`): say how to move it."""
    if (run_dir / CONFIG).exists():
        return
    for old in legacy:
        if (old / CONFIG).exists():
            raise FileExistsError(f"{old} is this run in the old layout; move it to the new one with "
                                  f"`mkdir -p {run_dir.parent} && mv {old} {run_dir}`, then re-run")
