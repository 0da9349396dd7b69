"""Convert a SwiGLU language model to SQS (or Bilinear) by annealing the gate while fine-tuning.

Swapping a pretrained model's SiLU gate for SQS in one go wrecks it (SmolLM2-135M's loss on
Shakespeare goes from ~3.6 to ~16 nats). Annealing moves the function there gradually, the way
the bilinear-MLP work fine-tuned TinyLlama from SwiGLU to a bilinear MLP: every gated MLP
computes

    down( w * [(1 - t) * act(v) + t * target(v)] ),    w = up(x), v = gate(x)

with the target term from the fused op (`sqs.functional.glu_packed(..., gate="sqs"|"bilinear")`
on one ``[up; gate]`` matmul), and t rises linearly from 0 to exactly 1 over the first
`anneal_steps` optimizer steps; the remaining steps fine-tune the pure target. At t = 1 the
original activation is not evaluated at all. The result is a plain transformers model:
``hidden_act="sqs"`` with ``config.sqs`` (loads after `sqs.integrations.transformers.register()`,
fused) or ``hidden_act="linear"`` for Bilinear (loads in stock transformers).

    from sqs.integrations.convert import ConvertConfig, anneal_to
    model = anneal_to(model, train_blocks, {"shakespeare": heldout_blocks},
                      ConvertConfig(target="sqs", steps=200), run_dir="runs/convert/smollm2-sqs")

Per-layer distillation (``ConvertConfig(distill_steps=N, ...)``) is the cheap way to most of the
conversion: a full-model step of 8 x 128 tokens costs about 22 s on 2 CPU cores (SmolLM2-135M, the
MLPs training), while one distillation step of 256 token positions for all 30 MLPs costs about 4 s,
because each MLP learns only to reproduce the original MLP's output on cached inputs (`MLPCache`,
one forward of the original model) and nothing backpropagates through the model. The gate anneals
the same way (t to exactly 1 over ``distill_anneal_steps``; the target term is the fused op); a short
end-to-end fine-tune at t = 1 (``steps``) then repairs what the layers' small errors do downstream.

A run directory makes it resumable (`config.json`, `curve.jsonl`, `checkpoint.safetensors` and
the one before it, written by `sqs.training.checkpoint`; `model/` at the end): re-running the
same call continues from the last checkpoint and ends with the same weights as an uninterrupted
run. `curve.jsonl` holds the held-out loss of the original model and of the plain swap (target
gate, no training) first, then training and held-out losses along the way, then the final model's.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from sqs.functional import DEFAULT_C, DEFAULT_LAM, DEFAULT_P, check_sqs_params, glu_packed
from sqs.io import ConfigError, UserError, append_jsonl, read_jsonl, write_json, write_text
from sqs.training.checkpoint import (
    CheckpointCorrupt,
    load_checkpoint,
    previous_path,
    save_checkpoint,
    verify_checkpoint,
)

TARGETS = ("sqs", "bilinear")
CURVE = "curve.jsonl"
CHECKPOINT = "checkpoint.safetensors"


class ConvertRunMismatch(UserError, ValueError):
    """A run directory made with other settings; the message names them."""


@dataclass
class ConvertConfig:
    """Settings of one conversion. Validated when built (a bad value is one `ConfigError` line)."""

    target: str = "sqs"
    steps: int = 200
    anneal_steps: int | None = None  # default: half of `steps`; 0 = swap at once, then fine-tune
    lr: float = 2e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1          # cosine decay to lr * this
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    batch: int = 8
    context: int = 128
    mlp_only: bool = True              # train only the MLP projections (attention, norms, embeddings frozen)
    eval_every: int = 25
    checkpoint_every: int = 25
    seed: int = 0
    sqs: dict = field(default_factory=lambda: {"c": DEFAULT_C, "lam": DEFAULT_LAM, "p": DEFAULT_P})
    # per-layer distillation before the end-to-end steps (0: none; see `distill`)
    distill_steps: int = 0
    distill_anneal_steps: int | None = None  # default: half of `distill_steps`; 0 = no annealing
    distill_batch: int = 256                 # token positions per layer and step
    distill_blocks: int = 128                # training windows whose MLP inputs and outputs are cached
    distill_lr: float = 1e-3
    distill_warmup_steps: int = 20
    distill_eval_every: int = 100            # held-out evaluation and checkpoint

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ConfigError(f"convert: target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.anneal_steps is None:
            self.anneal_steps = 0 if self.distill_steps else self.steps // 2
        if self.distill_anneal_steps is None:
            self.distill_anneal_steps = self.distill_steps // 2 if isinstance(self.distill_steps, int) else 0
        ints = {"steps": 0, "anneal_steps": 0, "warmup_steps": 0, "batch": 1, "context": 2, "eval_every": 1,
                "checkpoint_every": 1, "seed": 0, "distill_steps": 0, "distill_anneal_steps": 0, "distill_batch": 1,
                "distill_blocks": 1, "distill_warmup_steps": 0, "distill_eval_every": 1}
        for k, lo in ints.items():
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise ConfigError(f"convert: {k} must be an integer >= {lo}, got {v!r}")
        if self.steps == 0 and self.distill_steps == 0:
            raise ConfigError("convert: nothing to train: steps and distill_steps are both 0")
        if self.anneal_steps > self.steps:
            raise ConfigError(f"convert: anneal_steps ({self.anneal_steps}) must be <= steps ({self.steps}) so "
                              "the run ends at exactly the target gate")
        if self.distill_anneal_steps > self.distill_steps:
            raise ConfigError(f"convert: distill_anneal_steps ({self.distill_anneal_steps}) must be <= distill_steps "
                              f"({self.distill_steps}) so the distillation ends at exactly the target gate")
        if self.distill_steps and self.anneal_steps:
            raise ConfigError(f"convert: with distillation the gate reaches the target during distill_steps; the "
                              f"end-to-end steps fine-tune at the target, so anneal_steps must be 0, got "
                              f"{self.anneal_steps}")
        for k in ("lr", "distill_lr", "weight_decay", "grad_clip", "min_lr_ratio"):
            v = getattr(self, k)
            positive = k in ("lr", "distill_lr")
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0 or (positive and v == 0):
                raise ConfigError(f"convert: {k} must be a finite number {'> 0' if positive else '>= 0'}, got {v!r}")
        if self.min_lr_ratio > 1:
            raise ConfigError(f"convert: min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        unknown = set(self.sqs) - {"c", "lam", "p"}
        if unknown:
            raise ConfigError(f"convert: unknown sqs parameter(s) {sorted(unknown)}; valid: c, lam, p")
        self.sqs = {"c": DEFAULT_C, "lam": DEFAULT_LAM, "p": DEFAULT_P, **{k: float(v) for k, v in self.sqs.items()}}
        try:
            check_sqs_params(**self.sqs)
        except ValueError as e:
            raise ConfigError(f"convert: {e}") from e

    @property
    def gate_params(self) -> dict[str, float]:
        """Keyword arguments of the target gate (SQS: c, lam, p; Bilinear: none)."""
        return dict(self.sqs) if self.target == "sqs" else {}


def anneal_t(step: int, anneal_steps: int) -> float:
    """The target's weight t during optimizer step `step` (1-based): linear to exactly 1.0 at `anneal_steps`."""
    if anneal_steps <= 0 or step >= anneal_steps:
        return 1.0
    return step / anneal_steps


