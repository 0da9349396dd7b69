"""TinyStories language models (paper Sec. 4.2.2): run config, trainer task, experiment, report.

One run = one gate and one seed, trained by `sqs.training.trainer.train` into a run
directory (config.json, metrics.jsonl, checkpoint/model safetensors, plus the
tokenizer.json the run was trained with, so a run directory is self-contained).

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
val_ppl = exp(val_loss), val_bpb = val_loss * tokens / bytes / ln 2 with the validation
split's token and byte counts (`tinystories.split_stats`), which makes runs with different
tokenizers comparable. Positions early in a window see little context, so the loss is a
little higher than a sliding-window evaluation would give (the same for every gate).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sqs.functional import GATES, canonical_gate
from sqs.io import write_json, write_text
from sqs.models.gpt import GPT, GPTConfig
from sqs.training.checkpoint import load_checkpoint
from sqs.training.trainer import (
    TrainConfig,
    TrainingDiverged,
    is_complete,
    prepare_run_dir,
    read_metrics,
    step_generator,
    train,
)

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "lm"

#: Paper Table (Sec. 4.2.2) at 100 % of training: (loss, "perplexity" as printed).
PAPER_FINAL = {
    "relu": (1.9021, 7.65),
    "gelu": (1.9061, 7.80),
    "swiglu": (1.9042, 7.73),
    "bilinear": (1.9065, 7.80),
    "sqs": (1.9020, 7.63),
}
GATE_LABEL = {"relu": "ReLU", "gelu": "GELU", "swiglu": "SwiGLU", "bilinear": "Bilinear", "sqs": "SQS"}
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
DEFAULT_PROMPTS = ("Once upon a time", "One day, a little girl named Lily", "The dog was sad because")


# ----------------------------------------------------------------------------------------------
# Run config
# ----------------------------------------------------------------------------------------------

@dataclass
class LMRunConfig:
    """Everything that defines a run. TOML files group the keys in sections ([model],
    [data], [train], [eval]); the sections are only for reading, the keys are unique."""

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
        self.gate = canonical_gate(self.gate)
        self.gate_kwargs = dict(self.gate_kwargs or {})
        self.betas = tuple(float(b) for b in self.betas)
        n_len = sum(x is not None for x in (self.epochs, self.tokens, self.steps))
        if n_len != 1:
            raise ValueError("LMRunConfig: set exactly one of `epochs`, `tokens`, `steps` "
                             f"(got epochs={self.epochs}, tokens={self.tokens}, steps={self.steps})")
        for name in ("batch_size", "grad_accum", "context", "eval_windows", "eval_batch", "eval_points"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LMRunConfig: `{name}` must be > 0, got {getattr(self, name)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"LMRunConfig: `batch_size` ({self.batch_size}) must be divisible by "
                             f"`grad_accum` ({self.grad_accum})")
        if self.amp not in ("none", "bf16"):
            raise ValueError(f"LMRunConfig: `amp` must be 'none' or 'bf16', got {self.amp!r}")
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

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "LMRunConfig":
        flat = _flatten(d)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(flat) - known)
        if unknown:
            raise ValueError(f"LMRunConfig: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        return cls(**flat)

    def replace(self, **changes) -> "LMRunConfig":
        d = self.to_dict()
        length = {"epochs", "tokens", "steps"} & set(k for k, v in changes.items() if v is not None)
        if length:  # a new length replaces the old one instead of conflicting with it
            for k in ("epochs", "tokens", "steps"):
                d[k] = None
        d.update(changes)
        return LMRunConfig.from_dict(d)


def _flatten(d: dict) -> dict:
    """TOML sections -> flat keys; `gate_kwargs` stays a dict."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "gate_kwargs":
            for k2, v2 in _flatten(v).items():
                if k2 in out:
                    raise ValueError(f"LMRunConfig: key {k2!r} given twice")
                out[k2] = v2
        elif k == "description":
            continue
        else:
            if k in out:
                raise ValueError(f"LMRunConfig: key {k!r} given twice")
            out[k] = v
    return out


