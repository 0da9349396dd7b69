"""`sqs demo`: fetch MNIST, train Bilinear and SQS, decompose, write a report (`sqs.experiments.demo`)."""

from __future__ import annotations

from sqs.cli.args import add_set, folder, nonneg_int, positive_int


def _demo(args) -> int:
    from sqs.experiments.demo import run_demo

    run_demo(out=args.out, runs_dir=args.runs_dir, dataset=args.dataset, epochs=args.epochs, seed=args.seed,
             data_dir=args.data_dir, cache_dir=args.cache_dir, baselines=args.baselines,
             frontier_json=args.frontier, overrides=args.overrides)
    return 0


def register(sub, groups) -> None:
    p = sub.add_parser("demo", help="fetch MNIST, train Bilinear and SQS, decompose, write a report",
                       description="Fetch MNIST, train the paper's Sec. 4.1 model (embed -> 1 GLU layer -> head) "
                                   "with the Bilinear and the SQS gate, decompose both into per-class eigenvectors "
                                   "and write a self-contained report (report.html, report.md with PNGs).")
    p.add_argument("--out", default="report", help="report folder (default: report/)")
    p.add_argument("--runs-dir", type=folder, default="runs/demo",
                   help="runs folder: the two runs go to RUNS_DIR/sec41/<dataset>/<gate>[-<params>]-s<seed> (resumable)")
    p.add_argument("--dataset", default="mnist", choices=["mnist", "fashion-mnist"])
    p.add_argument("--epochs", type=positive_int, default=20, help="epochs per model (paper: 20)")
    p.add_argument("--seed", type=nonneg_int, default=0)
    add_set(p, "--set model.gate_kwargs.lam=0.1 (the SQS run; Bilinear takes no parameters)")
    p.add_argument("--data-dir", help="a folder of IDX files instead of fetching")
    p.add_argument("--baselines", action="store_true",
                   help="also train both gates from the same init on another data seed (agreement baselines)")
    p.add_argument("--frontier", default="results/frontier/frontier.json",
                   help="frontier report whose recommended setting is shown (default: %(default)s, if present)")
    p.add_argument("--cache-dir", help="cache root (default $SQS_CACHE_DIR or ~/.cache/sqs)")
    p.set_defaults(func=_demo)