def cosine_lr(step: int, steps: int, peak: float, warmup: int, min_ratio: float) -> float:
    """Learning rate of optimizer step `step` (1-based) of `steps`: linear warm-up over `warmup` steps to
    `peak`, then cosine to peak * min_ratio at the last step."""
    if step <= warmup:
        return peak * step / max(warmup, 1)
    frac = min(1.0, (step - warmup) / max(steps - warmup, 1))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


def lr_at(cfg: ConvertConfig, step: int) -> float:
    """Learning rate of end-to-end step `step` (1-based): warm-up, then cosine to lr * min_lr_ratio."""
    return cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup_steps, cfg.min_lr_ratio)


# ----------------------------------------------------------------------------- the annealed MLP


def _is_gated_mlp(mod: nn.Module) -> bool:
    return all(isinstance(getattr(mod, a, None), nn.Linear) for a in ("gate_proj", "up_proj", "down_proj")) \
        and isinstance(getattr(mod, "act_fn", None), nn.Module)


class AnnealedMLP(nn.Module):
    """A gated MLP computing down(w * [(1-t) act(v) + t target(v)]) with its own projections.

    Holds the original MLP's `gate_proj`, `up_proj`, `down_proj` (the same modules, so the
    state-dict keys and the trained weights are the original MLP's) and its `act_fn`.
    """

    def __init__(self, mlp: nn.Module, target: str, gate_params: dict[str, float]):
        super().__init__()
        if target not in TARGETS:
            raise ValueError(f"AnnealedMLP: target must be one of {TARGETS}, got {target!r}")
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self._original = (mlp,)  # a tuple: not a submodule, so the keys stay the original MLP's
        self.target, self.gate_params, self.t = target, dict(gate_params), 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up, gate = self.up_proj, self.gate_proj
        bias = None if up.bias is None else torch.cat([up.bias, gate.bias])
        packed = F.linear(x, torch.cat([up.weight, gate.weight]), bias)  # [w | v] from one matmul
        y = glu_packed(packed, self.target, **self.gate_params)
        if self.t < 1.0:  # the original gate's share; at t = 1 it is not computed at all
            w, v = packed.chunk(2, dim=-1)
            y = torch.lerp(w * self.act_fn(v), y, self.t)
        return self.down_proj(y)

    def extra_repr(self) -> str:
        return f"target={self.target}, t={self.t:g}, {self.gate_params}"