def _toml_loads(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib
        except ModuleNotFoundError as e:
            raise RuntimeError("reading TOML configs needs Python >= 3.11 or `pip install tomli`") from e
    return tomllib.loads(text)


def config_path(name_or_path: str | os.PathLike) -> Path:
    """A config name (a file in sqs/configs/lm/, with or without .toml) or a path to a .toml file."""
    p = Path(name_or_path).expanduser()
    if p.suffix == ".toml" and p.exists():
        return p
    q = CONFIG_DIR / (str(name_or_path) if str(name_or_path).endswith(".toml") else f"{name_or_path}.toml")
    if q.exists():
        return q
    names = sorted(x.stem for x in CONFIG_DIR.glob("*.toml"))
    raise FileNotFoundError(f"LM config {str(name_or_path)!r} not found: neither a .toml file nor one of the "
                            f"shipped configs {names}")


def parse_override(item: str) -> tuple[str, Any]:
    """`key=value` with the value read as TOML (1e-3, 20, true, "x", [0.9, 0.95]); else a string."""
    if "=" not in item:
        raise ValueError(f"override {item!r} must look like key=value (e.g. lr=3e-4 or train.epochs=3)")
    key, val = item.split("=", 1)
    key = key.strip().split(".")[-1]
    try:
        value = _toml_loads(f"v = {val.strip()}")["v"]
    except Exception:
        value = val.strip()
    return key, value


def load_config(name_or_path: str | os.PathLike = "tinystories-cpu", overrides: list[str] | dict | None = None,
                **changes) -> LMRunConfig:
    """Read a TOML config, then apply `overrides` ("key=value" strings or a dict) and `changes`."""
    path = config_path(name_or_path)
    raw = _toml_loads(path.read_text())
    flat = _flatten(raw)
    flat.setdefault("name", path.stem)
    cfg = LMRunConfig.from_dict(flat)
    upd = {}
    if isinstance(overrides, dict):
        upd.update(overrides)
    else:
        for item in overrides or []:
            k, v = parse_override(item)
            upd[k] = v
    upd.update({k: v for k, v in changes.items() if v is not None})
    return cfg.replace(**upd) if upd else cfg


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
                raise ValueError(f"LMTask: the {name} split has {len(arr)} tokens, fewer than context + 2 "
                                 f"({self.ctx + 2}); use a smaller `context` or more data")
        self.bytes_per_token = val_bytes_total / val_tokens_total
        g = torch.Generator().manual_seed(int(cfg.eval_seed))
        self.val_offsets = torch.randint(0, len(val_tokens) - self.ctx, (cfg.eval_windows,), generator=g)
        self.amp = cfg.amp == "bf16" and self.device.type == "cuda"

    def per_rank(self, world: int) -> int:
        per_micro = self.cfg.micro_batch
        if per_micro % world:
            raise ValueError(f"LMTask: batch_size / grad_accum = {per_micro} sequences per micro-step does not "
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
                "val_bpb": loss / self.bytes_per_token / math.log(2)}


# ----------------------------------------------------------------------------------------------
# Runs
# ----------------------------------------------------------------------------------------------

def _dist() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def resolve_device(device: str | None = "auto") -> torch.device:
    """"auto": this rank's GPU when CUDA is available (LOCAL_RANK under torchrun), else the CPU."""
    if device in (None, "auto"):
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return dev


def init_distributed(device: str | None = "auto") -> bool:
    """Under torchrun (WORLD_SIZE > 1), join the process group from the environment:
    NCCL when this run uses CUDA, gloo on CPU. Returns True if this call initialised it."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return False
    dev = resolve_device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return True


def _data(cfg: LMRunConfig, cache_dir, progress: bool):
    from sqs.data import tinystories

    rank, world = _dist()
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
           device: str | None = "auto", progress: bool = True, stop_after: int | None = None) -> list[dict]:
    """Train (or resume) one TinyStories run into `run_dir`; returns its metric records.

    Works in one process or under torchrun (call `init_distributed` first; each rank
    takes its slice of every global batch; rank 0 evaluates and writes). Raises
    `TrainingDiverged` on a non-finite loss, keeping the last checkpoint.
    `cache_dir` and `device` are not part of the run's identity (config.json).
    """
    rank, world = _dist()
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    train_tok, val_tok, tstats, vstats, tok = _data(cfg, cache_dir, progress and rank == 0)
    vocab = tok.get_vocab_size()
    if vocab > cfg.vocab_size:
        raise ValueError(f"tokenizer has {vocab} tokens, more than vocab_size={cfg.vocab_size}")
    p = plan(cfg, tstats["tokens"])
    model_cfg = GPTConfig(**cfg.model_kwargs(vocab))
    config = {
        "kind": "lm",
        "lm": cfg.to_dict(),
        "model": asdict(model_cfg),
        "plan": p,
        "data": {"dataset": "tinystories", "train_tokens": tstats["tokens"], "train_bytes": tstats["bytes"],
                 "train_stories": tstats["stories"], "valid_tokens": vstats["tokens"],
                 "valid_bytes": vstats["bytes"], "valid_stories": vstats["stories"]},
    }
    if rank == 0:
        prepare_run_dir(run_dir, config)  # refuses a directory made with another config
        if not (run_dir / "tokenizer.json").exists():
            from sqs.io import atomic_write

            atomic_write(run_dir / "tokenizer.json", lambda q: tok.save(str(q)))
    torch.manual_seed(cfg.seed)
    model = GPT(model_cfg).to(dev)
    if cfg.compile:
        import torch._dynamo as dynamo

        dynamo.reset()  # a fresh model per run: do not pile up guards from earlier runs
        # In place, so parameter names, checkpoints and the trainer's DDP wrapper are unchanged.
        model.compile()
    task = LMTask(train_tok, val_tok, cfg, vstats["tokens"], vstats["bytes"], device=dev)
    task.per_rank(world)  # fail early if the batch does not split over the ranks
    return train(model, task, train_config(cfg, p), run_dir, config=config, progress=progress,
                 desc=f"lm {cfg.gate} s{cfg.seed}", stop_after=stop_after)


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
    """The trained model (final weights, else the last checkpoint if allowed), its config and tokenizer."""
    run_dir = Path(run_dir)
    cpath = run_dir / "config.json"
    if not cpath.exists():
        raise FileNotFoundError(f"{run_dir} is not an LM run directory (no config.json)")
    config = json.loads(cpath.read_text())
    if config.get("kind") != "lm":
        raise ValueError(f"{run_dir} is not a language-model run (config kind {config.get('kind')!r})")
    cfg = LMRunConfig.from_dict(config["lm"])
    model = GPT(GPTConfig(**config["model"]))
    weights = run_dir / "model.safetensors"
    if not weights.exists():
        weights = run_dir / "checkpoint.safetensors"
        if not (allow_checkpoint and weights.exists()):
            raise FileNotFoundError(f"{run_dir} has no trained weights yet (no model.safetensors"
                                    f"{' or checkpoint.safetensors' if allow_checkpoint else ''})")
    meta = load_checkpoint(weights, model)
    model.to(resolve_device(device)).eval()
    tok_path = run_dir / "tokenizer.json"
    if tok_path.exists():
        from tokenizers import Tokenizer

        tok = Tokenizer.from_file(str(tok_path))
    else:
        from sqs.data import tinystories

        tok = tinystories.load_tokenizer(cache_dir=cache_dir, vocab_size=cfg.vocab_size)
    return LoadedLM(model, cfg, tok, run_dir, int(meta.get("step", 0)))


def generate_text(lm: LoadedLM, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = None, seed: int = 0, stop_at_eot: bool = True) -> str:
    """Continue `prompt` (the story start; an <|endoftext|> is put before it, as every story
    follows one in the training stream). Deterministic for (run, prompt, settings, seed)."""
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


# ----------------------------------------------------------------------------------------------
# The experiment: all gates under one budget, then the report
# ----------------------------------------------------------------------------------------------

def run_name(gate: str, seed: int) -> str:
    return f"{canonical_gate(gate)}-s{seed}"


def experiment_runs(gates, extra_seeds, seed: int = 0) -> list[tuple[str, int]]:
    runs = [(canonical_gate(g), seed) for g in gates]
    for s in extra_seeds:
        for g in ("sqs", "swiglu"):
            if canonical_gate(g) in [canonical_gate(x) for x in gates]:
                runs.append((canonical_gate(g), int(s)))
    seen, out = set(), []
    for r in runs:
        if r not in seen:
            seen.add(r)
            out.append(r)
    return out


def run_experiment(config: str | os.PathLike = "tinystories-cpu", out: str | os.PathLike = "results/lm",
                   runs_dir: str | os.PathLike = "runs/lm", gates=GATES, extra_seeds=(1,),
                   overrides: list[str] | None = None, report_only: bool = False,
                   cache_dir: str | os.PathLike | None = None, device: str | None = "auto",
                   progress: bool = True, samples: bool = True, max_new_tokens: int = 160,
                   throughput_reps: int = 30) -> dict:
    """Train every (gate, seed) that is not finished yet, then write the report.

    Runs live in `runs_dir/<config name>/<gate>-s<seed>`; finished runs are skipped, interrupted
    ones resume, diverged ones (diverged.json) are reported, not retried. After training, every
    gate's training step is also timed side by side (`measure_throughput`), because the runs'
    own tokens/s come from different times and so carry the machine's load drift.
    """
    base = load_config(config, overrides)
    root = Path(runs_dir) / base.name
    rank, _ = _dist()
    todo = experiment_runs(gates, extra_seeds, base.seed)
    if not report_only:
        for i, (gate, seed) in enumerate(todo):
            rd = root / run_name(gate, seed)
            if is_complete(rd):
                if rank == 0:
                    print(f"[{i + 1}/{len(todo)}] {rd}: finished, skipped", file=sys.stderr)
                continue
            if (rd / "diverged.json").exists():
                if rank == 0:
                    print(f"[{i + 1}/{len(todo)}] {rd}: diverged earlier (see diverged.json), skipped",
                          file=sys.stderr)
                continue
            if rank == 0:
                print(f"[{i + 1}/{len(todo)}] training {rd}", file=sys.stderr)
            try:
                run_lm(base.replace(gate=gate, seed=seed), rd, cache_dir=cache_dir, device=device, progress=progress)
            except TrainingDiverged as e:
                if rank == 0:
                    write_json(rd / "diverged.json", {"message": str(e)})
                    print(f"  {e}", file=sys.stderr)
    if rank != 0:
        return {}
    if not report_only and throughput_reps > 0:
        measure_throughput(base, list(dict.fromkeys(g for g, _ in todo)), reps=throughput_reps,
                           path=Path(out) / "throughput.json")
    return write_report(root, out, todo, base, samples=samples, max_new_tokens=max_new_tokens,
                        cache_dir=cache_dir)


def measure_throughput(cfg: LMRunConfig, gates: list[str], reps: int = 12, batch: int | None = None,
                       path: str | os.PathLike | None = None) -> dict:
    """Training-step tokens/s of every gate at `cfg`'s model size, interleaved step by step
    (sqs.bench.ops.bench_lm); `batch` defaults to the config's micro-batch. Saved as JSON if `path`."""
    import datetime

    from sqs.bench.ops import bench_lm

    micro = batch or cfg.micro_batch
    kw = cfg.model_kwargs(cfg.vocab_size)
    kw.pop("gate")
    print(f"timing one training step per gate, interleaved ({reps} rounds, {micro} sequences)", file=sys.stderr)
    res = bench_lm([canonical_gate(g) for g in gates], batch_size=micro, reps=reps, **kw)
    tps = micro * cfg.context
    ref = next((r.median_s for r in res if r.name == "swiglu"), None)
    out = {"measured": f"{datetime.datetime.now():%Y-%m-%d %H:%M}", "threads": torch.get_num_threads(),
           "reps": reps, "sequences_per_step": micro, "tokens_per_step": tps,
           "gates": {r.name: {"step_s": r.median_s, "tokens_per_s": tps / r.median_s,
                              "vs_swiglu": (ref / r.median_s) if ref else None} for r in res}}
    if path is not None:
        write_json(path, out)
    return out


def _at_fraction(records: list[dict], f: float) -> dict | None:
    for r in records:
        if r.get("fraction") == f:
            return r
    return None


def summarize_run(run_dir: Path) -> dict:
    recs = read_metrics(run_dir)
    info: dict[str, Any] = {"run_dir": str(run_dir), "complete": is_complete(run_dir)}
    if (run_dir / "diverged.json").exists():
        info["diverged"] = json.loads((run_dir / "diverged.json").read_text()).get("message")
    try:
        cfg = json.loads((run_dir / "config.json").read_text())
        info["plan"] = cfg.get("plan")
        info["data"] = cfg.get("data")
    except (OSError, ValueError):
        pass
    at = {}
    for f in FRACTIONS:
        r = _at_fraction(recs, f)
        if r is not None:
            at[f"{int(f * 100)}%"] = {k: r[k] for k in ("step", "tokens", "val_loss", "val_ppl", "val_bpb")}
    info["at"] = at
    last = recs[-1] if recs else None
    if last and last.get("elapsed_s"):
        # Median over evaluation intervals, the first one left out (compilation warm-up): robust to
        # other work on the machine. The overall mean (warm-up included) is kept beside it.
        rates = [r["tokens_per_s"] for r in recs[1:] if r.get("tokens_per_s")]
        info["tokens_per_s"] = float(np.median(rates[1:] if len(rates) > 2 else rates)) if rates else None
        info["tokens_per_s_overall"] = last["tokens"] / last["elapsed_s"]
        info["train_seconds"] = last["elapsed_s"]
    info["curve"] = [{"tokens": r["tokens"], "val_loss": r["val_loss"]} for r in recs if "val_loss" in r]
    return info


def _fmt(x, nd=4):
    return "—" if x is None else f"{x:.{nd}f}"


def write_report(root: str | os.PathLike, out: str | os.PathLike, runs: list[tuple[str, int]],
                 cfg: LMRunConfig | None = None, samples: bool = True, max_new_tokens: int = 160,
                 prompts=DEFAULT_PROMPTS, cache_dir=None) -> dict:
    """table.md, table.json, curves.png and samples.md from the run directories."""
    root, out = Path(root), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for gate, seed in runs:
        info = summarize_run(root / run_name(gate, seed))
        rows.append({"gate": gate, "label": GATE_LABEL[gate], "seed": seed, **info})
    plan_ = next((r["plan"] for r in rows if r.get("plan")), None)
    data_ = next((r["data"] for r in rows if r.get("data")), None)

    # per gate: mean over seeds of the final val loss; perplexity = exp(mean loss)
    tp_path = out / "throughput.json"
    throughput = json.loads(tp_path.read_text()) if tp_path.exists() else None
    per_gate = {}
    for gate in dict.fromkeys(g for g, _ in runs):
        fin = [r["at"]["100%"]["val_loss"] for r in rows if r["gate"] == gate and "100%" in r["at"]]
        bpb = [r["at"]["100%"]["val_bpb"] for r in rows if r["gate"] == gate and "100%" in r["at"]]
        tps = [r["tokens_per_s"] for r in rows if r["gate"] == gate and r.get("tokens_per_s")]
        if fin:
            m = float(np.mean(fin))
            per_gate[gate] = {"seeds": len(fin), "val_loss_mean": m,
                              "val_loss_std": float(np.std(fin, ddof=1)) if len(fin) > 1 else None,
                              "val_ppl_of_mean": math.exp(m), "val_bpb_mean": float(np.mean(bpb)),
                              "paper_loss": PAPER_FINAL[gate][0], "paper_ppl_as_printed": PAPER_FINAL[gate][1],
                              "train_tokens_per_s_mean": float(np.mean(tps)) if tps else None}
            if throughput and gate in throughput["gates"]:
                per_gate[gate]["interleaved_tokens_per_s"] = throughput["gates"][gate]["tokens_per_s"]
                per_gate[gate]["interleaved_vs_swiglu"] = throughput["gates"][gate]["vs_swiglu"]
    table = {"config": cfg.to_dict() if cfg else None, "plan": plan_, "data": data_, "runs": [
        {k: v for k, v in r.items() if k != "curve"} for r in rows], "per_gate": per_gate,
        "paper_reference": {g: {"loss": l, "ppl_as_printed": p} for g, (l, p) in PAPER_FINAL.items()},
        "note": "val_ppl = exp(val_loss); per-gate perplexity = exp(mean val loss over seeds). The paper's "
                "perplexities are not exp(its losses) (exp(1.9021) = 6.70, printed 7.65)."}
    table["throughput"] = throughput
    write_json(out / "table.json", table)
    write_text(out / "table.md", _table_md(rows, per_gate, cfg, plan_, data_, throughput))
    _plot_curves(rows, out / "curves.png", cfg)
    if samples:
        write_text(out / "samples.md", _samples_md(root, runs, prompts, max_new_tokens, cache_dir))
    return table


def _table_md(rows, per_gate, cfg, plan_, data_, throughput=None) -> str:
    L = ["# TinyStories (paper Sec. 4.2.2): validation loss, perplexity, bits per byte", ""]
    if cfg is not None and plan_ is not None:
        L.append(f"Config `{cfg.name}`: {cfg.n_layers} layers, d_model {cfg.d_model}, GLU hidden {cfg.d_hidden}, "
                 f"{cfg.n_heads} heads, context {cfg.context}, vocab {cfg.vocab_size} (byte-level BPE), "
                 f"AdamW lr {cfg.lr:g} wd {cfg.weight_decay:g}, cosine to {cfg.min_lr:g} after "
                 f"{plan_['warmup_steps']} warm-up steps, grad clip {cfg.grad_clip:g}; batch {cfg.batch_size} "
                 f"sequences = {plan_['tokens_per_step']:,} tokens per step; {plan_['steps']:,} steps = "
                 f"{plan_['train_tokens_total']:,} training tokens = {plan_['epochs']:.2f} epochs of the training "
                 f"split.")
    if data_:
        L.append(f"Data: {data_['train_tokens']:,} training tokens ({data_['train_stories']:,} stories); "
                 f"validation {data_['valid_tokens']:,} tokens / {data_['valid_bytes']:,} bytes "
                 f"({data_['valid_stories']:,} stories); evaluation on {cfg.eval_windows if cfg else '?'} fixed "
                 f"windows of {cfg.context if cfg else '?'} tokens.")
    L += ["", "Each cell: val loss (nats/token) / perplexity exp(loss) / bits per byte. "
          "tok/s: training tokens per second, median over evaluation intervals (evaluation and the first "
          "interval's compilation warm-up excluded).", "",
          "| Gate | seed | 25% | 50% | 75% | 100% | tok/s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = []
        for f in ("25%", "50%", "75%", "100%"):
            a = r["at"].get(f)
            cells.append("—" if a is None else f"{a['val_loss']:.4f} / {a['val_ppl']:.2f} / {a['val_bpb']:.4f}")
        status = "" if r.get("complete") else (" (diverged)" if r.get("diverged") else " (unfinished)")
        tps = r.get("tokens_per_s")
        L.append(f"| {r['label']}{status} | {r['seed']} | " + " | ".join(cells) +
                 f" | {'—' if tps is None else f'{tps:,.0f}'} |")
    L += ["", "## Per gate at 100 %, with the paper's values as reference", "",
          "Ours: mean over seeds of the final val loss, exp of that mean, mean bits per byte. "
          "Paper: its Table (4-layer d=128 model on the full TinyStories with its own tokenizer), "
          "values as printed.", "",
          "| Gate | seeds | ours: loss (± sd) | ours: ppl = exp(mean loss) | ours: bpb | paper: loss | "
          "paper: 'perplexity' as printed | exp(paper loss) |", "|---|---|---|---|---|---|---|---|"]
    for gate, g in per_gate.items():
        sd = f" ± {g['val_loss_std']:.4f}" if g["val_loss_std"] is not None else ""
        L.append(f"| {GATE_LABEL[gate]} | {g['seeds']} | {g['val_loss_mean']:.4f}{sd} | {g['val_ppl_of_mean']:.2f} | "
                 f"{g['val_bpb_mean']:.4f} | {g['paper_loss']:.4f} | {g['paper_ppl_as_printed']:.2f} | "
                 f"{math.exp(g['paper_loss']):.2f} |")
    if per_gate:
        ours = sorted(per_gate, key=lambda k: per_gate[k]["val_loss_mean"])
        paper = sorted(per_gate, key=lambda k: PAPER_FINAL[k][0])
        L += ["", f"Ranking by final loss (best first) — ours: {' < '.join(GATE_LABEL[g] for g in ours)}; "
                  f"paper: {' < '.join(GATE_LABEL[g] for g in paper)}."]
        multi = [g for g in per_gate.values() if g["val_loss_std"] is not None]
        if multi:
            L.append("Seed-to-seed standard deviation of the final loss: "
                     + ", ".join(f"{GATE_LABEL[k]} {v['val_loss_std']:.4f}" for k, v in per_gate.items()
                                 if v["val_loss_std"] is not None)
                     + "; gaps between gates smaller than that are noise.")
    if per_gate:
        L += ["", "## Training throughput", "",
              "Two measurements. *Runs*: each run's training tokens/s (median over its evaluation intervals), "
              "mean over seeds; the runs happen one after another, so a change in the machine's load between "
              "them shows up as a gap between gates. *Interleaved*: one training step (forward, backward, "
              "AdamW) of each gate in turn on the same batch, median over the rounds, measured right after "
              "training; load drift hits every gate alike, so this is the fair comparison.", ""]
        ref_run = per_gate.get("swiglu", {}).get("train_tokens_per_s_mean")
        L += ["| Gate | runs: tok/s | runs: ÷ SwiGLU | interleaved: tok/s | interleaved: ÷ SwiGLU |",
              "|---|---|---|---|---|"]
        for gate, g in per_gate.items():
            rt, it, iv = g.get("train_tokens_per_s_mean"), g.get("interleaved_tokens_per_s"), g.get("interleaved_vs_swiglu")
            L.append(f"| {GATE_LABEL[gate]} | {'—' if rt is None else f'{rt:,.0f}'} | "
                     f"{f'{rt / ref_run:.3f}' if rt and ref_run else '—'} | {'—' if it is None else f'{it:,.0f}'} | "
                     f"{'—' if iv is None else f'{iv:.3f}'} |")
        if throughput:
            L += ["", f"Interleaved: {throughput['reps']} rounds, {throughput['sequences_per_step']} sequences = "
                      f"{throughput['tokens_per_step']:,} tokens per step, {throughput['threads']} threads, measured "
                      f"{throughput['measured']}. Regenerate with `sqs bench lm`."]
    L += ["", "Notes:", "",
          "* Runs with the same seed draw the same batches in the same order and the same initial weights "
          "(all gates have the same parameter shapes), so at one seed the gate is the only difference; "
          "the extra seeds change both and show the run-to-run noise.",
          "* Perplexity here is exp(mean validation loss). The paper's perplexities are not exp of its "
          "losses: exp(1.9021) = 6.70 while it prints 7.65 for ReLU (and likewise for every gate), so they "
          "were computed some other way (e.g. a mean of per-batch perplexities, or another token "
          "normalisation); compare losses, not perplexities, with the paper.",
          "* Absolute values are not comparable with the paper's: different tokenizer (ours: byte-level BPE "
          "trained on the training split; the paper's samples are lowercased), different training data "
          "(the paper: all 2.1 M stories; the CPU config: the subset imported into the cache) and a "
          "different token budget. Bits per byte is tokenizer-independent; the ranking of gates and "
          "the gaps relative to the seed noise are the comparable quantities."]
    return "\n".join(L) + "\n"


def _plot_curves(rows, path: Path, cfg) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sqs.io import save_figure

    colors = {"relu": "tab:blue", "gelu": "tab:orange", "swiglu": "tab:green", "bilinear": "tab:purple",
              "sqs": "tab:red"}
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    first_seed = {}
    for r in rows:
        first_seed.setdefault(r["gate"], r["seed"])
    for r in rows:
        c = [p for p in r.get("curve", []) if p["val_loss"] is not None]
        if not c:
            continue
        x = np.array([p["tokens"] for p in c], dtype=float) / 1e6
        y = np.array([p["val_loss"] for p in c])
        main = r["seed"] == first_seed[r["gate"]]
        kw = dict(color=colors[r["gate"]], lw=1.8 if main else 1.0, ls="-" if main else "--",
                  label=r["label"] if main else f"{r['label']} (seed {r['seed']})")
        for ax, zoom in zip(axes, (False, True)):
            sel = x >= x.max() * 0.5 if zoom else slice(None)
            ax.plot(x[sel], y[sel], **kw)
    for ax, title in zip(axes, ("validation loss", "validation loss, second half of training")):
        ax.set_xlabel("training tokens (millions)")
        ax.set_ylabel("val loss (nats / token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if cfg is not None:
        fig.suptitle(f"TinyStories, config {cfg.name}: one line per gate (dashed: extra seeds)")
    fig.tight_layout()
    save_figure(fig, path)


def _samples_md(root: Path, runs, prompts, max_new_tokens: int, cache_dir) -> str:
    L = ["# TinyStories samples (compare the paper's App. D)", "",
         f"Each gate's first-seed run; the same prompts; greedy decoding and temperature 0.8 "
         f"(no top-k, generator seed 0); at most {max_new_tokens} new tokens, stopping at <|endoftext|>. "
         f"Regenerate any of them with `sqs generate RUN_DIR --prompt ... --temperature 0.8 --seed 0`.", ""]
    done = set()
    for gate, seed in runs:
        if gate in done:
            continue
        rd = root / run_name(gate, seed)
        done.add(gate)
        L += [f"## {GATE_LABEL[gate]} (`{rd}`)", ""]
        try:
            lm = load_lm(rd, device="cpu", allow_checkpoint=True, cache_dir=cache_dir)
        except (FileNotFoundError, ValueError) as e:
            L += [f"_no model: {e}_", ""]
            continue
        if not is_complete(rd):
            L += [f"_(unfinished run: weights of step {lm.step})_", ""]
        for prompt in prompts:
            for label, temp in (("greedy", 0.0), ("temperature 0.8, seed 0", 0.8)):
                text = generate_text(lm, prompt, max_new_tokens=max_new_tokens, temperature=temp, seed=0)
                L += [f"**{prompt!r}, {label}:**", "", "> " + text.replace("\n", "\n> "), ""]
    return "\n".join(L) + "\n"
