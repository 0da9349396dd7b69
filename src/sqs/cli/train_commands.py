"""`sqs train image` and `sqs train lm`: one run into a run directory (resumable)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sqs.cli.args import (RUNS_HELP, add_allow_change, add_gate, add_logger, add_set, folder, nonneg_int,
                          positive_float, positive_int)


def image_config(args, gate: str | None = None, dataset: str | None = None, seed: int | None = None):
    """The image config named by --config with --set and the per-run flags applied."""
    from sqs.runs.image_config import load_config

    ov = list(args.overrides or [])
    for key, val in (("dataset", dataset), ("model.gate", gate), ("seed", seed), ("epochs", args.epochs),
                     ("batch_size", getattr(args, "batch_size", None))):
        if val is not None:
            ov.append(f"{key}={json.dumps(val)}")
    return config_errors(load_config, args.config, ov)


def config_errors(load, *a, **kw):
    """Call a config loader; its refusals (ValueError, TypeError) are errors in the user's config or
    flags, reported as one-line ConfigError naming the config."""
    from sqs.io import ConfigError

    try:
        return load(*a, **kw)
    except (ValueError, TypeError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(str(e)) from e


def _train_image(args) -> int:
    import torch

    from sqs.runs.image_pipeline import run_image
    from sqs.training.loggers import check_loggers
    from sqs.training.rundir import allow_changes

    cfg = image_config(args, gate=args.gate, dataset=args.dataset, seed=args.seed)
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    run_dir = Path(args.run_dir) if args.run_dir else cfg.run_dir(args.runs_dir)
    check_loggers(args.logger)
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with allow_changes(*args.allow_change):
        recs = run_image(cfg, run_dir, progress=not args.no_progress, data_dir=args.data_dir, cache_dir=args.cache_dir,
                         loggers=args.logger)
    final = recs[-1] if recs else {}
    if final.get("final"):
        print(f"{cfg.label()}: step {final['step']}, test loss {final['test_loss']:.4f}, "
              f"test acc {final['test_acc']:.4f} ({time.perf_counter() - t0:.1f} s) -> {run_dir}")
    else:
        print(f"{cfg.label()}: stopped at step {final.get('step')}; re-run the same command to resume")
    return 0


def add_image_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="sec42",
                   help="a shipped config (sec41: 1 layer, batch 2048; sec42: 2 layers, batch 512) or a .toml file "
                        "(default: %(default)s)")
    p.add_argument("--epochs", type=positive_float, default=None,
                   help="override the config's epochs (> 0; default: config, 20)")
    add_set(p, "--set model.norm=rms --set train.lr=3e-3 --set model.gate_kwargs.lam=0.1")
    p.add_argument("--cache-dir", help="cache root holding the datasets (default $SQS_CACHE_DIR or ~/.cache/sqs)")
    p.add_argument("--threads", type=positive_int, default=None, help="torch intra-op threads per process")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


# --------------------------------------------------------------------------- language models


def add_lm_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tinystories-cpu",
                   help="a shipped LM config (tinystories-cpu, tinystories-paper) or a .toml path "
                        "(default: tinystories-cpu)")
    add_set(p, "--set train.lr=3e-4 --set train.batch_size=64 --set model.gate_kwargs.lam=0.1")
    p.add_argument("--epochs", type=positive_float, help="training length in epochs, > 0 (replaces the config's length)")
    p.add_argument("--tokens", type=positive_int, help="training length in tokens, >= 1 (replaces the config's length)")
    p.add_argument("--steps", type=positive_int,
                   help="training length in optimizer steps, >= 1 (replaces the config's length)")
    p.add_argument("--cache-dir", help="data cache root (default $SQS_CACHE_DIR or ~/.cache/sqs)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def lm_length(args) -> dict:
    return {k: getattr(args, k) for k in ("epochs", "tokens", "steps") if getattr(args, k) is not None}


def _train_lm(args) -> int:
    from sqs.runs.lm_config import load_config
    from sqs.runs.lm_pipeline import run_lm
    from sqs.training.distributed import finish_distributed, init_distributed, is_rank0
    from sqs.training.loggers import check_loggers
    from sqs.training.rundir import allow_changes

    cfg = config_errors(load_config, args.config, args.overrides, gate=args.gate, seed=args.seed, **lm_length(args))
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    run_dir = Path(args.run_dir) if args.run_dir else cfg.run_dir(args.runs_dir)
    check_loggers(args.logger)
    started = init_distributed(args.device)
    try:  # errors (a NaN: status 1; a user error: status 2) are reported by sqs.cli.main
        with allow_changes(*args.allow_change):
            records = run_lm(cfg, run_dir, cache_dir=args.cache_dir, device=args.device, progress=not args.no_progress,
                             loggers=args.logger)
    finally:
        finish_distributed(started)
    if is_rank0() and records:
        last = records[-1]
        print(json.dumps({"run_dir": str(run_dir), **{k: last.get(k) for k in
                                                      ("step", "tokens", "val_loss", "val_ppl", "val_bpb")}}))
    return 0


def register(sub, groups) -> None:
    from sqs.runs.image_config import DATASETS

    p = groups["train"].add_parser(
        "image", help="train one MNIST / Fashion-MNIST classifier (paper Sec. 4)",
        description="Train one image classifier into a run directory (config.json, metrics.jsonl, checkpoints, "
                    "model.safetensors). Re-running the same command resumes an interrupted run and does nothing "
                    "for a finished one. The run goes to its config's run directory, "
                    "RUNS_DIR/<config>/<dataset>/<gate>[-<params>]-s<seed> (e.g. runs/sec42/mnist/sqs-lam0.1-s0), "
                    "unless --run-dir says otherwise.")
    add_image_common(p)
    p.add_argument("--dataset", choices=DATASETS, default=None, help="default: the config's (mnist)")
    add_gate(p, "--gate", default=None, help="GLU gate (default: the config's, sqs)")
    p.add_argument("--seed", type=nonneg_int, default=None, help="default: the config's (0)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="override the config's batch size")
    add_allow_change(p)
    p.add_argument("--run-dir", type=folder, help="the run directory (default: the config's, under --runs-dir)")
    p.add_argument("--runs-dir", type=folder, default="runs", help=RUNS_HELP)
    p.add_argument("--data-dir", help="a folder with the dataset's four IDX files (raw or .gz) instead of the cache")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    add_logger(p)
    p.set_defaults(func=_train_image)

    p = groups["train"].add_parser(
        "lm", help="train one TinyStories language model (one gate, one seed)",
        description="Train (or resume) one TinyStories decoder with the chosen GLU gate into a run directory. "
                    "Under `torchrun --nproc-per-node N -m sqs.cli train lm ...` each process takes its slice "
                    "of every global batch (same result as one process).")
    add_lm_common(p)
    add_gate(p, "--gate", default=None, help="GLU gate (default: the config's, sqs)")
    p.add_argument("--seed", type=nonneg_int, default=None, help="seed (default: the config's, 0)")
    add_allow_change(p)
    p.add_argument("--run-dir", type=folder, help="run directory (default: the config's, RUNS_DIR/<config>/tinystories/"
                                     "<gate>[-<params>]-s<seed>); re-running the same command resumes it")
    p.add_argument("--runs-dir", type=folder, default="runs", help=RUNS_HELP)
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    add_logger(p)
    p.set_defaults(func=_train_lm)
