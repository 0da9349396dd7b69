"""One trainer for every experiment (images and language models).

A run is a directory:

    config.json          everything needed to rebuild model and data (written once)
    metrics.jsonl        one JSON record per evaluation (appended, flushed)
    checkpoint.safetensors  model + AdamW state + step, written atomically
    model.safetensors    final weights (present only when the run finished)

Resumability: the batch of step t is drawn from a generator seeded by
(seed, t), and the learning rate is a pure function of t, so a run restarted from
its last checkpoint replays exactly the steps an uninterrupted run would take and
ends with the same numbers.

The experiment supplies a `Task`:
    task.batch(step, micro, rank, world) -> batch   (deterministic in its arguments)
    task.loss(model, batch) -> scalar tensor (mean over the micro-batch)
    task.evaluate(model) -> dict of floats          (called on rank 0 only)
    task.units_per_step -> int                      (examples or tokens, for rates)
    task.unit -> str                                ("examples" or "tokens")

Distributed: under torchrun the trainer wraps the model in DistributedDataParallel;
each rank draws its slice of the same global batch, so N ranks and 1 process see
identical gradients. Rank 0 alone evaluates, logs and writes files.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sqs.io import read_jsonl, write_json
from sqs.training.checkpoint import load_checkpoint, save_checkpoint


class TrainingDiverged(RuntimeError):
    pass


class RunConfigMismatch(ValueError):
    pass


@dataclass
class TrainConfig:
    steps: int
    lr: float = 1e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 0
    min_lr: float = 0.0
    grad_accum: int = 1
    grad_clip: float = 0.0  # 0 = off
    eval_every: int = 100
    checkpoint_every: int = 0  # 0 = at every evaluation
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 1.0)
    eval_at_start: bool = True
    seed: int = 0

    def __post_init__(self):
        if self.steps <= 0:
            raise ValueError(f"TrainConfig: `steps` must be > 0, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"TrainConfig: `grad_accum` must be >= 1, got {self.grad_accum}")
        self.betas = tuple(self.betas)
        self.fractions = tuple(self.fractions)

    def eval_steps(self) -> set[int]:
        s = {min(self.steps, max(1, round(f * self.steps))) for f in self.fractions}
        s |= set(range(self.eval_every, self.steps + 1, self.eval_every)) if self.eval_every > 0 else set()
        s.add(self.steps)
        if self.eval_at_start:
            s.add(0)
        return s

    def fraction_at(self, step: int) -> float | None:
        for f in self.fractions:
            if min(self.steps, max(1, round(f * self.steps))) == step:
                return f
        return None


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warm-up, then cosine annealing to min_lr, stepped per optimizer step."""
    if cfg.warmup_steps > 0 and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    t = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1.0 + math.cos(math.pi * t))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (nanoGPT's rule: no decay on norms, biases)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas)


class Task(Protocol):
    unit: str
    units_per_step: int

    def batch(self, step: int, micro: int, rank: int, world: int) -> Any: ...
    def loss(self, model: torch.nn.Module, batch: Any) -> torch.Tensor: ...
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]: ...