def attach(model: nn.Module, target: str, gate_params: dict[str, float] | None = None) -> list[AnnealedMLP]:
    """Replace every gated MLP of `model` by an `AnnealedMLP` (t = 0), in place; return them in order."""
    found = [(name, mod) for name, mod in model.named_modules() if _is_gated_mlp(mod) and
             not isinstance(mod, AnnealedMLP)]
    if not found:
        raise ConfigError(f"convert: {type(model).__name__} has no gated MLP (gate_proj, up_proj, down_proj, act_fn); "
                          "sqs converts Llama-style SwiGLU models")
    out = []
    for name, mod in found:
        parent_name, _, attr = name.rpartition(".")
        wrapped = AnnealedMLP(mod, target, gate_params or {})
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, wrapped)
        out.append(wrapped)
    return out


def annealed(model: nn.Module) -> list[AnnealedMLP]:
    return [m for m in model.modules() if isinstance(m, AnnealedMLP)]


def set_t(model: nn.Module, t: float) -> None:
    """Set the target's weight t in [0, 1] in every annealed MLP."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"t must be in [0, 1], got {t}")
    for m in annealed(model):
        m.t = float(t)


def finalize(model: nn.Module) -> nn.Module:
    """Put the original MLP modules back with the target gate; the model then saves as what it computes.

    Refuses a model whose annealing has not reached t = 1 exactly. SQS: the MLPs get
    `sqs.nn.SQS(c, lam, p)` through `sqs.integrations.transformers.to_sqs` (the fused path;
    ``hidden_act="sqs"``). Bilinear: the identity activation, ``hidden_act="linear"``.
    """
    wrapped = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, AnnealedMLP)]
    if not wrapped:
        raise ValueError("finalize: the model has no annealed MLP (call attach and train first)")
    unfinished = sorted({m.t for _, m in wrapped if m.t != 1.0})
    if unfinished:
        raise ValueError(f"finalize: annealing has not reached t = 1 (t = {unfinished[0]:g}); train to the end")
    target, params = wrapped[0][1].target, wrapped[0][1].gate_params
    for name, mod in wrapped:
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, mod._original[0])
    if target == "sqs":
        from sqs.integrations.transformers import to_sqs

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "needs fine-tuning": it has been fine-tuned
            to_sqs(model, **params)
    else:
        from transformers.activations import ACT2FN

        for _, mod in wrapped:
            mod._original[0].act_fn = ACT2FN["linear"]
        for cfg in {id(c): c for c in [getattr(model, "config", None)] +
                    [getattr(m._original[0], "config", None) for _, m in wrapped] if c is not None}.values():
            cfg.hidden_act = "linear"
    return model


# ----------------------------------------------------------------------------- the run


def _trainable(model: nn.Module, mlps: list[AnnealedMLP], mlp_only: bool) -> nn.Module:
    """The module whose parameters train (and go into checkpoints): the MLPs, or the whole model."""
    for p in model.parameters():
        p.requires_grad_(not mlp_only)
    if not mlp_only:
        return model
    holder = nn.ModuleList(mlps)
    for p in holder.parameters():
        p.requires_grad_(True)
    return holder


def _batch(blocks: torch.Tensor, step: int, batch: int, seed: int) -> torch.Tensor:
    """The training windows of optimizer step `step`: a function of (seed, step) only, so resume is exact."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return blocks[torch.randint(0, len(blocks), (batch,), generator=g)]


