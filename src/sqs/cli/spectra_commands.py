"""`sqs spectra decompose|compare|explain|lm`: the weight-spectra analysis on your own runs."""

from __future__ import annotations

import functools
import sys

from sqs.cli.args import folder, nonneg_int, positive_int
from sqs.io import UserError


def _clean_errors(fn):
    """Report the analysis' refusals (gate, depth, bad index) and missing runs as one line, exit status 2."""

    @functools.wraps(fn)
    def wrapper(args):
        try:
            lines = fn(args)
        except (ValueError, FileNotFoundError, UserError) as e:
            print(f"sqs spectra: {e}", file=sys.stderr)
            return 2
        print("\n".join(lines))
        return 0
    return wrapper


def _decompose(args) -> list[str]:
    from sqs.experiments.weight_spectra import decompose_run

    return decompose_run(args.run_dir, out=args.out, dataset=args.dataset, data_dir=args.data_dir, force=args.force,
                         with_fidelity=not args.no_fidelity, n=args.n)[1]


def _compare(args) -> list[str]:
    from sqs.experiments.weight_spectra import compare_runs

    return compare_runs(args.run_dir_a, args.run_dir_b, out=args.out, force=args.force, fit=args.fit, k=args.k,
                        data_dir=args.data_dir)[1]


def _explain(args) -> list[str]:
    from sqs.experiments.weight_spectra import explain_run

    return explain_run(args.run_dir, args.index, out=args.out, dataset=args.dataset, data_dir=args.data_dir,
                       force=args.force, top=args.top)[1]


def _lm(args) -> list[str]:
    from sqs.experiments.lm_spectra import spectra_lm

    return spectra_lm(args.run_dir, args.layer, token=args.token, direction=args.direction, k=args.k, out=args.out,
                      cache_dir=args.cache_dir, windows=args.windows, force=args.force)[1]


def register(sub, groups) -> None:
    g = groups["spectra"]
    p = g.add_parser("decompose", help="eigendecompose one 1-layer run: figures + JSON",
                     description="Eigendecompose a 1-layer Bilinear (exact) or SQS (first-order reading) image "
                                 "classifier; write spectrum/eigenvector figures, spectra.json (with fidelity on the "
                                 "test set) and spectra.safetensors.")
    p.add_argument("run_dir", type=folder)
    p.add_argument("--out", help="output folder (default RUN_DIR/spectra)")
    p.add_argument("--force", action="store_true",
                   help="decompose relu/gelu/swiglu gates anyway (not a faithful reading)")
    p.add_argument("--dataset", help="override the dataset named in the run config")
    p.add_argument("--data-dir", help="folder of IDX files (default: the cache)")
    p.add_argument("--no-fidelity", action="store_true", help="skip the test-set fidelity metrics")
    p.add_argument("--n", type=positive_int, default=2, help="eigenvectors of each sign per class in the grid")
    p.set_defaults(func=_clean_errors(_decompose))

    p = g.add_parser("compare", help="two runs' eigenvectors compared through each one's most faithful reading",
                     description="Read two image runs of one dataset (any gate, any depth) with every reading (first-"
                                 "order, gain, affine; --fit adds the least-squares fit), each fitted on the training "
                                 "images and scored on the test images, and compare them through each one's most "
                                 "faithful reading, named: per rank and best one-to-one match on the positive and "
                                 "negative sides, subspace overlap, form cosine (A is the first run given).")
    p.add_argument("run_dir_a", type=folder)
    p.add_argument("run_dir_b", type=folder)
    p.add_argument("--out", help="output folder (default results/spectra/compare)")
    p.add_argument("--fit", action="store_true", help="also the least-squares fit reading (minutes per layer)")
    p.add_argument("--k", type=positive_int, default=10, help="ranks per side compared (default: %(default)s)")
    p.add_argument("--data-dir", help="folder of IDX files (default: the cache)")
    p.add_argument("--force", action="store_true", help="accepted for old scripts (every gate has a reading now)")
    p.set_defaults(func=_clean_errors(_compare))

    p = g.add_parser("explain", help="explain one test input by eigenvector contributions λ(q·x)²")
    p.add_argument("run_dir", type=folder)
    p.add_argument("--index", type=nonneg_int, required=True, help="index into the test split")
    p.add_argument("--top", type=positive_int, default=4)
    p.add_argument("--out", help="output folder (default RUN_DIR/spectra)")
    p.add_argument("--dataset")
    p.add_argument("--data-dir")
    p.add_argument("--force", action="store_true")
    p.set_defaults(func=_clean_errors(_explain))

    p = g.add_parser("lm", help="one GLU layer of a language-model run as a quadratic form over tokens",
                     description="For one token's output direction u at one GLU layer of a `sqs train lm` run: the "
                                 "signed spectrum of B_u (first-order reading), the tokens at both ends of its top "
                                 "eigenvectors per side and, for layer 0, the validation contexts that excite them "
                                 "most; writes a figure and JSON to --out.")
    p.add_argument("run_dir", type=folder)
    p.add_argument("--layer", type=nonneg_int, required=True, help="GLU layer, 0-based")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--token", help="one token of the run's tokenizer, e.g. ' happy' (mind the leading space)")
    which.add_argument("--direction", choices=["top-promoted"],
                       help="top-promoted: the token this layer promotes most on validation text")
    p.add_argument("--k", type=positive_int, default=3, help="eigenvectors per side (default: %(default)s)")
    p.add_argument("--out", help="output folder (default RUN_DIR/spectra)")
    p.add_argument("--windows", type=positive_int, default=16,
                   help="validation windows for the top-promoted token and layer-0 examples (default: %(default)s)")
    p.add_argument("--cache-dir", help="data cache holding the TinyStories validation split (default: the cache)")
    p.add_argument("--force", action="store_true", help="read relu/gelu/swiglu layers anyway (not faithful)")
    p.set_defaults(func=_clean_errors(_lm))
