"""TinyStories (Eldan & Li, 2023; CDLA-Sharing-1.0): import, byte-level BPE tokenizer, token files.

Layout of the cache (root from :func:`sqs.data.cache.cache_dir`)::

    <cache>/tinystories/train.txt              stories joined with "\\n<|endoftext|>\\n"
    <cache>/tinystories/valid.txt              same, validation split
    <cache>/tinystories/import_report.json     counts, sha256 of both splits
    <cache>/tinystories/tokenizer-<V>.json     byte-level BPE, <|endoftext|> = id 0
    <cache>/tinystories/tokenizer-<V>.meta.json  the train-split sha256 it was trained on
    <cache>/tinystories/tokens-<split>-<key>.bin   uint16 token ids, EOT after every story
    <cache>/tinystories/tokens-<split>-<key>.json  tokens / bytes / stories / sha256 of that file
    <cache>/tinystories/download/              official files when fetched from the hub

The package never reads a shared data folder on its own: :func:`fetch` with ``src`` (the CLI's
``sqs data fetch tinystories --from DIR``) copies from a folder the user names, and without ``src``
it downloads the official ``TinyStories-train.txt`` / ``TinyStories-valid.txt`` from the Hugging
Face dataset repo ``roneneldan/TinyStories``.

Bits per byte: ``bpb = mean_loss_nats_per_token * tokens / bytes / ln 2`` with ``tokens`` and
``bytes`` from :func:`split_stats` (see :func:`bits_per_byte`). ``tokens`` counts one
``<|endoftext|>`` per story; ``bytes`` counts the UTF-8 bytes of the story texts only (no
separators), so the end-of-story predictions are charged to the story's bytes.

The modules, one job each: `layout` (cache paths, reading imported splits), `mojibake`,
`corpus` (import a folder), `remote` (download the official files), `tokenizer`, `token_cache`.
Their public names are importable from here.
"""

from sqs.data.tinystories.corpus import HOLDOUT_PER_10000, import_corpus
from sqs.data.tinystories.layout import (EOT, JOINER, SPLITS, TinyStoriesError, data_dir, iter_stories, sample_dir,
                                         verify_split)
from sqs.data.tinystories.mojibake import repair_mojibake
from sqs.data.tinystories.remote import OFFICIAL_SHA256, OFFICIAL_URLS, download, fetch
from sqs.data.tinystories.token_cache import bits_per_byte, encode_split, prepare, split_stats, verify_token_cache
from sqs.data.tinystories.tokenizer import (copy_tokenizer, ensure_tokenizer_copy, load_tokenizer, recorded_sha256,
                                            train_tokenizer, verify_tokenizer_file)

__all__ = [
    "TinyStoriesError",
    "EOT",
    "JOINER",
    "SPLITS",
    "HOLDOUT_PER_10000",
    "OFFICIAL_URLS",
    "OFFICIAL_SHA256",
    "import_corpus",
    "fetch",
    "download",
    "repair_mojibake",
    "iter_stories",
    "train_tokenizer",
    "load_tokenizer",
    "encode_split",
    "split_stats",
    "bits_per_byte",
    "prepare",
    "sample_dir",
    "data_dir",
    "verify_split",
    "verify_token_cache",
    "verify_tokenizer_file",
    "copy_tokenizer",
    "ensure_tokenizer_copy",
    "recorded_sha256",
]
