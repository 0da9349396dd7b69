"""Where a run's training curves go besides metrics.jsonl: TensorBoard and Weights & Biases.

    names = parse_loggers("jsonl,tensorboard")      # the --logger flag; jsonl is always kept
    check_loggers(names)                            # LoggerUnavailable (one line naming the pip extra)
    train(model, task, cfg, run_dir, loggers=names) # the trainer opens, feeds and closes them

`metrics.jsonl` stays the record of a run (the trainer writes it whatever `--logger` says);
the loggers here mirror it for people who watch runs live, and add what is only worth
plotting: every step's loss, learning rate and gradient norm. At each evaluation they get the
evaluation metrics, the throughput (examples/s or tokens/s) and, for SQS layers, the
saturation share (`saturation_probe`, which also goes into metrics.jsonl).

Resuming continues the same logger run without duplicate steps:

* TensorBoard writes event files under `<run>/tensorboard/` (`tensorboardX`, 3 MB installed).
  A resumed run opens its writer with `purge_step = start + 1`, TensorBoard's own mechanism:
  readers drop every event of an earlier session at or after that step, so the steps a
  resume replays (after the checkpoint it starts from) are shown once, whatever was flushed
  before a crash, `kill -9` included.
* W&B keeps its run id in `<run>/wandb.json` and resumes it (`resume="allow"`); steps up to
  the last one logged there (saved at every evaluation and at the end) are not sent again.
  After a `kill -9` the steps between the last evaluation and the kill are sent a second time
  (with the same values: the resume replays them). It honours `WANDB_MODE`
  (`offline` needs no account), `WANDB_PROJECT` (default `sqs`) and `WANDB_DIR` (default: the
  run directory, files under `<run>/wandb/`).
"""

from __future__ import annotations

import json
import os
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F

from sqs.core import DEFAULT_LAM
from sqs.io import UserError
from sqs.training.rundir import TENSORBOARD, WANDB_RUN, run_file, write_run_json

#: Logger names for `--logger` (a comma list); `jsonl` (metrics.jsonl) is always written.
LOGGERS = ("jsonl", "tensorboard", "wandb")
#: The package each logger imports, and the extra that installs it.
REQUIRES = {"tensorboard": ("tensorboardX", "sqs[tensorboard]"), "wandb": ("wandb", "sqs[wandb]")}


class LoggerUnavailable(UserError):
    """A logger that cannot start here (package missing, W&B not logged in): one line with the fix."""


def parse_loggers(spec: str | Iterable[str] | None) -> tuple[str, ...]:
    """`"jsonl,tensorboard"` (or a list of names) -> ("jsonl", "tensorboard"); jsonl always first.
    An unknown name is a ConfigError naming the valid ones."""
    from sqs.io import ConfigError

    parts = spec.split(",") if isinstance(spec, str) else list(spec or ())
    names = [p.strip().lower() for p in parts if p.strip()]
    bad = [n for n in names if n not in LOGGERS]
    if bad:
        raise ConfigError(f"unknown logger {', '.join(map(repr, bad))}; choose from {', '.join(LOGGERS)} "
                          "(a comma list, e.g. --logger jsonl,tensorboard)")
    return tuple(dict.fromkeys(["jsonl", *names]))


def check_loggers(names: Iterable[str]) -> None:
    """Import every logger's package now, so a missing one is one line before any run starts."""
    for name in names:
        if name in REQUIRES:
            _require(name)


def _require(name: str):
    module, extra = REQUIRES[name]
    try:
        return __import__(module)
    except ImportError as e:
        raise LoggerUnavailable(f"--logger {name} needs the {module} package, which is not installed ({e}); "
                                f"install it with: pip install '{extra}'") from None


# ----------------------------------------------------------------------------- what is measured


def grad_norm(model: torch.nn.Module) -> torch.Tensor:
    """The total 2-norm of the model's gradients (what clip_grad_norm_ compares with grad_clip)."""
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())


