"""The byte-level BPE tokenizer trained on the imported train split (cached, retrained when the corpus changes)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from sqs.data.tinystories.layout import (EOT, TinyStoriesError, count_stories, data_dir, iter_stories, sha256_file,
                                         split_sha256)
from sqs.io import atomic_write, write_json


def check_vocab(vocab_size: int) -> None:
    if not 257 <= int(vocab_size) <= 65535:
        raise ValueError(f"vocab_size must be in [257, 65535] (byte alphabet + EOT; uint16 token files), "
                         f"got {vocab_size}")


def tok_paths(cache_dir, vocab_size: int) -> tuple[Path, Path]:
    d = data_dir(cache_dir)
    return d / f"tokenizer-{vocab_size}.json", d / f"tokenizer-{vocab_size}.meta.json"


def train_tokenizer(cache_dir: str | os.PathLike | None = None, vocab_size: int = 4096,
                    progress: bool = False):
    """Byte-level BPE (``<|endoftext|>`` = id 0) trained on the train split; cached and reused.

    Saved as ``<cache>/tinystories/tokenizer-<vocab_size>.json``; the side file
    ``tokenizer-<vocab_size>.meta.json`` records the train-split sha256, and the tokenizer is
    retrained when the corpus changed. Returns a ``tokenizers.Tokenizer``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    check_vocab(vocab_size)
    train_sha = split_sha256("train", cache_dir)
    path, meta_path = tok_paths(cache_dir, vocab_size)
    if path.exists() and meta_path.exists():
        try:
            meta = json.loads(meta_path.read_text())
            if meta.get("train_sha256") == train_sha and meta.get("tokenizer_sha256") == sha256_file(path):
                return Tokenizer.from_file(str(path))
        except (OSError, ValueError):
            pass

    t0 = time.time()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=int(vocab_size), special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=progress)
    tok.train_from_iterator(iter_stories("train", cache_dir), trainer=trainer,
                            length=count_stories("train", cache_dir))
    if tok.token_to_id(EOT) != 0:
        raise RuntimeError(f"{EOT} did not get id 0")
    atomic_write(path, lambda p: tok.save(str(p)))
    import tokenizers

    write_json(meta_path, dict(vocab_size=int(vocab_size), actual_vocab_size=tok.get_vocab_size(),
                               train_sha256=train_sha, tokenizer_sha256=sha256_file(path),
                               tokenizers_version=tokenizers.__version__,
                               seconds=round(time.time() - t0, 2)))
    return tok


def load_tokenizer(cache_dir: str | os.PathLike | None = None, vocab_size: int = 4096):
    """The cached tokenizer (no training; raises :class:`TinyStoriesError` if it is missing)."""
    from tokenizers import Tokenizer

    check_vocab(vocab_size)
    path, _ = tok_paths(cache_dir, vocab_size)
    if not path.exists():
        raise TinyStoriesError(f"{path}: no tokenizer yet. To fix: `sqs data fetch tinystories --from DIR "
                               f"--vocab-size {vocab_size}` (Python: sqs.data.tinystories.prepare(vocab_size="
                               f"{vocab_size})).")
    return Tokenizer.from_file(str(path))
