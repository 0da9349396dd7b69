"""The image run config (paper Sec. 4.1 and 4.2): one MNIST / Fashion-MNIST classifier run.

    cfg = load_config("sec42", overrides=["dataset=fashion-mnist", "model.gate=sqs", "seed=3"])
    cfg.run_dir("runs")          # runs/sec42/fashion-mnist/sqs-s3 (the one run-directory rule)

Every value is checked when the config is built (`ConfigError` naming the key), gate
parameters included (`model.gate_kwargs.<name>`, checked by the gate itself), so a bad
setting is refused before `--print-config` prints or a run directory appears. What a run
does with it is `sqs.runs.image_pipeline`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

from sqs.core import canonical_gate
from sqs.io import ConfigError
from sqs.models.image import ImageModelConfig
from sqs.runs.config_files import Overrides, check_gate_kwargs, config_name, dumps_toml, load_config_dict
from sqs.runs.naming import legacy_run_dirs, run_name, run_path
from sqs.training.trainer import TrainConfig

DATASETS = ("mnist", "fashion-mnist")
#: TrainConfig fields an ImageRunConfig derives itself (not settable in its `train` table).
_DERIVED_TRAIN = ("steps", "seed")


# ----------------------------------------------------------------------------- config


@dataclass
class ImageRunConfig:
    """Everything that defines one image run (data location excepted).

    `train` holds TrainConfig fields (lr, weight_decay, betas, warmup_steps, min_lr,
    grad_accum, grad_clip, eval_every, checkpoint_every, fractions, eval_at_start);
    `steps` comes from `epochs`, `seed` from the top level. `eval_every` defaults to
    steps // eval_points, `checkpoint_every` to one epoch.
    """

    dataset: str = "mnist"
    seed: int = 0
    init_seed: int | None = None  # seeds the model's initial weights (None: `seed`)
    data_seed: int | None = None  # seeds the batch order and the input noise (None: `seed`)
    model: ImageModelConfig = field(default_factory=ImageModelConfig)
    batch_size: int = 512
    epochs: float = 20
    noise_std: float = 1.0
    noise_prob: float = 1.0  # fraction of training images that get noise (kornia's RandomGaussianNoise default: 0.5)
    noise_relative: bool = False  # noise std in units of the training pixels' std (inputs read as normalised)
    eval_points: int = 40
    early_eval_every: int = 0
    early_eval_until: int = 0
    eval_batch_size: int = 2500
    train: dict = field(default_factory=lambda: {"lr": 1e-3, "weight_decay": 0.1})
    #: The config the run was made from: its name files the run (runs/<config>/...); not part of
    #: the run's identity, so not in config.json (`to_dict`).
    config: str = field(default="custom", compare=False)

    def __post_init__(self):
        if isinstance(self.model, Mapping):
            self.model = model_config_from_dict(self.model)
        self.model.gate = canonical_gate(self.model.gate)
        self.model.gate_kwargs = check_gate_kwargs(self.model.gate, self.model.gate_kwargs)
        if self.dataset not in DATASETS:
            raise ConfigError(f"ImageRunConfig: unknown `dataset` {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        for name in ("batch_size", "eval_points", "eval_batch_size"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ConfigError(f"ImageRunConfig: `{name}` must be a positive int, got {val!r}")
        for name in ("early_eval_every", "early_eval_until"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ConfigError(f"ImageRunConfig: `{name}` must be an int >= 0, got {val!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"ImageRunConfig: `seed` must be an int >= 0, got {self.seed!r}")
        for name in ("init_seed", "data_seed"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
                raise ConfigError(f"ImageRunConfig: `{name}` must be an int >= 0 (or absent: `seed`), got {val!r}")
            if val == self.seed:  # equal to `seed` is the unsplit run: one config, one run directory
                setattr(self, name, None)
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0 and math.isfinite(self.epochs)):
            raise ConfigError(f"ImageRunConfig: `epochs` must be a positive number, got {self.epochs!r}")
        if isinstance(self.epochs, float) and self.epochs.is_integer():
            self.epochs = int(self.epochs)
        if not (isinstance(self.noise_std, (int, float)) and self.noise_std >= 0):
            raise ConfigError(f"ImageRunConfig: `noise_std` must be >= 0, got {self.noise_std!r}")
        if not (isinstance(self.noise_prob, (int, float)) and 0 <= self.noise_prob <= 1):
            raise ConfigError(f"ImageRunConfig: `noise_prob` must be in [0, 1], got {self.noise_prob!r}")
        self.train = dict(self.train)
        valid = {f.name for f in fields(TrainConfig)} - set(_DERIVED_TRAIN)
        bad = sorted(set(self.train) - valid)
        if bad:
            derived = [k for k in bad if k in _DERIVED_TRAIN]
            hint = (" (`steps` comes from `epochs`, `seed` is set at the top level)" if derived else "")
            raise ConfigError(f"ImageRunConfig: unknown key(s) {bad} in `train`{hint}; "
                             f"valid: {', '.join(sorted(valid))}")
        for k in ("betas", "fractions"):
            if k in self.train:
                self.train[k] = list(self.train[k])
        try:  # every `train` value checked now, by the trainer's own rules, named as the key the user wrote
            TrainConfig(steps=1, **self.train)
        except ConfigError as e:
            raise ConfigError(str(e).replace("TrainConfig: `", "ImageRunConfig: `train.", 1)) from None
        except TypeError as e:
            raise ConfigError(f"ImageRunConfig: a value in `train` has the wrong type ({e})") from None
        for name in ("d_model", "d_hidden", "d_in", "n_classes"):
            val = getattr(self.model, name)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ConfigError(f"ImageRunConfig: `model.{name}` must be a positive int, got {val!r}")
        grad_accum = int(self.train.get("grad_accum", 1))
        if self.batch_size % grad_accum:
            raise ConfigError(f"ImageRunConfig: `batch_size` {self.batch_size} is not divisible by "
                             f"train.grad_accum {grad_accum}")

    # -- derived quantities
    @property
    def model_seed(self) -> int:
        """The seed of the model's initial weights: `init_seed`, else `seed`."""
        return self.seed if self.init_seed is None else self.init_seed

    @property
    def batch_seed(self) -> int:
        """The seed of the batch order and the input noise: `data_seed`, else `seed`."""
        return self.seed if self.data_seed is None else self.data_seed

    def steps_per_epoch(self, n_train: int) -> int:
        spe = n_train // self.batch_size
        if spe < 1:
            raise ConfigError(f"ImageRunConfig: `batch_size` {self.batch_size} is larger than the training set "
                              f"({n_train} examples); choose at most {n_train} with --batch-size N "
                              "(or --set batch_size=N)")
        return spe

    def steps(self, n_train: int) -> int:
        return max(1, int(math.floor(self.epochs * self.steps_per_epoch(n_train) + 1e-9)))

    def train_config(self, n_train: int) -> TrainConfig:
        steps = self.steps(n_train)
        kw = dict(self.train)
        kw.setdefault("eval_every", max(1, steps // self.eval_points))
        kw.setdefault("checkpoint_every", self.steps_per_epoch(n_train))
        return ImageTrainConfig(steps=steps, seed=self.batch_seed, early_eval_every=self.early_eval_every,
                                early_eval_until=self.early_eval_until, **kw)

    # -- (de)serialisation
    def to_dict(self) -> dict:
        """JSON-ready; `init_seed` / `data_seed` appear only when split, so an unsplit run's
        config.json (and its run directory) is the same as before the split existed."""
        d = json.loads(json.dumps(asdict(self)))
        del d["config"]
        for k in ("init_seed", "data_seed"):
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ImageRunConfig":
        d = dict(d)
        for k in ("kind", "resolved"):  # present in a run's config.json
            d.pop(k, None)
        valid = {f.name for f in fields(cls)} - {"config"}
        bad = sorted(set(d) - valid)
        if bad:
            raise ConfigError(f"image config: unknown key(s) {bad}; valid: {', '.join(sorted(valid))}")
        return cls(**d)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def run_name(self) -> str:
        """`<gate>[-<tag>]-s<seed>` or `<gate>[-<tag>]-i<init>-d<data>` (`sqs.runs.naming.run_name`)."""
        return run_name(self.model.gate, self.seed, init_seed=self.init_seed, data_seed=self.data_seed,
                        gate_kwargs=self.model.gate_kwargs)

    def label(self) -> str:
        """`<dataset>/<run name>`: the run's label and the tail of its run directory."""
        return f"{self.dataset}/{self.run_name()}"

    def run_dir(self, runs_root: str | Path) -> Path:
        """`<runs_root>/<config>/<dataset>/<run name>`: where this run lives (`sqs.runs.naming`)."""
        return run_path(runs_root, self.config, self.dataset, self.run_name())

    def legacy_dirs(self, runs_root: str | Path) -> list[Path]:
        """Where earlier versions filed this run (none for tagged or split runs, which they did not make)."""
        if self.run_name() != f"{self.model.gate}-s{self.seed}":
            return []
        return legacy_run_dirs(runs_root, self.config, self.dataset, self.model.gate, self.seed)


@dataclass
class ImageTrainConfig(TrainConfig):
    """TrainConfig plus denser evaluations early in training, where accuracy climbs fast
    (to time when each gate first reaches 80/85/90%): every `early_eval_every` steps up to
    step `early_eval_until`, on top of the regular `eval_every` grid."""

    early_eval_every: int = 0
    early_eval_until: int = 0

    def eval_steps(self) -> set[int]:
        s = super().eval_steps()
        if self.early_eval_every > 0 and self.early_eval_until > 0:
            s |= set(range(self.early_eval_every, min(self.early_eval_until, self.steps) + 1, self.early_eval_every))
        return s


def model_config_from_dict(d: Mapping[str, Any]) -> ImageModelConfig:
    valid = {f.name for f in fields(ImageModelConfig)}
    bad = sorted(set(d) - valid)
    if bad:
        raise ConfigError(f"image config: unknown key(s) {bad} in `model`; valid: {', '.join(sorted(valid))}")
    return ImageModelConfig(**d)


def load_config(name_or_path: str | Path = "sec42", overrides: Overrides = None) -> ImageRunConfig:
    """Read a shipped config by name (`sec41`, `sec42`) or a TOML file, then apply overrides
    (`model.gate=sqs`, `train.lr=3e-3`, `model.gate_kwargs.lam=0.1`; see `sqs.runs.config_files`).
    The run is filed under the config's name (`cfg.run_dir(root)`)."""
    d, where = load_config_dict("image", name_or_path, overrides)
    try:
        cfg = ImageRunConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e
    cfg.config = config_name(name_or_path)
    return cfg
