"""`sqs train lm`, `sqs generate`, `sqs experiment tinystories`.

All three work in one process; `train lm` and `experiment tinystories` also under
`torchrun --nproc-per-node N -m sqs.cli ...` (the process group is joined from the
environment: NCCL on CUDA, gloo on CPU; rank 0 logs and writes).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="tinystories-cpu",
                   help="a config in sqs/configs/lm/ (tinystories-cpu, tinystories-paper) or a .toml path "
                        "(default: tinystories-cpu)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value in TOML syntax (repeatable): --set lr=3e-4 "
                        "--set epochs=3 --set batch_size=64 --set grad_accum=4")
    p.add_argument("--epochs", type=float, help="training length in epochs (replaces the config's length)")
    p.add_argument("--tokens", type=int, help="training length in tokens (replaces the config's length)")
    p.add_argument("--steps", type=int, help="training length in optimizer steps (replaces the config's length)")
    p.add_argument("--cache-dir", help="data cache root (default $SQS_CACHE_DIR or ~/.cache/sqs)")
    p.add_argument("--device", default="auto", help="auto (default: CUDA if available), cpu, cuda, cuda:1, ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _length(args) -> dict:
    return {k: getattr(args, k) for k in ("epochs", "tokens", "steps") if getattr(args, k) is not None}


def _is_rank0() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _finish_dist(initialised: bool) -> None:
    import torch.distributed as dist

    if initialised and dist.is_initialized():
        dist.destroy_process_group()


def _train(args) -> int:
    from sqs.experiments import lm
    from sqs.training.trainer import RunConfigMismatch, TrainingDiverged

    cfg = lm.load_config(args.config, args.overrides, gate=args.gate, seed=args.seed, **_length(args))
    run_dir = Path(args.run_dir) if args.run_dir else Path("runs/lm") / cfg.name / lm.run_name(cfg.gate, cfg.seed)
    started = lm.init_distributed(args.device)
    try:
        records = lm.run_lm(cfg, run_dir, cache_dir=args.cache_dir, device=args.device,
                            progress=not args.no_progress)
    except TrainingDiverged as e:
        if _is_rank0():
            print(f"error: {e}", file=sys.stderr)
        return 1
    except RunConfigMismatch as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        _finish_dist(started)
    if _is_rank0() and records:
        last = records[-1]
        print(json.dumps({"run_dir": str(run_dir), **{k: last.get(k) for k in
                                                      ("step", "tokens", "val_loss", "val_ppl", "val_bpb")}}))
    return 0


def _generate(args) -> int:
    from sqs.experiments import lm

    loaded = lm.load_lm(args.run_dir, device=args.device if args.device != "auto" else "cpu",
                        cache_dir=args.cache_dir)
    for i in range(args.num_samples):
        text = lm.generate_text(loaded, args.prompt, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_k=args.top_k or None, seed=args.seed + i,
                                stop_at_eot=not args.no_stop)
        if args.num_samples > 1:
            print(f"--- sample {i + 1} (seed {args.seed + i})")
        print(text)
    return 0


def _experiment(args) -> int:
    from sqs.experiments import lm

    started = False if args.report_only else lm.init_distributed(args.device)
    try:
        overrides = list(args.overrides) + [f"{k}={v}" for k, v in _length(args).items()]
        table = lm.run_experiment(args.config, out=args.out, runs_dir=args.runs_dir, gates=args.gates,
                                  extra_seeds=args.extra_seeds, overrides=overrides, report_only=args.report_only,
                                  cache_dir=args.cache_dir, device=args.device, progress=not args.no_progress,
                                  samples=not args.no_samples, max_new_tokens=args.max_new_tokens,
                                  throughput_reps=args.throughput_reps)
    finally:
        _finish_dist(started)
    if _is_rank0() and table:
        print(f"wrote {args.out}/table.md, table.json, curves.png" + ("" if args.no_samples else ", samples.md"))
        print(Path(args.out, "table.md").read_text())
    return 0


def register(sub, groups) -> None:
    from sqs.functional import GATE_ALIASES, GATES

    gate_choices = list(GATES) + list(GATE_ALIASES)

    p = groups["train"].add_parser(
        "lm", help="train one TinyStories language model (one gate, one seed)",
        description="Train (or resume) one TinyStories decoder with the chosen GLU gate into a run directory. "
                    "Under `torchrun --nproc-per-node N -m sqs.cli train lm ...` each process takes its slice "
                    "of every global batch (same result as one process).")
    _add_common(p)
    p.add_argument("--gate", default=None, choices=gate_choices, help="GLU gate (default: the config's, sqs)")
    p.add_argument("--seed", type=int, default=None, help="seed (default: the config's, 0)")
    p.add_argument("--run-dir", help="run directory (default runs/lm/<config>/<gate>-s<seed>); "
                                     "re-running the same command resumes it")
    p.set_defaults(func=_train)

    g = sub.add_parser("generate", help="sample text from a trained language model",
                       description="Continue a prompt with a trained TinyStories model (deterministic for a seed; "
                                   "--temperature 0 is greedy).")
    g.add_argument("run_dir", help="a run directory of `sqs train lm`")
    g.add_argument("--prompt", default="Once upon a time")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0 = all)")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--num-samples", type=int, default=1, help="samples with seeds seed, seed+1, ...")
    g.add_argument("--no-stop", action="store_true", help="do not stop at <|endoftext|>")
    g.add_argument("--device", default="cpu")
    g.add_argument("--cache-dir", help="only for runs without a tokenizer.json")
    g.set_defaults(func=_generate)

    e = groups["experiment"].add_parser(
        "tinystories", help="Sec. 4.2.2: all five gates on TinyStories, table, curves, samples",
        description="Train all five gates under one token budget (plus extra seeds of SQS and SwiGLU), skipping "
                    "finished runs, then write results/lm/table.md, table.json, curves.png and samples.md.")
    _add_common(e)
    e.add_argument("--out", default="results/lm", help="report folder (default results/lm)")
    e.add_argument("--runs-dir", default="runs/lm", help="runs go to RUNS_DIR/<config name>/<gate>-s<seed>")
    e.add_argument("--gates", nargs="+", default=list(GATES), choices=gate_choices, metavar="GATE",
                   help=f"gates to train (default all: {' '.join(GATES)})")
    e.add_argument("--extra-seeds", nargs="*", type=int, default=[1],
                   help="extra seeds for SQS and SwiGLU, to show the seed noise (default: 1; none: --extra-seeds)")
    e.add_argument("--report-only", action="store_true", help="only regenerate the report from the run dirs")
    e.add_argument("--no-samples", action="store_true", help="skip samples.md")
    e.add_argument("--max-new-tokens", type=int, default=160, help="sample length in samples.md")
    e.add_argument("--throughput-reps", type=int, default=30,
                   help="after training, time every gate's training step interleaved this many rounds "
                        "(results/lm/throughput.json; 0 skips it)")
    e.set_defaults(func=_experiment)