def _eval(model: nn.Module, eval_sets: dict[str, torch.Tensor], lm_loss: Callable, batch: int) -> dict[str, float]:
    return {name: lm_loss(model, blocks, batch) for name, blocks in eval_sets.items()}


def _fingerprint(t: torch.Tensor) -> str:
    import hashlib

    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


#: Settings added after the first conversion runs, with the value those runs had: a run directory whose
#: config.json lacks one of them is the same run when the setting has this value.
_LATER_DEFAULTS = {"distill_steps": 0, "distill_anneal_steps": 0}


def _prepare(run_dir: Path, record: dict) -> bool:
    """Write or compare config.json; True when a checkpoint exists to resume from (else the curve starts afresh)."""
    cfg_path = run_dir / "config.json"
    if cfg_path.exists():
        old = json.loads(cfg_path.read_text())
        diff = sorted(k for k in set(old) | set(record) if old.get(k) != record.get(k) and not (
            k not in old and k.startswith("distill_") and record.get(k) == _LATER_DEFAULTS.get(k, record.get(k))))
        if diff:
            raise ConvertRunMismatch(f"{run_dir} was made with other settings ({', '.join(diff)} differ); "
                                     "use another --run-dir, or the same settings to resume")
    else:
        write_json(cfg_path, record)
    ckpt = run_dir / CHECKPOINT
    if not ckpt.exists() and not previous_path(ckpt).exists():
        (run_dir / CURVE).unlink(missing_ok=True)  # nothing trained yet: start the curve afresh
        return False
    return True


def _resume_point(run_dir: Path, say: Callable[[str], None]) -> tuple[Path, str, int]:
    """(checkpoint, phase, step) to resume from: the last checkpoint if it verifies, else the one before it.
    phase is "distill" or "train" (checkpoints without one were written by end-to-end training)."""
    ckpt = run_dir / CHECKPOINT
    errors = []
    for path in (ckpt, previous_path(ckpt)):
        if not path.exists():
            continue
        try:
            meta = verify_checkpoint(path)
        except CheckpointCorrupt as e:
            errors.append(str(e))
            say(f"{e}; using the previous checkpoint")
            continue
        return path, meta.get("phase", "train"), int(meta["step"])
    raise CheckpointCorrupt("; ".join(errors) or f"{run_dir}: no checkpoint to resume from")


def _kept(records: list[dict], phase: str, step: int) -> list[dict]:
    """The curve records that precede a checkpoint at (phase, step): what a resumed run keeps."""
    if phase == "distill":
        return [r for r in records if r.get("kind") == "baseline" or
                (r.get("kind", "").startswith("distill") and r.get("step", 0) <= step)]
    return [r for r in records if r.get("kind") != "final" and
            (r.get("kind") == "baseline" or r.get("kind", "").startswith("distill") or r.get("step", 0) <= step)]


# ----------------------------------------------------------------------------- per-layer distillation


@dataclass
class MLPCache:
    """Every gated MLP's inputs and the original MLP's outputs on some token windows: rows [n, d] per layer
    (bfloat16: the cache of 30 layers x 32 k tokens is 2.2 GB instead of 4.5 GB, and its rounding,
    2^-8 relative, is far below what distillation reaches)."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]

    @classmethod
    def of(cls, model: nn.Module, blocks: torch.Tensor, batch: int = 8) -> "MLPCache":
        """Run the (original, not yet attached) model's decoder on `blocks` and record its gated MLPs."""
        from sqs.integrations.pretrained import record

        mlps = [m for _, m in _gated_mlps(model)]
        ins, outs = record(model, mlps, blocks, batch_size=batch, outputs=True, dtype=torch.bfloat16)
        return cls(ins, outs)

    @property
    def rows(self) -> int:
        return self.inputs[0].shape[0]

    def variances(self) -> list[float]:
        """Per layer, the mean squared deviation of the outputs from their mean: the unit of the losses."""
        return [float(y.float().var(0, unbiased=False).mean().clamp_min(1e-30)) for y in self.outputs]


