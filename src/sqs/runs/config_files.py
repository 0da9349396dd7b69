"""The one config system of every run: TOML files, dotted overrides, gate parameters.

Configs are TOML files shipped in `sqs/configs/<kind>/` (kind: `image`, `lm`), read by
name (`sec42`, `tinystories-cpu`) or from any `.toml` path, with nested tables
(`[model]`, `[train]`, ...). Overrides use one syntax everywhere, dotted keys with TOML
values, as on the command line:

    d, name = load_config_dict("image", "sec42", ["model.gate=sqs", "train.lr=3e-3"])
    d, name = load_config_dict("lm", "tinystories-cpu", ["train.epochs=3"])

Each pipeline maps the nested dict onto its run config (`sqs.runs.image_config.ImageRunConfig`,
`sqs.runs.lm_config.LMRunConfig`), which validates every value (gate parameters with
`check_gate_kwargs`) before anything is written, and names its run directory
(`cfg.run_dir(root)`, the rule in `sqs.runs.naming`). The paper's reference numbers, which
every report prints beside ours, are one data file, `sqs/configs/reference/paper.toml`
(`paper_reference`).
"""

from __future__ import annotations

import copy
import io
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Mapping

from sqs.core import canonical_gate, load_toml
from sqs.functional import gate_fn
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
    if path.suffix == ".toml" or path.is_file():  # a folder named like a shipped config is not a config
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


# ----------------------------------------------------------------------------- gate parameters

#: How every config spells a gate's parameters (image and LM alike): `--set model.gate_kwargs.lam=0.1`.
GATE_KWARGS_KEY = "model.gate_kwargs"


def grid_gate_overrides(gate: str) -> list[str]:
    """The override a grid over several gates adds for `gate`: none for SQS, and for the gates
    that take no parameters (relu, gelu, swiglu, bilinear) an empty parameter table, so that
    `--set model.gate_kwargs.lam=0.1` over all five gates varies SQS and keeps the references plain."""
    return [] if canonical_gate(gate) == "sqs" else [f"{GATE_KWARGS_KEY}={{}}"]


def check_gate_kwargs(gate: str, gate_kwargs: Any) -> dict:
    """The gate's parameters as a dict, checked by type here and by name and range by the gate
    itself (`sqs.functional.gate_fn`: unknown names, p > 0, lam >= 0, finite); ConfigError
    naming `model.gate_kwargs.<name>` and the fix otherwise.

    A config must refuse them before anything is written: a bad value used to pass
    `--print-config` and fail only when the model was built, one traceback per run of a grid."""
    if gate_kwargs is None:
        return {}
    if not isinstance(gate_kwargs, Mapping):
        raise ConfigError(f"`{GATE_KWARGS_KEY}` must be a table of numbers (e.g. --set {GATE_KWARGS_KEY}.lam=0.1), "
                          f"got {gate_kwargs!r}")
    kw = dict(gate_kwargs)
    for name, value in kw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{GATE_KWARGS_KEY}.{name}` must be a number, got {value!r} "
                              f"(e.g. --set {GATE_KWARGS_KEY}.{name}=0.1)")
    try:
        gate_fn(gate, **kw)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"`{GATE_KWARGS_KEY}`: {e}") from None
    return kw


# ----------------------------------------------------------------------------- the paper's numbers


def paper_reference() -> dict:
    """The paper's reference numbers (`sqs/configs/reference/paper.toml`): `table1`, `lm`, `fig2`, `appc`."""
    return load_toml(resources.files("sqs") / "configs" / "reference" / "paper.toml")
