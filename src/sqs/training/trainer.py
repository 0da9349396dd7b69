"""One trainer for every experiment (images and language models).

A run is a directory (`sqs.training.rundir` owns its files; `is_complete` and
`read_metrics` are there too):

    config.json          everything needed to rebuild model and data
    metrics.jsonl        one JSON record per evaluation (appended, fsynced)
    history.jsonl        events: starts, allowed config changes, divergence, repairs
    checkpoint.safetensors  model + AdamW state + step, verified (sha256), written atomically;
                         checkpoint.prev.safetensors is the one before it
    model.safetensors    final weights (present only when the run finished)
    run.lock             held by the one process that trains the run

Resumability: the batch of step t is drawn from a generator seeded by
(seed, t), and the learning rate is a pure function of t, so a run restarted from
its last checkpoint replays exactly the steps an uninterrupted run would take and
ends with the same numbers.

Faults (docs/reliability.md): a damaged newest checkpoint is set aside and the previous
one used; damaged metrics lines are set aside with the file, never truncated away; a
second process on the same directory is refused; a non-finite loss or state stops the run
with a message that says which checkpoint is good. A folder holding files sqs did not write is
refused untouched, an OS error on the run's files is one line (`rundir.claimed`), and SIGTERM
stops the run like Ctrl-C (`signals.Terminated`), a save in progress completing first.

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
import os
import time
import warnings
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Protocol

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from sqs.io import ConfigError, DataWarning, append_jsonl, scan_jsonl, write_text
from sqs.training.checkpoint import (
    CheckpointCorrupt,
    NonFiniteState,
    load_checkpoint,
    previous_path,
    read_meta,
    save_checkpoint,
)
from sqs.training.distributed import rank_world, same_start
from sqs.training.loggers import RunLoggers, grad_norm, saturation_probe
from sqs.training.rundir import (
    CHECKPOINT,
    METRICS,
    MODEL,
    active_divergence,
    claimed,
    change_hint,
    copy_aside,
    move_aside,
    prepare_run_dir,
    record_event,
)
from sqs.training.signals import graceful_sigterm


class TrainingDiverged(RuntimeError):
    """The loss or the trained state became inf/NaN; the message says at which step and
    which checkpoint a resume would use. `step` and `checkpoint_step` (None: no good
    checkpoint) carry the same facts for programs."""

    def __init__(self, message: str, step: int | None = None, checkpoint_step: int | None = None):
        super().__init__(message)
        self.step = step
        self.checkpoint_step = checkpoint_step


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


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
        """Every number is checked here, before any file is written (a refused start leaves nothing)."""
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"TrainConfig: `{name}` must be {rule}, got {getattr(self, name)!r}")

        def is_int(x: Any) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        need(is_int(self.steps) and self.steps > 0, "steps", "an int > 0")
        need(_finite_number(self.lr) and self.lr > 0, "lr", "a finite number > 0")
        need(_finite_number(self.weight_decay) and self.weight_decay >= 0, "weight_decay", "a finite number >= 0")
        need(_finite_number(self.min_lr) and 0 <= self.min_lr <= self.lr, "min_lr", "a number in [0, lr]")
        need(_finite_number(self.grad_clip) and self.grad_clip >= 0, "grad_clip", "a finite number >= 0 (0 = off)")
        need(is_int(self.grad_accum) and self.grad_accum >= 1, "grad_accum", "an int >= 1")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0, "warmup_steps", "an int >= 0")
        need(is_int(self.eval_every) and self.eval_every >= 0, "eval_every", "an int >= 0 (0 = only fractions)")
        need(is_int(self.checkpoint_every) and self.checkpoint_every >= 0, "checkpoint_every",
             "an int >= 0 (0 = at every evaluation)")
        need(is_int(self.seed), "seed", "an int")
        self.betas = tuple(self.betas)
        need(len(self.betas) == 2 and all(_finite_number(b) and 0 <= b < 1 for b in self.betas), "betas",
             "two numbers in [0, 1)")
        self.fractions = tuple(self.fractions)
        need(all(_finite_number(f) and 0 < f <= 1 for f in self.fractions), "fractions", "numbers in (0, 1]")

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


def _note(run_dir: Path, message: str, event: str, **fields: Any) -> None:
    record_event(run_dir, event, **fields)
    warnings.warn(message, DataWarning, stacklevel=3)


def _repair_metrics(run_dir: Path, keep_until: int | None) -> list[dict]:
    """The readable records of metrics.jsonl with step <= `keep_until` (all if None).

    When that is not the whole file (damaged lines, or records after the checkpoint that
    the resume replays), the file is first copied aside as `metrics.jsonl.<why>-<n>`, then
    rewritten atomically with the records kept: nothing is dropped without a copy."""
    path = run_dir / METRICS
    scan = scan_jsonl(path)
    keep, later = [], []
    for r in scan.records:
        ok = isinstance(r.get("step"), int) and (keep_until is None or r["step"] <= keep_until)
        (keep if ok else later).append(r)
    if scan.damaged or later:
        why = "damaged" if scan.damaged else "replayed"
        aside = copy_aside(path, why)
        write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
        parts = []
        if scan.damaged:
            parts.append(f"line(s) {', '.join(map(str, scan.damaged[:10]))} are damaged")
        if later:
            parts.append(f"{len(later)} record(s) after step {keep_until} are replayed by the resume")
        msg = f"{path}: {' and '.join(parts)}; the file is kept as {aside.name} and the rest is kept in place"
        record_event(run_dir, "metrics_set_aside", to=aside.name, damaged_lines=scan.damaged,
                     replayed_steps=[r.get("step") for r in later])
        if scan.damaged:
            warnings.warn(msg, DataWarning, stacklevel=3)
    return keep


def _resume_from(run_dir: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict | None:
    """Load the checkpoint to resume from; return its metadata (None: start at step 0).

    Tries checkpoint.safetensors, then checkpoint.prev.safetensors. A damaged one is set
    aside (`.damaged-<n>`) with a warning; after a recorded divergence at step s a
    checkpoint of step >= s (the weights that gave the bad loss) is set aside
    (`.diverged-<n>`). The one used ends up as checkpoint.safetensors."""
    ckpt, prev = run_dir / CHECKPOINT, previous_path(run_dir / CHECKPOINT)
    limit = active_divergence(run_dir)
    damaged = []
    for path in (ckpt, prev):
        if not path.exists():
            continue
        if limit is not None:
            try:
                step = int(read_meta(path).get("step", 0))
            except (CheckpointCorrupt, TypeError, ValueError):
                step = None  # damaged: load_checkpoint below says so and sets it aside
            if step is not None and step >= limit:
                to = move_aside(path, "diverged")
                _note(run_dir, f"{path.name} (step {step}) holds the weights that diverged at step {limit}; kept as "
                      f"{to.name}, resuming from an earlier checkpoint", "checkpoint_set_aside", to=to.name,
                      step=step, why="diverged")
                continue
        try:
            meta = load_checkpoint(path, model, optimizer)
            step = meta.get("step")
            if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0):
                raise CheckpointCorrupt(f"checkpoint {path} has no valid `step` in its metadata (got {step!r})")
        except CheckpointCorrupt as e:
            to = move_aside(path, "damaged")
            damaged.append(f"{path.name} (kept as {to.name})")
            _note(run_dir, f"{e}; kept as {to.name}, trying the previous checkpoint", "checkpoint_set_aside",
                  to=to.name, why="damaged")
            continue
        if path != ckpt:
            os.replace(path, ckpt)
            _note(run_dir, f"{run_dir}: resuming from the previous checkpoint (step {meta.get('step')})",
                  "checkpoint_fallback", step=meta.get("step"))
        return meta
    if damaged:
        raise CheckpointCorrupt(f"run directory {run_dir} has no usable checkpoint: {', '.join(damaged)} "
                                "damaged; move the run directory away to start over")
    return None


#: A checkpoint whose largest |weight| has grown more than this many times since the run's start
#: is named as probably diverged too: resuming from it with a lower lr rarely helps.
GROWTH_SUSPECT = 1e3


def _max_abs(model: torch.nn.Module) -> float:
    with torch.no_grad():
        return max((float(p.detach().abs().max()) for p in model.parameters() if p.numel()), default=0.0)


def _diverged(run_dir: Path, what: str, step: int, ckpt_step: int | None, prev_step: int | None,
              grad_clip: float, growth: dict[int, float] | None = None) -> TrainingDiverged:
    """A TrainingDiverged whose message is true: the step, the checkpoint a resume would
    use (or that there is none), and a fix that works on resume. Recorded in history."""
    if ckpt_step is None:
        have = "no checkpoint had been written yet, so a new start begins at step 0"
        resume = None
    elif ckpt_step < step:
        have = f"the last good checkpoint, {CHECKPOINT} (step {ckpt_step}), is kept and a resume starts there"
        resume = ckpt_step
    else:
        back = (f"{previous_path(CHECKPOINT).name} (step {prev_step})" if prev_step is not None
                else "step 0 (there is no earlier checkpoint)")
        have = (f"{CHECKPOINT} (step {ckpt_step}) holds the weights that gave it, so a resume goes back to "
                f"{back}")
        resume = prev_step
    fix = f"lower the learning rate and allow that change with {change_hint(['lr'])}"
    if grad_clip <= 0:
        fix += f", or enable gradient clipping (grad_clip > 0, allowed with {change_hint(['grad_clip'])})"
    g = (growth or {}).get(resume) if resume is not None else None
    if g is not None and g > GROWTH_SUSPECT:
        fix = (f"start over: the weights of the step-{resume} checkpoint are already {g:.0e} times larger than at "
               "the start, so it has probably diverged too and a lower lr from there rarely helps; move the run "
               "directory away (or use a new --run-dir) and start with a lower learning rate"
               + (" or gradient clipping (grad_clip > 0)" if grad_clip <= 0 else ""))
    msg = (f"{what} at step {step} in {run_dir}: {have}. Re-running unchanged repeats the same steps and "
           f"diverges again; to go on, {fix}.")
    record_event(run_dir, "diverged", step=step, what=what, checkpoint_step=ckpt_step, resume_step=resume)
    return TrainingDiverged(msg, step=step, checkpoint_step=resume)


def train(model: torch.nn.Module, task: Task, cfg: TrainConfig, run_dir: str | Path, config: dict | None = None,
          progress: bool = True, desc: str = "train", stop_after: int | None = None,
          position: int | None = None, allow_changes: Iterable[str] = (), loggers: Iterable[str] = ()) -> list[dict]:
    """Train (or resume) a run; returns its metric records.

    `config` is the full experiment config stored in config.json (defaults to the
    TrainConfig). `stop_after` ends the process early after that many steps of
    this call, as if interrupted (tests use it to check resumption). `position` is the
    progress bar's line (tqdm's `position`), for several runs shown at once.
    `allow_changes` names settings (from ALLOWED_CHANGES: lr, min_lr, grad_clip) that may
    differ from the stored config on resume; each change is recorded in history.jsonl.
    `loggers` names where the curves also go (`sqs.training.loggers.LOGGERS`: tensorboard, wandb;
    metrics.jsonl is always written), opened by rank 0 for this session and continued on resume.

    Rank 0 claims the run directory until it returns (`rundir.claimed`): the run's lock
    (RunLocked if another process trains it), a folder holding files sqs did not write refused
    untouched (NotOurs), every OS error on the run's files one RunFileError line. SIGTERM raises
    `sqs.training.signals.Terminated` (a KeyboardInterrupt) unless the program handles it itself.
    """
    rank, world = rank_world()
    config = config if config is not None else {"train": asdict(cfg)}
    with graceful_sigterm(), (claimed(run_dir) if rank == 0 else nullcontext(Path(run_dir))) as run_dir:
        if rank == 0:
            prepare_run_dir(run_dir, config, allow_changes=allow_changes)
        if world > 1:
            dist.barrier()
        return _train(model, task, cfg, run_dir, config, progress, desc, stop_after, position, rank, world,
                      tuple(loggers))


def _train(model, task, cfg, run_dir: Path, config, progress, desc, stop_after, position, rank, world,
           loggers=()) -> list[dict]:
    optimizer = make_optimizer(model, cfg)
    ckpt = run_dir / CHECKPOINT
    model_path = run_dir / MODEL

    finished = None
    if rank == 0 and model_path.exists() and any(m.get("final") for m in scan_jsonl(run_dir / METRICS).records):
        try:
            load_checkpoint(model_path, model)  # verified: a damaged final file is not reported as done
            finished = _repair_metrics(run_dir, None)  # keep every readable record
        except CheckpointCorrupt as e:
            to = move_aside(model_path, "damaged")
            _note(run_dir, f"{e}; kept as {to.name}, rewritten from the final checkpoint",
                  "checkpoint_set_aside", to=to.name, why="damaged")
    if world > 1:
        done_flag = [finished is not None]
        dist.broadcast_object_list(done_flag, src=0)
        if done_flag[0]:
            if rank != 0:
                load_checkpoint(model_path, model)
            return finished if rank == 0 else []
    elif finished is not None:
        return finished

    start, run_loss, run_n, elapsed = 0, 0.0, 0, 0.0
    meta = _resume_from(run_dir, model, optimizer) if rank == 0 else None
    if world > 1:  # the other ranks load what rank 0 chose (it may have fallen back)
        dist.barrier()
        if rank != 0 and ckpt.exists():
            meta = load_checkpoint(ckpt, model, optimizer)
    if meta is not None:
        start, run_loss, run_n = meta["step"], meta.get("run_loss", 0.0), meta.get("run_n", 0)
        elapsed = meta.get("elapsed", 0.0)
    if world > 1:
        same_start(start, run_dir)  # a node that does not share the run folder would start elsewhere
    ckpt_step = start if meta is not None else None
    # Weight growth since the start, per kept checkpoint: a NaN message must not call a blown-up checkpoint good.
    w_start = (meta or {}).get("w_start") or _max_abs(model) or 1.0
    growth: dict[int, float] = {}
    if meta is not None and meta.get("w_max") is not None:
        growth[start] = float(meta["w_max"]) / w_start
    prev_p = previous_path(ckpt)
    prev_step = None
    if rank == 0 and prev_p.exists():
        try:
            prev_meta = read_meta(prev_p)
            prev_step = int(prev_meta.get("step"))
            if prev_meta.get("w_max") is not None:
                growth[prev_step] = float(prev_meta["w_max"]) / w_start
        except (CheckpointCorrupt, TypeError, ValueError):
            prev_step = None  # not usable as a fallback: the NaN message will not offer it
    evals = cfg.eval_steps()
    records: list[dict] = []
    if rank == 0:
        records = _repair_metrics(run_dir, start)
        have = {r["step"] for r in records}
        lost = sorted(s for s in evals if s < start and s not in have)
        if lost:
            _note(run_dir, f"{run_dir / METRICS} has no record of step(s) {', '.join(map(str, lost[:10]))}"
                  f"{' ...' if len(lost) > 10 else ''}: they cannot be recomputed (no weights of those steps are "
                  "kept)", "metrics_lost", steps=lost)
        record_event(run_dir, "start", step=start, steps=cfg.steps)

    ddp = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(model)

    ckpt_steps = set(range(cfg.checkpoint_every, cfg.steps + 1, cfg.checkpoint_every)) if cfg.checkpoint_every else evals
    bar = tqdm(total=cfg.steps, initial=start, desc=desc, unit="step", disable=not progress or rank != 0,
               dynamic_ncols=True, leave=False, position=position)
    t_interval, units_interval = time.perf_counter(), 0
    out = RunLoggers(loggers, run_dir, config, start) if rank == 0 else RunLoggers((), run_dir, config, start)
    last_norm: float | None = None  # the gradient norm of the step just taken (into the evaluation record)

    def log_eval(step: int, recomputed: bool = False) -> None:
        nonlocal run_loss, run_n, t_interval, units_interval, elapsed
        dt = time.perf_counter() - t_interval
        elapsed += dt
        model.eval()
        with torch.no_grad(), saturation_probe(model) as saturation:
            ev = task.evaluate(model)
        model.train()
        rec = {"step": step, task.unit: step * task.units_per_step, "lr": lr_at(cfg, max(0, step - 1)),
               "train_loss": (run_loss / run_n) if run_n else None, **ev,
               f"{task.unit}_per_s": (units_interval / dt) if units_interval and dt > 0 else None,
               "elapsed_s": elapsed}
        if step > start and last_norm is not None:
            rec["grad_norm"] = last_norm
        if saturation:
            rec["saturation"] = saturation
        f = cfg.fraction_at(step)
        if f is not None:
            rec["fraction"] = f
        if step == cfg.steps:
            rec["final"] = True
        if recomputed:
            rec["recomputed"] = True  # evaluated again from the checkpoint (its record was lost)
        records.append(rec)
        append_jsonl(run_dir / METRICS, rec)
        out.evaluation(step, rec, ev, task.unit)
        run_loss, run_n, units_interval = 0.0, 0, 0
        t_interval = time.perf_counter()

    def save(done: int) -> None:
        nonlocal ckpt_step, prev_step
        w_max = _max_abs(model)
        try:
            save_checkpoint(ckpt, model, optimizer,
                            {"step": done, "run_loss": run_loss, "run_n": run_n, "elapsed": elapsed,
                             "w_start": w_start, "w_max": w_max},
                            keep_previous=True)
        except NonFiniteState as e:
            raise _diverged(run_dir, f"{e.tensor} became inf or NaN", done, ckpt_step, prev_step,
                            cfg.grad_clip, growth) from None
        prev_step, ckpt_step = ckpt_step, done
        growth[done] = w_max / w_start

    try:
        if rank == 0 and start in evals and start not in {r["step"] for r in records}:
            log_eval(start, recomputed=start > 0)
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
                ctx = ddp.no_sync() if (world > 1 and not sync) else nullcontext()
                with ctx:
                    loss = task.loss(ddp, batch)
                    (loss / cfg.grad_accum).backward()
                loss_sum += float(loss.detach())
            mean_loss = loss_sum / cfg.grad_accum
            if not math.isfinite(mean_loss):
                if rank == 0:
                    raise _diverged(run_dir, f"loss became {mean_loss}", step, ckpt_step, prev_step, cfg.grad_clip,
                                    growth)
                raise TrainingDiverged(f"loss became {mean_loss} at step {step} in {run_dir}", step=step)
            done = step + 1
            want_norm = out.active or done in evals  # read only when logged (a float() waits for the GPU)
            if cfg.grad_clip > 0:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            else:
                norm = grad_norm(model) if want_norm else None
            last_norm = float(norm) if want_norm else None
            optimizer.step()
            run_loss += mean_loss
            run_n += 1
            units_interval += task.units_per_step
            out.step(done, mean_loss, lr, last_norm)
            bar.update(1)
            if done % 10 == 0 or done == cfg.steps:
                bar.set_postfix(loss=f"{mean_loss:.4f}", refresh=False)
            if rank == 0 and done in evals:
                log_eval(done)
                bar.set_postfix({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in records[-1].items()
                                 if k in ("val_loss", "test_loss", "test_acc")}, refresh=False)
            if rank == 0 and (done in ckpt_steps or done == cfg.steps):
                save(done)
            if stop_after is not None and done - start >= stop_after and done < cfg.steps:
                return records
        if rank == 0:
            save_checkpoint(model_path, model, None, {"step": cfg.steps, "config": config})
    finally:
        bar.close()
        out.close()
    if world > 1:
        dist.barrier()
    return records

