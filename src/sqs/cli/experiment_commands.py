"""`sqs experiment table1|spectra|frontier|gates|tinystories|lm-spectra`: a paper experiment end to end, results to --out.

Runs go to their configs' run directories, RUNS/<config>/<dataset>/<gate>[-<params>]-s<seed>
(--runs-dir RUNS, default runs/), e.g. runs/sec42/mnist/sqs-s0, runs/sec41/fashion-mnist/bilinear-s3,
runs/tinystories-cpu/tinystories/sqs-lam0.1-s0. Gate parameters given with --set
model.gate_kwargs.<name>=... reach the SQS runs; the other gates take none.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sqs.cli.args import (RUNS_HELP, add_gate, add_grid_launch, add_set, folder, grid_launch, grid_threads,
                          nonneg_int, positive_float, positive_int)
from sqs.cli.train_commands import add_image_common, add_lm_common, lm_length


def _report_grid(name: str, summary: dict) -> None:
    print(f"{name}: trained {summary['n_trained']}, skipped {summary['n_skipped']} finished, "
          f"{len(summary['failed'])} failed, wall {summary['wall_s']:.1f} s", file=sys.stderr)


def _exit_status(summary: dict | None) -> int:
    """1 when a grid had failed runs, else 0. A run stopped by an error a person fixes (held by
    another live process, not a run's folder, a full disk) is named with its one-line message,
    whose fix is not "retry"; the others (bugs) are named after their tracebacks."""
    if not (summary and summary["failed"]):
        return 0
    bugs = []
    for f in summary["failed"]:
        if "\n" in str(f["error"]):
            bugs.append(f["run"])
        else:
            print(f"sqs: error: run {f['run']}: {f['error']}", file=sys.stderr)
    if bugs:
        print("failed runs: " + ", ".join(bugs) + " (tracebacks above; re-run the command to retry)", file=sys.stderr)
    return 1


def _table1(args) -> int:
    from sqs.experiments.table1 import grid_dir, plan_grid, run_table1
    from sqs.experiments.table1_report import write_report
    from sqs.runs.pool import default_workers

    summary = None
    if not args.report_only:
        launch = grid_launch(args)
        specs = plan_grid(args.runs_dir, datasets=args.datasets, gates=args.gates, seeds=args.seeds,
                          epochs=args.epochs, config=args.config, overrides=args.overrides)
        workers = args.workers or default_workers()
        threads = grid_threads(args, launch)
        grid = grid_dir(args.runs_dir, args.config)
        print(f"table1: {len(specs)} runs in {grid} ({_where(launch, workers, threads)})", file=sys.stderr)
        summary = run_table1(specs, args.runs_dir, workers=workers, threads=threads, cache_dir=args.cache_dir,
                             progress=not args.no_progress, run_bars=not args.no_run_bars, log_dir=grid, **launch)
        _report_grid("table1", summary)
    paths = write_report(args.runs_dir, args.out, config=args.config)
    for p in paths.values():
        print(p)
    return _exit_status(summary)


def _where(launch: dict, workers: int, threads: int) -> str:
    """How a grid's runs execute, for its first line."""
    if launch["launcher"] == "ray":
        o = launch["launcher_options"]
        return (f"Ray tasks of {o['cpus_per_run']:g} CPU(s), {o['gpus_per_run']:g} GPU(s), {threads} thread(s) each, "
                f"on {o['address'] or 'the cluster at $RAY_ADDRESS or a local Ray'}")
    return f"{workers} worker(s) x {threads} thread(s)"


def _spectra(args) -> int:
    from sqs.experiments.weight_spectra import run_experiment

    run_experiment(runs_dir=args.runs_dir, out=args.out, seeds=args.seeds, datasets=args.datasets,
                   epochs=args.epochs, report_only=args.report_only, data_dir=args.data_dir,
                   explain_index=args.explain_index, overrides=args.overrides)
    return 0


def _tinystories(args) -> int:
    from sqs.experiments.lm_table import run_experiment
    from sqs.training.distributed import finish_distributed, init_distributed, is_rank0

    launch = grid_launch(args)
    started = False if (args.report_only or launch["launcher"]) else init_distributed(args.device)
    try:
        overrides = list(args.overrides) + [f"train.{k}={v}" for k, v in lm_length(args).items()]
        table = run_experiment(args.config, out=args.out, runs_dir=args.runs_dir, gates=args.gates,
                               extra_seeds=args.extra_seeds, overrides=overrides, report_only=args.report_only,
                               cache_dir=args.cache_dir, device=args.device, progress=not args.no_progress,
                               samples=not args.no_samples, max_new_tokens=args.max_new_tokens,
                               throughput_reps=args.throughput_reps, **launch)
    finally:
        finish_distributed(started)
    if is_rank0() and table:
        print(f"wrote {args.out}/table.md, table.json, curves.png" + ("" if args.no_samples else ", samples.md"))
        print(Path(args.out, "table.md").read_text())
    return 0


# --------------------------------------------------------------------------- frontier


def _frontier(args) -> int:
    from sqs.experiments.frontier import load_grid, plan_frontier, run_frontier
    from sqs.runs.pool import default_workers

    grid = load_grid(args.grid, args.grid_set)
    if args.datasets:
        grid.datasets = list(args.datasets)
    summary = None
    if not args.report_only:
        launch = grid_launch(args)
        specs = plan_frontier(args.runs_dir, grid, epochs=args.epochs, overrides=args.overrides)
        workers = args.workers or default_workers()
        threads = grid_threads(args, launch)
        print(f"frontier: {len(specs)} runs under {args.runs_dir} ({_where(launch, workers, threads)})"
              f"{'; log: ' + args.log if args.log else ''}", file=sys.stderr)
        summary = run_frontier(specs, workers=workers, threads=threads, cache_dir=args.cache_dir,
                               log=args.log, progress=not args.no_progress,
                               run_bars=not (args.no_run_bars or args.no_progress), runs_root=args.runs_dir, **launch)
        _report_grid("frontier", summary)
    if not args.train_only:
        from sqs.experiments.frontier_report import write_report

        paths = write_report(args.runs_dir, args.out, grid, epochs=args.epochs, overrides=args.overrides,
                             cache_dir=args.cache_dir, progress=not args.no_progress,
                             workers=args.workers or default_workers())
        for p in paths:
            print(p)
    return _exit_status(summary)


def _gates(args) -> int:
    from sqs.experiments.gates import load_grid, plan, run_gates
    from sqs.runs.pool import default_workers

    grid = load_grid(args.grid, args.grid_set)
    summary = None
    workers = args.workers or default_workers()
    if not args.report_only:
        launch = grid_launch(args)
        specs = plan(args.runs_dir, grid, epochs=args.epochs, overrides=args.overrides, lm_overrides=args.lm_set)
        threads = grid_threads(args, launch)
        print(f"gates: {len(specs)} runs under {args.runs_dir} ({_where(launch, workers, threads)})"
              f"{'; log: ' + args.log if args.log else ''}", file=sys.stderr)
        summaries = run_gates(specs, workers=workers, threads=threads, cache_dir=args.cache_dir,
                              log=args.log, progress=not args.no_progress,
                              run_bars=not (args.no_run_bars or args.no_progress), runs_root=args.runs_dir, **launch)
        for name, s in summaries.items():
            _report_grid(f"gates ({name})", s)
        summary = {"failed": [f for s in summaries.values() for f in s["failed"]]}
    if not args.train_only:
        from sqs.experiments.gates_report import write_report

        paths = write_report(args.runs_dir, args.out, grid, epochs=args.epochs, overrides=args.overrides,
                             lm_overrides=args.lm_set, cache_dir=args.cache_dir, workers=workers,
                             progress=not args.no_progress)
        for p in paths:
            print(p)
        print(Path(args.out, "table.md").read_text().split("## Verdict", 1)[1].split("\n## ", 1)[0].strip())
    return _exit_status(summary)


def _lm_spectra(args) -> int:
    from sqs.experiments.lm_spectra import run_experiment

    overrides = list(args.overrides) + [f"train.{k}={v}" for k, v in lm_length(args).items()]
    res = run_experiment(args.config, out=args.out, runs_dir=args.runs_dir, train=not args.no_train,
                         tokens=args.directions, windows=args.windows, k=args.k, overrides=overrides,
                         cache_dir=args.cache_dir, device=args.device, progress=not args.no_progress)
    print(f"wrote {args.out}/summary.md, summary.json and figures (analysis {res['analysis_s']:.0f} s)")
    print("\n".join(f"- {v}" for v in res["verdict"]))
    return 0


def register(sub, groups) -> None:
    from sqs.core import GATES
    from sqs.runs.image_config import DATASETS

    p = groups["experiment"].add_parser(
        "table1", help="paper Table 1 / Fig. 3: 5 gates x 5 seeds x {MNIST, Fashion-MNIST}",
        description="Train the Sec. 4.2 grid (finished runs are skipped, interrupted ones resumed), then write "
                    "table1.md (mean ± sample std over seeds at 25/50/75/100% beside the paper's values, first gate to "
                    "80/85/90% accuracy, timings), table1.json and curves_<dataset>.png to --out. Gate parameters "
                    "(--set model.gate_kwargs.lam=0.1) go to the SQS runs, filed as sqs-lam0.1-s<seed>.")
    add_image_common(p)
    p.add_argument("--out", default="results/image", help="report folder (default: %(default)s)")
    p.add_argument("--runs-dir", type=folder, default="runs", help=RUNS_HELP)
    p.add_argument("--seeds", type=positive_int, default=5, help="seeds 0..N-1 (default: %(default)s)")
    add_gate(p, "--gates", nargs="+", default=list(GATES), help=f"gates (default: {' '.join(GATES)})")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS), metavar="DATASET",
                   help=f"any of {', '.join(DATASETS)} (default: both)")
    p.add_argument("--workers", type=positive_int, default=None,
                   help="parallel worker processes (default: one per available CPU core, each with --threads 1)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from the run directories")
    p.add_argument("--no-run-bars", action="store_true",
                   help="only the overall progress bar (no per-run bars; useful when logging to a file)")
    add_grid_launch(p)
    p.set_defaults(func=_table1)

    p = groups["experiment"].add_parser(
        "spectra", help="Sec. 4.1: train Bilinear + SQS 1-layer models, compare their eigenvectors",
        description="Train (skipping finished runs) 1-layer Bilinear and SQS models per seed and dataset (config "
                    "sec41), decompose them and write summary.md, summary.json and figures.")
    p.add_argument("--runs-dir", type=folder, default="runs", help=RUNS_HELP)
    p.add_argument("--out", default="results/spectra")
    p.add_argument("--seeds", type=positive_int, default=5)
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--epochs", type=positive_int, default=20)
    add_set(p, "--set model.gate_kwargs.lam=0.1 (the SQS runs; Bilinear takes no parameters)")
    p.add_argument("--report-only", action="store_true", help="train nothing; analyse the finished runs")
    p.add_argument("--data-dir", help="folder of IDX files (default: the cache); only with one dataset")
    p.add_argument("--explain-index", type=nonneg_int, default=0)
    p.set_defaults(func=_spectra)

    f = groups["experiment"].add_parser(
        "frontier", help="the (c, lam, p) frontier: accuracy, saturation, agreement with Bilinear, reading fidelity",
        description="Train the frontier grid (sqs/configs/image/frontier.toml: 1-layer and 2-layer models over "
                    "SQS settings and the references; finished runs skipped, interrupted ones resumed) with the "
                    "Table 1 process pool, then analyse every run (cached next to it) and write table.md, "
                    "frontier.json and plots to --out.")
    f.add_argument("--grid", default="frontier", help="the grid: a shipped name or a .toml path (default: %(default)s)")
    f.add_argument("--grid-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the grid file, dotted keys: --grid-set 'grid.one_layer.seeds=[0]'")
    add_set(f, "--set train.lr=3e-3 (applies to every run)")
    f.add_argument("--epochs", type=positive_float, default=None, help="override every run's epochs (default: the configs')")
    f.add_argument("--datasets", nargs="+", choices=DATASETS, default=None, metavar="DATASET",
                   help="restrict to these datasets (default: the grid's)")
    f.add_argument("--runs-dir", type=folder, default="runs", help=RUNS_HELP)
    f.add_argument("--out", default="results/frontier", help="report folder (default: %(default)s)")
    f.add_argument("--log", default=None, help="progress log: one line per finished run, with rate and ETA")
    f.add_argument("--workers", type=positive_int, default=None,
                   help="parallel worker processes, for training and for the analysis (default: one per core)")
    f.add_argument("--threads", type=positive_int, default=None, help="torch threads per worker (default 1)")
    f.add_argument("--cache-dir", help="cache root holding the datasets (default $SQS_CACHE_DIR or ~/.cache/sqs)")
    f.add_argument("--report-only", action="store_true", help="train nothing; analyse the finished runs")
    f.add_argument("--train-only", action="store_true", help="train; write no report")
    f.add_argument("--no-progress", action="store_true", help="no progress bars")
    f.add_argument("--no-run-bars", action="store_true", help="only the overall progress bar")
    add_grid_launch(f)
    f.set_defaults(func=_frontier)

    g = groups["experiment"].add_parser(
        "gates", help="which gate? loss against readability for every gate, at depth 1/2/4 and in a language model",
        description="Train the gate benchmark (sqs/configs/image/gates.toml: ReLU, GELU, SwiGLU, Bilinear, SQS at "
                    "lam 0.5 and 0.05; image models of 1, 2 and 4 GLU layers on MNIST and Fashion-MNIST; TinyStories "
                    "decoders; 3 seeds; finished runs skipped, interrupted ones resumed), read every run with every "
                    "reading (first-order, gain, affine, fit: fitted on training data, scored on test data; cached "
                    "next to each run), and write table.md, summary.json and pareto.png (loss against the fidelity "
                    "of the best reading, the Pareto front, a computed verdict) to --out.")
    g.add_argument("--grid", default="gates", help="the grid: a shipped name or a .toml path (default: %(default)s)")
    g.add_argument("--grid-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override the grid file, dotted keys: --grid-set 'grid.seeds=[0]' --grid-set 'grid.lm.seeds=[]'")
    add_set(g, "--set train.lr=3e-3 (applies to every image run)")
    g.add_argument("--lm-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override every LM run's config, dotted keys (e.g. --lm-set train.steps=50)")
    g.add_argument("--epochs", type=positive_float, default=None,
                   help="override every image run's epochs (default: the configs')")
    g.add_argument("--runs-dir", type=folder, default="runs", help=RUNS_HELP)
    g.add_argument("--out", default="results/gates", help="report folder (default: %(default)s)")
    g.add_argument("--log", default=None, help="progress log: one line per finished run, with rate and ETA")
    g.add_argument("--workers", type=positive_int, default=None,
                   help="parallel worker processes, for training and for the analysis (default: one per core)")
    g.add_argument("--threads", type=positive_int, default=None, help="torch threads per worker (default 1)")
    g.add_argument("--cache-dir", help="cache root holding the datasets (default $SQS_CACHE_DIR or ~/.cache/sqs)")
    g.add_argument("--report-only", action="store_true", help="train nothing; analyse the finished runs")
    g.add_argument("--train-only", action="store_true", help="train; write no report")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    g.add_argument("--no-run-bars", action="store_true", help="only the overall progress bar")
    add_grid_launch(g)
    g.set_defaults(func=_gates)

    e = groups["experiment"].add_parser(
        "tinystories", help="Sec. 4.2.2: all five gates on TinyStories, table, curves, samples",
        description="Train all five gates under one token budget (plus extra seeds of SQS and SwiGLU), skipping "
                    "finished runs, then write results/lm/table.md, table.json, curves.png and samples.md.")
    add_lm_common(e)
    e.add_argument("--out", default="results/lm", help="report folder (default results/lm)")
    e.add_argument("--runs-dir", type=folder, default="runs", help=RUNS_HELP)
    add_gate(e, "--gates", nargs="+", default=list(GATES), help=f"gates to train (default all: {' '.join(GATES)})")
    e.add_argument("--extra-seeds", nargs="*", type=nonneg_int, default=[1],
                   help="extra seeds for SQS and SwiGLU, to show the seed noise (default: 1; none: --extra-seeds)")
    e.add_argument("--report-only", action="store_true", help="only regenerate the report from the run dirs")
    e.add_argument("--no-samples", action="store_true", help="skip samples.md")
    e.add_argument("--max-new-tokens", type=positive_int, default=160, help="sample length in samples.md")
    e.add_argument("--throughput-reps", type=nonneg_int, default=30,
                   help="after training, time every gate's training step interleaved this many rounds "
                        "(results/lm/throughput.json; 0 skips it)")
    add_grid_launch(e)
    e.set_defaults(func=_tinystories)

    from sqs.experiments.lm_spectra import DEFAULT_TOKENS, DEFAULT_WINDOWS

    e = groups["experiment"].add_parser(
        "lm-spectra", help="TinyStories GLU layers as quadratic forms over tokens: SQS vs Bilinear",
        description="Read every GLU layer of the TinyStories bilinear-s0 and sqs-s0 runs (same initialisation) as "
                    "quadratic forms for a few token directions: spectra, top tokens, fidelity, token-space "
                    "agreement with the sqs-s1 different-seed baseline. Trains missing or unfinished runs first "
                    "(unless --no-train); writes summary.md, summary.json and figures to --out.")
    add_lm_common(e)
    e.add_argument("--out", default="results/lm_spectra", help="report folder (default: %(default)s)")
    e.add_argument("--runs-dir", type=folder, default="runs", help=RUNS_HELP)
    e.add_argument("--no-train", action="store_true",
                   help="train nothing: analyse the finished runs, report unfinished ones as missing")
    e.add_argument("--directions", nargs="+", default=list(DEFAULT_TOKENS), metavar="TOKEN",
                   help="token directions (plus each layer's top-promoted token), default: "
                        + " ".join(repr(t) for t in DEFAULT_TOKENS))
    e.add_argument("--windows", type=positive_int, default=DEFAULT_WINDOWS,
                   help="validation windows analysed (half fit the gain reading, half are scored; default: %(default)s)")
    e.add_argument("--k", type=positive_int, default=10, help="eigenvectors per side compared (default: %(default)s)")
    e.set_defaults(func=_lm_spectra)
