"""`sqs train image` and `sqs experiment table1`."""

from __future__ import annotations

import argparse
import json
import sys
import time

DEFAULT_WORKERS_HELP = ("parallel worker processes (default: one per available CPU core, each with --threads 1: "
                        "measured ~2x faster than one process using every core, and robust to other jobs; "
                        "see sqs/experiments/table1.py)")


def _image_config(args, gate: str | None = None, dataset: str | None = None, seed: int | None = None):
    from sqs.experiments.image import load_config

    ov = list(args.set or [])
    for key, val in (("dataset", dataset), ("model.gate", gate), ("seed", seed), ("epochs", args.epochs),
                     ("batch_size", getattr(args, "batch_size", None))):
        if val is not None:
            ov.append(f"{key}={json.dumps(val)}")
    return load_config(args.config, ov)


def _train_image(args) -> int:
    import torch

    from sqs.experiments.image import run_image

    cfg = _image_config(args, gate=args.gate, dataset=args.dataset, seed=args.seed)
    if args.print_config:
        print(cfg.to_toml(), end="")
        return 0
    if args.run_dir is None:
        print("sqs train image: --run-dir is required (unless --print-config)", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    recs = run_image(cfg, args.run_dir, progress=not args.no_progress, data_dir=args.data_dir,
                     cache_dir=args.cache_dir)
    final = recs[-1] if recs else {}
    if final.get("final"):
        print(f"{cfg.name()}: step {final['step']}, test loss {final['test_loss']:.4f}, "
              f"test acc {final['test_acc']:.4f} ({time.perf_counter() - t0:.1f} s) -> {args.run_dir}")
    else:
        print(f"{cfg.name()}: stopped at step {final.get('step')}; re-run the same command to resume")
    return 0


def _table1(args) -> int:
    from sqs.experiments import table1

    if not args.report_only:
        specs = table1.plan_grid(args.runs_dir, datasets=args.datasets, gates=args.gates, seeds=args.seeds,
                                 epochs=args.epochs, config=args.config, overrides=args.set or [])
        workers = args.workers or table1.default_workers()
        threads = args.threads or 1
        print(f"table1: {len(specs)} runs in {args.runs_dir} ({workers} worker(s) x {threads} thread(s))",
              file=sys.stderr)
        summary = table1.run_grid(specs, workers=workers, threads=threads, cache_dir=args.cache_dir,
                                  progress=not args.no_progress, run_bars=not args.no_run_bars,
                                  log_dir=args.runs_dir)
        print(f"table1: trained {summary['n_trained']}, skipped {summary['n_skipped']} finished, "
              f"{len(summary['failed'])} failed, wall {summary['wall_s']:.1f} s", file=sys.stderr)
    paths = table1.write_report(args.runs_dir, args.out)
    for p in paths.values():
        print(p)
    if not args.report_only and summary["failed"]:
        print("failed runs: " + ", ".join(f["run"] for f in summary["failed"]) + " (re-run the command to retry)",
              file=sys.stderr)
        return 1
    return 0


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="sec42",
                   help="a shipped config (sec41: 1 layer, batch 2048; sec42: 2 layers, batch 512) or a .toml file "
                        "(default: %(default)s)")
    p.add_argument("--epochs", type=float, default=None, help="override the config's epochs (default: config, 20)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override any config key, dotted for tables: model.norm=rms, train.lr=3e-3, noise_std=0.5 "
                        "(repeatable)")
    p.add_argument("--cache-dir", help="cache root holding the datasets (default $SQS_CACHE_DIR or ~/.cache/sqs)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads per process")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def register(sub, groups) -> None:
    from sqs.experiments.image import DATASETS
    from sqs.functional import GATE_ALIASES, GATES

    gate_choices = list(GATES) + list(GATE_ALIASES)

    p = groups["train"].add_parser(
        "image", help="train one MNIST / Fashion-MNIST classifier (paper Sec. 4)",
        description="Train one image classifier into a run directory (config.json, metrics.jsonl, checkpoints, "
                    "model.safetensors). Re-running the same command resumes an interrupted run and does nothing "
                    "for a finished one.")
    _add_common(p)
    p.add_argument("--dataset", choices=DATASETS, default=None, help="default: the config's (mnist)")
    p.add_argument("--gate", choices=gate_choices, default=None, help="GLU gate (default: the config's, sqs)")
    p.add_argument("--seed", type=int, default=None, help="default: the config's (0)")
    p.add_argument("--batch-size", type=int, default=None, help="override the config's batch size")
    p.add_argument("--run-dir", help="the run directory (required)")
    p.add_argument("--data-dir", help="a folder with the dataset's four IDX files (raw or .gz) instead of the cache")
    p.add_argument("--print-config", action="store_true", help="print the resolved config as TOML and exit")
    p.set_defaults(func=_train_image)

    p = groups["experiment"].add_parser(
        "table1", help="paper Table 1 / Fig. 3: 5 gates x 5 seeds x {MNIST, Fashion-MNIST}",
        description="Train the Sec. 4.2 grid (finished runs are skipped, interrupted ones resumed), then write "
                    "table1.md (mean ± std over seeds at 25/50/75/100% beside the paper's values, first gate to "
                    "80/85/90% accuracy, timings), table1.json and curves_<dataset>.png to --out.")
    _add_common(p)
    p.add_argument("--out", default="results/image", help="report folder (default: %(default)s)")
    p.add_argument("--runs-dir", default="runs/table1", help="run directories (default: %(default)s)")
    p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 (default: %(default)s)")
    p.add_argument("--gates", nargs="+", choices=gate_choices, default=list(GATES), metavar="GATE",
                   help=f"any of {', '.join(gate_choices)} (default: {' '.join(GATES)})")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), metavar="DATASET",
                   help=f"any of {', '.join(DATASETS)} (default: both)")
    p.add_argument("--workers", type=int, default=None, help=DEFAULT_WORKERS_HELP)
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from --runs-dir")
    p.add_argument("--no-run-bars", action="store_true",
                   help="only the overall progress bar (no per-run bars; useful when logging to a file)")
    p.set_defaults(func=_table1)