def _gated_mlps(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, mod) for name, mod in model.named_modules() if _is_gated_mlp(mod) and
            not isinstance(mod, AnnealedMLP)]


@torch.no_grad()
def layer_fvu(mlps: list[AnnealedMLP], cache: MLPCache) -> list[float]:
    """Per layer, the fraction of the original MLP's output variance the annealed MLP misses on the cached
    inputs, at its current t: sum (mlp(x) - y)^2 / sum (y - mean y)^2 (0: reproduces it; 1: no better than
    the mean output)."""
    out = []
    for mlp, x, y in zip(mlps, cache.inputs, cache.outputs):
        y = y.float()
        out.append(float(((mlp(x.float()) - y) ** 2).sum() / ((y - y.mean(0)) ** 2).sum().clamp_min(1e-30)))
    return out


def distill_step(mlps: list[AnnealedMLP], cache: MLPCache, rows: torch.Tensor, variances: list[float],
                 opt: torch.optim.Optimizer) -> list[float]:
    """One optimizer step of every MLP toward the original MLP's outputs on the cached rows `rows`.

    Layer l's loss is mean (mlp_l(x) - y)^2 / variances[l] (a fraction of its output variance, so that
    layers of different scales weigh alike in the reports; Adam's steps do not depend on the scale). The
    layers' losses are independent, so one backward of their sum trains each on its own loss. Returns
    the per-layer losses.
    """
    losses = []
    for mlp, x, y, var in zip(mlps, cache.inputs, cache.outputs, variances):
        losses.append(((mlp(x[rows].float()) - y[rows].float()) ** 2).mean() / var)
    opt.zero_grad(set_to_none=True)
    torch.stack(losses).sum().backward()
    opt.step()
    return [float(v.detach()) for v in losses]


def _distill(model: nn.Module, mlps: list[AnnealedMLP], cache: MLPCache, held: MLPCache | None,
             eval_sets: dict[str, torch.Tensor], cfg: ConvertConfig, start: int, opt: torch.optim.Optimizer,
             holder: nn.Module, run_dir: Path | None, log: Callable, say: Callable, lm_loss: Callable,
             t0: float, stop_after: int | None) -> bool:
    """Distillation steps start+1 .. cfg.distill_steps; False when stopped early by `stop_after`."""
    variances = cache.variances()
    for step in range(start + 1, cfg.distill_steps + 1):
        ts = time.time()
        t = anneal_t(step, cfg.distill_anneal_steps)
        set_t(model, t)
        lr = cosine_lr(step, cfg.distill_steps, cfg.distill_lr, cfg.distill_warmup_steps, cfg.min_lr_ratio)
        for g in opt.param_groups:
            g["lr"] = lr
        gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7_919 + step)  # (seed, step) only: exact resume
        rows = torch.randint(0, cache.rows, (cfg.distill_batch,), generator=gen)
        losses = distill_step(mlps, cache, rows, variances, opt)
        rec = {"kind": "distill", "step": step, "t": t, "lr": lr, "loss": sum(losses) / len(losses),
               "layer_loss": losses, "step_s": time.time() - ts}
        if not all(math.isfinite(v) for v in losses):
            raise ConfigError(f"convert: the distillation loss became non-finite at step {step}; lower --distill-lr")
        log(rec)
        say(f"distill {step}/{cfg.distill_steps} t={t:.3f} lr={lr:.2e} loss {rec['loss']:.4f} ({rec['step_s']:.1f} s)")
        if step % cfg.distill_eval_every == 0 or step == cfg.distill_steps:
            ev = {"kind": "distill_eval", "step": step, "t": t, "current": _eval(model, eval_sets, lm_loss, cfg.batch)}
            set_t(model, 1.0)
            if t < 1.0:
                ev["target"] = _eval(model, eval_sets, lm_loss, cfg.batch)
            else:
                ev["target"] = ev["current"]
            if held is not None:
                ev["layer_fvu"] = layer_fvu(mlps, held)  # at t = 1, on held-out text
            set_t(model, t)
            ev["time_s"] = time.time() - t0
            log(ev)
            say(f"distill {step}: held-out {ev['current']} (at the target gate {ev['target']})")
            if run_dir is not None:
                save_checkpoint(run_dir / CHECKPOINT, holder, opt, {"step": step, "phase": "distill"},
                                keep_previous=True)
        if stop_after is not None and step >= stop_after:
            return False
    return True


