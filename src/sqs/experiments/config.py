"""One config system and one run-directory convention for every experiment.

Configs are TOML files shipped in `sqs/configs/<kind>/` (kind: `image`, `lm`), read by
name (`sec42`, `tinystories-cpu`) or from any `.toml` path, with nested tables
(`[model]`, `[train]`, ...). Overrides use one syntax everywhere, dotted keys with TOML
values, as on the command line:

    d, name = load_config_dict("image", "sec42", ["model.gate=sqs", "train.lr=3e-3"])
    d, name = load_config_dict("lm", "tinystories-cpu", ["train.epochs=3"])

Each experiment maps the nested dict onto its dataclass (`ImageRunConfig.from_dict`,
`LMRunConfig.from_toml`). Runs live at

    <runs_root>/<config name>/<dataset>/<gate>-s<seed>     e.g. runs/sec42/mnist/sqs-s0

(`run_dir`); a gate with non-default parameters adds a tag (`sqs-lam0.1-s0`), and a run whose
init and data seeds are split is `<gate>-i<init>-d<data>` (`run_name`). The paper's reference numbers, which every report prints beside ours, are
one data file, `sqs/configs/reference/paper.toml` (`paper_reference`).
"""

from __future__ import annotations

import copy
import io
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from sqs.core import DEFAULT_C, DEFAULT_LAM, DEFAULT_P, load_toml
from sqs.functional import canonical_gate
from sqs.io import ConfigError

KINDS = ("image", "lm")
Overrides = Mapping[str, Any] | Iterable[str] | None


class ConfigNotFound(ConfigError, FileNotFoundError):
    """A config named by a name or path that does not exist (the message lists the shipped ones)."""


class _TOMLText:
    """TOML text where `sqs.core.load_toml` (the one guarded tomllib / tomli import) expects a file."""

    def __init__(self, text: str, where: str):
        self.text, self.where = text, where

    def open(self, mode: str = "rb") -> io.BytesIO:
        return io.BytesIO(self.text.encode("utf-8"))

    def __str__(self) -> str:
        return self.where


def loads_toml(text: str, where: str = "TOML") -> dict:
    """Parse TOML text; a syntax error names `where` (a ValueError)."""
    return load_toml(_TOMLText(text, where))


# ----------------------------------------------------------------------------- configs


def _folder(kind: str):
    if kind not in KINDS:
        raise ConfigError(f"unknown config kind {kind!r}; choose one of {', '.join(KINDS)}")
    return resources.files("sqs") / "configs" / kind


def config_names(kind: str) -> list[str]:
    """The run configs shipped with the package for `kind`, by name (experiment grids such as
    `frontier`, files with a `[grid]` table, are read by name too but are not run configs)."""
    try:
        return sorted(p.name[:-5] for p in _folder(kind).iterdir()
                      if p.name.endswith(".toml") and not p.name.startswith("_")
                      and "\n[grid]" not in "\n" + p.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError):
        return []


def config_name(name_or_path: str | Path) -> str:
    """The name a config's runs are filed under: the shipped name, or the file's stem."""
    return Path(str(name_or_path)).name.removesuffix(".toml")