@contextmanager
def saturation_probe(model: torch.nn.Module) -> Iterator[dict[str, float]]:
    """While the block runs, count for every SQS GLU layer (`sqs.nn.GLU`, gate "sqs", lam > 0)
    the gate pre-activations v = V x with |v| > 1/lam; on exit the yielded dict holds
    {layer name: share}. Beyond 1/lam the gate's denominator 1 + lam|v| is over 2: the unit is
    in its shrink regime, far from the bilinear reading.

    A forward pre-hook recomputes V x (one extra matmul per layer, during evaluation only).
    Empty for models without SQS layers, and for a model compiled in place (hooks inside a
    compiled graph would recompile it at every evaluation)."""
    from sqs.nn import GLU

    out: dict[str, float] = {}
    layers = [(name, m) for name, m in model.named_modules()
              if isinstance(m, GLU) and m.gate == "sqs" and float(m.gate_kwargs.get("lam", DEFAULT_LAM)) > 0]
    if not layers or getattr(model, "_compiled_call_impl", None) is not None:
        yield out
        return
    counts: dict[str, list] = {name: [0, 0] for name, _ in layers}

    def hook(name: str, layer: GLU):
        bound = 1.0 / float(layer.gate_kwargs.get("lam", DEFAULT_LAM))

        def count(module, args) -> None:
            x = args[0]
            w = module.proj.weight[module.d_hidden:]
            b = module.proj.bias[module.d_hidden:] if module.proj.bias is not None else None
            v = F.linear(x, w.to(x.dtype), None if b is None else b.to(x.dtype))
            counts[name][0] = counts[name][0] + (v.abs() > bound).sum()
            counts[name][1] += v.numel()
        return count

    handles = [m.register_forward_pre_hook(hook(name, m)) for name, m in layers]
    try:
        yield out
    finally:
        for h in handles:
            h.remove()
        out.update({name: float(c[0]) / c[1] for name, c in counts.items() if c[1]})


def eval_scalars(record: dict, metrics: Iterable[str], unit: str) -> dict[str, float]:
    """The scalars of one metrics.jsonl record as logger tags: eval/<metric>, train/<unit>_per_s,
    train/loss_mean (mean training loss since the previous evaluation), saturation/<layer>."""
    out = {f"eval/{k}": record[k] for k in metrics if _number(record.get(k))}
    for key, tag in ((f"{unit}_per_s", f"train/{unit}_per_s"), ("train_loss", "train/loss_mean"),
                     ("elapsed_s", "time/elapsed_s")):
        if _number(record.get(key)):
            out[tag] = record[key]
    for layer, share in (record.get("saturation") or {}).items():
        out[f"saturation/{layer}"] = share
    return out


def _number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _flat(config: dict, prefix: str = "") -> dict[str, Any]:
    """{"train": {"lr": 1e-3}} -> {"train.lr": 1e-3}; lists and None as text (hyper-parameter values)."""
    out: dict[str, Any] = {}
    for k, v in config.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)
    return out


# ----------------------------------------------------------------------------- the loggers


