"""Image runs of the paper (Sec. 4.1 and 4.2): MNIST / Fashion-MNIST classifiers.

One run = one `ImageRunConfig` (`sqs.runs.image_config`) trained by the project's trainer
into its run directory; a list of runs goes through the process pool (`run_grid`):

    cfg = load_config("sec42", overrides=["dataset=fashion-mnist", "model.gate=sqs", "seed=3"])
    run_image(cfg, cfg.run_dir("runs"))               # runs/sec42/fashion-mnist/sqs-s3
    model, config = load_image_model(cfg.run_dir("runs"))
    run_grid([RunSpec.of(c, "runs") for c in cfgs], workers=2)

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
import functools
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from sqs.models.image import ImageClassifier, ImageModelConfig
from sqs.runs.image_config import ImageRunConfig, model_config_from_dict
from sqs.runs.naming import check_no_legacy
from sqs.runs.pool import RunSpec, launch
from sqs.training.checkpoint import CheckpointError, load_checkpoint, read_meta
from sqs.training.rundir import (
    CHECKPOINT,
    CONFIG,
    MODEL,
    TIMING,
    RunConfigMismatch,
    canonical_config,
    check_claimable,
    claimed,
    has_started,
    update_run_json,
)
from sqs.training.trainer import step_generator, train

RUN_KIND = "image"


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
              position: int | None = None, loggers: Iterable[str] = ()) -> list[dict]:
    """Train (or resume, or do nothing if finished) one image run; returns its metric records.

    `run_dir` is normally `cfg.run_dir(root)`. `data` = (x_train, y_train, x_test, y_test) skips
    loading (tests, probes); otherwise the dataset comes from `data_dir` (a folder of IDX files)
    or the cache. `position` places the per-run progress bar (for parallel runs). `loggers`: where
    the curves also go besides metrics.jsonl (`sqs.training.loggers`: tensorboard, wandb).
    """
    t0 = time.perf_counter()
    run_dir = check_claimable(run_dir)  # a folder that is not ours is refused before the data are loaded
    x_tr, y_tr, x_te, y_te = data if data is not None else load_data(cfg.dataset, data_dir, cache_dir)
    tc = cfg.train_config(x_tr.shape[0])
    noise_std = cfg.noise_std * (float(x_tr.std()) if cfg.noise_relative else 1.0)
    task = ImageTask(x_tr, y_tr, x_te, y_te, cfg.batch_size, seed=cfg.batch_seed, noise_std=noise_std,
                     noise_prob=cfg.noise_prob,
                     grad_accum=tc.grad_accum, eval_batch_size=cfg.eval_batch_size)
    model = build_model(cfg)
    kw = {"position": position} if position is not None else {}
    with claimed(run_dir):  # the trainer claims it again (re-entrant); timing.json is written under the same hold
        records = train(model, task, tc, run_dir, config=run_record(cfg, x_tr.shape[0], x_te.shape[0]),
                        progress=progress, desc=desc or cfg.label(), stop_after=stop_after, loggers=loggers, **kw)
        add_timing(run_dir, time.perf_counter() - t0)
    return records


def add_timing(run_dir: str | Path, wall: float) -> Path:
    """Accumulate a process's wall time (data, model, training and evaluation) in timing.json."""
    return update_run_json(run_dir, TIMING, lambda old: {"wall_s": old.get("wall_s", 0.0) + wall,
                                                         "calls": old.get("calls", 0) + 1,
                                                         "threads": torch.get_num_threads()})


def read_run_config(run_dir: str | Path) -> dict:
    """The config.json of an image run (FileNotFoundError / ValueError for anything else)."""
    path = Path(run_dir) / CONFIG
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
    mcfg = model_config_from_dict(config["model"])
    model = ImageClassifier(mcfg)
    path = run_dir / MODEL
    if not path.exists():
        ckpt = run_dir / CHECKPOINT
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


# ----------------------------------------------------------------------------- a list of runs


def check_existing(specs: Sequence[RunSpec], runs_root: str | Path | None = None) -> None:
    """Refuse to mix runs made with another config into a grid (before anything starts), and
    runs of an old layout (`check_no_legacy`, when `runs_root` is given).

    A directory that never trained (no checkpoint, no final weights: a refused start) is not
    a run to protect: the trainer sets its files aside and starts it with the new config."""
    bad = []
    for s in specs:
        if runs_root is not None:
            check_no_legacy(s.run_dir, s.cfg.legacy_dirs(runs_root))
        path = s.run_dir / CONFIG
        if path.exists() and has_started(s.run_dir):
            try:
                stored = json.loads(path.read_text())
            except (OSError, ValueError) as e:
                bad.append(f"{s.run_dir} (config.json unreadable: {e})")
                continue
            old = canonical_config({k: v for k, v in stored.items() if k not in ("kind", "resolved")})
            new = canonical_config(s.cfg.to_dict())
            if old != new:
                diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
                bad.append(f"{s.run_dir} (differs in: {', '.join(diff)})")
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise RunConfigMismatch(f"{len(bad)} run director{'y was' if len(bad) == 1 else 'ies were'} made with a "
                                f"different config: {'; '.join(bad[:3])}{more}; choose another --runs-dir "
                                "(or move them away to start over)")


def prefetch(datasets: Iterable[str], cache_dir=None, progress: bool = True) -> None:
    """Fetch a dataset whose files are not in the cache yet (before any worker starts)."""
    from sqs.data import images

    for ds in sorted(set(datasets)):
        folder = images.dataset_dir(ds, cache_dir)
        if not all(images.find_file(folder, f) for f in images.FILES):
            images.fetch(ds, cache_dir=cache_dir, progress=progress)


def train_spec(spec: RunSpec, *, position: int, progress: bool, cache_dir=None, loggers: Iterable[str] = ()) -> dict:
    """Train one run of a grid (the pool's `run_one`: a top-level function, so any launcher can
    ship it to another process); returns its final test loss and accuracy."""
    recs = run_image(spec.cfg, spec.run_dir, progress=progress, cache_dir=cache_dir, desc=spec.name,
                     position=position, loggers=loggers)
    final = recs[-1] if recs else {}
    return {"test_loss": final.get("test_loss"), "test_acc": final.get("test_acc")}


def run_grid(specs: Sequence[RunSpec], workers: int = 2, threads: int = 1, cache_dir=None, progress: bool = True,
             run_bars: bool = True, runs_root: str | Path | None = None, desc: str = "image runs",
             on_finish: Callable[[str, bool, Any], None] | None = None, log: str | Path | None = None,
             launcher: str | None = None, launcher_options: dict | None = None,
             loggers: Iterable[str] = ()) -> dict:
    """Train every unfinished image run of `specs` with the pool (`sqs.runs.pool.launch`):
    refuse mixed configs and old layouts first (`check_existing`), fetch missing datasets once,
    then skip finished runs and resume interrupted ones. Returns the pool's summary (also
    appended to the JSONL file `log` when something was trained). `launcher` and
    `launcher_options` choose where the runs execute (`sqs.runs.pool.LAUNCHERS`, e.g. "ray" with
    {"cpus_per_run": 1}); `loggers` where their curves go besides metrics.jsonl."""
    check_existing(specs, runs_root)
    run_one = functools.partial(train_spec, cache_dir=cache_dir, loggers=tuple(loggers))
    return launch(specs, run_one, workers=workers, threads=threads,
                  progress=progress, run_bars=run_bars, desc=desc, on_finish=on_finish, log=log,
                  prepare=lambda todo: prefetch((s.cfg.dataset for s in todo), cache_dir, progress),
                  launcher=launcher, launcher_options=launcher_options)