def config_text(kind: str, name_or_path: str | Path) -> tuple[str, str]:
    """(TOML text, where it came from) of a shipped config name or a `.toml` path."""
    path = Path(name_or_path).expanduser()
    if path.suffix == ".toml" or path.exists():
        if path.is_file():
            return path.read_text(encoding="utf-8"), str(path)
        shipped = _folder(kind) / path.name
        if str(name_or_path) != path.name or not shipped.is_file():
            raise ConfigNotFound(f"{kind} config file {path} does not exist")
        name_or_path = path.stem
    res = _folder(kind) / f"{name_or_path}.toml"
    if str(name_or_path).startswith("_") or not res.is_file():
        raise ConfigNotFound(f"no {kind} config named {str(name_or_path)!r}; shipped configs: "
                                f"{', '.join(config_names(kind)) or '(none)'}; or give the path of a .toml file")
    return res.read_text(encoding="utf-8"), f"sqs/configs/{kind}/{name_or_path}.toml"


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value`; dotted keys reach into tables (`model.norm=rms`, `train.lr=3e-3`); the value
    is read as a TOML value (`0.1`, `true`, `[0.9, 0.99]`, `"x"`), falling back to a bare string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value (e.g. --set model.gate=sqs or "
                          "--set train.lr=3e-3)")
    key, raw = (s.strip() for s in text.split("=", 1))
    if not key:
        raise ConfigError(f"override {text!r} has an empty key (write --set key=value)")
    try:
        value = loads_toml(f"v = {raw}")["v"]
    except ValueError:
        value = raw
    return key, value


def override_items(overrides: Overrides) -> list[tuple[str, Any]]:
    """Overrides given as a {dotted key: value} mapping or as `key=value` strings, as pairs."""
    if not overrides:
        return []
    if isinstance(overrides, Mapping):
        return list(overrides.items())
    return [parse_override(s) for s in overrides]


def apply_overrides(d: dict, overrides: Overrides) -> dict:
    """A copy of config dict `d` with overrides applied (dotted keys create nested tables)."""
    d = copy.deepcopy(d)
    for key, value in override_items(overrides):
        parts = key.split(".")
        node = d
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {key!r}: {p!r} is not a table")
            node = nxt
        node[parts[-1]] = value
    return d


def load_config_dict(kind: str, name_or_path: str | Path, overrides: Overrides = None) -> tuple[dict, str]:
    """(nested config dict with overrides applied, where it came from)."""
    text, where = config_text(kind, name_or_path)
    return apply_overrides(loads_toml(text, where), overrides), where


def dumps_toml(d: Mapping[str, Any]) -> str:
    """A small TOML writer for config dicts (scalars, lists, nested tables)."""

    def val(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, float):
            return repr(v) if math.isfinite(v) else ("nan" if math.isnan(v) else ("inf" if v > 0 else "-inf"))
        if isinstance(v, str):
            return json.dumps(v)
        if isinstance(v, (list, tuple)):
            return "[" + ", ".join(val(x) for x in v) + "]"
        if isinstance(v, Mapping):
            return "{" + ", ".join(f"{_key(k)} = {val(x)}" for k, x in v.items()) + "}"
        raise TypeError(f"cannot write {type(v).__name__} as TOML")

    out = [f"{_key(k)} = {val(v)}" for k, v in d.items() if not isinstance(v, Mapping)]
    for k, v in d.items():  # top-level tables become [sections]; deeper ones inline tables
        if isinstance(v, Mapping):
            out.append(f"\n[{_key(k)}]")
            out.extend(f"{_key(kk)} = {val(vv)}" for kk, vv in v.items())
    return "\n".join(out) + "\n"


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


# ----------------------------------------------------------------------------- run directories


def gate_tag(gate: str, gate_kwargs: Mapping[str, Any] | None = None) -> str:
    """The gate's non-default parameters as a run-name tag: `lam0.1`, `c0`, `p2`, `lam0.5-p2` ('' for the defaults).

    SQS parameters are listed in the order c, lam, p and only where they differ from the
    defaults (`sqs.core.DEFAULT_C`, `DEFAULT_LAM`, `DEFAULT_P`), so the paper's default gate keeps
    the plain name `sqs`; other gates' keyword arguments are listed sorted by name.
    """
    kw = dict(gate_kwargs or {})
    if canonical_gate(gate) == "sqs":
        defaults = {"c": DEFAULT_C, "lam": DEFAULT_LAM, "p": DEFAULT_P}
        keys = [k for k in ("c", "lam", "p") if k in kw and float(kw[k]) != defaults[k]]
        keys += sorted(k for k in kw if k not in defaults)
    else:
        keys = sorted(kw)
    return "-".join(f"{k}{_num(kw[k])}" for k in keys)


def _num(v: Any) -> str:
    return f"{v:g}" if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)


def run_name(gate: str, seed: int, *, init_seed: int | None = None, data_seed: int | None = None,
             gate_kwargs: Mapping[str, Any] | None = None) -> str:
    """`<gate>[-<tag>]-s<seed>` with the gate's paper name (aliases accepted); a run whose init and
    data seeds differ from `seed` is `<gate>[-<tag>]-i<init>-d<data>` (None means `seed`)."""
    tag = gate_tag(gate, gate_kwargs)
    base = canonical_gate(gate) + (f"-{tag}" if tag else "")
    init = int(seed) if init_seed is None else int(init_seed)
    data = int(seed) if data_seed is None else int(data_seed)
    if init == int(seed) and data == int(seed):
        return f"{base}-s{int(seed)}"
    return f"{base}-i{init}-d{data}"


def run_dir(runs_root: str | Path, config: str | Path, dataset: str, gate: str, seed: int, *,
            init_seed: int | None = None, data_seed: int | None = None,
            gate_kwargs: Mapping[str, Any] | None = None) -> Path:
    """`<runs_root>/<config name>/<dataset>/<run_name>`, the one layout of every experiment."""
    return Path(runs_root) / config_name(config) / dataset / run_name(
        gate, seed, init_seed=init_seed, data_seed=data_seed, gate_kwargs=gate_kwargs)


_OLD_GATE_NAMES = {"bilinear": ("identity",), "swiglu": ("silu",)}


def legacy_run_dirs(runs_root: str | Path, config: str | Path, dataset: str, gate: str, seed: int) -> list[Path]:
    """Where earlier versions put this run: `<dataset>/<gate>/seed<k>` (table1),
    `<dataset>/<gate>-seed<k>` (spectra), `<config>/<gate>-s<k>` (lm), each under the
    runs folder or its `<config>` subfolder, with the old gate names too."""
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


def check_no_legacy(runs_root: str | Path, config: str | Path, dataset: str, gate: str, seed: int) -> None:
    """Refuse to start a run from scratch when the same run exists in an old layout: say how to move it."""
    new = run_dir(runs_root, config, dataset, gate, seed)
    if (new / "config.json").exists():
        return
    for old in legacy_run_dirs(runs_root, config, dataset, gate, seed):
        if (old / "config.json").exists():
            raise FileExistsError(f"{old} is this run in the old layout; move it to the new one with "
                                  f"`mkdir -p {new.parent} && mv {old} {new}`, then re-run")


# ----------------------------------------------------------------------------- the paper's numbers


def paper_reference() -> dict:
    """The paper's reference numbers (`sqs/configs/reference/paper.toml`): `table1`, `lm`, `fig2`, `appc`."""
    return load_toml(resources.files("sqs") / "configs" / "reference" / "paper.toml")
