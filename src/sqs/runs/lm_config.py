"""The TinyStories run config: one flat dataclass, read from nested TOML sections.

    cfg = load_config("tinystories-cpu", ["train.lr=3e-4", "model.gate_kwargs.lam=0.1"], gate="sqs")
    cfg.run_dir("runs")        # runs/tinystories-cpu/tinystories/sqs-lam0.1-s0

Where each key sits in a TOML file is `SECTIONS`; overrides use the same dotted names. Gate
parameters are spelled as in image configs, `model.gate_kwargs.<name>` (a run's config.json
keeps storing the flat `gate_kwargs`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field

from pathlib import Path

from sqs.core import canonical_gate
from sqs.io import ConfigError
from sqs.models.gpt import GPTConfig
from sqs.runs.config_files import (
    GATE_KWARGS_KEY,
    Overrides,
    check_gate_kwargs,
    config_name,
    dumps_toml,
    load_config_dict,
    override_items,
)
from sqs.runs.naming import legacy_run_dirs, run_name, run_path

DATASET = "tinystories"
#: Where each LMRunConfig field sits in a TOML config (top-level fields: name, gate, seed).
SECTIONS = {
    "model": ("n_layers", "d_model", "n_heads", "d_hidden", "context", "tie_embeddings", "gate_kwargs"),
    "data": ("vocab_size",),
    "train": ("batch_size", "grad_accum", "epochs", "tokens", "steps", "lr", "weight_decay", "betas",
              "warmup_steps", "warmup_frac", "min_lr", "grad_clip", "amp", "compile", "checkpoint_every"),
    "eval": ("eval_every", "eval_points", "eval_windows", "eval_batch", "eval_seed"),
}
_SECTION_OF = {k: sec for sec, keys in SECTIONS.items() for k in keys}


@dataclass
class LMRunConfig:
    """Everything that defines a run: one flat dataclass (a run's config.json stores it flat).
    TOML files put each key in its section of `SECTIONS` ([model], [data], [train], [eval];
    name, gate and seed at the top): `from_toml` maps them, and overrides name them the same
    way (`train.lr=3e-4`, `model.d_hidden=256`, `model.gate_kwargs.lam=0.1`, `gate=swiglu`)."""

    name: str = "custom"
    gate: str = "sqs"
    gate_kwargs: dict = field(default_factory=dict)
    seed: int = 0
    # data
    vocab_size: int = 4096
    # model (see sqs.models.gpt for the choices the paper leaves open)
    n_layers: int = 4
    d_model: int = 128
    n_heads: int = 4
    d_hidden: int = 128
    context: int = 256
    tie_embeddings: bool = True
    # optimisation: exactly one of epochs / tokens / steps sets the length
    batch_size: int = 512  # sequences per optimizer step, global (all ranks, all micro-steps)
    grad_accum: int = 1  # micro-steps per optimizer step
    epochs: float | None = None
    tokens: int | None = None
    steps: int | None = None
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0  # if 0, warmup_frac * steps
    warmup_frac: float = 0.0
    min_lr: float = 0.0  # cosine annealing to this value (PyTorch's eta_min default: 0)
    grad_clip: float = 0.0  # 0 = off
    amp: str = "none"  # "bf16": bfloat16 autocast on CUDA (ignored on CPU)
    compile: bool = False  # torch.compile the model in place (nn.Module.compile); same math, faster
    # evaluation
    eval_every: int = 0  # if 0, about steps / eval_points
    eval_points: int = 20
    eval_windows: int = 256
    eval_batch: int = 64
    eval_seed: int = 1234
    checkpoint_every: int = 0  # 0 = at every evaluation

    def __post_init__(self):
        """Every setting is checked here, before any file is written (ConfigError naming the key)."""
        try:
            self._validate()
        except (ValueError, TypeError) as e:
            if isinstance(e, ConfigError):
                raise
            raise ConfigError(f"LMRunConfig: {e}") from e

    def _validate(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"LMRunConfig: `{name}` must be {rule}, got {getattr(self, name)!r}")

        def number(x) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)

        self.gate = canonical_gate(self.gate)
        self.gate_kwargs = check_gate_kwargs(self.gate, self.gate_kwargs)
        self.betas = tuple(float(b) for b in self.betas)
        n_len = sum(x is not None for x in (self.epochs, self.tokens, self.steps))
        if n_len != 1:
            raise ConfigError("LMRunConfig: set exactly one of `epochs`, `tokens`, `steps` "
                              f"(got epochs={self.epochs}, tokens={self.tokens}, steps={self.steps})")
        if self.epochs is not None:
            need(number(self.epochs) and self.epochs > 0, "epochs", "a finite number > 0")
        for name in ("tokens", "steps"):
            if getattr(self, name) is not None:
                need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "an int > 0")
        for name in ("batch_size", "grad_accum", "context", "eval_windows", "eval_batch", "eval_points"):
            need(isinstance(getattr(self, name), int) and getattr(self, name) > 0, name, "an int > 0")
        need(isinstance(self.seed, int) and self.seed >= 0, "seed", "an int >= 0")
        need(number(self.lr) and self.lr > 0, "lr", "a finite number > 0")
        need(number(self.min_lr) and 0 <= self.min_lr <= self.lr, "min_lr", "a number in [0, lr]")
        need(number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0")
        need(number(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "a finite number >= 0 (0 = off)")
        need(number(self.warmup_frac) and 0 <= self.warmup_frac < 1, "warmup_frac", "a number in [0, 1)")
        need(isinstance(self.warmup_steps, int) and self.warmup_steps >= 0, "warmup_steps", "an int >= 0")
        need(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "two numbers in [0, 1)")
        for name, rule in (("checkpoint_every", "an int >= 0 (0 = at every evaluation)"),
                           ("eval_every", "an int >= 0 (0 = from eval_points)")):
            need(isinstance(getattr(self, name), int) and getattr(self, name) >= 0, name, rule)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"LMRunConfig: `batch_size` ({self.batch_size}) must be divisible by "
                              f"`grad_accum` ({self.grad_accum})")
        if self.amp not in ("none", "bf16"):
            raise ConfigError(f"LMRunConfig: `amp` must be 'none' or 'bf16', got {self.amp!r}")
        GPTConfig(**self.model_kwargs(self.vocab_size))  # validate the model part now

    def model_kwargs(self, vocab_size: int) -> dict:
        return dict(vocab_size=int(vocab_size), n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
                    d_hidden=self.d_hidden, gate=self.gate, gate_kwargs=dict(self.gate_kwargs),
                    context=self.context, tie_embeddings=self.tie_embeddings)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context

    @property
    def micro_batch(self) -> int:
        """Sequences per micro-step, all ranks together."""
        return self.batch_size // self.grad_accum

    def run_name(self) -> str:
        """`<gate>[-<tag>]-s<seed>` (`sqs.runs.naming.run_name`): a non-default gate parameter shows."""
        return run_name(self.gate, self.seed, gate_kwargs=self.gate_kwargs)

    def label(self) -> str:
        """`tinystories/<run name>`: the run's label and the tail of its run directory."""
        return f"{DATASET}/{self.run_name()}"

    def run_dir(self, runs_root: str | os.PathLike) -> Path:
        """`<runs_root>/<config name>/tinystories/<run name>`: where this run lives (`sqs.runs.naming`)."""
        return run_path(runs_root, self.name, DATASET, self.run_name())

    def legacy_dirs(self, runs_root: str | os.PathLike) -> list[Path]:
        """Where earlier versions filed this run (none for a tagged run: they did not make those)."""
        if self.run_name() != f"{self.gate}-s{self.seed}":
            return []
        return legacy_run_dirs(runs_root, self.name, DATASET, self.gate, self.seed)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    def to_toml(self) -> str:
        """The config as a TOML file `load_config` reads back (sections as in `SECTIONS`; unset lengths left out)."""
        flat = {k: v for k, v in self.to_dict().items() if v is not None}
        nested: dict = {k: v for k, v in flat.items() if k not in _SECTION_OF}
        for k, v in flat.items():
            if k in _SECTION_OF:
                nested.setdefault(_SECTION_OF[k], {})[k] = v
        return dumps_toml(nested)

    @classmethod
    def from_toml(cls, d: dict, where: str = "LM config") -> "LMRunConfig":
        """From a nested TOML dict (sections as in `SECTIONS`; a `description` is ignored)."""
        return cls.from_dict(_flatten(d, where))

    @classmethod
    def from_dict(cls, d: dict) -> "LMRunConfig":
        """From flat keys (a run's config.json)."""
        flat = dict(d)
        flat.pop("description", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ConfigError(f"LMRunConfig: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**flat)

    def replace(self, **changes) -> "LMRunConfig":
        d = self.to_dict()
        length = {"epochs", "tokens", "steps"} & set(k for k, v in changes.items() if v is not None)
        if length:  # a new length replaces the old one instead of conflicting with it
            for k in ("epochs", "tokens", "steps"):
                d[k] = None
        d.update(changes)
        return LMRunConfig.from_dict(d)


def _field_of(key: str, where: str = "LM config") -> str:
    """The LMRunConfig field a dotted TOML key names (`train.lr` -> `lr`), checking its section."""
    parts = key.split(".")
    name, section = parts[-1], ".".join(parts[:-1])
    if key == "gate_kwargs":  # the old spelling, before image and LM configs shared one
        raise ConfigError(f"{where}: `gate_kwargs` is spelled {GATE_KWARGS_KEY}.<name> now, as in image configs "
                          f"(e.g. --set {GATE_KWARGS_KEY}.lam=0.1, or [model.gate_kwargs] in a TOML file)")
    known = {f.name for f in dataclasses.fields(LMRunConfig)}
    if name not in known and key != "description":
        raise ConfigError(f"{where}: unknown key {key!r}; valid keys: "
                         + ", ".join(sorted(f"{_SECTION_OF[k]}.{k}" if k in _SECTION_OF else k for k in known)))
    want = _SECTION_OF.get(name, "")
    if section != want:
        fix = f"{want}.{name}" if want else name
        raise ConfigError(f"{where}: key {key!r} belongs {'in [' + want + ']' if want else 'at the top level'}; "
                         f"write it as {fix}")
    return name


def _flatten(d: dict, where: str = "LM config", prefix: str = "") -> dict:
    """Nested TOML tables -> flat LMRunConfig keys, each checked against its section."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and key != GATE_KWARGS_KEY and key != "gate_kwargs":
            out.update(_flatten(v, where, key + "."))
        elif key != "description":
            out[_field_of(key, where)] = v
    return out


def _updates(cfg: LMRunConfig, overrides: Overrides) -> dict:
    """Flat field updates from dotted overrides; `model.gate_kwargs.<name>=v` sets one gate parameter
    on top of the config's others (`model.gate_kwargs={...}` replaces them all)."""
    upd: dict = {}
    prefix = GATE_KWARGS_KEY + "."
    for key, value in override_items(overrides):
        if key.startswith(prefix):
            kw = upd.setdefault("gate_kwargs", dict(cfg.gate_kwargs))
            kw[key[len(prefix):]] = value
        else:
            upd[_field_of(key, "override")] = value
    return upd


def load_config(name_or_path: str | os.PathLike = "tinystories-cpu", overrides: Overrides = None,
                **changes) -> LMRunConfig:
    """Read a shipped config by name or a TOML file, then apply `overrides` (dotted keys with
    TOML values, `train.lr=3e-4`, `model.gate_kwargs.lam=0.1`, as strings or a dict) and
    `changes` (flat fields, None ignored). A new training length (epochs / tokens / steps)
    replaces the config's."""
    d, where = load_config_dict("lm", name_or_path)
    d.setdefault("name", config_name(name_or_path))
    try:
        cfg = LMRunConfig.from_toml(d, where)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from e
    upd = _updates(cfg, overrides)
    upd.update({k: v for k, v in changes.items() if v is not None})
    return cfg.replace(**upd) if upd else cfg