class TensorBoardLogger:
    """Event files in `<run>/tensorboard/` (see the module docstring for resumes)."""

    def __init__(self, run_dir: Path, config: dict, start: int):
        tbx = _require("tensorboard")
        self.purge = start + 1 if start > 0 else None
        # The file name begins with the time in seconds: the start step after it keeps two sessions
        # of the same second in order (and apart).
        self.writer = tbx.SummaryWriter(logdir=str(run_file(run_dir, TENSORBOARD)), purge_step=self.purge,
                                        flush_secs=30, filename_suffix=f".s{start:09d}")
        self.config = config
        self.hparams_written = False

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, step)

    def evaluation(self, step: int, scalars: dict[str, float]) -> None:
        if not self.hparams_written:  # the config as hyper-parameters, with the metrics known by now
            from tensorboardX.summary import hparams

            for summary in hparams(_flat(self.config), {t: 0.0 for t in scalars if t.startswith("eval/")}):
                self.writer.file_writer.add_summary(summary)
            self.writer.add_text("config", "```\n" + json.dumps(self.config, indent=1) + "\n```", step)
            self.hparams_written = True
        self.log(step, scalars)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbLogger:
    """One W&B run per run directory, its id kept in `<run>/wandb.json` (see the module docstring)."""

    def __init__(self, run_dir: Path, config: dict, start: int):
        wandb = _require("wandb")
        self.run_dir = run_dir
        state = _read_json(run_file(run_dir, WANDB_RUN))
        self.state = {"id": state.get("id") or uuid.uuid4().hex[:12], "last_step": state.get("last_step", -1)}
        write_run_json(run_dir, WANDB_RUN, self.state)  # the id is kept before W&B knows it
        parts = run_dir.resolve().parts
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sqs"), id=self.state["id"],
                                  resume="allow", name="/".join(parts[-3:]), group="/".join(parts[-3:-1]),
                                  dir=os.environ.get("WANDB_DIR") or str(run_dir), config=config,
                                  settings=wandb.Settings(console="off", silent=True))
        except Exception as e:  # noqa: BLE001 - W&B raises many kinds (no API key, network, ...)
            msg = " ".join(str(e).split())
            raise LoggerUnavailable(f"--logger wandb could not start a W&B run ({type(e).__name__}: {msg}); log in "
                                    "with `wandb login` (or set WANDB_API_KEY), or set WANDB_MODE=offline") from None
        # A resumed online run knows its last step; an offline one has only wandb.json.
        self.skip_until = max(int(self.state["last_step"]), int(getattr(self.run, "step", 0) or 0) - 1)
        self.state["url"] = getattr(self.run, "url", None)  # None offline (`wandb sync` uploads it later)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        if step > self.skip_until:
            self.run.log(scalars, step=step)
            self.state["last_step"] = max(self.state["last_step"], step)

    def evaluation(self, step: int, scalars: dict[str, float]) -> None:
        self.log(step, scalars)
        write_run_json(self.run_dir, WANDB_RUN, self.state)

    def close(self) -> None:
        try:
            self.run.finish()
        finally:
            write_run_json(self.run_dir, WANDB_RUN, self.state)


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


_CLASSES = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}


class RunLoggers:
    """The loggers of one training session (rank 0 only); a no-op when only jsonl was asked for.

    The trainer calls `step` after every optimizer step, `evaluation` after every metrics.jsonl
    record, and `close` when the session ends (finished, stopped or failed)."""

    def __init__(self, names: Iterable[str], run_dir: str | Path, config: dict, start: int):
        self.loggers: list = []
        try:
            for name in parse_loggers(names):
                if name in _CLASSES:
                    self.loggers.append(_CLASSES[name](Path(run_dir), config, start))
        except BaseException:
            self.close()
            raise

    @property
    def active(self) -> bool:
        """Whether anything listens: per-step values (the gradient norm) are computed only then."""
        return bool(self.loggers)

    def step(self, step: int, loss: float, lr: float, grad_norm: float | None) -> None:
        scalars = {"train/loss": loss, "train/lr": lr}
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        for lg in self.loggers:
            lg.log(step, scalars)

    def evaluation(self, step: int, record: dict, metrics: Iterable[str], unit: str) -> None:
        scalars = eval_scalars(record, list(metrics), unit)
        for lg in self.loggers:
            lg.evaluation(step, scalars)

    def close(self) -> None:
        """Close every logger; a failure to close one is a warning (the run's own files are written
        already, and an error here must not hide the one that ended the session)."""
        loggers, self.loggers = self.loggers, []
        for lg in loggers:
            try:
                lg.close()
            except Exception as e:  # noqa: BLE001 - close the others
                warnings.warn(f"closing the {type(lg).__name__} failed: {type(e).__name__}: {e}", RuntimeWarning,
                              stacklevel=2)
