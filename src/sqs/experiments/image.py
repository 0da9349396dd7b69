"""Image experiments of the paper (Sec. 4.1 and 4.2): MNIST / Fashion-MNIST classifiers.

One run = one `ImageRunConfig` trained by the project's trainer into a run directory:

    cfg = load_config("sec42", overrides=["dataset=fashion-mnist", "model.gate=sqs", "seed=3"])
    run_image(cfg, "runs/sec42/fashion-mnist/sqs-s3")
    model, config = load_image_model("runs/sec42/fashion-mnist/sqs-s3")

Data and batches
    The train and test sets are held in memory as tensors ((N, 784) float32 in [0, 1],
    int64 labels, from `sqs.data.images.load`). Batches are drawn by index, no per-sample
    Python code:

    * epochs without replacement: epoch e uses a permutation of the N training examples
      drawn from a generator seeded by (seed, e) (`epoch_generator`); step t of the run is
      batch t mod S of epoch t // S, where S = floor(N / batch_size) steps per epoch
      (PyTorch's drop_last convention: every batch is full, the N mod batch_size examples
      left over differ every epoch). A run therefore has `steps = floor(epochs * S)`
      optimizer steps; for MNIST at batch 512 that is 117 per epoch, 2340 for 20 epochs
      (at batch 2048: 29 and 580).
    * Gaussian input noise (std `noise_std`, pixels in [0, 1]) is added to the training
      batches only, drawn from `step_generator(seed, step, micro)`; evaluation uses clean
      images.

    Everything a step uses is a pure function of (seed, step, micro), so a resumed run
    replays exactly the steps an uninterrupted one takes (the trainer's contract).

Evaluation
    `test_loss` (mean cross-entropy) and `test_acc` on the full test set, in batches of
    `eval_batch_size`, every `eval_every` steps (by default steps // eval_points, i.e.
    about 40 points per curve), at 25/50/75/100% of training, and optionally every
    `early_eval_every` steps up to `early_eval_until` (the first-to-80/85/90% timing).
"""

from __future__ import annotations

import copy
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from sqs.experiments import config as _config
from sqs.experiments.config import apply_overrides, dumps_toml, parse_override, run_name  # noqa: F401
from sqs.functional import canonical_gate
from sqs.io import write_json
from sqs.models.image import ImageClassifier, ImageModelConfig
from sqs.training.checkpoint import CheckpointError, load_checkpoint, read_meta
from sqs.training.trainer import TrainConfig, step_generator, train