# ----------------------------------------------------------------------------- the run


def anneal_to(model: nn.Module, train_blocks: torch.Tensor, eval_sets: dict[str, torch.Tensor],
              cfg: ConvertConfig, run_dir: str | Path | None = None, *, tokenizer=None,
              source: dict | None = None, progress: Callable[[str], None] | None = print,
              stop_after: int | None = None, stop_after_distill: int | None = None) -> nn.Module:
    """Anneal every gated MLP of `model` from its own gate to `cfg.target`; return it finalized.

    With `cfg.distill_steps` (per-layer distillation, cheap: no backward through the model), every MLP
    first learns to reproduce the original MLP's output on cached inputs (the original model's MLP
    inputs on `cfg.distill_blocks` training windows) while t rises to 1 over `cfg.distill_anneal_steps`;
    then `cfg.steps` end-to-end steps fine-tune the whole model's LM loss at t = 1. Without it, t rises
    to 1 over `cfg.anneal_steps` of the end-to-end steps.

    train_blocks: token windows [n, T] to train on (each end-to-end step draws `cfg.batch` of them);
    eval_sets: name -> held-out windows, evaluated before training (original model, plain swap),
    along the way and at the end (the first set's MLP inputs also give the held-out distillation
    error per layer). With `run_dir`, records go to `curve.jsonl`, checkpoints to
    `checkpoint.safetensors`, and the final model (with `tokenizer`, if given) to `run_dir/model`.
    `stop_after` / `stop_after_distill` stop after that end-to-end / distillation step without
    finalizing (tests of resume); the model then still holds its annealed MLPs.
    """
    from sqs.integrations.pretrained import lm_loss

    run_dir = Path(run_dir) if run_dir is not None else None
    say = progress or (lambda _msg: None)
    eval_batch = cfg.batch
    record = {**asdict(cfg), "train_blocks": [*train_blocks.shape], "train_sha": _fingerprint(train_blocks),
              "eval_sets": {k: _fingerprint(v) for k, v in eval_sets.items()}, "source": source or {}}
    resume = False
    if run_dir is not None:
        run_dir.mkdir(parents=True, exist_ok=True)
        resume = _prepare(run_dir, record)
    ckpt, phase, start = (None, "distill" if cfg.distill_steps else "train", 0)
    if resume:
        ckpt, phase, start = _resume_point(run_dir, say)
        if phase == "distill" and start >= cfg.distill_steps:
            phase, start = "train", 0  # distillation finished: the end-to-end phase starts afresh from its weights

    def log(rec: dict) -> None:
        if run_dir is not None:
            append_jsonl(run_dir / CURVE, rec)

    t0 = time.time()
    if not resume:
        say("evaluating the original model ...")
        original = _eval(model, eval_sets, lm_loss, eval_batch)
    cache = held = None
    if phase == "distill":
        say(f"recording the original MLPs on {min(cfg.distill_blocks, len(train_blocks))} training windows ...")
        cache = MLPCache.of(model, train_blocks[:cfg.distill_blocks], eval_batch)
        held = MLPCache.of(model, next(iter(eval_sets.values())), eval_batch) if eval_sets else None
    mlps = attach(model, cfg.target, cfg.gate_params)
    if not resume:
        set_t(model, 1.0)
        swap = _eval(model, eval_sets, lm_loss, eval_batch)
        log({"kind": "baseline", "step": 0, "original": original, "swap": swap, "time_s": time.time() - t0})
        say(f"held-out loss: original {original}, plain swap to {cfg.target} {swap}")
    if resume:
        kept = _kept(read_jsonl(run_dir / CURVE), phase, start)
        write_text(run_dir / CURVE, "".join(json.dumps(r) + "\n" for r in kept))
    if phase == "distill":
        holder = _trainable(model, mlps, mlp_only=True)
        opt = torch.optim.AdamW([p for p in holder.parameters()], lr=cfg.distill_lr, weight_decay=cfg.weight_decay)
        if ckpt is not None:
            load_checkpoint(ckpt, holder, opt)
            say(f"resuming {run_dir} at distillation step {start}")
        model.train()
        if not _distill(model, mlps, cache, held, eval_sets, cfg, start, opt, holder, run_dir, log, say, lm_loss,
                        t0, stop_after_distill):
            return model
        del cache, held, opt
        phase, start, ckpt = "train", 0, None
    elif ckpt is not None and start == 0:  # a finished distillation: its MLP weights, a fresh optimizer
        load_checkpoint(ckpt, _trainable(model, mlps, mlp_only=True))
        say(f"resuming {run_dir} after the distillation")
    holder = _trainable(model, mlps, cfg.mlp_only)
    params = [p for p in holder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if ckpt is not None and start > 0:
        load_checkpoint(ckpt, holder, opt)
        say(f"resuming {run_dir} at step {start}")
    set_t(model, anneal_t(start, cfg.anneal_steps))  # 1 after a distillation, 0 before a fresh annealing
    model.train()
    step = start
    for step in range(start + 1, cfg.steps + 1):
        ts = time.time()
        t = anneal_t(step, cfg.anneal_steps)
        set_t(model, t)
        lr = lr_at(cfg, step)
        for g in opt.param_groups:
            g["lr"] = lr
        x = _batch(train_blocks, step, cfg.batch, cfg.seed)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip) if cfg.grad_clip > 0 else None
        opt.step()
        rec = {"kind": "train", "step": step, "t": t, "lr": lr, "loss": loss.item(),
               "grad_norm": None if gnorm is None else float(gnorm), "step_s": time.time() - ts}
        if not math.isfinite(rec["loss"]):
            raise ConfigError(f"convert: the training loss became {rec['loss']} at step {step}; "
                              "lower the learning rate (--lr)")
        log(rec)
        say(f"step {step}/{cfg.steps} t={t:.3f} lr={lr:.2e} train loss {rec['loss']:.4f} ({rec['step_s']:.1f} s)")
        if step % cfg.eval_every == 0 or step == cfg.steps:
            ev = {"kind": "eval", "step": step, "t": t, "current": _eval(model, eval_sets, lm_loss, eval_batch)}
            if t < 1.0:  # what the model would be if the annealing stopped here, at the target gate
                set_t(model, 1.0)
                ev["target"] = _eval(model, eval_sets, lm_loss, eval_batch)
                set_t(model, t)
            else:
                ev["target"] = ev["current"]
            ev["time_s"] = time.time() - t0
            log(ev)
            say(f"step {step}: held-out {ev['current']} (at the target gate {ev['target']})")
        if run_dir is not None and (step % cfg.checkpoint_every == 0 or step == cfg.steps):
            save_checkpoint(run_dir / CHECKPOINT, holder, opt, {"step": step, "phase": "train"}, keep_previous=True)
        if stop_after is not None and step >= stop_after:
            return model
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    finalize(model)
    final = _eval(model, eval_sets, lm_loss, eval_batch)
    log({"kind": "final", "step": step, "t": 1.0, "final": final, "time_s": time.time() - t0})
    say(f"done: held-out loss at {cfg.target} {final}")
    if run_dir is not None:
        model.save_pretrained(run_dir / "model")
        if tokenizer is not None:
            tokenizer.save_pretrained(run_dir / "model")
    return model


def read_curve(run_dir: str | Path) -> list[dict]:
    """The records of a conversion run (`curve.jsonl`)."""
    return read_jsonl(Path(run_dir) / CURVE)


__all__ = ["TARGETS", "AnnealedMLP", "ConvertConfig", "ConvertRunMismatch", "MLPCache", "anneal_t", "anneal_to",
           "attach", "annealed", "cosine_lr", "distill_step", "finalize", "layer_fvu", "lr_at", "read_curve", "set_t"]