def step_generator(seed: int, step: int, micro: int = 0) -> torch.Generator:
    """The random stream of one (micro-)step: independent of where a run resumed."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + step * 1_009 + micro) % (2**63 - 1))
    return g


def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def read_metrics(run_dir: str | Path) -> list[dict]:
    return read_jsonl(Path(run_dir) / "metrics.jsonl")


def is_complete(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / "model.safetensors").exists() and any(m.get("final") for m in read_metrics(run_dir))


def prepare_run_dir(run_dir: str | Path, config: dict) -> Path:
    """Create the run directory or check that an existing one was made with `config`."""
    run_dir = Path(run_dir)
    path = run_dir / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        if old != json.loads(json.dumps(config)):
            diffs = [k for k in sorted(set(old) | set(config)) if old.get(k) != json.loads(json.dumps(config)).get(k)]
            raise RunConfigMismatch(
                f"run directory {run_dir} was made with a different config (differs in: {', '.join(diffs)}); "
                "choose another run directory or delete this one to start over")
    else:
        write_json(path, config)
    return run_dir


def train(model: torch.nn.Module, task: Task, cfg: TrainConfig, run_dir: str | Path, config: dict | None = None,
          progress: bool = True, desc: str = "train", stop_after: int | None = None,
          position: int | None = None) -> list[dict]:
    """Train (or resume) a run; returns its metric records.

    `config` is the full experiment config stored in config.json (defaults to the
    TrainConfig). `stop_after` ends the process early after that many steps of
    this call, as if interrupted (tests use it to check resumption). `position` is the
    progress bar's line (tqdm's `position`), for several runs shown at once.
    """
    rank, world = _dist()
    run_dir = Path(run_dir)
    config = config if config is not None else {"train": asdict(cfg)}
    if rank == 0:
        prepare_run_dir(run_dir, config)
    if world > 1:
        dist.barrier()

    optimizer = make_optimizer(model, cfg)
    ckpt = run_dir / "checkpoint.safetensors"
    start, run_loss, run_n, elapsed = 0, 0.0, 0, 0.0
    if ckpt.exists():
        meta = load_checkpoint(ckpt, model, optimizer)
        start, run_loss, run_n = meta["step"], meta.get("run_loss", 0.0), meta.get("run_n", 0)
        elapsed = meta.get("elapsed", 0.0)
    records = [m for m in read_metrics(run_dir) if m["step"] <= start] if rank == 0 else []
    if rank == 0 and (run_dir / "metrics.jsonl").exists():
        # Drop records written after the checkpoint: the resumed run rewrites them.
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in records))
    if start >= cfg.steps and is_complete(run_dir):
        return records

    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)

    evals = cfg.eval_steps()
    ckpt_steps = set(range(cfg.checkpoint_every, cfg.steps + 1, cfg.checkpoint_every)) if cfg.checkpoint_every else evals
    metrics_f = open(run_dir / "metrics.jsonl", "a") if rank == 0 else None
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True, leave=False, position=position)
    t_interval, units_interval = time.perf_counter(), 0

    def log_eval(step: int) -> None:
        nonlocal run_loss, run_n, t_interval, units_interval, elapsed
        dt = time.perf_counter() - t_interval
        elapsed += dt
        model.eval()
        with torch.no_grad():
            ev = task.evaluate(model)
        model.train()
        rec = {"step": step, task.unit: step * task.units_per_step, "lr": lr_at(cfg, max(0, step - 1)),
               "train_loss": (run_loss / run_n) if run_n else None, **ev,
               f"{task.unit}_per_s": (units_interval / dt) if units_interval and dt > 0 else None,
               "elapsed_s": elapsed}
        f = cfg.fraction_at(step)
        if f is not None:
            rec["fraction"] = f
        if step == cfg.steps:
            rec["final"] = True
        records.append(rec)
        metrics_f.write(json.dumps(rec) + "\n")
        metrics_f.flush()
        run_loss, run_n, units_interval = 0.0, 0, 0
        t_interval = time.perf_counter()

    try:
        if start == 0 and 0 in evals and rank == 0 and not records:
            log_eval(0)
        model.train()
        for step in range(start, cfg.steps):
            lr = lr_at(cfg, step)
            for g in optimizer.param_groups:
                g["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss_sum = 0.0
            for micro in range(cfg.grad_accum):
                batch = task.batch(step, micro, rank, world)
                sync = micro == cfg.grad_accum - 1
                ctx = ddp.no_sync() if (world > 1 and not sync) else _null()
                with ctx:
                    loss = task.loss(ddp, batch)
                    (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach())
            mean_loss = loss_sum / cfg.grad_accum
            if not math.isfinite(mean_loss):
                raise TrainingDiverged(
                    f"loss became {mean_loss} at step {step} in {run_dir}; the last good checkpoint "
                    f"({ckpt.name}) is kept. Lower the learning rate or enable grad_clip, then resume or restart.")
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            run_loss += mean_loss
            run_n += 1
            units_interval += task.units_per_step
            done = step + 1
            bar.update(1)
            if done % 10 == 0 or done == cfg.steps:
                bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            if rank == 0 and done in evals:
                log_eval(done)
                bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in records[-1].items()
                                 if k in ("val_loss", "test_loss", "test_acc")}, refresh=False)
            if rank == 0 and (done in ckpt_steps or done == cfg.steps):
                save_checkpoint(ckpt, model, optimizer,
                                {"step": done, "run_loss": run_loss, "run_n": run_n, "elapsed": elapsed})
            if stop_after is not None and done - start >= stop_after and done < cfg.steps:
                return records
        if rank == 0:
            save_checkpoint(run_dir / "model.safetensors", model, None, {"step": cfg.steps, "config": config})
    finally:
        bar.close()
        if metrics_f:
            metrics_f.close()
    if world > 1:
        dist.barrier()
    return records


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False