DATASETS = ("mnist", "fashion-mnist")
RUN_KIND = "image"
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

    def __post_init__(self):
        if isinstance(self.model, Mapping):
            self.model = _model_config(self.model)
        self.model.gate = canonical_gate(self.model.gate)
        if self.dataset not in DATASETS:
            raise ValueError(f"ImageRunConfig: unknown `dataset` {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        for name in ("batch_size", "eval_points", "eval_batch_size"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val <= 0:
                raise ValueError(f"ImageRunConfig: `{name}` must be a positive int, got {val!r}")
        for name in ("early_eval_every", "early_eval_until"):
            val = getattr(self, name)
            if not isinstance(val, int) or isinstance(val, bool) or val < 0:
                raise ValueError(f"ImageRunConfig: `{name}` must be an int >= 0, got {val!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"ImageRunConfig: `seed` must be an int >= 0, got {self.seed!r}")
        for name in ("init_seed", "data_seed"):
            val = getattr(self, name)
            if val is not None and (not isinstance(val, int) or isinstance(val, bool) or val < 0):
                raise ValueError(f"ImageRunConfig: `{name}` must be an int >= 0 (or absent: `seed`), got {val!r}")
            if val == self.seed:  # equal to `seed` is the unsplit run: one config, one run directory
                setattr(self, name, None)
        if not (isinstance(self.epochs, (int, float)) and self.epochs > 0 and math.isfinite(self.epochs)):
            raise ValueError(f"ImageRunConfig: `epochs` must be a positive number, got {self.epochs!r}")
        if isinstance(self.epochs, float) and self.epochs.is_integer():
            self.epochs = int(self.epochs)
        if not (isinstance(self.noise_std, (int, float)) and self.noise_std >= 0):
            raise ValueError(f"ImageRunConfig: `noise_std` must be >= 0, got {self.noise_std!r}")
        if not (isinstance(self.noise_prob, (int, float)) and 0 <= self.noise_prob <= 1):
            raise ValueError(f"ImageRunConfig: `noise_prob` must be in [0, 1], got {self.noise_prob!r}")
        self.train = dict(self.train)
        valid = {f.name for f in fields(TrainConfig)} - set(_DERIVED_TRAIN)
        bad = sorted(set(self.train) - valid)
        if bad:
            derived = [k for k in bad if k in _DERIVED_TRAIN]
            hint = (" (`steps` comes from `epochs`, `seed` is set at the top level)" if derived else "")
            raise ValueError(f"ImageRunConfig: unknown key(s) {bad} in `train`{hint}; "
                             f"valid: {', '.join(sorted(valid))}")
        for k in ("betas", "fractions"):
            if k in self.train:
                self.train[k] = list(self.train[k])
        grad_accum = int(self.train.get("grad_accum", 1))
        if self.batch_size % grad_accum:
            raise ValueError(f"ImageRunConfig: `batch_size` {self.batch_size} is not divisible by "
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
            raise ValueError(f"batch_size {self.batch_size} is larger than the training set ({n_train} examples)")
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
        for k in ("init_seed", "data_seed"):
            if d[k] is None:
                del d[k]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ImageRunConfig":
        d = dict(d)
        for k in ("kind", "resolved"):  # present in a run's config.json
            d.pop(k, None)
        valid = {f.name for f in fields(cls)}
        bad = sorted(set(d) - valid)
        if bad:
            raise ValueError(f"image config: unknown key(s) {bad}; valid: {', '.join(sorted(valid))}")
        return cls(**d)

    def to_toml(self) -> str:
        return dumps_toml(self.to_dict())

    def run_name(self) -> str:
        """`<gate>[-<tag>]-s<seed>` or `<gate>[-<tag>]-i<init>-d<data>` (`sqs.experiments.config.run_name`)."""
        return run_name(self.model.gate, self.seed, init_seed=self.init_seed, data_seed=self.data_seed,
                        gate_kwargs=self.model.gate_kwargs)

    def name(self) -> str:
        """`<dataset>/<run name>`: the run's label and the tail of its run directory."""
        return f"{self.dataset}/{self.run_name()}"


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


def _model_config(d: Mapping[str, Any]) -> ImageModelConfig:
    valid = {f.name for f in fields(ImageModelConfig)}
    bad = sorted(set(d) - valid)
    if bad:
        raise ValueError(f"image config: unknown key(s) {bad} in `model`; valid: {', '.join(sorted(valid))}")
    return ImageModelConfig(**d)


def config_names() -> list[str]:
    """The image configs shipped with the package (`sqs/configs/image/*.toml`), by name."""
    return _config.config_names("image")


def load_config(name_or_path: str | Path = "sec42", overrides: _config.Overrides = None) -> ImageRunConfig:
    """Read a shipped config by name (`sec41`, `sec42`) or a TOML file, then apply overrides
    (`model.gate=sqs`, `train.lr=3e-3`; see `sqs.experiments.config`)."""
    d, where = _config.load_config_dict("image", name_or_path, overrides)
    try:
        return ImageRunConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from e


# ----------------------------------------------------------------------------- task


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """The random stream of an epoch's permutation (separate from the per-step streams)."""
    g = torch.Generator()
    g.manual_seed((seed * 2_000_029 + epoch * 7_919 + 0x5DEECE66D) % (2**63 - 1))
    return g


class ImageTask:
    """The trainer's Task for in-memory image classification (see the module docstring)."""

    unit = "examples"

    def __init__(self, x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor, y_test: torch.Tensor,
                 batch_size: int, seed: int = 0, noise_std: float = 1.0, grad_accum: int = 1,
                 eval_batch_size: int = 2500, noise_prob: float = 1.0):
        if x_train.ndim != 2 or x_train.shape[0] != y_train.shape[0]:
            raise ValueError(f"ImageTask: expected x_train (N, D) and y_train (N,), got {tuple(x_train.shape)} "
                             f"and {tuple(y_train.shape)}")
        if x_test.ndim != 2 or x_test.shape[0] != y_test.shape[0]:
            raise ValueError(f"ImageTask: expected x_test (N, D) and y_test (N,), got {tuple(x_test.shape)} "
                             f"and {tuple(y_test.shape)}")
        if batch_size % grad_accum:
            raise ValueError(f"ImageTask: batch_size {batch_size} is not divisible by grad_accum {grad_accum}")
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test
        self.batch_size, self.seed, self.noise_std = batch_size, seed, float(noise_std)
        self.noise_prob = float(noise_prob)
        self.grad_accum, self.eval_batch_size = grad_accum, eval_batch_size
        self.n_train = x_train.shape[0]
        self.steps_per_epoch = self.n_train // batch_size
        if self.steps_per_epoch < 1:
            raise ValueError(f"ImageTask: batch_size {batch_size} exceeds the training set ({self.n_train})")
        self.units_per_step = batch_size
        self._perm_epoch, self._perm = -1, None

    def permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            self._perm = torch.randperm(self.n_train, generator=epoch_generator(self.seed, epoch))
            self._perm_epoch = epoch
        return self._perm

    def batch(self, step: int, micro: int = 0, rank: int = 0, world: int = 1):
        epoch, i = divmod(step, self.steps_per_epoch)
        micro_bs = self.batch_size // self.grad_accum
        if micro_bs % world:
            raise ValueError(f"ImageTask: micro-batch {micro_bs} is not divisible by the world size {world}")
        start = i * self.batch_size + micro * micro_bs
        idx = self.permutation(epoch)[start:start + micro_bs]
        x = self.x_train[idx]
        if self.noise_std > 0 and self.noise_prob > 0:
            g = step_generator(self.seed, step, micro)
            noise = torch.randn(x.shape, generator=g, dtype=x.dtype)
            if self.noise_prob < 1:  # noise on a random subset of the images, as kornia's p
                noise.mul_(torch.rand(x.shape[0], 1, generator=g) < self.noise_prob)
            x.add_(noise, alpha=self.noise_std)  # x is a fresh tensor (advanced indexing copies)
        y = self.y_train[idx]
        if world > 1:  # every rank draws the same micro-batch (and noise) and keeps its slice
            per = micro_bs // world
            x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        return x, y

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(model(x), y)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        loss_sum, correct, n = 0.0, 0, self.x_test.shape[0]
        for s in range(0, n, self.eval_batch_size):
            x, y = self.x_test[s:s + self.eval_batch_size], self.y_test[s:s + self.eval_batch_size]
            logits = model(x)
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            correct += int((logits.argmax(-1) == y).sum())
        return {"test_loss": loss_sum / n, "test_acc": correct / n}


# ----------------------------------------------------------------------------- runs


def load_data(dataset: str, data_dir=None, cache_dir=None):
    """(x_train, y_train, x_test, y_test) of an image dataset, via `sqs.data.images.load`."""
    from sqs.data.images import load

    x_tr, y_tr = load(dataset, "train", data_dir=data_dir, cache_dir=cache_dir)
    x_te, y_te = load(dataset, "test", data_dir=data_dir, cache_dir=cache_dir)
    return x_tr, y_tr, x_te, y_te


def run_record(cfg: ImageRunConfig, n_train: int, n_test: int) -> dict:
    """What a run's config.json holds: the config plus what was derived from the data."""
    return {"kind": RUN_KIND, **cfg.to_dict(),
            "resolved": {"n_train": n_train, "n_test": n_test, "steps_per_epoch": cfg.steps_per_epoch(n_train),
                         "train": json.loads(json.dumps(asdict(cfg.train_config(n_train))))}}


def build_model(cfg: ImageRunConfig | ImageModelConfig, seed: int | None = None) -> ImageClassifier:
    """The model, initialised from `seed` without touching the global RNG state."""
    mcfg = cfg.model if isinstance(cfg, ImageRunConfig) else cfg
    seed = cfg.model_seed if (seed is None and isinstance(cfg, ImageRunConfig)) else (seed or 0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ImageClassifier(copy.deepcopy(mcfg))


def run_image(cfg: ImageRunConfig, run_dir: str | Path, progress: bool = True, *, data_dir=None, cache_dir=None,
              data=None, stop_after: int | None = None, desc: str | None = None,
              position: int | None = None) -> list[dict]:
    """Train (or resume, or do nothing if finished) one image run; returns its metric records.

    `data` = (x_train, y_train, x_test, y_test) skips loading (tests, probes); otherwise the
    dataset comes from `data_dir` (a folder of IDX files) or the cache. `position` places
    the per-run progress bar (for parallel runs).
    """
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = data if data is not None else load_data(cfg.dataset, data_dir, cache_dir)
    tc = cfg.train_config(x_tr.shape[0])
    noise_std = cfg.noise_std * (float(x_tr.std()) if cfg.noise_relative else 1.0)
    task = ImageTask(x_tr, y_tr, x_te, y_te, cfg.batch_size, seed=cfg.batch_seed, noise_std=noise_std,
                     noise_prob=cfg.noise_prob,
                     grad_accum=tc.grad_accum, eval_batch_size=cfg.eval_batch_size)
    model = build_model(cfg)
    kw = {"position": position} if position is not None else {}
    records = train(model, task, tc, run_dir, config=run_record(cfg, x_tr.shape[0], x_te.shape[0]),
                    progress=progress, desc=desc or cfg.name(), stop_after=stop_after, **kw)
    _add_timing(run_dir, time.perf_counter() - t0)
    return records


def _add_timing(run_dir: Path, wall: float) -> None:
    """Accumulate this process's wall time (data, model, training and evaluation) in timing.json."""
    path = run_dir / "timing.json"
    try:
        old = json.loads(path.read_text()) if path.exists() else {}
    except (OSError, json.JSONDecodeError):
        old = {}
    write_json(path, {"wall_s": old.get("wall_s", 0.0) + wall, "calls": old.get("calls", 0) + 1,
                      "threads": torch.get_num_threads()})


def read_run_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    config = json.loads(path.read_text())
    if config.get("kind") != RUN_KIND:
        raise ValueError(f"{run_dir} is not an image run (config.json kind={config.get('kind')!r})")
    return config


def load_image_model(run_dir: str | Path, *, allow_incomplete: bool = False) -> tuple[ImageClassifier, dict]:
    """Rebuild a finished run's model from config.json and load model.safetensors.

    Returns (model in eval mode, the run's config dict). `allow_incomplete` falls back to
    the latest training checkpoint of an unfinished run. A weights file that does not
    belong to the config (other shapes, or made with another model config) raises
    CheckpointError.
    """
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    mcfg = _model_config(config["model"])
    model = ImageClassifier(mcfg)
    path = run_dir / "model.safetensors"
    if not path.exists():
        ckpt = run_dir / "checkpoint.safetensors"
        if allow_incomplete and ckpt.exists():
            path = ckpt
        else:
            raise FileNotFoundError(
                f"{run_dir} has no model.safetensors: the run has not finished. Resume it with the same "
                f"command (`sqs train image ... --run-dir {run_dir}`)"
                + ("" if allow_incomplete else ", or pass allow_incomplete=True to use its last checkpoint"))
    meta = read_meta(path)
    stored = (meta.get("config") or {}).get("model")
    if stored is not None and stored != json.loads(json.dumps(config["model"])):
        diff = sorted(k for k in set(stored) | set(config["model"]) if stored.get(k) != config["model"].get(k))
        raise CheckpointError(f"{path} was written by a run with another model config (differs in: "
                              f"{', '.join(diff)}) than {run_dir / 'config.json'}")
    try:
        load_checkpoint(path, model)
    except CheckpointError as e:
        raise CheckpointError(f"{path} does not match the model of {run_dir / 'config.json'}: {e}") from e
    model.eval()
    return model, config

