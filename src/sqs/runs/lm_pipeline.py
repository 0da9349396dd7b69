"""TinyStories language models (paper Sec. 4.2.2): trainer task, runs, loading, generation.

The run config is `sqs.runs.lm_config.LMRunConfig` (`cfg.run_dir(root)` names the run's
directory); the experiment over all gates is `sqs.experiments.lm_table`.

One run = one gate and one seed, trained by `sqs.training.trainer.train` into a run
directory (config.json, metrics.jsonl, checkpoint/model safetensors, plus the
tokenizer.json the run was trained with and its sha256, so a run directory is self-contained).
The tokenizer copy is checked like the weights: on every start (a damaged copy is copied again
from the cache when the cache holds the same tokenizer, or named in one line) and on every load.

Batches. A step's global batch is `batch_size` windows of `context + 1` tokens at
random offsets of the uint16 training token file, drawn from
`step_generator(seed, step, 0)`: it depends on (seed, step) only. Gradient
accumulation (`grad_accum` micro-steps) and DDP ranks only partition that batch:
micro-step m, rank r takes windows [m*B/A + r*B/(A*W), ... + B/(A*W)). So a run on
N processes, or with another `grad_accum`, computes the same gradients as one process
(up to float summation order), and a resumed run draws exactly the batches an
uninterrupted run would. One optimizer step = batch_size * context tokens
(512 * 256 = 131,072 tokens at paper scale). "Epochs" = tokens seen / training tokens
(random windows, sampled with replacement, as nanoGPT does).

Evaluation. A fixed set of `eval_windows` validation windows (offsets drawn once from
`eval_seed`), every position scored: val_loss = mean cross-entropy per token (nats),
val_ppl = exp(val_loss), val_bpb = `tinystories.bits_per_byte` of val_loss with the validation
split's token and byte counts (`tinystories.split_stats`), which makes runs with different
tokenizers comparable. Positions early in a window see little context, so the loss is a
little higher than a sliding-window evaluation would give (the same for every gate).
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
import torch.distributed as dist

from sqs.core import resolve_device
from sqs.data.tinystories import bits_per_byte, ensure_tokenizer_copy, verify_tokenizer_file
from sqs.io import ConfigError
from sqs.models.gpt import GPT, GPTConfig
from sqs.runs.lm_config import DATASET, LMRunConfig
from sqs.training.checkpoint import load_checkpoint
from sqs.training.distributed import rank_world
from sqs.training.rundir import (
    CHECKPOINT,
    CONFIG,
    MODEL,
    TOKENIZER,
    NotARunDir,
    RunDirError,
    check_claimable,
    claimed,
    prepare_run_dir,
    run_file,
)
from sqs.training.trainer import TrainConfig, step_generator, train

FRACTIONS = (0.25, 0.5, 0.75, 1.0)
# ----------------------------------------------------------------------------------------------
# The trainer task
# ----------------------------------------------------------------------------------------------

def _windows(data: np.ndarray, offsets: torch.Tensor, length: int) -> torch.Tensor:
    idx = offsets.numpy()[:, None].astype(np.int64) + np.arange(length, dtype=np.int64)
    return torch.from_numpy(np.asarray(data[idx], dtype=np.int64))


class LMTask:
    """Next-token prediction on random windows of a uint16 token file (see module docstring)."""

    unit = "tokens"

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, cfg: LMRunConfig,
                 val_tokens_total: int, val_bytes_total: int, device: str | torch.device = "cpu"):
        self.cfg = cfg
        self.train_tokens, self.val_tokens = train_tokens, val_tokens
        self.ctx = cfg.context
        self.device = torch.device(device)
        self.units_per_step = cfg.batch_size * cfg.context
        for name, arr in (("training", train_tokens), ("validation", val_tokens)):
            if len(arr) < self.ctx + 2:
                raise ConfigError(f"LMTask: the {name} split has {len(arr)} tokens, fewer than context + 2 "
                                  f"({self.ctx + 2}); use a smaller context (--set model.context=N) or more data")
        self.val_tokens_total, self.val_bytes_total = val_tokens_total, val_bytes_total
        g = torch.Generator().manual_seed(int(cfg.eval_seed))
        self.val_offsets = torch.randint(0, len(val_tokens) - self.ctx, (cfg.eval_windows,), generator=g)
        self.amp = cfg.amp == "bf16" and self.device.type == "cuda"

    def per_rank(self, world: int) -> int:
        per_micro = self.cfg.micro_batch
        if per_micro % world:
            raise ConfigError(f"LMTask: batch_size / grad_accum = {per_micro} sequences per micro-step does not "
                             f"split over {world} processes; choose batch_size, grad_accum and the process "
                             "count so that batch_size is divisible by grad_accum * processes")
        return per_micro // world

    def global_offsets(self, step: int) -> torch.Tensor:
        g = step_generator(self.cfg.seed, step, 0)
        return torch.randint(0, len(self.train_tokens) - self.ctx, (self.cfg.batch_size,), generator=g)

    def batch(self, step: int, micro: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = self.per_rank(world)
        start = micro * self.cfg.micro_batch + rank * n
        w = _windows(self.train_tokens, self.global_offsets(step)[start:start + n], self.ctx + 1)
        w = w.to(self.device, non_blocking=True)
        return w[:, :-1], w[:, 1:]

    def _xent(self, model, x, y, reduction: str = "mean") -> torch.Tensor:
        """Next-token cross-entropy in float32 (the blocks may run under bf16 autocast)."""
        if self.amp:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return model(x, targets=y, reduction=reduction)
        return model(x, targets=y, reduction=reduction)

    def loss(self, model: torch.nn.Module, batch) -> torch.Tensor:
        return self._xent(model, *batch)

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module) -> dict[str, float]:
        total, count = 0.0, 0
        for i in range(0, len(self.val_offsets), self.cfg.eval_batch):
            w = _windows(self.val_tokens, self.val_offsets[i:i + self.cfg.eval_batch], self.ctx + 1).to(self.device)
            total += float(self._xent(model, w[:, :-1], w[:, 1:], reduction="sum"))
            count += w[:, 1:].numel()
        loss = total / count
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 700.0)),
                "val_bpb": bits_per_byte(loss, self.val_tokens_total, self.val_bytes_total)}


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------

def _data(cfg: LMRunConfig, cache_dir, progress: bool):
    from sqs.data import tinystories

    rank, world = rank_world()
    local_rank = int(os.environ.get("LOCAL_RANK", rank)) if world > 1 else 0
    if local_rank == 0:  # once per node (writes are atomic), before the other ranks read the files
        tinystories.prepare(cache_dir=cache_dir, vocab_size=cfg.vocab_size, progress=progress)
    if world > 1:
        dist.barrier()
    train_tok = tinystories.encode_split("train", cache_dir=cache_dir, vocab_size=cfg.vocab_size, progress=False)
    val_tok = tinystories.encode_split("valid", cache_dir=cache_dir, vocab_size=cfg.vocab_size, progress=False)
    vstats = tinystories.split_stats("valid", cache_dir=cache_dir, vocab_size=cfg.vocab_size)
    tstats = tinystories.split_stats("train", cache_dir=cache_dir, vocab_size=cfg.vocab_size)
    tok = tinystories.load_tokenizer(cache_dir=cache_dir, vocab_size=cfg.vocab_size)
    return train_tok, val_tok, tstats, vstats, tok


def plan(cfg: LMRunConfig, train_tokens: int) -> dict:
    """Steps, warm-up and evaluation interval derived from the config and the data size."""
    tps = cfg.tokens_per_step
    if cfg.steps is not None:
        steps = int(cfg.steps)
    elif cfg.tokens is not None:
        steps = max(1, round(cfg.tokens / tps))
    else:
        steps = max(1, math.ceil(cfg.epochs * train_tokens / tps))
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else round(cfg.warmup_frac * steps)
    eval_every = cfg.eval_every if cfg.eval_every > 0 else max(1, round(steps / cfg.eval_points))
    return dict(steps=steps, tokens_per_step=tps, train_tokens_total=steps * tps,
                epochs=steps * tps / train_tokens, warmup_steps=int(warmup), eval_every=int(eval_every))


def train_config(cfg: LMRunConfig, p: dict) -> TrainConfig:
    return TrainConfig(steps=p["steps"], lr=cfg.lr, weight_decay=cfg.weight_decay, betas=tuple(cfg.betas),
                       warmup_steps=p["warmup_steps"], min_lr=cfg.min_lr, grad_accum=cfg.grad_accum,
                       grad_clip=cfg.grad_clip, eval_every=p["eval_every"], checkpoint_every=cfg.checkpoint_every,
                       fractions=FRACTIONS, eval_at_start=True, seed=cfg.seed)


def run_lm(cfg: LMRunConfig, run_dir: str | os.PathLike, cache_dir: str | os.PathLike | None = None,
           device: str | None = "auto", progress: bool = True, stop_after: int | None = None,
           loggers: Iterable[str] = ()) -> list[dict]:
    """Train (or resume) one TinyStories run into `run_dir`; returns its metric records.

    Works in one process or under torchrun (call `sqs.training.distributed.init_distributed`
    first; each rank takes its slice of every global batch; rank 0 evaluates and writes). Raises
    `TrainingDiverged` on a non-finite loss, keeping the last checkpoint.
    `cache_dir` and `device` are not part of the run's identity (config.json); nor are `loggers`,
    where the curves also go besides metrics.jsonl (`sqs.training.loggers`: tensorboard, wandb).

    Everything is validated (the device, config, schedule, model, the data against the context)
    before anything is written to `run_dir`, so a refused start leaves nothing behind. The run's
    tokenizer.json is checked against its sha256 before training (and repaired from the cache, or
    named in one line).
    """
    rank, world = rank_world()
    dev = resolve_device(device)  # first: `--device banana` is one line before any data is read
    run_dir = check_claimable(run_dir) if rank == 0 else Path(run_dir)  # so is a folder that is not ours
    train_tok, val_tok, tstats, vstats, tok = _data(cfg, cache_dir, progress and rank == 0)
    vocab = tok.get_vocab_size()
    if vocab > cfg.vocab_size:
        raise ConfigError(f"tokenizer has {vocab} tokens, more than vocab_size={cfg.vocab_size} "
                          "(--set data.vocab_size=N)")
    p = plan(cfg, tstats["tokens"])
    model_cfg = GPTConfig(**cfg.model_kwargs(vocab))
    config = {
        "kind": "lm",
        "lm": cfg.to_dict(),
        "model": asdict(model_cfg),
        "plan": p,
        "data": {"dataset": DATASET, "train_tokens": tstats["tokens"], "train_bytes": tstats["bytes"],
                 "train_stories": tstats["stories"], "valid_tokens": vstats["tokens"],
                 "valid_bytes": vstats["bytes"], "valid_stories": vstats["stories"]},
    }
    tcfg = train_config(cfg, p)  # validate before you create: nothing below may fail after files appear
    task = LMTask(train_tok, val_tok, cfg, vstats["tokens"], vstats["bytes"], device=dev)
    task.per_rank(world)  # fail early if the batch does not split over the ranks
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(dev)
    if cfg.compile:
        import torch._dynamo as dynamo

        dynamo.reset()  # a fresh model per run: do not pile up guards from earlier runs
        # In place, so parameter names, checkpoints and the trainer's DDP wrapper are unchanged.
        model.compile()
    if rank != 0:
        return train(model, task, tcfg, run_dir, config=config, progress=progress,
                     desc=f"lm {cfg.gate} s{cfg.seed}", stop_after=stop_after)  # rank 0 alone logs
    with claimed(run_dir):  # one hold over the start, the tokenizer and training (the trainer's claim is re-entrant)
        prepare_run_dir(run_dir, config)  # refuses a directory made with another config
        # made, or checked against its sha256 and repaired from the cache, before any step is taken
        ensure_tokenizer_copy(run_file(run_dir, TOKENIZER), cache_dir=cache_dir, vocab_size=cfg.vocab_size)
        return train(model, task, tcfg, run_dir, config=config, progress=progress,
                     desc=f"lm {cfg.gate} s{cfg.seed}", stop_after=stop_after, loggers=loggers)


@dataclass
class LoadedLM:
    model: GPT
    config: LMRunConfig
    tokenizer: Any
    run_dir: Path
    step: int

    @property
    def eot_id(self) -> int | None:
        from sqs.data.tinystories import EOT

        return self.tokenizer.token_to_id(EOT)


def load_lm(run_dir: str | os.PathLike, device: str | None = "cpu", allow_checkpoint: bool = True,
            cache_dir: str | os.PathLike | None = None) -> LoadedLM:
    """The trained model (final weights, else the last checkpoint if allowed), its config and tokenizer
    (the run's tokenizer.json, checked against its sha256; a damaged one is named in one line with
    the command that repairs it)."""
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    cpath = run_dir / CONFIG
    if not cpath.exists():
        what = "does not exist" if not run_dir.exists() else "is not an LM run directory (no config.json)"
        raise NotARunDir(f"{run_dir} {what}; give a run directory made by `sqs train lm --run-dir DIR`")
    try:
        config = json.loads(cpath.read_text())
    except (OSError, ValueError) as e:
        raise RunDirError(f"{cpath} is not readable ({e}); restore it from a copy") from e
    if not isinstance(config, dict) or config.get("kind") != "lm":
        kind = config.get("kind") if isinstance(config, dict) else None
        raise RunDirError(f"{run_dir} is not a language-model run (config kind {kind!r}); "
                          "give the run directory of a `sqs train lm` run")
    cfg = LMRunConfig.from_dict(config["lm"])
    model = GPT(GPTConfig(**config["model"]))
    weights = run_dir / MODEL
    if not weights.exists():
        weights = run_dir / CHECKPOINT
        if not (allow_checkpoint and weights.exists()):
            raise NotARunDir(f"{run_dir} has no trained weights yet (no model.safetensors"
                             f"{' or checkpoint.safetensors' if allow_checkpoint else ''}); train it first "
                             f"(`sqs train lm --run-dir {run_dir} ...`)")
    meta = load_checkpoint(weights, model)
    model.to(dev).eval()
    tok_path = run_dir / TOKENIZER
    if tok_path.exists():
        tok = verify_tokenizer_file(tok_path, fix=(
            f"re-run the `sqs train lm` command that made the run (same --config and --set, --run-dir {run_dir}): "
            "it copies the tokenizer again from the cache (Python: run_lm(cfg, run_dir))"))
    else:
        from sqs.data import tinystories

        tok = tinystories.load_tokenizer(cache_dir=cache_dir, vocab_size=cfg.vocab_size)
    return LoadedLM(model, cfg, tok, run_dir, int(meta.get("step", 0)))


def generate_text(lm: LoadedLM, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = None, seed: int = 0, stop_at_eot: bool = True) -> str:
    """Continue `prompt` (the story start; an <|endoftext|> is put before it, as every story
    follows one in the training stream). Deterministic for (run, prompt, settings, seed)."""
    if not (isinstance(max_new_tokens, int) and max_new_tokens >= 1):
        raise ConfigError(f"generate: `max_new_tokens` must be an int >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature >= 0):
        raise ConfigError(f"generate: `temperature` must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and not (isinstance(top_k, int) and top_k >= 1):
        raise ConfigError(f"generate: `top_k` must be an int >= 1 or None (all tokens), got {top_k!r}")
    eot = lm.eot_id
    dev = next(lm.model.parameters()).device
    ids = ([eot] if eot is not None else []) + lm.tokenizer.encode(prompt, add_special_tokens=False).ids
    idx = torch.tensor([ids], dtype=torch.long, device=dev)
    g = torch.Generator().manual_seed(int(seed))
    out = lm.model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=g,
                            eos_id=eot if stop_at_eot else None)
    new = out[0, len(ids):].tolist()
    if stop_at_eot and eot is not None and eot in new:
        new = new[:new.index(eot)]
    return prompt + lm.tokenizer.decode(new, skip_special_tokens=True)


def train_lm_spec(spec, *, position: int = 0, progress: bool = True, cache_dir=None, device: str | None = "cpu",
                  loggers: Iterable[str] = ()) -> dict:
    """Train one LM run of a grid (the pool's `run_one`: a top-level function any launcher, the
    process pool or Ray, can ship to another process or node); returns its final validation numbers.
    `device` defaults to the CPU, so parallel workers do not pile onto one GPU; a launcher that
    reserves a GPU per run passes "auto"."""
    recs = run_lm(spec.cfg, spec.run_dir, cache_dir=cache_dir, device=device, progress=progress, loggers=loggers)
    final = next((r for r in reversed(recs) if "val_loss" in r), {})
    return {k: final.get(k) for k in ("step", "val_loss", "val_ppl", "val_bpb")}
